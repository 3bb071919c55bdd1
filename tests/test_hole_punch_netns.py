"""Hole punching behind real NAT: two swarmgrad nodes, each behind its own router (`testing.netns.nat_hosts`), meet
through a circuit relay on a public host, and the node's own punch schedule (`p2p.hole_punch`, carried out with
`p2p.libp2p_compat.punch_direct`) upgrades them to a direct connection, or, behind routers that reject unsolicited
connections, gives up within its bound and leaves them on the relayed one. Every host is its own process
(`testing.nat_peer`). Needs root, iproute2 and iptables; skipped otherwise, except under CI (CI=true), where it
fails instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from testing.nat_peer import NatPeer
from testing.netns import NatTopology, nat_hosts, unavailable_reason

pytestmark = pytest.mark.slow

PORT = 7400
START_TIMEOUT_S = 120.0
"""A node process imports py-libp2p and torch-free swarmgrad: seconds on an idle machine, more under load."""
ANSWER_TIMEOUT_S = 60.0


def _require_nat() -> None:
    reason = unavailable_reason(nat=True)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"NAT tests must run in CI: {reason}")
        pytest.skip(reason)


@contextmanager
def relayed_pair(
    tmp_path: Path, drop_unsolicited: bool, *node_args: str, swarm_key_hex: str = ""
) -> Iterator[tuple[NatTopology, NatPeer, NatPeer]]:
    """A relay and two nodes behind different routers (all of one private swarm when `swarm_key_hex` is given), the
    first (a) holding a relayed connection to the second (b), which accepted it and so is the side that punches."""
    key_args = ("--swarm-key-hex", swarm_key_hex) if swarm_key_hex else ()
    with nat_hosts(1, (1, 1), drop_unsolicited=drop_unsolicited) as topology, ExitStack() as stack:
        public = topology.public[0]
        relay = stack.enter_context(NatPeer(public, "relay", PORT, tmp_path, tmp_path / "relay.log", *key_args))
        node_args = ("--relay", relay.wait_ready(START_TIMEOUT_S)["addr"], *key_args, *node_args)
        a, b = (
            stack.enter_context(
                NatPeer(router.private[0], "node", PORT, tmp_path, tmp_path / f"{name}.log", *node_args)
            )
            for name, router in zip("ab", topology.routers, strict=True)
        )
        a.wait_ready(START_TIMEOUT_S)
        b.wait_ready(START_TIMEOUT_S)
        dialled = a.ask(f"dial {b.peer_id}", ANSWER_TIMEOUT_S)
        assert dialled["relayed"], dialled
        yield topology, a, b


def _direct_addrs(answer: dict) -> list[list[str]]:
    return [conn["addrs"] for conn in answer["conns"] if not conn["relayed"]]


@pytest.mark.parametrize("swarm_key_hex", ["", bytes(range(32)).hex()], ids=["public", "private"])
def test_two_nodes_behind_dropping_nats_punch_a_direct_connection_and_close_the_relayed_one(
    tmp_path: Path, swarm_key_hex: str
) -> None:
    _require_nat()
    with relayed_pair(tmp_path, True, swarm_key_hex=swarm_key_hex) as (topology, a, b):
        outcome = b.ask("wait_punch 40", ANSWER_TIMEOUT_S)
        assert outcome["punch"] == "succeeded", (outcome, b.tail())
        router_a, router_b = (router.host.ip for router in topology.routers)
        # each side's direct connection goes to the other router's public address, at the other node's listen port
        assert [f"/ip4/{router_b}/tcp/{PORT}"] in _direct_addrs(a.ask(f"conns {b.peer_id}", ANSWER_TIMEOUT_S))
        assert [f"/ip4/{router_a}/tcp/{PORT}"] in _direct_addrs(b.ask(f"conns {a.peer_id}", ANSWER_TIMEOUT_S))
        left = a.ask(f"wait_relay_closed {b.peer_id} 20", ANSWER_TIMEOUT_S)
        assert [conn["relayed"] for conn in left["conns"]] == [False], left
        echo = a.ask(f"echo {b.peer_id} 3", ANSWER_TIMEOUT_S)
        assert len(echo["echo_s"]) == 3
        stats = b.ask("stats", ANSWER_TIMEOUT_S)["stats"]
        assert stats["hole_punch.punches_succeeded"] == stats["hole_punch.punches_tried"] >= 1
        assert stats.get("hole_punch.punches_failed", 0) == stats["hole_punch.punches_tried"] - 1
        assert stats["hole_punch.relayed_closed"] == 1
        assert a.ask("stats", ANSWER_TIMEOUT_S)["stats"].get("hole_punch.punches_tried", 0) == 0  # only b punches


@pytest.mark.long  # 18-20 s: make test-long
def test_behind_rejecting_nats_the_punch_gives_up_within_its_bound_and_the_relayed_connection_stays(
    tmp_path: Path,
) -> None:
    _require_nat()
    # 2 attempts of at most 4 s, 1 s (+25%) before the first and 5 s (+25%) between them: over within ~16 s
    punch = ("--punch-timeout-s", "4", "--max-attempts", "2")
    with relayed_pair(tmp_path, False, *punch) as (_topology, a, b):
        outcome = b.ask("wait_punch 40", ANSWER_TIMEOUT_S)
        assert outcome["punch"] == "failed" and outcome["attempt"] == 2, (outcome, b.tail())
        assert outcome["elapsed_s"] < 30.0
        stats = b.ask("stats", ANSWER_TIMEOUT_S)["stats"]
        assert (stats["hole_punch.punches_tried"], stats["hole_punch.punches_failed"]) == (2, 2)
        assert stats["hole_punch.peers_given_up"] == 1
        for node, other in ((a, b), (b, a)):
            conns = node.ask(f"conns {other.peer_id}", ANSWER_TIMEOUT_S)["conns"]
            assert [conn["relayed"] for conn in conns] == [True], conns
        echo = a.ask(f"echo {b.peer_id} 3", ANSWER_TIMEOUT_S)
        assert [conn["relayed"] for conn in echo["conns"]] == [True]
