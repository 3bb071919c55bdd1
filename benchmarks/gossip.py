"""Gossip rounds of 4 peer processes on 127.0.0.1: sparse (top-k 1 %) against a dense exchange, same transport.

Runs `testing.gossip_loopback` twice with 4 processes each (LibP2PTransport, Noise + yamux) over a 10M-element
fp32 vector:

* `sparse`: the `GossipService` (error-compensated top-k values, fp16, 1 chosen neighbour per round; with
  push-pull a peer also answers whoever chose it, so it sends about 2 messages a round, as in the dense mode),
  `SPARSE_ROUNDS` rounds;
* `dense` (the baseline, measured in the same run): each peer sends its whole fp32 vector to its two ring neighbours
  and averages what it receives, `DENSE_ROUNDS` rounds.

Round 0 of each run (stream opening, first native top-k call) is left out. Prints one JSON line: the median seconds
per round and median bytes sent per peer per round of each mode, their ratios, the fraction of sparse rounds that
ended at their deadline, and the load average (the figures are from a shared 2-core box). Goals: sparse <= 0.2 s
per round and <= 1/50 of the dense bytes.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PEERS = 4
NUMEL = 10_000_000
DENSITY = 0.01
SPARSE_ROUNDS = 12
DENSE_ROUNDS = 4
SPARSE_DEADLINE_S = 5.0
DENSE_DEADLINE_S = 60.0
RUN_TIMEOUT_S = 500.0
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testing.gossip_loopback import spawn_peers, stop_peers  # noqa: E402


def run_mode(mode: str, rounds: int, deadline_s: float) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix=f"gossip-bench-{mode}-") as tmp:
        directory = Path(tmp)
        options = ["--numel", str(NUMEL), "--rounds", str(rounds), "--deadline-s", str(deadline_s)]
        options += ["--density", str(DENSITY), "--neighbours", "1", "--mode", mode]
        procs = spawn_peers(directory, PEERS, options)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            statuses = [proc.wait(max(1.0, deadline - time.monotonic())) for proc in procs]
        finally:
            stop_peers(procs)
        if any(statuses):
            raise SystemExit(f"{mode}: a peer failed: {statuses}: {[proc.tail() for proc in procs]}")
        records = [e for proc in procs for e in proc.snapshot() if e["event"] == "round"]
    return [r for r in records if r["round"] > 0]


def main() -> None:
    sparse = run_mode("sparse", SPARSE_ROUNDS, SPARSE_DEADLINE_S)
    dense = run_mode("dense", DENSE_ROUNDS, DENSE_DEADLINE_S)
    sparse_s = statistics.median(r["seconds"] for r in sparse)
    dense_s = statistics.median(r["seconds"] for r in dense)
    sparse_bytes = statistics.median(r["bytes_sent"] for r in sparse)
    dense_bytes = statistics.median(r["bytes_sent"] for r in dense)
    result = {
        "benchmark": "gossip",
        "peers": PEERS,
        "numel": NUMEL,
        "density": DENSITY,
        "sparse_s_per_round_median": round(sparse_s, 4),
        "dense_s_per_round_median": round(dense_s, 4),
        "sparse_bytes_per_peer_round_median": sparse_bytes,
        "dense_bytes_per_peer_round_median": dense_bytes,
        "bytes_ratio_sparse_over_dense": round(sparse_bytes / dense_bytes, 5),
        "time_ratio_sparse_over_dense": round(sparse_s / dense_s, 4),
        "sparse_rounds_timed_out_fraction": round(sum(r["timed_out"] for r in sparse) / len(sparse), 3),
        "sparse_neighbours_heard_median": statistics.median(r["heard"] for r in sparse),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "goal": "sparse <= 0.2 s per round and <= 1/50 of dense bytes",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
