"""Robust aggregation of neighbours' differences: pure tensor functions, no I/O, no state, no randomness.

Every rule works on the same small dense view of one gossip round. A round at peer i gathered sparse updates from
`m` neighbours; over the union `U` of their supports, row `j` of `diffs` holds `x_j[c] - x_i[c]` for the
coordinates `c` neighbour `j` sent (and 0 elsewhere), and `mask[j, c]` says whether it sent `c`. The peer then
moves `x_i[U] += step_size * rule(...)`. For `step_size` in (0, 1] and weights that sum to at most 1, every rule
below yields, per coordinate, a convex combination of the peer's own value and values received, so honest values
never leave the hull of what honest peers held -- except for what a Byzantine neighbour can inject, which is what
the rules bound:

* `weighted_mean`: the plain gossip step, `sum_j w_j d_j`. A single neighbour can move the peer arbitrarily far.
* `trimmed_mean`: per coordinate, among the entries present (the caller includes the peer's own zero row), drop
  the `trim` largest and `trim` smallest and average the rest. Columns with `<= 2 * trim` entries give 0 (no
  move). With sparse supports most columns have few entries, so this rule moves little; it is here to compare.
* `clipped_gossip`: ClippedGossip (He, Karimireddy, Jaggi, arXiv 2202.01545): `sum_j w_j clip_tau(d_j)`, where
  `clip_tau(d) = d * min(1, tau / ||d||)`. A Byzantine neighbour moves the peer by at most `w_j * tau` per round.
  `adaptive_clip_radius` picks `tau` as a multiple of the median of recent difference norms: a Byzantine
  minority of the history cannot move the median outside the range of honest norms, and `tau` shrinks as the
  honest peers converge. The caller records norms `capped` at a multiple of the current radius, so that one
  peer knocked far from the others cannot be made to trust ever larger differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from swarmgrad.core.errors import LocalProtocolError


def _check_view(diffs: torch.Tensor, mask: torch.Tensor) -> None:
    if diffs.dim() != 2 or mask.shape != diffs.shape or mask.dtype != torch.bool:
        raise LocalProtocolError(
            f"diffs must be 2-D with a bool mask of the same shape, got {tuple(diffs.shape)} and "
            f"{tuple(mask.shape)} {mask.dtype}"
        )


def _check_weights(diffs: torch.Tensor, weights: torch.Tensor) -> None:
    if weights.shape not in ((diffs.shape[0],), diffs.shape):
        raise LocalProtocolError(
            f"weights must have shape ({diffs.shape[0]},) or {tuple(diffs.shape)}, got {tuple(weights.shape)}"
        )


def _per_entry(diffs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights[:, None].expand(diffs.shape) if weights.dim() == 1 else weights


def coordinate_weights(mask: torch.Tensor) -> torch.Tensor:
    """Per entry `1 / (count + 1)`, count = entries present in its column: each coordinate is averaged equally
    between the peer itself and the neighbours that sent it (0 where absent)."""
    count = mask.sum(dim=0, keepdim=True)
    return mask / (count + 1.0)


def weighted_mean(diffs: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`sum_j weights[j] * diffs[j]` over the entries present in `mask` (absent entries count as 0). `weights` is
    one weight per row or one per entry."""
    _check_view(diffs, mask)
    _check_weights(diffs, weights)
    return (torch.where(mask, diffs, 0.0) * _per_entry(diffs, weights)).sum(dim=0)


def trimmed_mean(diffs: torch.Tensor, mask: torch.Tensor, trim: int) -> torch.Tensor:
    """Coordinate-wise trimmed mean over the entries present in each column; 0 where a column has `<= 2 * trim`."""
    _check_view(diffs, mask)
    if trim < 0:
        raise LocalProtocolError(f"trim must be >= 0, got {trim}")
    rows = diffs.shape[0]
    ordered, _ = torch.where(mask, diffs, math.inf).sort(dim=0)  # present entries first, ascending
    count = mask.sum(dim=0)
    position = torch.arange(rows, device=diffs.device)[:, None]
    keep = (position >= trim) & (position < count[None, :] - trim)
    kept = keep.sum(dim=0)
    total = torch.where(keep, ordered, 0.0).sum(dim=0)
    return torch.where(kept > 0, total / kept.clamp(min=1), 0.0)


def row_norms(diffs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of each row over its present entries."""
    _check_view(diffs, mask)
    return torch.linalg.vector_norm(torch.where(mask, diffs, 0.0), dim=1)


def clip_scales(norms: torch.Tensor, radius: float) -> torch.Tensor:
    """`min(1, radius / norm)` per row: the factor that brings each row's norm down to at most `radius`."""
    if not radius >= 0:
        raise LocalProtocolError(f"radius must be >= 0, got {radius}")
    return torch.where(norms > radius, radius / norms.clamp(min=torch.finfo(norms.dtype).tiny), 1.0)


def clipped_gossip(diffs: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, radius: float) -> torch.Tensor:
    """ClippedGossip: `sum_j weights[j] * clip_radius(diffs[j])` (per-row or per-entry weights)."""
    _check_weights(diffs, weights)
    scales = clip_scales(row_norms(diffs, mask), radius)
    return weighted_mean(diffs, mask, _per_entry(diffs, weights) * scales[:, None])


def capped(norms: torch.Tensor, cap: float) -> list[float]:
    """The norms as floats, each at most `cap`: what a clip-radius history records."""
    return [min(float(n), cap) for n in norms]


def adaptive_clip_radius(norm_history: Sequence[float], multiplier: float) -> float:
    """`multiplier` times the median of recently seen difference norms (the lower median for an even count)."""
    if not norm_history:
        raise LocalProtocolError("adaptive_clip_radius needs at least one norm")
    if not multiplier > 0:
        raise LocalProtocolError(f"multiplier must be > 0, got {multiplier}")
    ordered = sorted(norm_history)
    return multiplier * ordered[(len(ordered) - 1) // 2]
