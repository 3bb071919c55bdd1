"""Simulator scale: simulated gossip rounds per wall-clock minute with the cheap model (noisy quadratic), on one
core, for each swarm size. One JSON line per size: peers, rounds, wall_s, rounds_per_min, messages_per_s (simulated
messages per wall-clock second), events, peak_rss_mib (of the whole process so far).

    python benchmarks/sim_scale.py [--peers 100 1000] [--rounds 20] [--dim 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before this folder, whose gossip.py would shadow the gossip package

import torch  # noqa: E402

from sim.scenario import scenario_from_dict  # noqa: E402
from sim.swarm import SwarmRun  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dim", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for peers in args.peers:
        scenario = scenario_from_dict(
            {
                "swarm": {"peers": peers, "rounds": args.rounds},
                "model": {"dim": args.dim},
                "gossip": {"density": 0.01},
                "network": {"latency_s": 0.05, "uplink_bytes_per_s": 1.25e6},
            }
        )
        run = SwarmRun(scenario, seed=0)
        started = time.perf_counter()
        rows = run.run()
        wall_s = time.perf_counter() - started
        rounds = len(rows) - 1
        line = {
            "peers": peers,
            "rounds": rounds,
            "wall_s": round(wall_s, 2),
            "rounds_per_min": round(60 * rounds / wall_s, 1),
            "messages_per_s": round(run.sim.counters["messages_sent"] / wall_s),
            "events": run.loop.events_run,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
