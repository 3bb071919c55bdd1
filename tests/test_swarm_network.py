"""Private and public swarms on real py-libp2p hosts in one process, on 127.0.0.1.

Private: two peers with the same swarm key connect; a peer with another key and a peer without a key are refused
within the bounded handshake (py-libp2p alone takes ~30-40 s), with a log line that says why. Public: a hostile peer
that sends oversized frames is banned and cut off, a flood of connections beyond the inbound cap is refused, and an
honest peer keeps its service throughout.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from p2p.discovery import BootstrapFailed, DiscoveryConfig
from p2p.host import HostConfig
from p2p.libp2p_transport import LibP2PTransport
from p2p.node import NodeConfig, SwarmNode, open_node
from p2p.swarm import ScoringConfig
from swarmgrad.core.errors import TransportError
from swarmgrad.core.machine import PeerDown

if TYPE_CHECKING:  # libp2p installs trio-typing, whose stale `trio-stubs` hide trio's own `TaskStatus` from mypy
    from trio_typing import TaskStatus

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ECHO = "/swarmgrad-test/echo/1.0.0"
GIVE_UP_CEILING_S = 25.0  # a refused node gives up under one py-libp2p handshake timeout (30-40 s), loaded or not
EVENT_CEILING_S = 180.0  # on a whole scenario's waits for events: a hang fails, slowness does not


def config(tmp: Path, name: str, psk: bytes | None, bootstrap: tuple[str, ...] = (), **scoring: float) -> NodeConfig:
    return NodeConfig(
        host=HostConfig(key_path=tmp / name / "identity.key", psk=psk),
        discovery=DiscoveryConfig(swarm_id="private", bootstrap_addrs=bootstrap),
        scoring=ScoringConfig(**scoring),  # type: ignore[arg-type]
    )


async def wait_live(node: SwarmNode, peer: str) -> None:
    events = node.subscribe()
    while peer not in node.live_peers():
        await events.receive()


async def test_private_swarm_admits_only_holders_of_the_key_and_refuses_others_quickly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="p2p.discovery")
    with trio.fail_after(EVENT_CEILING_S):
        async with open_node(config(tmp_path, "a", KEY)) as a:
            addr = a.listen_multiaddrs[0]
            async with open_node(config(tmp_path, "b", KEY, (addr,))) as b:
                await wait_live(b, a.peer_id)
                await wait_live(a, b.peer_id)
                for name, psk in (("wrong-key", OTHER_KEY), ("no-key", None)):
                    caplog.clear()
                    started = time.time()
                    with pytest.RaisesGroup(
                        pytest.RaisesExc(BootstrapFailed, match="wrong or missing swarm key"), flatten_subgroups=True
                    ):
                        async with open_node(config(tmp_path, name, psk, (addr,))):
                            pytest.fail(f"{name} must not join")
                    # each handshake is cut at 1.5 s and logged (py-libp2p alone takes ~30-40 s); the node gives up
                    # after its bootstrap attempts, well before one py-libp2p timeout even on a loaded box
                    first_refusal = next(r for r in caplog.records if r.name == "p2p.discovery")
                    assert "TCP connected, but the handshake" in first_refusal.getMessage()
                    assert "wrong or missing swarm key" in first_refusal.getMessage()
                    assert time.time() - started < GIVE_UP_CEILING_S, name
                assert a.live_peers() == [b.peer_id]


async def test_hostile_peer_is_banned_and_an_honest_peer_keeps_its_service(tmp_path: Path) -> None:
    with trio.fail_after(EVENT_CEILING_S):
        async with (
            open_node(config(tmp_path, "a", None, ban_threshold=2.5, max_inbound_connections=4)) as a,
            trio.open_nursery() as nursery,
        ):
            a_transport = LibP2PTransport(a.host, a.config.host, a.policy, nursery)
            inbox = a_transport.listen(ECHO, max_message_bytes=1024)
            addr = a.listen_multiaddrs[0]
            async with open_node(config(tmp_path, "honest", None, (addr,))) as honest:
                honest_transport = LibP2PTransport(honest.host, honest.config.host, honest.policy, nursery)
                await wait_live(a, honest.peer_id)
                await honest_transport.send(a.peer_id, ECHO, b"hello")
                assert (await inbox.receive()).payload == b"hello"

                # a stranger sends frames over the limit until it is banned and cut off
                async with LibP2PTransport.open(HostConfig(key_path=tmp_path / "evil" / "identity.key")) as evil:
                    evil_events = evil.peer_events()
                    await evil.connect(addr)
                    for _ in range(3):
                        try:
                            await evil.send(a.peer_id, ECHO, b"x" * 4096)
                        except TransportError:
                            break  # already cut off
                    async for event in evil_events:  # a closes the connection once the ban is in place
                        if isinstance(event, PeerDown) and event.peer == a.peer_id:
                            break
                    assert a.policy.banned_peers() == [evil.local_peer]
                    assert a_transport.statistics()["remote_errors"] >= 3
                    assert not a.host.get_network().get_connections(evil.host.get_id())
                    assert evil.local_peer not in a.live_peers()

                # a flood of connections from fresh identities: beyond the inbound cap they are closed on arrival
                flood = []
                async with trio.open_nursery() as flood_nursery:
                    for i in range(5):
                        transport = await flood_nursery.start(_open_flooder, tmp_path / f"flood{i}", addr)
                        flood.append(transport)
                    assert a.policy.statistics()["refused_inbound_cap"] >= 2
                    # the honest peer was admitted first and keeps its service
                    await honest_transport.send(a.peer_id, ECHO, b"still here")
                    assert (await inbox.receive()).payload == b"still here"
                    assert honest.peer_id in a.live_peers()
                    flood_nursery.cancel_scope.cancel()
            await a_transport.aclose()
            nursery.cancel_scope.cancel()


async def _open_flooder(path: Path, addr: str, *, task_status: TaskStatus[LibP2PTransport]) -> None:
    async with LibP2PTransport.open(HostConfig(key_path=path / "identity.key")) as transport:
        with trio.move_on_after(5):
            await transport.connect(addr)
        task_status.started(transport)
        await trio.sleep_forever()
