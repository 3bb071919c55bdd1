"""Benchmark: DCUtR hole punching between two swarmgrad nodes behind different NAT routers (root, iproute2, iptables).

Topology (`testing.netns.nat_hosts(1, (1, 1))`, port-preserving routers that drop unsolicited packets): a circuit
relay on the public host, one node behind each router, each a process of its own (`testing.nat_peer`). Each of
`BENCH_TRIES` (20) tries starts two fresh nodes (new identities, a new listen port, so no TIME_WAIT socket or
conntrack entry of an earlier try is reused), connects the first to the second through the relay
(`p2p.libp2p_compat.dial_relayed`), and lets the second node's punch schedule (`p2p.hole_punch`, the node's
defaults except a first delay of `FIRST_DELAY_S`, so that the relayed round trips below are measured before any
punch) upgrade it. Per try: whether it ended direct, the time from the relayed connection to the direct one (as the
machine measured it: the first delay, any failed attempts and the successful one) and the successful attempt's own
duration; the median of 5 echo round trips (a new stream, 32 bytes each way) over the relayed connection right after
the dial and over the direct one once the relayed one is closed; and, over each, the round trip of a payload the size
of one gossip update (`UPDATE_BYTES`: 2 KiB, about what a `make demo` peer sends one neighbour a round (bytes sent /
rounds / neighbours); 256 KiB, about a 4M-parameter model's update at 1 % density and 6 bytes a kept value), which
is what a relayed neighbour adds to a gossip round: a round sends each neighbour one update and waits for theirs.

Prints one JSON line: the share of tries that ended direct, the share of punch attempts that succeeded, the
median and max times, and the median relayed and direct echo and update round trips and their ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's `testing` harness

from testing.nat_peer import NatPeer  # noqa: E402
from testing.netns import nat_hosts, unavailable_reason  # noqa: E402

TRIES = int(os.environ.get("BENCH_TRIES", 20))
FIRST_DELAY_S = 2.0
ECHOES = 5
UPDATE_BYTES = {"2k": 2 * 1024, "256k": 256 * 1024}
UPDATE_EXCHANGES = 3
BASE_PORT = 7400
START_TIMEOUT_S = 120.0
ANSWER_TIMEOUT_S = 120.0
PUNCH_WAIT_S = 90.0
"""Longer than the node's 3 attempts of at most 15 s and its backoff between them."""


def one_try(index: int, topology: Any, relay_addr: str, tmp: Path) -> dict[str, Any]:
    port = BASE_PORT + 1 + index
    options = ("--relay", relay_addr, "--first-delay-s", str(FIRST_DELAY_S), "--relay-close-grace-s", "1")
    hosts = [router.private[0] for router in topology.routers]
    with (
        NatPeer(hosts[0], "node", port, tmp, tmp / f"a{index}.log", *options) as a,
        NatPeer(hosts[1], "node", port, tmp, tmp / f"b{index}.log", *options) as b,
    ):
        a.wait_ready(START_TIMEOUT_S)
        b.wait_ready(START_TIMEOUT_S)
        a.ask(f"dial {b.peer_id}", ANSWER_TIMEOUT_S)
        relayed = a.ask(f"echo {b.peer_id} {ECHOES}", ANSWER_TIMEOUT_S)
        relayed_ok = all(conn["relayed"] for conn in relayed["conns"])
        relayed_updates = {name: _exchange(a, b.peer_id, size) for name, size in UPDATE_BYTES.items()}
        outcome = b.ask(f"wait_punch {PUNCH_WAIT_S}", ANSWER_TIMEOUT_S)
        result: dict[str, Any] = {
            "direct": outcome["punch"] == "succeeded",
            "relayed_echo_s": relayed["echo_median_s"] if relayed_ok else None,
        }
        for name, seconds in relayed_updates.items():
            result[f"relayed_update_{name}_s"] = seconds if relayed_ok else None
        stats = b.ask("stats", ANSWER_TIMEOUT_S)["stats"]
        result["attempts"] = stats.get("hole_punch.punches_tried", 0)
        result["attempts_succeeded"] = stats.get("hole_punch.punches_succeeded", 0)
        if result["direct"]:
            result["relayed_to_direct_s"] = outcome["since_relayed_s"]
            result["attempt_s"] = outcome["attempt_s"]
            left = a.ask(f"wait_relay_closed {b.peer_id} 20", ANSWER_TIMEOUT_S)
            if [conn["relayed"] for conn in left["conns"]] == [False]:
                result["direct_echo_s"] = a.ask(f"echo {b.peer_id} {ECHOES}", ANSWER_TIMEOUT_S)["echo_median_s"]
                for name, size in UPDATE_BYTES.items():
                    result[f"direct_update_{name}_s"] = _exchange(a, b.peer_id, size)
        return result


