"""Sim to real: the `digits4` scenario in the simulator beside the same swarm as 4 real peer processes.

The real side is the `make demo` swarm (`swarmgrad.demo.start_swarm`: a bootstrap peer and three that find it
through the DHT, on 127.0.0.1, `digits`, density 0.01, one local step a round, each waiting for the other three);
the simulated side is `sim/scenarios/digits4.toml` (the same task, model, shards, optimizer, density and deadline)
for the same number of rounds. Prints one JSON line: each side's held-out accuracy (mean over the 4 peers) every
`--eval-every` rounds, the largest gap between them, the final accuracies and the gossip bytes each peer sent.

Gossip bytes are compared like with like: the simulator's rows count gossip messages alone, and so does the real
side's figure, each peer's `finished` `gossip_bytes_sent` (its gossip driver's payloads). The peer's `bytes_sent`
is its transport's total, which carries model fetch and epoch consensus too; consensus bytes per peer are printed
beside, for each side, but not compared: the simulator models the agreement and the proposal's chunk samples, not
the certified body each member downloads afterwards, and the real peers' epochs are 50 rounds (the peer's
default) where `digits4`'s are 25.

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
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.scenario import load_scenario  # noqa: E402
from sim.swarm import SwarmRun  # noqa: E402
from swarmgrad.demo import start_swarm  # noqa: E402
from swarmgrad.procs import EXITED  # noqa: E402

PEERS = 4
FINISH_TIMEOUT_S = 900.0


class Side(NamedTuple):
    """One side's run: mean held-out accuracy by round, and gossip and consensus bytes sent per peer (means)."""

    curve: dict[int, float]
    gossip_bytes: float
    consensus_bytes: float


def simulated(rounds: int, seed: int, every: int) -> Side:
    scenario = load_scenario(ROOT / "sim" / "scenarios" / "digits4.toml")
    scenario = dataclasses.replace(scenario, swarm=dataclasses.replace(scenario.swarm, rounds=rounds))
    run = SwarmRun(scenario, seed)
    rows = run.run()
    curve = {r.round: float(r.accuracy or 0.0) for r in rows if r.round % every == 0 and r.round > 0}
    consensus = run.summary().get("consensus", {})
    assert isinstance(consensus, dict)
    return Side(curve, rows[-1].bytes_sent / PEERS, int(consensus.get("bytes_sent", 0)) / PEERS)


def real(rounds: int, every: int) -> tuple[Side, float]:
    """The real swarm's side and its wall time in seconds."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="swarmgrad-sim-to-real-") as tmp:
        extra = ["--set", f"network.min_peers={PEERS - 1}", "--set", f"training.eval_every_rounds={every}"]
        peers, _ = start_swarm(Path(tmp), PEERS, swarm_id="simreal", rounds=rounds, extra=extra)
        accuracy: dict[str, dict[int, float]] = {p.name: {} for p in peers}
        sent: dict[str, int] = {}
        consensus: dict[str, int] = {}
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
                        sent[peer.name] = int(event["gossip_bytes_sent"])
                        consensus[peer.name] = int(event["consensus_bytes_sent"])
        finally:
            for peer in peers:
                peer.stop()
    common = sorted(set.intersection(*(set(a) for a in accuracy.values())))
    curve = {r: sum(accuracy[p][r] for p in accuracy) / PEERS for r in common if r % every == 0}
    count = max(1, len(sent))
    return Side(curve, sum(sent.values()) / count, sum(consensus.values()) / count), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()
    sim = simulated(args.rounds, args.seed, args.eval_every)
    actual, real_s = real(args.rounds, args.eval_every)
    sim_curve, real_curve = sim.curve, actual.curve
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
                "sim_gossip_bytes_per_peer": round(sim.gossip_bytes),
                "real_gossip_bytes_per_peer": round(actual.gossip_bytes),
                "sim_consensus_bytes_per_peer": round(sim.consensus_bytes),
                "real_consensus_bytes_per_peer": round(actual.consensus_bytes),
                "real_wall_s": round(real_s, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
