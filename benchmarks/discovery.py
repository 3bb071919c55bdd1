"""Benchmark: how fast `swarmgrad node` processes on loopback find each other through the DHT.

One bootstrap peer, then 15 peers started together, each given only the bootstrap's address. For each joiner:
the time from its process start and from its `listening` line (joined and published) until it has discovered at
least 8 other members, and the bytes it moved through its sockets meanwhile (`/proc/<pid>/io` rchar + wchar
between `listening` and the end of the run: DHT traffic plus pings, identify and member-record fetches; logs are
kept at WARNING so that stderr writes stay negligible). Baseline, measured in the same run: the bootstrap
process's own start-up time (spawn to `listening` with no peer to find), i.e. what importing py-libp2p and starting
a host cost on this machine.

Prints one JSON line: medians and p90s in seconds, bytes per peer, how peers were first found (bootstrap or
dht) and the ratio of the median discovery time to the 3 s goal. `time_to_target_once_available_s` counts from the
moment the peer listens and at least 8 others listen too: with 16 interpreters starting on 2 cores, the last
ones listen many seconds after the first, and no protocol can find a peer that is not up yet.

`--hosts N` (root, iproute2): the multi-host mode. N network namespaces on one bridge (`testing.netns`), one node
per "host", every node on 0.0.0.0 port 7400 with no --announce, joined through the address `swarmgrad id` prints
on the first host. Reports the time from `listening` until each node holds direct connections (`peer_up`) to 3
others, and, after at most `BENCH_MESH_S` (20 s) more for the rest, the share of node pairs holding a direct
connection (1.0: a full mesh; a star around the bootstrap would be 2/N).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmgrad.procs import ChildFailed, ChildProcess, Event

NUM_PEERS = int(os.environ.get("BENCH_PEERS", 16))
TARGET_KNOWN = 8
TIMEOUT_S = float(os.environ.get("BENCH_TIMEOUT_S", 120))
GOAL_S = 3.0
MESH_KNOWN = 3
MESH_S = float(os.environ.get("BENCH_MESH_S", 20))


def proc_io_bytes(pid: int) -> int:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


class Peer:
    """One `swarmgrad node` (a `ChildProcess`) and what its events say, kept up to date by the reader thread."""

    def __init__(
        self,
        name: str,
        tmp: Path,
        swarm_id: str,
        bootstrap: str | None,
        listen: str = "/ip4/127.0.0.1/tcp/0",
        wrap: list[str] | None = None,
    ) -> None:
        command = [*(wrap or []), sys.executable, "-m", "swarmgrad.cli"]
        command += ["--log-level", os.environ.get("BENCH_LOG_LEVEL", "WARNING"), "node", "--json"]
        command += ["--data-dir", str(tmp / name), "--listen", listen, "--swarm-id", swarm_id]
        if bootstrap is not None:
            command += ["--bootstrap", bootstrap]
        self.listening: dict[str, Any] | None = None
        self.io_at_listening = 0
        self.found: dict[str, tuple[str, float]] = {}
        self.reached_at: float | None = None
        self.up: set[str] = set()
        self.meshed_at: float | None = None  # when it first held direct connections to MESH_KNOWN others
        self.child = ChildProcess(name, command, tmp / f"{name}.err", on_event=self._on_event)
        self.spawned_at = self.child.spawned_at
        self.proc = self.child.proc

    def _on_event(self, event: Event) -> None:
        if event["event"] == "listening":
            self.listening = event
            self.io_at_listening = proc_io_bytes(self.child.pid)
        elif event["event"] == "peer_discovered":
            self.found.setdefault(event["peer"], (event["via"], event["t"]))
            if len(self.found) >= TARGET_KNOWN and self.reached_at is None:
                self.reached_at = event["t"]
        elif event["event"] == "peer_up":
            self.up.add(event["peer"])
            if len(self.up) >= MESH_KNOWN and self.meshed_at is None:
                self.meshed_at = event["t"]
        elif event["event"] == "peer_down":
            self.up.discard(event["peer"])

    def wait(self, predicate: Callable[[Peer], bool], deadline: float) -> bool:
        """Whether `predicate(self)` came to hold by `deadline` (wall clock; it is checked on each event)."""
        try:
            self.child.wait_for(lambda _events: predicate(self), max(0.0, deadline - time.time()), "the benchmark")
        except ChildFailed:
            return False
        return True

    def stop(self) -> None:
        self.child.kill()


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def started(boot: Peer) -> tuple[float, float]:
    """Wait for the bootstrap node to listen: the run's deadline, and its start-up time (the baseline)."""
    deadline = time.time() + TIMEOUT_S
    if not boot.wait(lambda p: p.listening is not None, deadline):
        raise SystemExit("the bootstrap node did not start")
    assert boot.listening is not None
    return deadline, boot.listening["t"] - boot.spawned_at


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        peers: list[Peer] = []
        try:
            boot = Peer("boot", tmp, "bench", None)
            peers.append(boot)
            deadline, baseline_startup_s = started(boot)
            assert boot.listening is not None
            addr = boot.listening["addrs"][0]
            joiners = [Peer(f"p{i}", tmp, "bench", addr) for i in range(1, NUM_PEERS)]
            peers += joiners
            for peer in joiners:
                peer.wait(lambda p: p.reached_at is not None, deadline)
            io_bytes = [proc_io_bytes(p.proc.pid) - p.io_at_listening for p in joiners if p.proc.poll() is None]
            exited = [p.child.tail(200).splitlines()[-1:] for p in joiners if p.proc.poll() is not None]
        finally:
            for peer in peers:
                peer.stop()
    reached = [p for p in joiners if p.reached_at is not None and p.listening is not None]
    from_spawn = [p.reached_at - p.spawned_at for p in reached]  # type: ignore[operator]
    from_listening = [p.reached_at - p.listening["t"] for p in reached]  # type: ignore[index,operator]
    startup = [p.listening["t"] - p.spawned_at for p in joiners if p.listening is not None]
    # The discovery latency proper: from the moment the peer listens and TARGET_KNOWN others listen too (before
    # that, no protocol can find them: on 2 cores the others' interpreters are still importing).
    listened_at = {p: p.listening["t"] for p in peers if p.listening is not None}
    after_available = []
    for p in reached:
        others = sorted(t for q, t in listened_at.items() if q is not p)
        if len(others) >= TARGET_KNOWN:
            after_available.append(p.reached_at - max(listened_at[p], others[TARGET_KNOWN - 1]))  # type: ignore[operator]
    paths = Counter(via for p in joiners for via, _ in p.found.values())
    median_listening = statistics.median(from_listening) if from_listening else None
    print(
        json.dumps(
            {
                "benchmark": "discovery",
                "peers": NUM_PEERS,
                "target_known": TARGET_KNOWN,
                "reached_target": len(reached),
                "joiners": len(joiners),
                "time_to_target_from_listening_s": {
                    "median": median_listening,
                    "p90": p90(from_listening) if from_listening else None,
                },
                "time_to_target_from_spawn_s": {
                    "median": statistics.median(from_spawn) if from_spawn else None,
                    "p90": p90(from_spawn) if from_spawn else None,
                },
                "time_to_target_once_available_s": {
                    "median": statistics.median(after_available) if after_available else None,
                    "p90": p90(after_available) if after_available else None,
                },
                "startup_s_median": statistics.median(startup) if startup else None,
                "baseline_bootstrap_startup_s": baseline_startup_s,
                "socket_io_bytes_per_peer_median": statistics.median(io_bytes) if io_bytes else None,
                "first_found_via": dict(sorted(paths.items())),
                "exited_early": len(exited),
                "exit_reasons": sorted({line[0][:200] for line in exited if line}),
                "median_vs_goal_3s": None if median_listening is None else median_listening / GOAL_S,
                "cpu_count": os.cpu_count(),
            },
            sort_keys=False,
        )
    )


