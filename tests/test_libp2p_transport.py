"""LibP2PTransport on real py-libp2p hosts (127.0.0.1): hostile input, cancelled sends, the peer policy, sockets.

Hostile peers here are other transports' hosts writing raw bytes on the protocol's stream, as an attacker would.
Every check that a bad stream did no harm ends by showing that a good message from another peer still arrives.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2p.host import HostConfig
from p2p.libp2p_transport import LibP2PTransport
from swarmgrad.core.codec import FRAME_HEADER_SIZE, Schema, encode_frame_header
from swarmgrad.core.driver import Driver
from swarmgrad.core.errors import MessageTooLarge, PeerUnreachable, TransportClosed
from swarmgrad.core.machine import Action, Event, Notify, PeerDown, PeerId, PeerUp, Received
from swarmgrad.core.transport import Delivery

PROTO = "/swarmgrad/test/1.0.0"
MiB = 1024 * 1024
TIMEOUT_S = 60


class RecordingPolicy:
    """A `PeerPolicy` that refuses the peers in `refused` and queues every report for the test to await."""

    def __init__(self) -> None:
        self.refused: set[PeerId] = set()
        self._send, self.reports = trio.open_memory_channel[tuple[PeerId, str]](1000)

    def allows(self, peer: PeerId) -> bool:
        return peer not in self.refused

    def report(self, peer: PeerId, reason: str) -> None:
        self._send.send_nowait((peer, reason))


@asynccontextmanager
async def transports(
    tmp_path: Path, count: int, policy: RecordingPolicy | None = None, **config: object
) -> AsyncIterator[list[LibP2PTransport]]:
    """`count` transports; the first one gets `policy`."""
    async with AsyncExitStack() as stack:
        opened = []
        for i in range(count):
            host_config = HostConfig(key_path=tmp_path / f"peer{i}.key", **config)  # type: ignore[arg-type]
            opened.append(
                await stack.enter_async_context(LibP2PTransport.open(host_config, policy if i == 0 else None))
            )
        yield opened


async def raw_stream(attacker: LibP2PTransport, victim: LibP2PTransport, protocol: str = PROTO) -> INetStream:
    await attacker.connect(victim.listen_multiaddrs[0])
    return await attacker.host.new_stream(ID.from_base58(victim.local_peer), [TProtocol(protocol)])


async def truncations_counted(transport: LibP2PTransport, count: int) -> None:
    """Return once `transport` has counted `count` truncated frames (its handler runs apart from the test's sends):
    checked every 10 ms, failing the test after 10 s."""
    with trio.fail_after(10):
        while transport.statistics().get("truncated_frames", 0) < count:
            await trio.sleep(0.01)


async def assert_still_serves(
    victim: LibP2PTransport, inbox: trio.MemoryReceiveChannel[Delivery], good: LibP2PTransport
) -> None:
    await good.connect(victim.listen_multiaddrs[0])
    await good.send(victim.local_peer, PROTO, b"still here")
    delivery = await inbox.receive()
    assert (delivery.peer, delivery.payload) == (good.local_peer, b"still here")


@pytest.mark.parametrize(
    ("name", "garbage"),
    [
        ("random bytes", os.urandom(4096)),
        ("bad magic", b"XX" + encode_frame_header(5)[2:] + b"hello"),
        ("unknown version", b"SG\x09\x00" + struct.pack("<Q", 5) + b"hello"),
        ("unknown flags", b"SG\x01\x80" + struct.pack("<Q", 5) + b"hello"),
    ],
)
async def test_garbage_is_reported_and_the_host_keeps_serving(tmp_path: Path, name: str, garbage: bytes) -> None:
    policy = RecordingPolicy()
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 3, policy) as (victim, attacker, good):
            inbox = victim.listen(PROTO)
            stream = await raw_stream(attacker, victim)
            await stream.write(garbage)
            peer, reason = await policy.reports.receive()
            assert peer == attacker.local_peer
            assert "bad frame" in reason
            assert victim.statistics()["remote_errors"] == 1
            assert victim.statistics().get("messages_in", 0) == 0
            assert victim.statistics().get("handler_errors", 0) == 0
            await assert_still_serves(victim, inbox, good)
            await attacker.send(victim.local_peer, PROTO, b"attacker, well behaved now")
            assert (await inbox.receive()).payload == b"attacker, well behaved now"


async def test_a_truncated_frame_is_dropped_and_counted_but_not_reported(tmp_path: Path) -> None:
    policy = RecordingPolicy()
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 3, policy) as (victim, sender, good):
            inbox = victim.listen(PROTO)
            stream = await raw_stream(sender, victim)
            await stream.write(encode_frame_header(1000) + b"x" * 10 + encode_frame_header(5) + b"hello")
            await stream.close()
            await assert_still_serves(victim, inbox, good)
            await truncations_counted(victim, 1)
            assert victim.statistics().get("remote_errors", 0) == 0  # what honest cut sends leave: no offence
            with pytest.raises(trio.WouldBlock):
                policy.reports.receive_nowait()


async def test_a_frame_announcing_4_gib_is_refused_before_any_allocation(tmp_path: Path) -> None:
    policy = RecordingPolicy()
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 3, policy) as (victim, attacker, good):
            inbox = victim.listen(PROTO, max_message_bytes=MiB)
            stream = await raw_stream(attacker, victim)
            await stream.write(encode_frame_header(4 * 1024**3) + b"x" * 100)  # then it keeps the stream open
            peer, reason = await policy.reports.receive()
            assert peer == attacker.local_peer
            assert f"frame of {4 * 1024**3} bytes over the {MiB} limit" in reason
            await assert_still_serves(victim, inbox, good)
            policy.refused.add(attacker.local_peer)  # banning the peer stops the skipping and closes its connection
            with pytest.raises(PeerUnreachable):
                await attacker.send(victim.local_peer, PROTO, b"x")
                await attacker.send(victim.local_peer, PROTO, b"x")


async def test_an_oversized_frame_is_skipped_and_the_stream_stays_usable(tmp_path: Path) -> None:
    policy = RecordingPolicy()
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 2, policy) as (victim, sender):
            inbox = victim.listen(PROTO, max_message_bytes=1000)
            await sender.connect(victim.listen_multiaddrs[0])
            await sender.send(victim.local_peer, PROTO, bytes(3 * MiB))
            await sender.send(victim.local_peer, PROTO, b"next")
            assert (await inbox.receive()).payload == b"next"
            _, reason = await policy.reports.receive()
            assert "over the 1000 limit" in reason
            assert victim.statistics()["skipped_bytes"] == 3 * MiB
            assert sender.statistics().get("stream_retries", 0) == 0


@dataclasses.dataclass(frozen=True)
class Hello:
    n: int


@dataclasses.dataclass(frozen=True)
class Unknown:
    text: str


class Recorder:
    """A machine that notifies every message it receives."""

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Received):
            return [Notify((event.peer, event.msg))]
        return []


async def test_a_valid_frame_of_an_unknown_message_type_reaches_the_drivers_error_path(tmp_path: Path) -> None:
    schema = Schema("test", {1: Hello})
    errors_send, errors = trio.open_memory_channel[tuple[PeerId, str]](10)
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 3) as (victim, attacker, good), trio.open_nursery() as nursery:
            driver = Driver(
                Recorder(), victim, PROTO, schema, on_peer_error=lambda p, r: errors_send.send_nowait((p, r))
            )
            await nursery.start(driver.run)
            await attacker.connect(victim.listen_multiaddrs[0])
            await attacker.send(victim.local_peer, PROTO, Schema("other", {7: Unknown}).encode(Unknown("boo")))
            peer, reason = await errors.receive()
            assert peer == attacker.local_peer and "unknown message tag 7" in reason
            assert driver.statistics()["remote_errors"] == 1
            await good.connect(victim.listen_multiaddrs[0])
            await good.send(victim.local_peer, PROTO, schema.encode(Hello(5)))
            assert await driver.notifications.receive() == (good.local_peer, Hello(5))
            assert victim.statistics().get("handler_errors", 0) == 0
            nursery.cancel_scope.cancel()


async def test_a_send_cancelled_mid_frame_resets_its_stream_and_the_next_send_works(tmp_path: Path) -> None:
    policy = RecordingPolicy()
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 2, policy) as (receiver, sender):
            inbox = receiver.listen(PROTO, max_message_bytes=64 * MiB)
            await sender.connect(receiver.listen_multiaddrs[0])
            await sender.send(receiver.local_peer, PROTO, b"first")
            assert (await inbox.receive()).payload == b"first"
            # 48 MiB take about a second on loopback (Noise runs at ~50 MB/s): 0.2 s lands well inside the frame.
            with trio.move_on_after(0.2) as scope:
                await sender.send(receiver.local_peer, PROTO, bytes(48 * MiB))
            assert scope.cancelled_caught
            await sender.send(receiver.local_peer, PROTO, b"after")
            delivery = await inbox.receive()
            assert delivery.payload == b"after", "the half-sent frame was dropped, the next one arrives whole"
            await truncations_counted(receiver, 1)
            with pytest.raises(trio.WouldBlock):  # an honest sender's cut frame is no offence
                policy.reports.receive_nowait()


async def test_a_refused_peer_cannot_connect_or_send(tmp_path: Path) -> None:
    policy = RecordingPolicy()
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 3, policy) as (guarded, refused, good):
            inbox = guarded.listen(PROTO)
            events = refused.peer_events()
            policy.refused.add(refused.local_peer)
            with pytest.raises(PeerUnreachable, match="refused by the peer policy"):
                await guarded.connect(refused.listen_multiaddrs[0])
            with pytest.raises(PeerUnreachable, match="refused by the peer policy"):
                await guarded.send(refused.local_peer, PROTO, b"x")
            await refused.connect(guarded.listen_multiaddrs[0])
            assert await events.receive() == PeerUp(guarded.local_peer)
            assert await events.receive() == PeerDown(guarded.local_peer), "the guarded side closed the connection"
            assert refused.local_peer not in guarded.connected_peers()
            await assert_still_serves(guarded, inbox, good)
            assert guarded.statistics()["refused_connections"] >= 1


async def test_connect_errors_name_the_address(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 2, connect_timeout_s=5) as (a, b):
            with pytest.raises(PeerUnreachable, match="not-an-address"):
                await a.connect("not-an-address")
            with pytest.raises(PeerUnreachable, match="/p2p/"):
                await a.connect("/ip4/127.0.0.1/tcp/1")  # no peer id
            dead = b.listen_multiaddrs[0].replace(b.listen_multiaddrs[0].split("/")[4], "1", 1)
            with pytest.raises(PeerUnreachable, match=r"/ip4/127\.0\.0\.1/tcp/1/p2p/"):
                await a.connect(dead)
            with pytest.raises(PeerUnreachable, match="this peer itself"):
                await a.connect(a.listen_multiaddrs[0])
            with pytest.raises(MessageTooLarge):
                await a.send(b.local_peer, PROTO, bytes(HostConfig(tmp_path / "x").max_message_bytes + 1))
            await a.aclose()
            with pytest.raises(TransportClosed):
                await a.connect(b.listen_multiaddrs[0])


async def test_frame_headers_are_read_whole_even_when_split(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 2) as (victim, sender):
            inbox = victim.listen(PROTO)
            stream = await raw_stream(sender, victim)
            frame = encode_frame_header(5) + b"hello"
            for i in range(len(frame)):
                await stream.write(frame[i : i + 1])
            assert (await inbox.receive()).payload == b"hello"
            assert FRAME_HEADER_SIZE == 12


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_closing_ten_hosts_leaves_no_file_descriptor_behind(tmp_path: Path) -> None:
    async def exchange(count: int) -> None:
        async with transports(tmp_path, count) as peers:
            inboxes = [peer.listen(PROTO) for peer in peers]
            for i, peer in enumerate(peers):
                nxt = peers[(i + 1) % count]
                await peer.connect(nxt.listen_multiaddrs[0])
                await peer.send(nxt.local_peer, PROTO, b"ring")
            for inbox in inboxes:
                assert (await inbox.receive()).payload == b"ring"

    with trio.fail_after(TIMEOUT_S):
        await exchange(2)  # imports and lazily created process-wide resources settle before counting
        before = open_fds()
        await exchange(10)
        after = open_fds()
    assert after - before == set(), (
        f"leaked descriptors: {[os.readlink(f'/proc/self/fd/{fd}') for fd in after - before]}"
    )


async def test_a_private_network_admits_only_holders_of_its_key(tmp_path: Path) -> None:
    psk = bytes(range(32))
    with trio.fail_after(TIMEOUT_S):
        async with (
            transports(tmp_path / "member", 2, psk=psk) as (a, b),
            transports(tmp_path / "outsider", 1, psk=bytes(32), connect_timeout_s=2) as (outsider,),
        ):
            inbox = b.listen(PROTO)
            await a.connect(b.listen_multiaddrs[0])
            await a.send(b.local_peer, PROTO, b"members only")
            assert (await inbox.receive()).payload == b"members only"
            with pytest.raises(PeerUnreachable, match="cannot connect"):
                await outsider.connect(b.listen_multiaddrs[0])
            assert outsider.local_peer not in b.connected_peers()


async def test_the_in_flight_budget_holds_a_peer_back_without_losing_anything(tmp_path: Path) -> None:
    """With room for one 1 MiB frame per peer, two protocols' streams from one peer take turns."""
    other = "/swarmgrad/test-other/1.0.0"
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 2, max_message_bytes=MiB, max_in_flight_bytes_per_peer=MiB) as (rx, tx):
            inboxes = {PROTO: rx.listen(PROTO, max_message_bytes=MiB), other: rx.listen(other, max_message_bytes=MiB)}
            await tx.connect(rx.listen_multiaddrs[0])

            async def send_five(protocol: str) -> None:
                for i in range(5):
                    await tx.send(rx.local_peer, protocol, bytes([i]) * MiB)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_five, PROTO)
                nursery.start_soon(send_five, other)
                for protocol, inbox in inboxes.items():
                    got = [await inbox.receive() for _ in range(5)]
                    assert [d.payload == bytes([i]) * MiB for i, d in enumerate(got)] == [True] * 5, protocol
            assert rx.statistics().get("remote_errors", 0) == 0


