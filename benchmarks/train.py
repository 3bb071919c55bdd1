"""Time from launch to 95 % test accuracy on `digits`: 4 peer processes on 127.0.0.1 versus one process, same run.

Prints one JSON line. Swarm: 4 `swarmgrad peer` processes (one bootstrap, three finding each other through the DHT;
each waits until `--min-peers` others are live, then trains; one that comes later fetches the current model),
evaluating every 5 rounds. `swarm_time_to_target_s` is the time from launching the first process until every peer
has reported the target accuracy, `per_peer_...` the time for each, `first_evaluation_s` when each peer first
reported (start-up: interpreter, imports, joining). Baseline: one process (also launched fresh, so it pays the
same interpreter and import costs) trains the same model on the whole training set, evaluating every 5 steps.
Bytes: what each peer's transport sent (gossip, any model it served to a joiner, consensus); the compression ratio
sets what its gossip messages would have cost dense (fp32, the whole parameter vector) against gossip's own bytes.
The goal of the issue: <= 10 s from launch with >= 50x fewer bytes than dense.

Consensus costs: the swarm runs with epoch consensus on (the default) and off (`--no-consensus`), `--repeats`
times each, alternating which goes first, in the same run. `consensus_over_off` holds the medians' ratios, on over
off, of the time to the target and of the rounds per second (per peer, between its first and last evaluation,
median over the peers; the goal: the first <= 1.05, the second >= 0.95). With consensus on, `commit_latency_ms`
gives per epoch the median and max over the peers' `certified` events (all repeats pooled), and
`consensus_bytes_per_peer_per_epoch` what the agreement and the chunk exchange sent (their drivers' payload bytes)
beside `gossip_bytes_per_peer_per_epoch`, what gossip sent (medians over the peers of the last repeat).

Run: .venv/bin/python benchmarks/train.py [--rounds N] [--target 0.95] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarmgrad.demo import start_swarm  # noqa: E402
from swarmgrad.procs import ChildFailed  # noqa: E402

EVAL_EVERY = 5


def single_process(target: float, max_steps: int) -> None:
    """The baseline child: train on the whole training set; print the unix time the target was first reached."""
    import torch

    from training.tasks.digits import DigitsTask, make_task

    torch.set_num_threads(1)
    task = DigitsTask(shard_fraction=1.0, optimizer=make_task().optimizer)
    model = task.build_model()
    optimizer = task.optimizer.build(list(model.parameters()))
    batches = task.shard("baseline").batches()
    hit_unix_s, value = None, 0.0
    for step in range(1, max_steps + 1):
        loss = task.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % EVAL_EVERY == 0:
            value = task.evaluate(model).value
            if value >= target:
                hit_unix_s = time.time()
                break
    print(json.dumps({"hit_unix_s": hit_unix_s, "steps": step, "value": value}), flush=True)


def run_single(target: float, max_steps: int) -> dict[str, float | None]:
    launched = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--single-child", "--target", str(target), "--rounds", str(max_steps)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    hit = result["hit_unix_s"]
    return {"time_to_target_s": None if hit is None else hit - launched, "steps": result["steps"]}


def rounds_per_s(evaluations: list[dict[str, Any]]) -> float | None:
    """Training speed of one peer: rounds between its first and last evaluation over the time between them."""
    if len(evaluations) < 2 or evaluations[-1]["unix_s"] <= evaluations[0]["unix_s"]:
        return None
    first, last = evaluations[0], evaluations[-1]
    return (last["round"] - first["round"]) / (last["unix_s"] - first["unix_s"])


def run_swarm(target: float, rounds: int, min_peers: int, workdir: Path, consensus: bool) -> dict[str, Any]:
    launched = time.time()
    extra = ["--set", f"network.min_peers={min_peers}", "--set", f"training.eval_every_rounds={EVAL_EVERY}"]
    if not consensus:
        extra.append("--no-consensus")
    peers, _ = start_swarm(workdir, 4, swarm_id="bench", rounds=rounds, extra=extra)
    try:
        finished = {peer.name: peer.read_until("finished", 600.0) for peer in peers}
    finally:
        for peer in peers:
            peer.stop()
    hits, first_rounds, speeds = [], [], []
    latencies: dict[int, list[float]] = {}
    for peer in peers:
        evaluations = peer.seen("round")
        first_rounds.append(evaluations[0]["unix_s"] - launched if evaluations else None)
        reached = [e["unix_s"] for e in evaluations if e["value"] >= target]
        hits.append(reached[0] - launched if reached else None)
        speeds.append(rounds_per_s(evaluations))
        for event in peer.seen("certified"):
            if event["commit_latency_ms"] is not None:
                latencies.setdefault(event["epoch"], []).append(event["commit_latency_ms"])
    sent = [e["bytes_sent"] for e in finished.values()]
    gossip = [e["gossip_bytes_sent"] for e in finished.values()]  # what the dense figure prices
    dense = [e["dense_bytes_equivalent"] for e in finished.values()]
    measured = [s for s in speeds if s is not None]
    per_epoch = {
        key: [e[key] / e["epochs"] for e in finished.values() if e["epochs"]]
        for key in ("gossip_bytes_sent", "consensus_bytes_sent")
    }
    return {
        "time_to_target_s": None if None in hits else max(h for h in hits if h is not None),
        "rounds_per_s": statistics.median(measured) if measured else None,
        "latencies_ms": latencies,
        "gossip_bytes_per_peer_per_epoch": round(statistics.median(per_epoch["gossip_bytes_sent"]))
        if per_epoch["gossip_bytes_sent"]
        else None,
        "consensus_bytes_per_peer_per_epoch": round(statistics.median(per_epoch["consensus_bytes_sent"]))
        if per_epoch["consensus_bytes_sent"]
        else None,
        "epochs_per_peer": [e["epochs"] for e in finished.values()],
        "certified_epochs_per_peer": [len(peer.seen("certified")) for peer in peers],
        "per_peer_time_to_target_s": [None if h is None else round(h, 2) for h in hits],
        "first_evaluation_s": [None if f is None else round(f, 2) for f in first_rounds],
        "final_accuracy": [round(e["value"], 4) for e in finished.values()],
        "bytes_sent_per_peer": sent,
        "dense_bytes_per_peer": dense,
        "compression_ratio_median": statistics.median(d / g for d, g in zip(dense, gossip, strict=True) if g),
    }


def median_or_none(values: list[Any]) -> float | None:
    """The median, or None when a value is missing (a run that never reached the target)."""
    return None if not values or None in values else statistics.median(values)


def ratio(on: float | None, off: float | None) -> float | None:
    return None if on is None or not off else round(on / off, 3)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["time_to_target_s"] for r in runs]
    speeds = [r["rounds_per_s"] for r in runs]
    return {
        "time_to_target_s": median_or_none(times),
        "rounds_per_s": median_or_none(speeds),
        "time_to_target_s_per_repeat": [None if t is None else round(t, 2) for t in times],
        "rounds_per_s_per_repeat": [None if v is None else round(v, 2) for v in speeds],
        "first_evaluation_s_median": median_or_none([median_or_none(r["first_evaluation_s"]) for r in runs]),
        "gossip_bytes_per_peer_per_epoch": runs[-1]["gossip_bytes_per_peer_per_epoch"],
    }


def commit_latency(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    pooled: dict[int, list[float]] = {}
    for run in runs:
        for epoch, values in run["latencies_ms"].items():
            pooled.setdefault(epoch, []).extend(values)
    return {
        str(epoch): {"median_ms": round(statistics.median(v), 1), "max_ms": round(max(v), 1), "samples": len(v)}
        for epoch, v in sorted(pooled.items())
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=150, help="rounds per peer (steps for the baseline: 4x)")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument(
        "--min-peers", type=int, default=3, help="live peers each waits for before its first round (0: train at once)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="swarm runs with consensus on, and as many off")
    parser.add_argument("--single-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single_child:
        single_process(args.target, args.rounds)
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    single = run_single(args.target, 4 * args.rounds)
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="swarmgrad-bench-") as tmp:
        try:
            for repeat in range(args.repeats):
                for consensus in (False, True) if repeat % 2 == 0 else (True, False):
                    workdir = Path(tmp) / f"{'on' if consensus else 'off'}-{repeat}"
                    runs[consensus].append(run_swarm(args.target, args.rounds, args.min_peers, workdir, consensus))
        except ChildFailed as exc:
            print(json.dumps({"benchmark": "train", "error": str(exc)}))
            return 1
    on, off = summary(runs[True]), summary(runs[False])
    time_ratio = ratio(on["time_to_target_s"], off["time_to_target_s"])
    speed_ratio = ratio(on["rounds_per_s"], off["rounds_per_s"])
    swarm = runs[True][-1]
    swarm_s, single_s = on["time_to_target_s"], single["time_to_target_s"]
    record = {
        "benchmark": "train",
        "task": "digits",
        "peers": 4,
        "target_accuracy": args.target,
        "repeats": args.repeats,
        "swarm_time_to_target_s": None if swarm_s is None else round(float(swarm_s), 2),
        "single_time_to_target_s": None if single_s is None else round(single_s, 2),
        "swarm_over_single": None if swarm_s is None or not single_s else round(float(swarm_s) / single_s, 2),
        "single_steps": single["steps"],
        "min_peers": args.min_peers,
        "consensus_on": on,
        "consensus_off": off,
        "consensus_over_off": {
            "time_to_target": time_ratio,
            "rounds_per_s": speed_ratio,
            "within_5_percent": time_ratio is not None
            and speed_ratio is not None
            and time_ratio <= 1.05
            and speed_ratio >= 0.95,
        },
        "commit_latency_ms": commit_latency(runs[True]),
        **{
            key: value
            for key, value in swarm.items()
            if key not in ("time_to_target_s", "rounds_per_s", "latencies_ms")
        },
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
