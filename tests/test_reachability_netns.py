"""`network.reachability = "auto"` decided by real dial-backs between `swarmgrad node` processes, each in its own
network namespace of `testing.netns.nat_hosts` (docs/nat.md, "The topology"):

* three public hosts (one the bootstrap) become "public";
* a host behind a NAT router becomes "private" (the servers see it come from the router's address);
* a host behind a NAT router that announces the router's public address, with nothing forwarded, becomes "private"
  (its advertised IP is the one the servers see, but their dial-backs to it are dropped by the router);
* a public host whose listen port is firewalled (new inbound TCP connections dropped in its namespace) becomes
  "private", although it reaches every other peer.

Every node gets one verdict, and it is the right one; waiting is on their `--json` events, never a sleep. The check
is made fast by config (`network.reachability_retry_s = 1`, `network.dialback_timeout_s = 2`). Needs root,
iproute2 and iptables: skipped otherwise, except under CI (CI=true), where it fails instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swarmgrad.procs import Event
from testing.netns import nat_hosts, unavailable_reason
from tests.node_processes import NodeProcess, node_group

pytestmark = pytest.mark.slow

PORT = 7400
LISTEN = f"/ip4/0.0.0.0/tcp/{PORT}"
FAST = ["--set", "network.reachability_retry_s=1", "--set", "network.dialback_timeout_s=2"]
START_S = 60.0
VERDICT_S = 60.0
"""Ceiling per node: on the loaded 2-core machine a member took 10 s to join, and the checks wait for two members
that can serve (12-26 s there, 0.4-9 s when quiet)."""


def _require_nat() -> None:
    reason = unavailable_reason(nat=True)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"NAT reachability tests must run in CI: {reason}")
        pytest.skip(reason)


def _verdict(events: list[Event]) -> bool:
    return any(e["event"] == "reachability" for e in events)


def _first_verdict(node: NodeProcess) -> tuple[str, str, float, int]:
    """The node's first verdict, its reason, the seconds from `listening` to it, and how many peers were up then."""
    events = node.wait_for(_verdict, VERDICT_S, "a reachability verdict")
    listening = next(e for e in events if e["event"] == "listening")
    at = next(i for i, e in enumerate(events) if e["event"] == "reachability")
    verdict = events[at]
    up = len({e["peer"] for e in events[:at] if e["event"] == "peer_up"})
    return str(verdict["reachability"]), str(verdict["reason"]), float(verdict["t"]) - float(listening["t"]), up


def test_public_natted_announcing_and_firewalled_hosts_each_learn_their_reachability(tmp_path: Path) -> None:
    _require_nat()
    with nat_hosts(4, (1, 1)) as topology, node_group(tmp_path) as group:
        pub0, pub1, pub2, walled = topology.public
        natted, announcing = topology.routers[0].private[0], topology.routers[1].private[0]
        walled.run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(PORT), "--syn", "-j", "DROP")
        boot = group.start("pub0", *FAST, listen=LISTEN, wrap=pub0.wrap([]))
        boot_addr = str(boot.wait_listening(START_S)["addrs"][0])
        join = ["--bootstrap", boot_addr, *FAST]
        router_addr = f"/ip4/{topology.routers[1].host.ip}/tcp/{PORT}"
        expected: dict[str, tuple[NodeProcess, str]] = {"pub0": (boot, "public")}
        for name, host, extra, verdict in (
            ("pub1", pub1, [], "public"),
            ("pub2", pub2, [], "public"),
            ("walled", walled, [], "private"),
            ("natted", natted, [], "private"),
            ("announcing", announcing, ["--announce", router_addr], "private"),
        ):
            expected[name] = (group.start(name, *join, *extra, listen=LISTEN, wrap=host.wrap([])), verdict)
        results = {name: _first_verdict(node) for name, (node, _) in expected.items()}
        report = ", ".join(
            f"{name} {got} after {took:.1f} s ({up} peers up)" for name, (got, _, took, up) in sorted(results.items())
        )
        print(f"verdicts: {report}")
        for name, (node, want) in expected.items():
            got, reason, _, _ = results[name]
            assert got == want, f"{name}: {got} ({reason}); {node.tail()}"
        assert "not an address of ours" in results["natted"][1]  # seen from its router's address
        assert "not dialled back" in results["announcing"][1] and "not dialled back" in results["walled"][1]
        for name, (node, _) in expected.items():
            verdicts = [e for e in node.snapshot() if e["event"] == "reachability"]
            assert len(verdicts) == 1, f"{name} changed its mind: {verdicts}"
            assert "Traceback" not in node.stderr(), node.stderr()[-3000:]
