"""Circuit relays on real py-libp2p hosts in one process, on 127.0.0.1, in a private swarm (pnet on every leg).

A public node relays under small limits (3 reservations, 2 circuits per peer); two private nodes find it through the
DHT, reserve on it, advertise only their circuit addresses and become live members of each other through it. A bare
host takes the last reservation; the next is refused with the spec's RESOURCE_LIMIT_EXCEEDED; circuits to that host
beyond its limit are refused (py-libp2p answers NO_RESERVATION there) while a client keeps opening them in a loop;
and through it all the relay stays up: a reservation is renewed, a
freed circuit slot is given out again (the client dials in a loop until it gets it, for at most FREE_SLOT_S: within
a second, after a few to 54 refusals, on the loaded 2-core machine), the other private peer is still reached.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio
from libp2p.abc import IHost
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

from p2p.addrs import parse_peer_addr
from p2p.discovery import DiscoveryConfig, bounded_connect
from p2p.host import HostConfig, running_host
from p2p.node import NodeConfig, SwarmNode, open_node
from p2p.relay import RelayAddrsChanged, RelayServiceConfig
from p2p.relay_host import RelayHost, reserve_slot

KEY = bytes(range(32))
EVENT_CEILING_S = 180.0  # on the whole scenario: a hang fails, slowness on a loaded machine does not
LIMITS = RelayServiceConfig(max_reservations=3, max_circuits_per_peer=2)
LOOP_ATTEMPTS = 8
FREE_SLOT_S = 30.0


def node_config(tmp: Path, name: str, reachability: str, bootstrap: tuple[str, ...] = ()) -> NodeConfig:
    return NodeConfig(
        host=HostConfig(key_path=tmp / name / "identity.key", psk=KEY),
        discovery=DiscoveryConfig(swarm_id="relays", bootstrap_addrs=bootstrap),
        reachability=reachability,  # type: ignore[arg-type]
        relay=LIMITS,
    )


async def relayed_addrs(node: SwarmNode) -> tuple[str, ...]:
    """Wait for `node`'s first circuit addresses."""
    events = node.subscribe()
    async for event in events:
        if isinstance(event, RelayAddrsChanged) and event.addrs:
            return event.addrs
    raise AssertionError("the node stopped")


@asynccontextmanager
async def client(tmp: Path, name: str) -> AsyncIterator[tuple[IHost, RelayHost]]:
    """A bare host of the swarm (no discovery, no membership) that can dial circuits."""
    config = HostConfig(key_path=tmp / name / "identity.key", psk=KEY)
    async with running_host(config) as host, trio.open_nursery() as nursery:
        relay_host = RelayHost(host, LIMITS, config)
        await nursery.start(relay_host.run)
        yield host, relay_host
        nursery.cancel_scope.cancel()


async def test_a_relay_serves_private_peers_within_its_limits_and_stays_up_under_a_circuit_loop(
    tmp_path: Path,
) -> None:
    with trio.fail_after(EVENT_CEILING_S):
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(open_node(node_config(tmp_path, "relay", "public")))
            boot = (relay.listen_multiaddrs[0],)
            started = time.monotonic()
            a = await stack.enter_async_context(open_node(node_config(tmp_path, "a", "private", boot)))
            b = await stack.enter_async_context(open_node(node_config(tmp_path, "b", "private", boot)))
            a_addrs, b_addrs = await relayed_addrs(a), await relayed_addrs(b)
            print(f"both private peers reserved {time.monotonic() - started:.2f} s after the first started")
            for node, addrs in ((a, a_addrs), (b, b_addrs)):
                assert all(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{node.peer_id}" in addr for addr in addrs), addrs
                assert node.relay_client.reserved_relays() == [relay.peer_id]
                assert node.listen_multiaddrs == []  # a private peer advertises no address of its own
            await wait_live(a, b.peer_id)  # the two private peers meet through the relay
            assert a.is_relayed(b.peer_id)
            relay_info = parse_peer_addr("relay", boot[0])

            # a bare host takes the last reservation; one more is beyond the relay's limit
            target_host, _ = await stack.enter_async_context(client(tmp_path, "target"))
            late_host, _ = await stack.enter_async_context(client(tmp_path, "late"))
            for host in (target_host, late_host):
                assert await bounded_connect(host, relay_info, a.config.host) is None
            assert (await reserve_slot(target_host, relay_info.peer_id, 10.0))[0] == StatusCode.OK
            status, _ = await reserve_slot(late_host, relay_info.peer_id, 10.0)
            assert status == StatusCode.RESOURCE_LIMIT_EXCEEDED
            target = target_host.get_id().to_base58()
            target_addr = f"{boot[0]}/p2p-circuit/p2p/{target}"

            # two circuits to the target are within its limit, a third is not, however often it is tried
            clients = [await stack.enter_async_context(client(tmp_path, f"c{i}")) for i in range(3)]
            for _host, relay_host in clients[:2]:
                assert (reason := await relay_host.dial(target, target_addr)) is None, reason
            loop_started = time.monotonic()
            third = clients[2][1]
            for _ in range(LOOP_ATTEMPTS):
                reason = await third.dial(target, target_addr)
                assert reason is not None and f"status {int(StatusCode.NO_RESERVATION)}" in reason, reason
            loop_s = time.monotonic() - loop_started
            print(f"{LOOP_ATTEMPTS} refused circuits in {loop_s:.2f} s")

            # the relay is still up: it renews a reservation, gives a freed slot out again, relays to `b`
            status, _ = await reserve_slot(a.host, relay_info.peer_id, 10.0)
            assert status == StatusCode.OK
            await clients[0][0].disconnect(target_host.get_id())
            freed, attempts = time.monotonic(), 0
            with trio.move_on_after(FREE_SLOT_S):  # the relay frees the slot once it sees the circuit's end
                while (reason := await third.dial(target, target_addr)) is not None:
                    attempts += 1
            print(f"the slot was given out again after {attempts} refusals, {time.monotonic() - freed:.2f} s")
            assert reason is None, reason
            assert (reason := await third.dial(b.peer_id, b_addrs[0])) is None, reason
            assert relay.relay_host.relaying and not a.relay_host.relaying


async def wait_live(node: SwarmNode, peer: str) -> None:
    events = node.subscribe()
    while peer not in node.live_peers():
        await events.receive()
