"""End to end: real `swarmgrad node` processes on 127.0.0.1 find each other through the DHT, see a killed peer
go down, and keep two swarms apart. Each test bounds every wait and kills its processes on the way out."""

from __future__ import annotations

import pytest

from tests.node_processes import NodeGroup, discovered_at_least, peer_down

pytestmark = pytest.mark.slow

CEILING_S = 180.0  # on waits for events: generous for 8 interpreters on a loaded 2-core box; the time is not tested


def test_eight_peers_find_each_other_through_the_dht_and_see_a_killed_peer_go_down(nodes: NodeGroup) -> None:
    boot = nodes.start("boot")
    boot_addr = boot.wait_listening()["addrs"][0]
    peers = [nodes.start(f"p{i}", "--bootstrap", boot_addr) for i in range(1, 8)]
    ids = {boot.wait_listening()["peer_id"]} | {p.wait_listening()["peer_id"] for p in peers}
    everyone = [boot, *peers]
    for node in everyone:
        node.wait_for(discovered_at_least(5), CEILING_S, ">= 5 peers discovered")
    paths = {node.name: node.discovered() for node in everyone}
    for name, found in paths.items():
        assert set(found) <= ids, f"{name} lists peers that are not in the swarm"
        assert len(found) >= 5, f"{name} knows only {found}"
    # joiners were given only the bootstrap peer: every other peer came from a DHT lookup; "bootstrap" is only
    # ever the bootstrap peer
    boot_id = boot.wait_listening()["peer_id"]
    for name, found in paths.items():
        assert all(via in ("bootstrap", "dht") for via in found.values()), found
        assert {peer for peer, via in found.items() if via == "bootstrap"} <= {boot_id}, (name, found)
    # so every peer (the bootstrap peer included) learned at least 4 of its >= 5 through a DHT lookup
    dht_finds = {name: sum(via == "dht" for via in found.values()) for name, found in paths.items()}
    assert min(dht_finds.values()) >= 4, paths

    victim = peers[3]
    victim_id = victim.wait_listening()["peer_id"]
    watchers = [n for n in everyone if victim_id in n.discovered()]
    victim.kill()
    for node in watchers:
        node.wait_for(peer_down(victim_id), CEILING_S, f"peer_down for {victim_id}")


def test_two_swarms_on_one_machine_never_list_each_others_peers(nodes: NodeGroup) -> None:
    boot_a = nodes.start("a0", swarm_id="alpha")
    addr_a = boot_a.wait_listening()["addrs"][0]
    boot_b = nodes.start("b0", swarm_id="beta")
    addr_b = boot_b.wait_listening()["addrs"][0]
    a1 = nodes.start("a1", "--bootstrap", addr_a, swarm_id="alpha")
    b1 = nodes.start("b1", "--bootstrap", addr_b, swarm_id="beta")
    # a third peer of beta is handed alpha's bootstrap peer too: it shares alpha's DHT but must not list alpha
    b2 = nodes.start("b2", "--bootstrap", addr_b, "--bootstrap", addr_a, swarm_id="beta")
    alpha = {n.wait_listening()["peer_id"] for n in (boot_a, a1)}
    beta = {n.wait_listening()["peer_id"] for n in (boot_b, b1, b2)}
    for node, own in ((boot_a, alpha), (a1, alpha), (boot_b, beta), (b1, beta), (b2, beta)):
        node.wait_for(discovered_at_least(len(own) - 1), CEILING_S, "every peer of its own swarm")
    for node, own in ((boot_a, alpha), (a1, alpha), (boot_b, beta), (b1, beta), (b2, beta)):
        listed = set(node.discovered())
        assert listed <= own, f"{node.name} lists peers of another swarm: {listed - own}"
