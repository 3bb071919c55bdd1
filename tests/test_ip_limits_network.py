"""Per-IP limits on real py-libp2p hosts on 127.0.0.1 (issue 11, item 8: identity churn in a public swarm).

A client that makes a fresh identity for each attack (one oversized frame each) gets its IP banned after a few
identities, and one that only cycles identities is throttled by the new-identities rate; each ban is logged once
with the IP, the reason and the duration. Honest peers behind one IP (four nodes on 127.0.0.1, as in the demo) are
not throttled by the default limits, nor banned for frames their cut sends leave truncated.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from p2p.discovery import DiscoveryConfig
from p2p.host import HostConfig
from p2p.libp2p_transport import LibP2PTransport
from p2p.limits import IpLimitsConfig
from p2p.node import NodeConfig, SwarmNode, open_node
from swarmgrad.core.codec import encode_frame_header
from swarmgrad.core.errors import TransportError

ECHO = "/swarmgrad-test/echo/1.0.0"
LOCAL = "127.0.0.1"
MAX_ATTEMPTS = 12


def config(tmp: Path, name: str, bootstrap: tuple[str, ...] = (), **limits: float) -> NodeConfig:
    return NodeConfig(
        host=HostConfig(key_path=tmp / name / "identity.key"),
        discovery=DiscoveryConfig(swarm_id="public", bootstrap_addrs=bootstrap),
        ip_limits=IpLimitsConfig(**limits),  # type: ignore[arg-type]
    )


def ip_ban_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "p2p.node" and "banned IP" in r.getMessage()]


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Return once `predicate()` holds: checked every 20 ms, at most `timeout_s` (then `trio.TooSlowError`)."""
    with trio.fail_after(timeout_s):
        for _ in range(int(timeout_s / 0.02) + 1):
            if predicate():
                return
            await trio.sleep(0.02)


async def admitted(node: SwarmNode, transport: LibP2PTransport, addr: str) -> bool:
    """Connect `transport` (a fresh identity) to `node`: whether the node admitted the connection or closed it."""
    before = node.statistics()

    def decided() -> bool:
        stats = node.statistics()
        return any(stats.get(k, 0) > before.get(k, 0) for k in ("node.connections_opened", "node.connections_refused"))

    try:
        await transport.connect(addr)
    except TransportError:
        return False
    await wait_until(decided)
    return node.statistics().get("node.connections_opened", 0) > before.get("node.connections_opened", 0)


async def test_fresh_identity_per_attack_gets_the_ip_banned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2p.node")
    with trio.fail_after(120):
        async with open_node(config(tmp_path, "a")) as a, trio.open_nursery() as nursery:
            a_transport = LibP2PTransport(a.host, a.config.host, a.policy, nursery)
            a_transport.listen(ECHO, max_message_bytes=1024)
            addr = a.listen_multiaddrs[0]
            offenders = 0
            for i in range(MAX_ATTEMPTS):  # each identity sends one oversized frame: one scored error, no peer ban
                if LOCAL in a.ip_limits.banned_ips(trio.current_time()):
                    break
                async with LibP2PTransport.open(HostConfig(key_path=tmp_path / f"evil{i}" / "id.key")) as evil:
                    await evil.connect(addr)
                    try:
                        await evil.send(a.peer_id, ECHO, b"x" * 4096)
                    except TransportError:
                        pass  # cut off: fine, the frame was counted or refused
                    # the offence is reported as soon as the frame header is read
                    await wait_until(lambda seen=offenders: a_transport.statistics().get("remote_errors", 0) > seen)
                    offenders += 1
            assert a.ip_limits.banned_ips(trio.current_time()) == [LOCAL]
            assert offenders == IpLimitsConfig().max_offending_identities_per_minute + 1
            assert a.policy.banned_peers() == []  # no identity erred often enough for a peer ban
            # a further fresh identity from the banned IP is refused on arrival
            async with LibP2PTransport.open(HostConfig(key_path=tmp_path / "late" / "id.key")) as late:
                assert not await admitted(a, late, addr)
            (line,) = ip_ban_lines(caplog)
            assert LOCAL in line and "identities caused errors" in line and "600 s" in line
            await a_transport.aclose()
            nursery.cancel_scope.cancel()


async def test_one_ip_cycling_identities_is_throttled_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2p.node")
    with trio.fail_after(120):
        async with open_node(config(tmp_path, "a", max_new_identities_per_minute=4, ip_ban_duration_s=90.0)) as a:
            addr = a.listen_multiaddrs[0]
            results = []
            for i in range(MAX_ATTEMPTS):
                async with LibP2PTransport.open(HostConfig(key_path=tmp_path / f"churn{i}" / "id.key")) as churn:
                    results.append(await admitted(a, churn, addr))
                if not results[-1]:
                    break
            assert results == [True] * 4 + [False]
            async with LibP2PTransport.open(HostConfig(key_path=tmp_path / "late" / "id.key")) as late:
                assert not await admitted(a, late, addr)
            (line,) = ip_ban_lines(caplog)
            assert LOCAL in line and "more than 4 new identities within 60 s" in line and "90 s" in line
            assert a.statistics()["ip_limits.ip_bans"] == 1