async def test_closing_fails_queued_sends_with_transport_closed(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 2) as (a, b):
            b.listen(PROTO, max_message_bytes=64 * MiB)
            await a.connect(b.listen_multiaddrs[0])
            outcomes: list[str] = []

            async def send_big() -> None:
                try:
                    await a.send(b.local_peer, PROTO, bytes(48 * MiB))
                    outcomes.append("sent")
                except TransportClosed:
                    outcomes.append("closed")

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(send_big)
                await trio.lowlevel.checkpoint()  # the three sends are queued; the first may be on the wire
                await a.aclose()
            assert outcomes.count("closed") >= 2, outcomes


async def test_an_unexpected_error_while_sending_fails_that_send_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with transports(tmp_path, 2) as (a, b):
            inbox = b.listen(PROTO)
            await a.connect(b.listen_multiaddrs[0])
            real_new_stream = a.host.new_stream
            calls = 0

            async def flaky_new_stream(peer_id: ID, protocols: list[TProtocol]) -> INetStream:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("a bug py-libp2p might have")
                return await real_new_stream(peer_id, protocols)

            monkeypatch.setattr(a.host, "new_stream", flaky_new_stream)
            with pytest.raises(PeerUnreachable, match="a bug py-libp2p might have"):
                await a.send(b.local_peer, PROTO, b"lost")
            assert a.statistics()["writer_errors"] == 1
            await a.send(b.local_peer, PROTO, b"delivered")
            assert (await inbox.receive()).payload == b"delivered"
