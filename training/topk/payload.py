"""The sparse payload: a compact, bounds-checked wire form of top-k selected entries.

This module owns `SparsePayload` (a frozen dataclass that travels as a field of any `swarmgrad.core.codec.Schema`
message: ints, strs and numpy arrays only), `pack_sparse` and `unpack_sparse`. It does no I/O and applies nothing: the
receiver adds the decoded entries to its model itself, and only after `unpack_sparse` returned.

Index formats (the selected indices are strictly increasing, which both formats rely on):

* `int32`: one little-endian int32 per entry (4 B); needs `numel < 2**31`.
* `u16_chunk`: the index space is cut into chunks of 65,536 entries; each entry stores its offset inside its
  chunk as uint16 (2 B), and `chunk_counts` (uint32, one per chunk) says how many entries fall in each chunk.
  Smaller than `int32` whenever `k > 2 * ceil(numel / 65536)`; `auto` picks the smaller of the two.

Value formats: `fp32` (4 B), `fp16` (2 B, |v| <= 65504), `bf16` (2 B, sent as its uint16 bits), `int8` (1 B,
symmetric: each block of 256 consecutive values shares one float32 scale `max|v| / 127`, codes in [-127, 127]).

Checks. Constructing a payload (hence decoding one) checks its structure: known formats, exact dtypes, 1-D arrays
of the announced lengths, consistent chunk counts; failures are `DecodeError`. `unpack_sparse` then checks the
content against the receiver: `numel` equal to the receiver's, `k` within `max_k`, indices in range and strictly
increasing (so no entry is applied twice), every value and scale finite. Any failure is a `DecodeError` and
nothing is returned. `pack_sparse` refuses to build a payload that a receiver would reject
(`LocalProtocolError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from swarmgrad.core.errors import ConfigError, DecodeError, LocalProtocolError

INDEX_CHUNK = 1 << 16
SCALE_BLOCK = 256
INT8_LEVELS = 127
FP16_MAX = 65504.0
INDEX_FORMATS = ("int32", "u16_chunk")
INT32_MAX = 2**31 - 1
"""The largest index the `int32` format holds (a constant: `np.iinfo` builds an object per call)."""
VALUE_FORMATS = ("fp32", "fp16", "bf16", "int8")

_INDEX_DTYPES: dict[str, np.dtype[Any]] = {"int32": np.dtype("<i4"), "u16_chunk": np.dtype("<u2")}
_VALUE_DTYPES: dict[str, np.dtype[Any]] = {
    "fp32": np.dtype("<f4"),
    "fp16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
}
_COUNT_DTYPE = np.dtype("<u4")
_SCALE_DTYPE = np.dtype("<f4")


def num_chunks(numel: int) -> int:
    """How many 65,536-entry index chunks cover `numel` entries."""
    return -(-numel // INDEX_CHUNK)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_array(name: str, array: object, dtype: np.dtype[Any], length: int) -> None:
    if not isinstance(array, np.ndarray):
        raise DecodeError(f"SparsePayload.{name} must be an array, got {type(array).__name__}")
    if array.dtype != dtype or array.ndim != 1 or array.shape[0] != length:
        raise DecodeError(
            f"SparsePayload.{name} must be 1-D {dtype} of length {length}, got {array.dtype} of shape {array.shape}"
        )


@dataclass(frozen=True, eq=False)
class SparsePayload:
    """`k` entries of a flattened tensor of `numel` entries, in the given index and value formats."""

    numel: int
    k: int
    index_format: str
    value_format: str
    indices: np.ndarray
    values: np.ndarray
    chunk_counts: np.ndarray | None  # u16_chunk only: entries per 65,536-entry chunk, uint32
    scales: np.ndarray | None  # int8 only: one float32 scale per block of 256 values

    def __post_init__(self) -> None:
        if not (_is_int(self.numel) and self.numel >= 0):
            raise DecodeError(f"SparsePayload.numel must be an int >= 0, got {self.numel!r}")
        if not (_is_int(self.k) and 0 <= self.k <= self.numel):
            raise DecodeError(f"SparsePayload.k must be an int in [0, {self.numel}], got {self.k!r}")
        index_dtype = _INDEX_DTYPES.get(self.index_format)
        if index_dtype is None:
            raise DecodeError(f"unknown index format {self.index_format!r}")
        value_dtype = _VALUE_DTYPES.get(self.value_format)
        if value_dtype is None:
            raise DecodeError(f"unknown value format {self.value_format!r}")
        _check_array("indices", self.indices, index_dtype, self.k)
        _check_array("values", self.values, value_dtype, self.k)
        if self.index_format == "u16_chunk":
            chunks = num_chunks(self.numel)
            _check_array("chunk_counts", self.chunk_counts, _COUNT_DTYPE, chunks)
            counts = np.asarray(self.chunk_counts, dtype=np.int64)
            if int(counts.sum()) != self.k:
                raise DecodeError(f"chunk counts add up to {int(counts.sum())}, not k={self.k}")
            if chunks and (counts.max() > INDEX_CHUNK or counts[-1] > self.numel - (chunks - 1) * INDEX_CHUNK):
                raise DecodeError("a chunk count exceeds its chunk's size")
        elif self.chunk_counts is not None:
            raise DecodeError(f"chunk_counts must be absent for index format {self.index_format!r}")
        if self.index_format == "int32" and self.numel > INT32_MAX:
            raise DecodeError(f"index format int32 cannot address numel={self.numel}")
        if self.value_format == "int8":
            _check_array("scales", self.scales, _SCALE_DTYPE, -(-self.k // SCALE_BLOCK))
        elif self.scales is not None:
            raise DecodeError(f"scales must be absent for value format {self.value_format!r}")

    @property
    def size_bytes(self) -> int:
        """Bytes of array data this payload puts on the wire (the few header bytes aside)."""
        arrays = (self.indices, self.values, self.chunk_counts, self.scales)
        return sum(a.nbytes for a in arrays if a is not None)


def choose_index_format(numel: int, k: int) -> str:
    """The smaller index format for `k` of `numel` entries (`int32` on a tie)."""
    if numel > INT32_MAX:
        return "u16_chunk"
    return "u16_chunk" if 2 * k + 4 * num_chunks(numel) < 4 * k else "int32"


def pack_sparse(
    indices: torch.Tensor | np.ndarray,
    values: torch.Tensor | np.ndarray,
    numel: int,
    value_format: str = "fp16",
    index_format: str = "auto",
) -> SparsePayload:
    """Encode `values` at `indices` (1-D, distinct, in [0, numel); sorted here if needed) of a `numel`-entry tensor.
    Both are tensors (on any device; values of any float dtype) or numpy arrays.

    Raises `ConfigError` for an unknown format and `LocalProtocolError` for entries a receiver would reject
    (duplicate or out-of-range indices, NaN/Inf values, values out of the format's range).
    """
    if value_format not in VALUE_FORMATS:
        raise ConfigError("value_format", value_format, f"one of {VALUE_FORMATS}")
    if index_format != "auto" and index_format not in INDEX_FORMATS:
        raise ConfigError("index_format", index_format, f"'auto' or one of {INDEX_FORMATS}")
    # numpy from here on: single-threaded, which on small arrays beats torch's parallel kernels (whose barriers
    # cost up to ~100 ms on a busy 2-core machine) and costs a microsecond where a torch call costs several.
    # Reductions as array methods: `np.all(a)` adds a Python wrapper that costs more than the reduction of a k-entry
    # array.
    idx = _host(indices).astype(np.int64, copy=False)
    val = _host(values).astype(np.float32, copy=False)
    if idx.ndim != 1 or val.ndim != 1 or idx.size != val.size:
        raise LocalProtocolError(f"indices {idx.shape} and values {val.shape} must be 1-D alike")
    if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
        order = np.argsort(idx, kind="stable")
        idx, val = idx[order], val[order]
        if not bool((idx[1:] > idx[:-1]).all()):
            raise LocalProtocolError("indices must be distinct")
    k = int(idx.size)
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel):
        raise LocalProtocolError(f"indices must be in [0, {numel})")
    if not bool(np.isfinite(val).all()):
        raise LocalProtocolError("values must be finite")
    fmt = choose_index_format(numel, k) if index_format == "auto" else index_format
    chunk_counts = None
    if fmt == "int32":
        if numel > INT32_MAX:
            raise LocalProtocolError(f"index format int32 cannot address numel={numel}")
        packed_idx = idx.astype("<i4")
    else:
        packed_idx = (idx & (INDEX_CHUNK - 1)).astype("<u2")
        chunk_counts = np.bincount(idx >> 16, minlength=num_chunks(numel)).astype(_COUNT_DTYPE)
    packed_val, scales = _pack_values(val, value_format)
    return SparsePayload(numel, k, fmt, value_format, packed_idx, packed_val, chunk_counts, scales)


def _host(array: torch.Tensor | np.ndarray) -> np.ndarray:
    """A numpy array of `array`'s data: the array itself, or the tensor's (on the CPU; float16 and bfloat16, which
    numpy lacks or reads differently, as float32)."""
    if isinstance(array, np.ndarray):
        return array
    tensor = array.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def _pack_values(val: np.ndarray, value_format: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`val`: finite float32 values."""
    if value_format == "fp32":
        return val.astype("<f4"), None
    if value_format == "fp16":
        if val.size and float(np.abs(val).max()) > FP16_MAX:
            raise LocalProtocolError(f"a value exceeds the fp16 range ({FP16_MAX}); use bf16 or fp32")
        return val.astype("<f2"), None
    if value_format == "bf16":
        # Round to nearest, ties to even, on the float32 bits (as torch's float32 -> bfloat16 conversion does); for
        # finite values the sum stays below 2**32.
        bits = val.astype(np.float32).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(
            np.uint16
        )
        if bool(((rounded & 0x7F80) == 0x7F80).any()):
            raise LocalProtocolError("a value exceeds the bf16 range; use fp32")
        return rounded.astype("<u2"), None
    k = val.size
    blocks = -(-k // SCALE_BLOCK)
    flat = np.zeros(blocks * SCALE_BLOCK, dtype=np.float32)
    flat[:k] = val
    padded = flat.reshape(blocks, SCALE_BLOCK)
    scales = (np.abs(padded).max(axis=1) / np.float32(INT8_LEVELS)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    codes = np.clip(np.rint(padded / safe[:, None]), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return codes.reshape(-1)[:k].copy(), scales.astype(_SCALE_DTYPE)


def unpack_sparse(payload: SparsePayload, numel: int, max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check `payload` against a receiver whose tensor has `numel` entries (and accepts at most `max_k`), and
    return its entries as numpy arrays: int64 indices (strictly increasing) and float32 values (`torch.from_numpy`
    makes tensors of them without a copy). Raises `DecodeError`."""
    if payload.numel != numel:
        raise DecodeError(f"payload is for {payload.numel} entries, the receiver's tensor has {numel}")
    k = payload.k
    if max_k is not None and k > max_k:
        raise DecodeError(f"payload carries {k} entries, at most {max_k} accepted")
    if payload.index_format == "int32":
        idx = payload.indices.astype(np.int64)
    else:
        if payload.chunk_counts is None:
            raise DecodeError("u16_chunk payload without chunk_counts")
        chunk = np.repeat(np.arange(num_chunks(numel), dtype=np.int64), payload.chunk_counts.astype(np.int64))
        idx = chunk * INDEX_CHUNK + payload.indices.astype(np.int64)
    if k:
        if idx[0] < 0 or idx[-1] >= numel:
            raise DecodeError(f"an index is outside [0, {numel})")
        if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise DecodeError("indices are not strictly increasing")
    values = _unpack_values(payload)
    if not bool(np.isfinite(values).all()):
        raise DecodeError("a value is NaN or infinite")
    return idx, values


def decoded_values(payload: SparsePayload) -> np.ndarray:
    """The values as a receiver decodes them (float32, in the payload's ascending index order), without the
    receiver's checks: for the sender of a payload `pack_sparse` just made, to record what it told."""
    return _unpack_values(payload)


def _unpack_values(payload: SparsePayload) -> np.ndarray:
    fmt = payload.value_format
    if fmt in ("fp32", "fp16"):
        return payload.values.astype(np.float32)
    if fmt == "bf16":
        return (payload.values.astype(np.uint32) << 16).view(np.float32)
    if payload.scales is None:
        raise DecodeError("int8 payload without scales")
    if not bool(np.isfinite(payload.scales).all()) or bool((payload.scales < 0).any()):
        raise DecodeError("an int8 scale is negative, NaN or infinite")
    if payload.k and int(payload.values.min()) < -INT8_LEVELS:
        raise DecodeError(f"an int8 code is below -{INT8_LEVELS}")
    scales = np.repeat(payload.scales, SCALE_BLOCK)[: payload.k]
    return payload.values.astype(np.float32) * scales
