"""Pure-torch reference implementations of the top-k operators: the test oracle and the opt-in fallback.

This module owns the *meaning* of each operator; the C++/CUDA kernels in `csrc/` must agree with it (up to the
choice among tied elements). It must stay plain torch: no compiled code, no I/O, no randomness.

Conventions shared with the kernels:

* magnitude order is the order of `|x|` with NaN ranked above +Inf (as `torch.topk` ranks NaN);
* the k selected indices come back sorted ascending (int64), with the original signed values in `x`'s dtype;
* among elements of equal magnitude any subset may be chosen; the count is always exactly k.
"""

from __future__ import annotations

import torch

from swarmgrad.core.errors import LocalProtocolError

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_topk_args(x: torch.Tensor, k: int) -> None:
    """The argument checks of `topk_abs` whatever the implementation (the kernels' `TORCH_CHECK`s, which raise
    `RuntimeError` when the op is called directly, check the same). Raises `LocalProtocolError`: a caller's bug."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise LocalProtocolError(f"topk_abs: x must be float32, float16 or bfloat16, got {x.dtype}")
    if not 0 <= k <= x.numel():
        raise LocalProtocolError(f"topk_abs: k must be in [0, {x.numel()}], got {k}")


def reference_topk_abs(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int64, ascending) and signed values of the `k` largest `|x|` of `x` flattened."""
    check_topk_args(x, k)
    flat = x.reshape(-1)
    # torch.topk ranks NaN above every number, which is the documented order; fp32 keeps fp16/bf16 exact.
    _, indices = torch.topk(flat.abs().float(), k, sorted=False)
    indices, _ = torch.sort(indices)
    return indices, flat[indices]
