"""Benchmark of the top-k compression layer: the native `topk_abs` against `torch.topk(x.abs(), k)` and the
memory-read floor (one `x.sum()` over the same tensor), and the sparse payload (bytes per selected entry, encode
and decode time) in every value format.

Prints one JSON line per (size, density) case; every time is a median over rounds measured in this run, and every
ratio the median of the per-round ratios (the calls of one round run back to back, under the same load).
Usage: `python benchmarks/topk.py [--sizes 1e6,1e7,1e8] [--densities 0.001,0.01] [--device cpu|cuda] [--threads N]`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.topk import load_extension, pack_sparse, topk_abs, unpack_sparse
from training.topk.payload import VALUE_FORMATS


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of `fn` in milliseconds (the device synchronised around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def paired(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Times every function once per round, round after round (after one warm-up round), so that each round's
    ratios compare calls made under the same load; returns the times of every round, by name."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(elapsed_ms(fn, device))
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    return round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 2)


def med(times: list[float]) -> float:
    return round(statistics.median(times), 3)


def run_case(n: int, density: float, device: torch.device) -> dict[str, object]:
    repeats = 3 if n >= 50_000_000 else 7
    gen = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(n, generator=gen, device=device)
    k = min(n, max(1, math.ceil(density * n)))  # as `GossipConfig.k_for`
    t = paired(
        {"native": lambda: topk_abs(x, k), "torch_topk": lambda: torch.topk(x.abs(), k), "floor": lambda: x.sum()},
        repeats,
        device,
    )
    case: dict[str, object] = {
        "bench": "topk",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "n": n,
        "density": density,
        "k": k,
        "native_ms": med(t["native"]),
        "torch_topk_ms": med(t["torch_topk"]),
        "read_floor_ms": med(t["floor"]),
        "speedup_vs_torch_topk": median_ratio(t["torch_topk"], t["native"]),
        "native_vs_floor": median_ratio(t["native"], t["floor"]),
        "torch_topk_vs_floor": median_ratio(t["torch_topk"], t["floor"]),
    }
    if device.type == "cpu":
        indices, values = topk_abs(x, k)
        payload: dict[str, object] = {}
        for fmt in VALUE_FORMATS:
            packed = pack_sparse(indices, values, n, value_format=fmt)
            p = paired(
                {
                    "encode": lambda f=fmt: pack_sparse(indices, values, n, value_format=f),  # type: ignore[misc]
                    "decode": lambda q=packed: unpack_sparse(q, n, max_k=k),  # type: ignore[misc]
                },
                5,
                device,
            )
            payload[fmt] = {
                "index_format": packed.index_format,
                "bytes_per_selected": round(packed.size_bytes / k, 3),
                "vs_dense_fp32": round(4 * n / packed.size_bytes, 1),
                "encode_ms": med(p["encode"]),
                "decode_ms": med(p["decode"]),
            }
        case["payload"] = payload
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated element counts")
    parser.add_argument("--densities", default="0.001,0.01", help="comma-separated densities")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_extension()
    for size in args.sizes.split(","):
        for density in args.densities.split(","):
            print(json.dumps(run_case(int(float(size)), float(density), device)), flush=True)


if __name__ == "__main__":
    main()
