"""Top-k gradient compression: the native `topk_abs` operator, error feedback, and the sparse wire payload.

This package owns selecting, remembering and encoding the entries of a gradient that a peer sends; it does no
networking and applies nothing to a model. The native kernels build on first use (see `build.py`); the pure-torch
reference (`reference.py`) runs only when the caller opts in (`implementation="reference"` or
`SWARMGRAD_TOPK_FALLBACK=reference`).
"""

from training.topk.build import ExtensionUnavailable, load_extension
from training.topk.feedback import ErrorFeedback, TopKConfig, k_for_density, warmup_density
from training.topk.ops import TopKSelector, topk_abs
from training.topk.payload import SparsePayload, pack_sparse, unpack_sparse
from training.topk.reference import reference_ef_step, reference_topk_abs

__all__ = [
    "ErrorFeedback",
    "ExtensionUnavailable",
    "SparsePayload",
    "TopKConfig",
    "TopKSelector",
    "k_for_density",
    "load_extension",
    "pack_sparse",
    "reference_ef_step",
    "reference_topk_abs",
    "topk_abs",
    "unpack_sparse",
    "warmup_density",
]
