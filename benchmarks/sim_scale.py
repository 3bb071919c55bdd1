"""Simulator scale: simulated gossip rounds per wall-clock minute with the cheap model (noisy quadratic), on one
core, for each swarm size. One JSON line per size, each size run in a fresh process (so its peak memory is its
own): peers, rounds, wall_s (the whole run), startup_s (of it, bringing the peers up: each machine told of the
n - 1 others in one `PeersUp`), rounds_per_min (over the whole run) and steady_rounds_per_min (after the
start-up), cpu_s (the process's CPU time over the run) and rounds_per_cpu_min (what the wall-clock figure would be
on an idle core: on a shared machine the wall clock also counts other jobs' time), messages_per_s (simulated
messages per wall-clock second), events, peak_rss_mib, and goal_rounds_per_min where the project set one.

    python benchmarks/sim_scale.py [--peers 100 1000 10000] [--rounds 20 20 3] [--dim 1000] [--baseline DIR]
                                   [--epoch-rounds 10 [--members 100] [--tolerance 0.4]]

`--epoch-rounds N` turns on epoch consensus every N rounds (`[consensus] epoch_rounds`; 0, the default: none), each
member running the real `EpochChain`, with `--members M` voters (0: every peer, at most 1,024) and the sampled-chunk
check's `--tolerance` (at 100 peers and more the quadratic's peers still lie farther apart than the default 0.4 at
round 10, so epochs commit only with a wider one); the line then has `epochs_committed` and `consensus_messages`.

`--rounds` gives one count for every size, or one per size. `--baseline DIR` runs each size first with the
simulator of another checkout (e.g. `git worktree add DIR main`), in the same run, and puts its figures under
`baseline` with the ratios `speedup` (rounds per wall-clock minute) and `cpu_speedup` (rounds per CPU minute).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before this folder, whose gossip.py would shadow the gossip package

GOAL_ROUNDS_PER_MIN = {1000: 300}
DEFAULT_TOLERANCE = 0.4
"""`consensus.chunks.DEFAULT_TOLERANCE` (not imported: this module imports the simulator only in `run_one`)."""


def run_one(
    peers: int, rounds: int, dim: int, epoch_rounds: int = 0, members: int = 0, tolerance: float = DEFAULT_TOLERANCE
) -> dict[str, object]:
    import torch

    from sim.scenario import scenario_from_dict
    from sim.swarm import RoundMetrics, SwarmRun

    torch.set_num_threads(1)
    scenario = scenario_from_dict(
        {
            "swarm": {"peers": peers, "rounds": rounds},
            "model": {"dim": dim},
            "gossip": {"density": 0.01},
            "network": {"latency_s": 0.05, "uplink_bytes_per_s": 1.25e6},
            "consensus": {"epoch_rounds": epoch_rounds, "members": members, "tolerance": tolerance},
        }
    )
    row_times: list[float] = []

    def on_row(_: RoundMetrics) -> None:
        row_times.append(time.perf_counter())

    run = SwarmRun(scenario, seed=0, on_row=on_row)
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = run.run()
    wall_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    done = len(rows) - 1
    steady_s = row_times[-1] - row_times[0]
    line: dict[str, object] = {
        "peers": peers,
        "rounds": done,
        "wall_s": round(wall_s, 2),
        "startup_s": round(row_times[0] - started, 2),
        "rounds_per_min": round(60 * done / wall_s, 1),
        "steady_rounds_per_min": round(60 * done / steady_s, 1) if steady_s > 0 else None,
        "cpu_s": round(cpu_s, 2),
        "rounds_per_cpu_min": round(60 * done / cpu_s, 1),
        "messages_per_s": round(run.sim.counters["messages_sent"] / wall_s),
        "events": run.loop.events_run,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if run.consensus is not None:
        summary = run.consensus.summary()
        line["epochs_committed"] = summary["epochs_committed"]
        line["consensus_messages"] = summary["messages_sent"]
    if peers in GOAL_ROUNDS_PER_MIN:
        line["goal_rounds_per_min"] = GOAL_ROUNDS_PER_MIN[peers]
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, nargs="+", default=[20])
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--epoch-rounds", type=int, default=0, help="epoch consensus every N rounds (0: none)")
    parser.add_argument("--members", type=int, default=0, help="consensus voters (0: every peer, at most 1,024)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="of the sampled-chunk check")
    parser.add_argument("--one", action="store_true", help="run the single size given, in this process")
    parser.add_argument("--baseline", type=Path, help="a checkout whose simulator runs each size first, for comparison")
    args = parser.parse_args()
    if len(args.rounds) not in (1, len(args.peers)):
        parser.error("--rounds takes one count, or one per size in --peers")
    rounds = args.rounds * len(args.peers) if len(args.rounds) == 1 else args.rounds
    if args.one:
        line = run_one(args.peers[0], rounds[0], args.dim, args.epoch_rounds, args.members, args.tolerance)
        print(json.dumps(line), flush=True)
        return
    for peers, count in zip(args.peers, rounds, strict=True):
        sizes = ["--one", "--peers", str(peers), "--rounds", str(count), "--dim", str(args.dim)]
        if args.epoch_rounds:  # a baseline checkout must know these options too
            sizes += ["--epoch-rounds", str(args.epoch_rounds), "--members", str(args.members)]
            sizes += ["--tolerance", str(args.tolerance)]
        baseline = None
        if args.baseline is not None:
            baseline = child([sys.executable, str(args.baseline / "benchmarks" / "sim_scale.py"), *sizes])
        line = child([sys.executable, __file__, *sizes])
        if baseline is not None:
            line["baseline"] = {key: value for key, value in baseline.items() if key != "goal_rounds_per_min"}
            line["speedup"] = round(float(line["rounds_per_min"]) / float(baseline["rounds_per_min"]), 2)
            if "rounds_per_cpu_min" in baseline:
                cpu = float(line["rounds_per_cpu_min"]) / float(baseline["rounds_per_cpu_min"])
                line["cpu_speedup"] = round(cpu, 2)
        print(json.dumps(line), flush=True)


def child(command: list[str]) -> dict[str, Any]:
    """The JSON line a `--one` run prints."""
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    main()
