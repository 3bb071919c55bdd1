"""Benchmark of the event loop's responsiveness during gossip rounds over large models.

Three peers gossip over the in-memory transport (1 ms links), each averaging a `--params`-element vector (default
10M, density 1 %, fp16 on the wire), for `--rounds` rounds. A probe task on each run's event loop sleeps 1 ms at a
time and records how late it wakes: the event loop's lag. Two runs, in this process, one after the other: the
round's tensor work (top-k selection, aggregation) in worker threads (`Compute`, the product's default), and the
baseline with the same work on the event loop (what every round did before `Compute` existed). The target: a worst
lag under 50 ms at 10M parameters.

Prints one JSON line: worst and median lag (ms) and rounds per second of each run, and the ratio of worst lags.
Usage: `python benchmarks/event_loop_lag.py [--params 10000000] [--rounds 8]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gossip.messages import model_fingerprint
from gossip.round import GossipConfig
from gossip.service import GossipService
from sim.transport import LinkModel, SimNetwork
from swarmgrad.core.driver import ComputeRunner, run_in_worker_thread, run_on_event_loop

PEERS = 3
PROBE_INTERVAL_S = 0.001


async def measure(numel: int, rounds: int, run_compute: ComputeRunner) -> dict[str, float]:
    """Lags (s) seen by the probe while every peer runs `rounds` rounds, and the rounds' wall time."""
    net = SimNetwork(seed=1, default_link=LinkModel(latency_s=0.001))
    names = [f"p{i}" for i in range(PEERS)]
    lags: list[float] = []
    async with net.run(), AsyncExitStack() as stack, trio.open_nursery() as nursery:
        transports = [await stack.enter_async_context(net.open_transport(n)) for n in names]
        for i, t in enumerate(transports):
            for other in names[i + 1 :]:
                await t.connect(other)
        services = []
        for i, t in enumerate(transports):
            config = GossipConfig(swarm_id="lag", density=0.01, round_deadline_s=30.0, seed=i, neighbours_per_round=2)
            service = GossipService(t, config, numel, model_fingerprint([(numel,)]), run_compute=run_compute)
            await nursery.start(service.run)
            services.append(service)

        async def probe() -> None:
            while True:
                before = trio.current_time()
                await trio.sleep(PROBE_INTERVAL_S)
                lags.append(trio.current_time() - before - PROBE_INTERVAL_S)

        async def peer(service: GossipService, seed: int) -> None:
            x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
            for _ in range(rounds):
                x = (await service.average_async(x)).params
                x.add_(1e-3)  # a training step's worth of change, so each round selects afresh

        nursery.start_soon(probe)
        start = trio.current_time()
        async with trio.open_nursery() as peers:
            for i, service in enumerate(services):
                peers.start_soon(peer, service, i)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    return {"worst_lag_s": max(lags), "median_lag_s": statistics.median(lags), "rounds_per_s": rounds / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    threaded = trio.run(measure, args.params, args.rounds, run_in_worker_thread)
    inline = trio.run(measure, args.params, args.rounds, run_on_event_loop)
    print(
        json.dumps(
            {
                "benchmark": "event_loop_lag",
                "params": args.params,
                "peers": PEERS,
                "rounds": args.rounds,
                "worst_lag_ms": round(threaded["worst_lag_s"] * 1e3, 1),
                "median_lag_ms": round(threaded["median_lag_s"] * 1e3, 2),
                "rounds_per_s": round(threaded["rounds_per_s"], 2),
                "baseline_on_event_loop_worst_lag_ms": round(inline["worst_lag_s"] * 1e3, 1),
                "baseline_median_lag_ms": round(inline["median_lag_s"] * 1e3, 2),
                "baseline_rounds_per_s": round(inline["rounds_per_s"], 2),
                "worst_lag_ratio": round(inline["worst_lag_s"] / threaded["worst_lag_s"], 1),
                "goal_worst_lag_ms": 50,
            }
        )
    )


if __name__ == "__main__":
    main()
