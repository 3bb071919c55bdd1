"""One conformance suite for every `Transport` implementation (see `tests/transport_harness.py`)."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from swarmgrad.core.errors import MessageTooLarge, PeerUnreachable, TransportClosed
from swarmgrad.core.machine import PeerDown, PeerUp
from swarmgrad.core.transport import Transport
from tests.transport_harness import HARNESSES, Harness

PROTO = "/swarmgrad/conformance/1.0.0"
MiB = 1024 * 1024
TIMEOUT_S = 60


@pytest.fixture(params=HARNESSES, ids=lambda h: h.name)
def harness(request: pytest.FixtureRequest) -> Harness:
    return request.param  # type: ignore[no-any-return]


async def _connect(harness: Harness, a: Transport, b: Transport) -> None:
    assert await a.connect(harness.address(b)) == b.local_peer


async def test_ordering_per_link(harness: Harness) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with harness.open(3, 64 * MiB) as (a, b, c):
            inbox = c.listen(PROTO)
            await _connect(harness, a, c)
            await _connect(harness, b, c)

            async def send_many(src: Transport, count: int) -> None:
                for i in range(count):
                    await src.send(c.local_peer, PROTO, src.local_peer.encode() + b":" + str(i).encode())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_many, a, 30)
                nursery.start_soon(send_many, b, 30)
            seen: dict[str, list[int]] = {a.local_peer: [], b.local_peer: []}
            for _ in range(60):
                delivery = await inbox.receive()
                sender, _, index = delivery.payload.partition(b":")
                assert sender.decode() == delivery.peer, "the delivery names its real sender"
                seen[delivery.peer].append(int(index))
            assert seen == {a.local_peer: list(range(30)), b.local_peer: list(range(30))}


async def test_large_payload_round_trip_is_intact(harness: Harness) -> None:
    payload = os.urandom(50 * MiB + 123)
    with trio.fail_after(TIMEOUT_S):
        async with harness.open(2, 64 * MiB) as (a, b):
            inbox = b.listen(PROTO, max_message_bytes=64 * MiB)
            await _connect(harness, a, b)
            await a.send(b.local_peer, PROTO, payload)
            delivery = await inbox.receive()
            assert delivery.peer == a.local_peer
            assert len(delivery.payload) == len(payload)
            assert hashlib.sha256(delivery.payload).digest() == hashlib.sha256(payload).digest()


async def test_size_limits_are_enforced(harness: Harness) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with harness.open(2, 1 * MiB) as (a, b):
            inbox = b.listen(PROTO, max_message_bytes=1000)
            await _connect(harness, a, b)
            with pytest.raises(MessageTooLarge):
                await a.send(b.local_peer, PROTO, bytes(MiB + 1))
            await a.send(b.local_peer, PROTO, bytes(1001))  # over the receiver's limit: refused there
            await a.send(b.local_peer, PROTO, b"small")  # the link still works
            delivery = await inbox.receive()
            assert delivery.payload == b"small"
            assert b.statistics().get("remote_errors", 0) >= 1


async def test_close_semantics(harness: Harness) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with harness.open(2, MiB) as (a, b):
            inbox = b.listen(PROTO)
            await _connect(harness, a, b)
            await b.aclose()
            await b.aclose()  # idempotent
            with pytest.raises(TransportClosed):
                await b.send(a.local_peer, PROTO, b"x")
            async for _ in inbox:  # the listener's channel ends
                raise AssertionError("nothing was sent")
            with pytest.raises(PeerUnreachable):
                await a.send(b.local_peer, PROTO, b"x")
                await a.send(b.local_peer, PROTO, b"x")  # a stream may take one write to notice
            assert b.local_peer not in a.connected_peers()


async def test_peer_up_and_down_are_reported(harness: Harness) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with harness.open(2, MiB) as (a, b):
            events = a.peer_events()
            await _connect(harness, a, b)
            assert await events.receive() == PeerUp(b.local_peer)
            assert a.connected_peers() == [b.local_peer]
            await b.aclose()
            assert await events.receive() == PeerDown(b.local_peer)
            assert a.connected_peers() == []