def main_hosts(count: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's `testing` harness
    from testing.netns import bridged_hosts, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"--hosts: {reason}")
    listen = "/ip4/0.0.0.0/tcp/7400"
    with tempfile.TemporaryDirectory() as tmp_dir, bridged_hosts(count) as hosts:
        tmp = Path(tmp_dir)
        peers: list[Peer] = []
        try:
            out = hosts[0].run(sys.executable, "-m", "swarmgrad.cli", "id", "--data-dir", str(tmp / "h0"), "--listen",
                               listen, "--json")  # fmt: skip
            addr = json.loads(out)["addrs"][0]
            boot = Peer("h0", tmp, "bench", None, listen, hosts[0].wrap([]))
            peers.append(boot)
            deadline, baseline_startup_s = started(boot)
            peers += [Peer(f"h{i}", tmp, "bench", addr, listen, host.wrap([])) for i, host in enumerate(hosts[1:], 1)]
            for peer in peers:
                peer.wait(lambda p: p.meshed_at is not None, deadline)
            mesh_deadline = time.time() + MESH_S
            for peer in peers:
                peer.wait(lambda p: len(p.up) >= count - 1, mesh_deadline)
            ids = {p.listening["peer_id"]: p for p in peers if p.listening is not None}
            pairs = [(a, b) for i, a in enumerate(sorted(ids)) for b in sorted(ids)[i + 1 :]]
            direct = sum(1 for a, b in pairs if b in ids[a].up or a in ids[b].up)
            advertised = sorted({addr for p in peers if p.listening for addr in p.listening["addrs"]})
        finally:
            for peer in peers:
                peer.stop()
    meshed = [p.meshed_at - p.listening["t"] for p in peers if p.meshed_at is not None and p.listening is not None]
    print(
        json.dumps(
            {
                "benchmark": "discovery_hosts",
                "hosts": count,
                "mesh_known": MESH_KNOWN,
                "reached_mesh_known": len(meshed),
                "time_to_direct_connections_to_3_from_listening_s": {
                    "median": statistics.median(meshed) if meshed else None,
                    "p90": p90(meshed) if meshed else None,
                },
                "direct_pair_share": direct / len(pairs) if pairs else None,
                "star_pair_share": 2 / count,
                "advertised_unspecified": sum("/0.0.0.0/" in a for a in advertised),
                "baseline_bootstrap_startup_s": baseline_startup_s,
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--hosts":
        main_hosts(int(sys.argv[2]))
    elif len(sys.argv) == 1:
        main()
    else:
        raise SystemExit("usage: discovery.py [--hosts N]")
