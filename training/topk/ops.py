"""The public top-k operator and the choice between the native kernels and the pure-torch reference.

This module owns `topk_abs` and the rule for which implementation runs: the native op
`torch.ops.swarmgrad.topk_abs` (built on first use, see `build.py`), unless the caller opted into the reference,
either with `implementation="reference"` or with the environment variable `SWARMGRAD_TOPK_FALLBACK=reference`
(read at call time). A native build that fails is an error that says how to build; it never silently falls back.
`TopKSelector` makes that choice, and loads the kernels, once, when it is built: what a protocol machine is handed,
so that no machine step reads the environment or loads a library.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from swarmgrad.core.errors import ConfigError, LocalProtocolError
from training.topk.build import ExtensionUnavailable, has_cuda_kernels, load_extension
from training.topk.reference import check_topk_args, reference_topk_abs

Implementation = Literal["native", "reference"]
FALLBACK_ENV = "SWARMGRAD_TOPK_FALLBACK"


def resolve_implementation(implementation: Implementation | None) -> Implementation:
    """`implementation` if given, else `reference` when `SWARMGRAD_TOPK_FALLBACK=reference`, else `native`."""
    if implementation is None:
        env = os.environ.get(FALLBACK_ENV, "")
        if env not in ("", "reference"):
            raise ConfigError(FALLBACK_ENV, env, "unset, empty or 'reference'")
        return "reference" if env == "reference" else "native"
    if implementation not in ("native", "reference"):
        raise ConfigError("implementation", implementation, "'native', 'reference' or None")
    return implementation


def ensure_native(device: torch.device) -> None:
    """Load the native kernels and check they cover `device`. Raises `ExtensionUnavailable`."""
    load_extension()
    if device.type == "cuda" and not has_cuda_kernels():
        raise ExtensionUnavailable(
            "the native top-k kernels were built without CUDA (torch has no CUDA or no CUDA toolkit was found); "
            "move the tensor to the CPU or opt into the reference with SWARMGRAD_TOPK_FALLBACK=reference"
        )
    if device.type not in ("cpu", "cuda"):
        raise ExtensionUnavailable(f"no native top-k kernel for device {device}")


def topk_abs(
    x: torch.Tensor, k: int, *, implementation: Implementation | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int64, ascending) and signed values (x's dtype) of the `k` largest `|x|` of `x` flattened.

    `x` is float32, float16 or bfloat16, of any shape and strides; `0 <= k <= x.numel()`. NaN ranks above +Inf
    (as in `torch.topk`); among equal magnitudes the lowest indices are taken by the native kernels (the
    reference may take any of them). A bad dtype or k raises `LocalProtocolError`.
    """
    check_topk_args(x, k)
    if resolve_implementation(implementation) == "reference":
        return reference_topk_abs(x, k)
    ensure_native(x.device)
    indices, values = torch.ops.swarmgrad.topk_abs(x, k)
    return indices, values


class TopKSelector:
    """`topk_abs` with its implementation chosen, and the native kernels loaded and checked for `device`, at
    construction (`implementation=None` reads `SWARMGRAD_TOPK_FALLBACK` then, and only then). Raises
    `ExtensionUnavailable` or `ConfigError` there, never on a call."""

    def __init__(self, implementation: Implementation | None = None, device: torch.device | None = None) -> None:
        self.implementation = resolve_implementation(implementation)
        self.device = torch.device("cpu") if device is None else device
        if self.implementation == "native":
            ensure_native(self.device)

    def __call__(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (ascending) and values of the `k` largest `|x|`, as `topk_abs`."""
        check_topk_args(x, k)
        if x.device != self.device:
            raise LocalProtocolError(f"this selector was built for {self.device}, got a tensor on {x.device}")
        if self.implementation == "reference":
            return reference_topk_abs(x, k)
        indices, values = torch.ops.swarmgrad.topk_abs(x, k)
        return indices, values
