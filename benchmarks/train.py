"""Time from launch to 95 % test accuracy on `digits`: 4 peer processes on 127.0.0.1 versus one process, same run.

Prints one JSON line. Swarm: 4 `swarmgrad peer` processes (one bootstrap, three finding each other through the DHT;
each waits until `--min-peers` others are live, then trains; one that comes later fetches the current model),
evaluating every 5 rounds. `swarm_time_to_target_s` is the time from launching the first process until every peer
has reported the target accuracy, `per_peer_...` the time for each, `first_evaluation_s` when each peer first
reported (start-up: interpreter, imports, joining). Baseline: one process (also launched fresh, so it pays the
same interpreter and import costs) trains the same model on the whole training set, evaluating every 5 steps.
Bytes: what each peer's transport sent (gossip, plus any model it served to a joiner), against what its gossip
messages would have cost dense (fp32, the whole parameter vector). The goal of the issue: <= 10 s from
launch with >= 50x fewer bytes than dense.

Run: .venv/bin/python benchmarks/train.py [--rounds N] [--target 0.95]
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


def run_swarm(target: float, rounds: int, min_peers: int, workdir: Path) -> dict[str, object]:
    launched = time.time()
    extra = ["--set", f"network.min_peers={min_peers}", "--set", f"training.eval_every_rounds={EVAL_EVERY}"]
    peers, _ = start_swarm(workdir, 4, swarm_id="bench", rounds=rounds, extra=extra)
    try:
        finished = {peer.name: peer.read_until("finished", 600.0) for peer in peers}
    finally:
        for peer in peers:
            peer.stop()
    hits, first_rounds = [], []
    for peer in peers:
        evaluations = peer.seen("round")
        first_rounds.append(evaluations[0]["unix_s"] - launched if evaluations else None)
        reached = [e["unix_s"] for e in evaluations if e["value"] >= target]
        hits.append(reached[0] - launched if reached else None)
    sent = [e["bytes_sent"] for e in finished.values()]
    dense = [e["dense_bytes_equivalent"] for e in finished.values()]
    return {
        "time_to_target_s": None if None in hits else max(h for h in hits if h is not None),
        "per_peer_time_to_target_s": [None if h is None else round(h, 2) for h in hits],
        "first_evaluation_s": [None if f is None else round(f, 2) for f in first_rounds],
        "final_accuracy": [round(e["value"], 4) for e in finished.values()],
        "bytes_sent_per_peer": sent,
        "dense_bytes_per_peer": dense,
        "compression_ratio_median": statistics.median(d / s for d, s in zip(dense, sent, strict=True) if s),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=150, help="rounds per peer (steps for the baseline: 4x)")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument(
        "--min-peers", type=int, default=3, help="live peers each waits for before its first round (0: train at once)"
    )
    parser.add_argument("--single-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single_child:
        single_process(args.target, args.rounds)
        return 0
    single = run_single(args.target, 4 * args.rounds)
    with tempfile.TemporaryDirectory(prefix="swarmgrad-bench-") as tmp:
        try:
            swarm = run_swarm(args.target, args.rounds, args.min_peers, Path(tmp))
        except ChildFailed as exc:
            print(json.dumps({"benchmark": "train", "error": str(exc)}))
            return 1
    swarm_s, single_s = swarm["time_to_target_s"], single["time_to_target_s"]
    record = {
        "benchmark": "train",
        "task": "digits",
        "peers": 4,
        "target_accuracy": args.target,
        "swarm_time_to_target_s": None if swarm_s is None else round(float(swarm_s), 2),  # type: ignore[arg-type]
        "single_time_to_target_s": None if single_s is None else round(single_s, 2),
        "swarm_over_single": None if swarm_s is None or not single_s else round(float(swarm_s) / single_s, 2),  # type: ignore[arg-type]
        "single_steps": single["steps"],
        "min_peers": args.min_peers,
        **{key: value for key, value in swarm.items() if key != "time_to_target_s"},
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
