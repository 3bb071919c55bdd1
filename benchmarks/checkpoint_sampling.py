"""Benchmark of the data side of epoch consensus: building a checkpoint root, serving and checking a sample, and
how far apart honest peers' parameters are (what the sampling tolerance must admit).

Default: one JSON line per model size (`--params`, default 1e6 and 1e7 float32 parameters, in three tensors):
the median wall time over `--repeats` runs of `CheckpointTree.from_state` (canonical bytes, chunk hashes, tree),
SHA-256 alone over the same bytes (the floor), serving and checking `DEFAULT_SAMPLE_COUNT` chunks against a voter
whose parameters differ by 1 %, and the reply's bytes on the wire (the validity traffic of one voter per proposal).

`--scenario SIM.toml [--seed N]`: runs the simulated swarm and prints, per swarm round, its consensus distance and
the largest relative distance `||x_i - x_j|| / ||x_j||` between two live honest peers (`consensus.chunks`'s metric
over the whole vector). `--checkpoints DIR`: the same metric between the peers' checkpoints of each round that all
of them kept (in a directory of peer data directories, e.g. one written by `python -m swarmgrad.demo --keep DIR`):
over the whole model, per chunk, and per 4 KiB piece of the parameters (1,024 float32 values: what the chunks of a
model too small to have several look like). docs/consensus.md reports both.

Usage: `python benchmarks/checkpoint_sampling.py [--params 1e6,1e7] [--repeats 3]`,
`... --scenario S.toml [--seed N]` or `... --checkpoints DIR`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before this folder, whose gossip.py would shadow the gossip package

from consensus.chunks import (  # noqa: E402
    DEFAULT_SAMPLE_COUNT,
    SCHEMA,
    ChunkRequest,
    check_sample,
    chunk_distance,
    sample_indices,
    serve,
)
from consensus.merkle import CheckpointTree  # noqa: E402

PIECE_VALUES = 1024


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timing(params: int, repeats: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    first = params // 2
    state = {
        "a.weight": torch.randn(first, generator=gen),
        "a.bias": torch.randn(1000, generator=gen),
        "b.weight": torch.randn(params - first - 1000, generator=gen),
    }
    tree = CheckpointTree.from_state(state)
    own = CheckpointTree.from_state(
        {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    )
    indices = sample_indices(b"a voter's signature", tree.chunk_count, DEFAULT_SAMPLE_COUNT)
    request = ChunkRequest("bench", 1, tree.root, indices)
    reply = serve(request, tree)
    verdict = check_sample(tree.root, tree.chunk_count, indices, reply, own)
    return {
        "params": params,
        "size_bytes": tree.total_size_bytes,
        "chunks": tree.chunk_count,
        "root_ms": round(median_ms(lambda: CheckpointTree.from_state(state), repeats), 1),
        "sha256_only_ms": round(median_ms(lambda: hashlib.sha256(tree.data).digest(), repeats), 1),
        "serve_ms": round(median_ms(lambda: serve(request, tree), repeats), 2),
        "check_ms": round(
            median_ms(lambda: check_sample(tree.root, tree.chunk_count, indices, reply, own), repeats), 2
        ),
        "sample_chunks": len(indices),
        "reply_bytes": len(SCHEMA.encode(reply)),
        "honest_sample_passes": verdict is None,
    }


def largest_relative_distance(vectors: list[torch.Tensor]) -> float:
    return max(float((a - b).norm() / b.norm()) for a, b in itertools.permutations(vectors, 2))


def spread_in_simulation(scenario_path: Path, seed: int) -> None:
    from sim.scenario import load_scenario
    from sim.swarm import SwarmRun

    class Measured(SwarmRun):
        def _record(self) -> None:
            super()._record()
            live = [self.peers[p].params for p in self.honest if self.peers[p].live]
            row = self.rows[-1]
            widest = largest_relative_distance(live) if len(live) > 1 else 0.0
            print(json.dumps({"round": row.round, "consensus_distance": row.consensus_distance, "max_rel": widest}))

    torch.set_num_threads(1)
    Measured(load_scenario(scenario_path), seed).run()


def spread_of_checkpoints(directory: Path) -> None:
    from safetensors.torch import load_file

    peers = sorted(p for p in directory.iterdir() if (p / "checkpoints").is_dir())
    kept = [{f.name for f in (p / "checkpoints").glob("ckpt-*[0-9].safetensors")} for p in peers]
    for name in sorted(set.intersection(*kept)) if len(peers) > 1 else []:
        states = [load_file(p / "checkpoints" / name) for p in peers]
        flat = [torch.cat([s[k].double().reshape(-1) for k in sorted(s)]) for s in states]
        trees = [CheckpointTree.from_state(s) for s in states]
        per_chunk = []
        for i in range(trees[0].chunk_count):
            distances = [chunk_distance(i, a.chunk(i), b) for a, b in itertools.permutations(trees, 2)]
            per_chunk.append(max(d for d in distances if isinstance(d, float)))
        line = {"checkpoint": name, "peers": len(peers), "chunks": trees[0].chunk_count}
        line["max_rel_whole_model"] = round(largest_relative_distance(flat), 4)
        line["max_rel_per_chunk"] = round(max(per_chunk), 4)
        pieces = [v.split(PIECE_VALUES) for v in flat]
        line["max_rel_per_4KiB_piece"] = round(
            max(largest_relative_distance([p[i] for p in pieces]) for i in range(len(pieces[0]))), 4
        )
        print(json.dumps(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="1e6,1e7")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenario", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoints", type=Path)
    args = parser.parse_args()
    if args.scenario is not None:
        spread_in_simulation(args.scenario, args.seed)
    elif args.checkpoints is not None:
        spread_of_checkpoints(args.checkpoints)
    else:
        torch.set_num_threads(1)
        for params in (int(float(p)) for p in args.params.split(",")):
            print(json.dumps(timing(params, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
