"""Peers behind NAT routers reach each other through relays: real `swarmgrad` processes in the network-namespace
topology of `testing.netns.nat_hosts` (public hosts on one bridge, each private host behind a router of its own
that masquerades and drops unsolicited inbound packets; docs/nat.md).

* `swarmgrad node`: three public members (the first the bootstrap) and two NATed ones (reachability forced: the
  verdict is not what is tested here). Each NATed member reserves on two relays found through the DHT, advertises
  only circuit addresses, and the two become live members of each other over a relayed connection, although
  neither can open a connection to the other. Killing one of a NATed member's relays makes it reserve on the third
  and keep the other NATed member live.
* `swarmgrad peer`: two public and two NATed peers train digits together; every peer reaches the demo's target,
  and the NATed pair mixes each other's updates (from their `finished` events); how many of the NATed peers'
  connections were relayed is printed. Then one of the two relays is killed, and both NATed peers train on for
  `AFTER_KILL_ROUNDS` rounds with the two peers left.

Needs root, iproute2 and iptables; skipped otherwise, except under CI (CI=true), where it fails instead.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from p2p.identity import load_or_create_identity, peer_id_of
from swarmgrad.demo import DEFAULT_TARGET, PeerProcess, peer_args
from swarmgrad.procs import Event
from testing.netns import NetnsHost, nat_hosts, unavailable_reason
from tests.node_processes import NodeProcess, node_group

pytestmark = pytest.mark.slow

PORT = 7400
EVENT_S = 120.0  # ceiling on one wait: a hang fails, a loaded machine does not
PRIVATE = ["--set", "network.reachability=private"]
PUBLIC = ["--set", "network.reachability=public"]
TRAIN = ["--set", "network.min_peers=3", "--set", "consensus.enabled=false"]
AFTER_KILL_ROUNDS = 20
TRAIN_S = 240.0  # ceiling on reaching the target: slowness on a loaded machine must not fail the test
JOIN = ["--set", "network.bootstrap_attempts=120", "--set", "network.bootstrap_retry_s=0.25"]


def _require_nat() -> None:
    reason = unavailable_reason(nat=True)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"NAT topology tests must run in CI: {reason}")
        pytest.skip(reason)


def _ids(tmp: Path, names: list[str]) -> dict[str, str]:
    return {name: peer_id_of(load_or_create_identity(tmp / name / "identity.key")) for name in names}


def _up(peer: str) -> Callable[[list[Event]], bool]:
    """The last membership event about `peer` says it is up."""

    def holds(events: list[Event]) -> bool:
        about = [e["event"] for e in events if e["event"] in ("peer_up", "peer_down") and e.get("peer") == peer]
        return bool(about) and about[-1] == "peer_up"

    return holds


def _relays(events: list[Event]) -> list[str]:
    """The relays of the last `relayed` event."""
    relayed = [e for e in events if e["event"] == "relayed"]
    return relayed[-1]["relays"] if relayed else []


def test_natted_members_reach_each_other_through_relays_and_replace_a_killed_relay(tmp_path: Path) -> None:
    _require_nat()
    names = ["pub0", "pub1", "pub2", "nat0", "nat1"]
    ids = _ids(tmp_path, names)
    with nat_hosts(3, (1, 1)) as topology, node_group(tmp_path) as group:
        hosts: dict[str, NetnsHost] = {
            **{f"pub{i}": host for i, host in enumerate(topology.public)},
            "nat0": topology.routers[0].private[0],
            "nat1": topology.routers[1].private[0],
        }
        boot = f"/ip4/{hosts['pub0'].ip}/tcp/{PORT}/p2p/{ids['pub0']}"
        nodes: dict[str, NodeProcess] = {}
        for name in names:
            extra = [*(PUBLIC if name.startswith("pub") else PRIVATE), *(JOIN if name != "pub0" else [])]
            nodes[name] = group.start(
                name,
                *(["--bootstrap", boot] if name != "pub0" else []),
                *extra,
                swarm_id="natrelay",
                listen=f"/ip4/0.0.0.0/tcp/{PORT}",
                wrap=hosts[name].wrap([]),
            )
        started = {name: node.wait_listening()["t"] for name, node in nodes.items()}
        for nat, other in (("nat0", "nat1"), ("nat1", "nat0")):
            events = nodes[nat].wait_for(
                lambda ev, o=other: _up(ids[o])(ev) and len(_relays(ev)) == 2, EVENT_S, f"{other} up, two relays"
            )
            relayed = [e for e in events if e["event"] == "relayed"][-1]
            assert set(relayed["relays"]) <= {ids["pub0"], ids["pub1"], ids["pub2"]}
            assert all("/p2p-circuit/p2p/" + ids[nat] in addr for addr in relayed["addrs"]), relayed
            up_at = next(e["t"] for e in events if e["event"] == "peer_up" and e["peer"] == ids[other])
            print(
                f"{nat}: {other} live {up_at - started[nat]:.2f} s after {nat} listened, through relays "
                f"{sorted(r[-6:] for r in relayed['relays'])}"
            )
        held = set(_relays(nodes["nat0"].snapshot()))
        victim = next(name for name in ("pub1", "pub2", "pub0") if ids[name] in held)
        (spare,) = [name for name in ("pub0", "pub1", "pub2") if ids[name] not in held]
        nodes[victim].signal(signal.SIGKILL)
        events = nodes["nat0"].wait_for(
            lambda ev: ids[spare] in _relays(ev) and _up(ids["nat1"])(ev), EVENT_S, f"reserved on {spare}"
        )
        assert ids[victim] not in _relays(events)


def test_two_public_and_two_natted_peers_train_digits_together(tmp_path: Path) -> None:
    _require_nat()
    names = ["pub0", "pub1", "nat0", "nat1"]
    ids = _ids(tmp_path, names)
    with nat_hosts(2, (1, 1)) as topology:
        hosts: dict[str, NetnsHost] = {
            "pub0": topology.public[0],
            "pub1": topology.public[1],
            "nat0": topology.routers[0].private[0],
            "nat1": topology.routers[1].private[0],
        }
        boot = f"/ip4/{hosts['pub0'].ip}/tcp/{PORT}/p2p/{ids['pub0']}"
        peers: dict[str, PeerProcess] = {}
        try:
            for name in names:
                extra = [*(PUBLIC if name.startswith("pub") else PRIVATE), *TRAIN]
                args = peer_args(
                    tmp_path / name,
                    swarm_id="nattrain",
                    rounds=0,
                    bootstrap=None if name == "pub0" else boot,
                    listen=f"/ip4/0.0.0.0/tcp/{PORT}",
                    extra=[*extra, *(JOIN if name != "pub0" else [])],
                )
                peers[name] = PeerProcess(name, args, tmp_path / f"{name}.log", hosts[name].wrap([]))
            reached = {}
            for name, peer in peers.items():  # every peer live with the 3 others, and at the demo's target
                reached[name] = peer.read_until(
                    "round", TRAIN_S, lambda e: bool(e["peers"] >= 3 and e["value"] >= DEFAULT_TARGET)
                )
            # one of the NATed peers' two relays dies: both go on training with the two peers left
            killed = peers["pub1"].kill()
            for name in ("nat0", "nat1"):
                goal = int(reached[name]["round"]) + AFTER_KILL_ROUNDS
                peers[name].read_until(
                    "round", TRAIN_S, lambda e, goal=goal: bool(e["round"] >= goal and e["peers"] >= 2)
                )
        finally:
            statuses = {name: peer.stop() for name, peer in peers.items() if name != "pub1"}
    assert killed == -signal.SIGKILL
    assert statuses == dict.fromkeys(["pub0", "nat0", "nat1"], 0), statuses
    events = {name: peer.snapshot() for name, peer in peers.items()}
    finished = {name: next(e for e in ev if e["event"] == "finished") for name, ev in events.items() if name != "pub1"}
    for nat, other in (("nat0", "nat1"), ("nat1", "nat0")):
        assert finished[nat]["contributions"].get(ids[other], 0) > 0, (nat, finished[nat]["contributions"])
    ups = [e for name in ("nat0", "nat1") for e in events[name] if e["event"] == "peer_up"]
    relayed = sum(e["relayed"] for e in ups)
    print(
        f"NATed peers: {len(ups)} connections up, {relayed} relayed; updates mixed: nat0 <- nat1 "
        f"{finished['nat0']['contributions'][ids['nat1']]} rounds, nat1 <- nat0 "
        f"{finished['nat1']['contributions'][ids['nat0']]} rounds"
    )
    assert all(e["relayed"] for e in ups if {e["peer"]} <= {ids["nat0"], ids["nat1"]})
