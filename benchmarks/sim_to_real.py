"""Sim to real: the `digits4` scenario in the simulator beside the same swarm as 4 real peer processes.

The real side is the `make demo` swarm (`swarmgrad.demo.start_swarm`: a bootstrap peer and three that find it
through the DHT, on 127.0.0.1, `digits`, density 0.01, one local step a round, each waiting for the other three);
the simulated side is `sim/scenarios/digits4.toml` (the same task, model, shards, optimizer, density and deadline)
for the same number of rounds. Prints one JSON line: each side's held-out accuracy (mean over the 4 peers) every
`--eval-every` rounds, the largest gap between them, the final accuracies and the gossip bytes each peer sent.

Run: .venv/bin/python benchmarks/sim_to_real.py [--rounds 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.scenario import load_scenario  # noqa: E402
from sim.swarm import SwarmRun  # noqa: E402
from swarmgrad.demo import start_swarm  # noqa: E402
from swarmgrad.procs import EXITED  # noqa: E402

PEERS = 4
FINISH_TIMEOUT_S = 900.0


def simulated(rounds: int, seed: int, every: int) -> tuple[dict[int, float], float]:
    scenario = load_scenario(ROOT / "sim" / "scenarios" / "digits4.toml")
    scenario = dataclasses.replace(scenario, swarm=dataclasses.replace(scenario.swarm, rounds=rounds))
    rows = SwarmRun(scenario, seed).run()
    curve = {r.round: float(r.accuracy or 0.0) for r in rows if r.round % every == 0 and r.round > 0}
    return curve, rows[-1].bytes_sent / PEERS


def real(rounds: int, every: int) -> tuple[dict[int, float], float, float]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="swarmgrad-sim-to-real-") as tmp:
        extra = ["--set", f"network.min_peers={PEERS - 1}", "--set", f"training.eval_every_rounds={every}"]
        peers, _ = start_swarm(Path(tmp), PEERS, swarm_id="simreal", rounds=rounds, extra=extra)
        accuracy: dict[str, dict[int, float]] = {p.name: {} for p in peers}
        sent: dict[str, int] = {}
        try:
            deadline = time.monotonic() + FINISH_TIMEOUT_S
            while len(sent) < PEERS and time.monotonic() < deadline:
                for peer in peers:
                    event = peer.next_event(0.05)
                    if event is None:
                        continue
                    if event["event"] == EXITED["event"]:
                        raise SystemExit(f"{peer.name} exited early (log: {peer.log_path})")
                    if event["event"] == "round":
                        accuracy[peer.name][int(event["round"])] = float(event["value"])
                    elif event["event"] == "finished":
                        sent[peer.name] = int(event["bytes_sent"])
        finally:
            for peer in peers:
                peer.stop()
    common = sorted(set.intersection(*(set(a) for a in accuracy.values())))
    curve = {r: sum(accuracy[p][r] for p in accuracy) / PEERS for r in common if r % every == 0}
    return curve, sum(sent.values()) / max(1, len(sent)), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()
    sim_curve, sim_bytes = simulated(args.rounds, args.seed, args.eval_every)
    real_curve, real_bytes, real_s = real(args.rounds, args.eval_every)
    both = sorted(set(sim_curve) & set(real_curve))
    gaps = [abs(sim_curve[r] - real_curve[r]) for r in both]
    last = both[-1] if both else None
    print(
        json.dumps(
            {
                "bench": "sim_to_real",
                "rounds": args.rounds,
                "sim_accuracy": {str(r): round(sim_curve[r], 4) for r in both},
                "real_accuracy": {str(r): round(real_curve[r], 4) for r in both},
                "max_gap_points": round(100 * max(gaps), 2) if gaps else None,
                "final_gap_points": round(100 * (sim_curve[last] - real_curve[last]), 2) if last else None,
                "sim_bytes_per_peer": round(sim_bytes),
                "real_bytes_per_peer": round(real_bytes),
                "real_wall_s": round(real_s, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
