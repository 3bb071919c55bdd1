"""Error feedback for top-k compression: a compressor per flattened tensor that keeps what it did not send.

This module owns `ErrorFeedback` (the residual, the optional momentum buffer and the density schedule) and the
validated `TopKConfig`. It does no I/O and knows nothing of the wire format (`payload.py`) or of peers.

Each `compress(grad)` step is one fused native pass (`torch.ops.swarmgrad.ef_step`): `residual += grad`, select
the top-k magnitudes of `residual`, return them and zero them in `residual`. Invariant, exact in float32 at every
step: `sent + new residual == old residual + grad` (the addition is the only rounding, done once).

Two options come from Deep Gradient Compression (Lin et al., ICLR 2018, arXiv 1712.01887):

* momentum correction (section 3.2): accumulate the velocity `u = momentum * u + grad` instead of the raw
  gradient, `residual += u`, and zero the selected entries of `u` as well (momentum factor masking), so that
  compression does not break momentum SGD. The invariant then reads `sent + new residual == old residual + u`.
* density warm-up (section 3.3, "warm-up training"): during the first `warmup_steps` steps the density falls
  exponentially, 25 % -> 6.25 % -> 1.5625 % -> 0.39 % (four equal stages, never below the target), then stays at
  the target. A low density with feedback can otherwise release a large held-back mass at once early in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarmgrad.core.errors import ConfigError, LocalProtocolError
from training.topk.ops import Implementation, ensure_native, resolve_implementation
from training.topk.reference import reference_ef_step

WARMUP_STAGES = 4
WARMUP_FIRST_DENSITY = 0.25


@dataclass(frozen=True)
class TopKConfig:
    """How much of each gradient is sent per step, and the DGC options."""

    density: float  # fraction of entries sent per step, in (0, 1]
    momentum: float | None = None  # momentum correction factor in [0, 1), or None for plain error feedback
    warmup_steps: int = 0  # steps of DGC's exponential density warm-up (0: none)

    def __post_init__(self) -> None:
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise ConfigError("density", self.density, "a number in (0, 1]")
        if self.momentum is not None and not (isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0):
            raise ConfigError("momentum", self.momentum, "None or a number in [0, 1)")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ConfigError("warmup_steps", self.warmup_steps, "an int >= 0")


def warmup_density(step: int, density: float, warmup_steps: int) -> float:
    """The density to use at `step` (0-based) under DGC's exponential warm-up towards `density`."""
    if step >= warmup_steps:
        return density
    stage = step * WARMUP_STAGES // warmup_steps
    return max(density, WARMUP_FIRST_DENSITY ** (stage + 1))


def k_for_density(numel: int, density: float) -> int:
    """How many of `numel` entries a density selects: rounded, at least 1, at most `numel`."""
    return min(numel, max(1, round(density * numel)))


class ErrorFeedback:
    """The top-k compressor of one flattened tensor (or parameter group) with its residual.

    `compress(grad)` returns `(indices int64 ascending, values float32)` and keeps the rest in `residual`.
    If what was returned is not delivered in full (a failed send, a lossy value format), hand the missing part
    back with `absorb(indices, values)` so that no gradient mass is lost.
    """

    def __init__(
        self,
        numel: int,
        density: float,
        *,
        momentum: float | None = None,
        warmup_steps: int = 0,
        implementation: Implementation | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not (isinstance(numel, int) and numel > 0):
            raise ConfigError("numel", numel, "an int > 0")
        self.config = TopKConfig(density=density, momentum=momentum, warmup_steps=warmup_steps)
        self.numel = numel
        self.implementation = resolve_implementation(implementation)
        if self.implementation == "native":
            ensure_native(torch.device(device))
        self.residual = torch.zeros(numel, dtype=torch.float32, device=device)
        self.velocity: torch.Tensor | None = (
            None if momentum is None else torch.zeros(numel, dtype=torch.float32, device=device)
        )
        self.steps = 0

    @property
    def k(self) -> int:
        """How many entries the next `compress` sends."""
        cfg = self.config
        return k_for_density(self.numel, warmup_density(self.steps, cfg.density, cfg.warmup_steps))

    def compress(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add `grad` (any shape with `numel` entries, any float dtype) and take out the top-k to send."""
        if grad.numel() != self.numel:
            raise LocalProtocolError(f"ErrorFeedback of {self.numel} entries got a gradient of {grad.numel()}")
        if grad.device != self.residual.device:
            raise LocalProtocolError(f"gradient on {grad.device}, residual on {self.residual.device}")
        flat = grad.reshape(-1).to(torch.float32)
        k = self.k
        momentum = self.config.momentum
        if self.implementation == "reference":
            result = reference_ef_step(self.residual, flat, k, self.velocity, momentum or 0.0)
        elif self.velocity is None or momentum is None:
            result = torch.ops.swarmgrad.ef_step(self.residual, flat, k)
        else:
            result = torch.ops.swarmgrad.ef_step_momentum(self.residual, self.velocity, flat, momentum, k)
        self.steps += 1
        return result[0], result[1]

    def absorb(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Put `values` back into the residual at `indices` (mass that was selected but not delivered)."""
        self.residual.index_add_(0, indices.to(torch.int64), values.to(torch.float32))