async def test_honest_peers_behind_one_ip_are_not_throttled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p2p.node")
    with trio.fail_after(120):
        async with open_node(config(tmp_path, "p0")) as first:
            addr = first.listen_multiaddrs[0]
            async with (
                open_node(config(tmp_path, "p1", (addr,))) as p1,
                open_node(config(tmp_path, "p2", (addr,))) as p2,
                open_node(config(tmp_path, "p3", (addr,))) as p3,
            ):
                nodes: list[SwarmNode] = [first, p1, p2, p3]
                for node in nodes:
                    await node.wait_for_peers(3)
                for node in nodes:
                    stats = node.statistics()
                    assert node.ip_limits.banned_ips(trio.current_time()) == []
                    assert stats.get("node.connections_refused", 0) == 0
                    assert stats.get("ip_limits.ip_bans", 0) == 0
                assert ip_ban_lines(caplog) == []


async def test_honest_peers_whose_frames_are_cut_do_not_get_their_ip_banned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A send cut at its round deadline, or by a connection dropped after failed pings, leaves a truncated frame at
    # the receiver. Charged as an offence, four such honest peers on 127.0.0.1 got the IP banned for 10 minutes in
    # a chaos run (tests/test_chaos.py); now a truncated frame is counted, not reported.
    caplog.set_level(logging.INFO, logger="p2p.node")
    identities = IpLimitsConfig().max_offending_identities_per_minute + 1
    with trio.fail_after(120):
        async with open_node(config(tmp_path, "a")) as a, trio.open_nursery() as nursery:
            a_transport = LibP2PTransport(a.host, a.config.host, a.policy, nursery, ip_limits=a.ip_limits)
            inbox = a_transport.listen(ECHO, max_message_bytes=1024)
            for i in range(identities):
                async with LibP2PTransport.open(HostConfig(key_path=tmp_path / f"cut{i}" / "id.key")) as honest:
                    await honest.connect(a.listen_multiaddrs[0])
                    stream = await honest.host.new_stream(ID.from_base58(a.peer_id), [TProtocol(ECHO)])
                    await stream.write(encode_frame_header(500) + b"x" * 10)  # then the stream ends mid-frame
                    await stream.close()
                    await wait_until(lambda done=i: a_transport.statistics().get("truncated_frames", 0) > done)
                    await honest.send(a.peer_id, ECHO, b"still welcome")
                    assert (await inbox.receive()).payload == b"still welcome"
            assert a.ip_limits.banned_ips(trio.current_time()) == []
            assert a.policy.banned_peers() == []
            assert a_transport.statistics().get("remote_errors", 0) == 0
            assert ip_ban_lines(caplog) == []
            await a_transport.aclose()
            nursery.cancel_scope.cancel()


async def reset_by_peer(stream: INetStream) -> bool:
    """Read until the stream ends: True when it ends (closed or reset by the other side)."""
    for _ in range(16):  # the receiver sends nothing on these streams: the first read ends them
        try:
            if not await stream.read(1024):
                return True
        except StreamError:
            return True
    return False


async def test_idle_and_half_open_streams_are_reset_and_streams_per_ip_are_capped(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with (
            open_node(config(tmp_path, "a", max_inbound_streams_per_ip=3)) as a,
            trio.open_nursery() as nursery,
        ):
            server_config = dataclasses.replace(a.config.host, stream_idle_timeout_s=1.0)
            a_transport = LibP2PTransport(a.host, server_config, a.policy, nursery, ip_limits=a.ip_limits)
            inbox = a_transport.listen(ECHO, max_message_bytes=1024)
            async with LibP2PTransport.open(HostConfig(key_path=tmp_path / "client" / "id.key")) as client:
                await client.connect(a.listen_multiaddrs[0])
                target = ID.from_base58(a.peer_id)
                idle = await client.host.new_stream(target, [TProtocol(ECHO)])
                half = await client.host.new_stream(target, [TProtocol(ECHO)])
                await half.write(encode_frame_header(100)[:5])  # half a header, then silence
                await client.send(a.peer_id, ECHO, b"hello")  # its own stream: the IP's third
                assert (await inbox.receive()).payload == b"hello"
                await wait_until(lambda: a.ip_limits.statistics()["inbound_streams"] == 3)
                try:  # over the cap: reset on arrival, which may be before the client has read the protocol's ack
                    fourth = await client.host.new_stream(target, [TProtocol(ECHO)])
                except StreamFailure:
                    pass
                else:
                    assert await reset_by_peer(fourth)
                assert a.ip_limits.statistics()["refused_streams_per_ip"] == 1
                # the silent streams are reset after stream_idle_timeout_s; the sending one is too, once idle
                assert await reset_by_peer(idle) and await reset_by_peer(half)
                await wait_until(lambda: a_transport.statistics().get("idle_streams", 0) >= 3)
                assert a.ip_limits.statistics()["inbound_streams"] <= 1
                # a new send opens a fresh stream and is delivered
                await client.send(a.peer_id, ECHO, b"again")
                assert (await inbox.receive()).payload == b"again"
            await a_transport.aclose()
            nursery.cancel_scope.cancel()
