"""Divergence repair: whether a peer gives up its own parameters for the certified checkpoint. A pure function.

Every honest peer keeps training on its own parameters after an epoch is certified: gossip keeps them within a small
spread of each other, and the certified checkpoint is just one of them (the proposer's). A peer that was cut off by
a partition, or restarted from an old local checkpoint, may lie far outside that spread; averaging would pull it
back only slowly, and it would drag its neighbours meanwhile. The rule:

    a peer adopts the certified checkpoint of epoch E when its own parameters at E's boundary would fail the
    validity check against the certified body on at least one chunk:
    max over chunks i of chunk_distance(i, certified chunk i, own) > tolerance

with `consensus.chunks.chunk_distance` (the relative L2 distance of the certified elements from the peer's own,
`||a - b|| / ||b||`) and the same `tolerance` the voters use (`DEFAULT_TOLERANCE`). So a peer stays exactly when, as
a voter checking every chunk instead of a sample, it would have accepted the certified checkpoint; since that
checkpoint passed the sampled checks of at least f+1 honest voters, a peer inside the honest spread keeps its own
state, and one whose layout differs or whose distance exceeds the tolerance anywhere takes the certified one.
Comparing every chunk costs about one millisecond per 64 KiB chunk (0.6 s for a 10M-parameter model): run it in a
worker (`Compute`). No I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from consensus.chunks import DEFAULT_TOLERANCE, chunk_distance
from consensus.merkle import CheckpointTree
from swarmgrad.core.errors import LocalProtocolError


@dataclass(frozen=True)
class RepairDecision:
    """`adopt`: take the certified checkpoint. `distance`: the largest chunk distance found (inf when the two
    cannot be compared), at chunk `chunk`; `reason`: one line for the log."""

    adopt: bool
    distance: float
    chunk: int
    reason: str


def repair_decision(
    own: CheckpointTree, certified: CheckpointTree, tolerance: float = DEFAULT_TOLERANCE
) -> RepairDecision:
    """The rule of the module docstring, for the peer's `own` tree at the certified boundary and the `certified`
    checkpoint's tree (whose bytes match the certificate's root)."""
    if not 0 <= tolerance < math.inf:
        raise LocalProtocolError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if own.root == certified.root:
        return RepairDecision(False, 0.0, 0, "our parameters are the certified checkpoint")
    if own.chunk_count != certified.chunk_count:
        return RepairDecision(
            True, math.inf, 0, f"our layout has {own.chunk_count} chunks, the certified {certified.chunk_count}"
        )
    largest, at = 0.0, 0
    for index in range(certified.chunk_count):
        distance = chunk_distance(index, certified.chunk(index), own)
        if isinstance(distance, str):
            return RepairDecision(True, math.inf, index, f"chunk {index} cannot be compared: {distance}")
        if distance > largest:
            largest, at = distance, index
    if largest > tolerance:
        return RepairDecision(
            True,
            largest,
            at,
            f"chunk {at} lies {largest:.3g} from the certified checkpoint (tolerance {tolerance:.3g})",
        )
    return RepairDecision(
        False, largest, at, f"within tolerance {tolerance:.3g} (largest chunk distance {largest:.3g}, chunk {at})"
    )