def _exchange(node: NatPeer, peer_id: str, size: int) -> float:
    """The median round trip of `size` bytes each way over `UPDATE_EXCHANGES` new streams."""
    return float(node.ask(f"echo {peer_id} {UPDATE_EXCHANGES} {size}", ANSWER_TIMEOUT_S)["echo_median_s"])


def _update_figures(tries: list[dict[str, Any]], direct: list[dict[str, Any]]) -> dict[str, float | None]:
    figures: dict[str, float | None] = {}
    for name in UPDATE_BYTES:
        relayed = [t[f"relayed_update_{name}_s"] for t in tries if t[f"relayed_update_{name}_s"] is not None]
        straight = [t[f"direct_update_{name}_s"] for t in direct if f"direct_update_{name}_s" in t]
        figures[f"update_{name}_relayed_median_s"] = statistics.median(relayed) if relayed else None
        figures[f"update_{name}_direct_median_s"] = statistics.median(straight) if straight else None
        figures[f"update_{name}_relayed_over_direct"] = (
            statistics.median(relayed) / statistics.median(straight) if relayed and straight else None
        )
    return figures


def main() -> None:
    reason = unavailable_reason(nat=True)
    if reason is not None:
        print(json.dumps({"benchmark": "nat", "skipped": reason}), flush=True)
        return
    started = time.monotonic()
    tries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name, nat_hosts(1, (1, 1)) as topology:
        tmp = Path(tmp_name)
        with NatPeer(topology.public[0], "relay", BASE_PORT, tmp, tmp / "relay.log") as relay:
            relay_addr = relay.wait_ready(START_TIMEOUT_S)["addr"]
            for index in range(TRIES):
                tries.append(one_try(index, topology, relay_addr, tmp))
                print(f"try {index + 1}/{TRIES}: {tries[-1]}", file=sys.stderr, flush=True)
    direct = [t for t in tries if t["direct"]]
    times = [t["relayed_to_direct_s"] for t in direct]
    attempt_times = [t["attempt_s"] for t in direct]
    relayed_echo = [t["relayed_echo_s"] for t in tries if t["relayed_echo_s"] is not None]
    direct_echo = [t["direct_echo_s"] for t in direct if "direct_echo_s" in t]
    attempts = sum(t["attempts"] for t in tries)
    median = statistics.median
    report = {
        "benchmark": "nat",
        "tries": len(tries),
        "direct_share": len(direct) / len(tries),
        "attempt_success_share": sum(t["attempts_succeeded"] for t in tries) / attempts if attempts else None,
        "first_delay_s": FIRST_DELAY_S,
        "relayed_to_direct_median_s": median(times) if times else None,
        "relayed_to_direct_max_s": max(times) if times else None,
        "successful_attempt_median_s": median(attempt_times) if attempt_times else None,
        "successful_attempt_max_s": max(attempt_times) if attempt_times else None,
        "echo_relayed_median_s": median(relayed_echo) if relayed_echo else None,
        "echo_direct_median_s": median(direct_echo) if direct_echo else None,
        "echo_relayed_over_direct": median(relayed_echo) / median(direct_echo)
        if relayed_echo and direct_echo
        else None,
        **_update_figures(tries, direct),
        "wall_s": time.monotonic() - started,
        "load_average_1m": os.getloadavg()[0],
    }
    print(json.dumps(report, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
