"""Benchmark of the top-k compression layer: the native `topk_abs` against `torch.topk(x.abs(), k)` and the
memory-read floor (one `x.sum()` over the same tensor), the fused error-feedback step against the same step in
torch ops, and the sparse payload (bytes per selected entry, encode and decode time) in every value format.

Prints one JSON line per (size, density) case; every figure is a median over repeats measured in this run.
Usage: `python benchmarks/topk.py [--sizes 1e6,1e7,1e8] [--densities 0.001,0.01] [--device cpu|cuda]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.topk import ErrorFeedback, k_for_density, load_extension, pack_sparse, topk_abs, unpack_sparse
from training.topk.payload import VALUE_FORMATS
from training.topk.reference import reference_ef_step


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_case(n: int, density: float, device: torch.device) -> dict[str, object]:
    repeats = 3 if n >= 50_000_000 else 7
    gen = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(n, generator=gen, device=device)
    k = k_for_density(n, density)
    native_ms = median_ms(lambda: topk_abs(x, k), repeats, device)
    torch_ms = median_ms(lambda: torch.topk(x.abs(), k), repeats, device)
    floor_ms = median_ms(lambda: x.sum(), repeats, device)
    case: dict[str, object] = {
        "bench": "topk",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "n": n,
        "density": density,
        "k": k,
        "native_ms": round(native_ms, 3),
        "torch_topk_ms": round(torch_ms, 3),
        "read_floor_ms": round(floor_ms, 3),
        "speedup_vs_torch_topk": round(torch_ms / native_ms, 2),
        "native_vs_floor": round(native_ms / floor_ms, 2),
        "torch_topk_vs_floor": round(torch_ms / floor_ms, 2),
    }
    if device.type == "cpu":
        grad = torch.randn(n, generator=gen)
        ef = ErrorFeedback(n, density)
        residual = torch.zeros(n)
        ef_ms = median_ms(lambda: ef.compress(grad), repeats, device)
        torch_ef_ms = median_ms(lambda: reference_ef_step(residual, grad, k), repeats, device)
        case.update(
            ef_step_native_ms=round(ef_ms, 3),
            ef_step_torch_ops_ms=round(torch_ef_ms, 3),
            ef_step_speedup=round(torch_ef_ms / ef_ms, 2),
        )
        indices, values = topk_abs(x, k)
        payload: dict[str, object] = {}
        for fmt in VALUE_FORMATS:
            packed = pack_sparse(indices, values, n, value_format=fmt)
            payload[fmt] = {
                "index_format": packed.index_format,
                "bytes_per_selected": round(packed.size_bytes / k, 3),
                "vs_dense_fp32": round(4 * n / packed.size_bytes, 1),
                "encode_ms": round(
                    median_ms(lambda f=fmt: pack_sparse(indices, values, n, value_format=f), 5, device), 3
                ),  # type: ignore[misc]
                "decode_ms": round(median_ms(lambda p=packed: unpack_sparse(p, n, max_k=k), 5, device), 3),  # type: ignore[misc]
            }
        case["payload"] = payload
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated element counts")
    parser.add_argument("--densities", default="0.001,0.01", help="comma-separated densities")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    device = torch.device(args.device)
    load_extension()
    for size in args.sizes.split(","):
        for density in args.densities.split(","):
            print(json.dumps(run_case(int(float(size)), float(density), device)), flush=True)


if __name__ == "__main__":
    main()
