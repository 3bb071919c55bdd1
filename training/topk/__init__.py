"""Top-k selection and its wire format: the native `topk_abs` operator and the sparse payload.

This package owns selecting, remembering and encoding the entries of a gradient that a peer sends; it does no
networking and applies nothing to a model. The native kernels build on first use (see `build.py`); the pure-torch
reference (`reference.py`) runs only when the caller opts in (`implementation="reference"` or
`SWARMGRAD_TOPK_FALLBACK=reference`).
"""

from training.topk.build import ExtensionUnavailable, load_extension
from training.topk.ops import TopKSelector, topk_abs
from training.topk.payload import SparsePayload, pack_sparse, unpack_sparse
from training.topk.reference import reference_topk_abs

__all__ = [
    "ExtensionUnavailable",
    "SparsePayload",
    "TopKSelector",
    "load_extension",
    "pack_sparse",
    "reference_topk_abs",
    "topk_abs",
    "unpack_sparse",
]
