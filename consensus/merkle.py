"""Checkpoint roots: the canonical parameter bytes of a model state and the Merkle tree that names them.

An epoch's decided value names the proposer's parameters by one 32-byte root, so that a voter can check a few
sampled pieces of them (`consensus.chunks`) without downloading the model. This module owns the byte layout and
the tree; it does no I/O and knows nothing of votes or peers.

**Canonical parameter bytes** of a state (`Mapping[str, torch.Tensor]`), in this order:

1. the header: `HEADER_MAGIC` (8 bytes), the length of the layout text (u64, little-endian), then the layout text:
   compact JSON `[[name, dtype, [dims...]], ...]` in name order (dtype as torch spells it without `torch.`,
   e.g. `"float32"`, `"bfloat16"`);
2. each tensor's raw little-endian bytes (C order), in name order. Zero bytes pad the header and every tensor so
   that each tensor starts at a multiple of `ALIGN_BYTES` (8).

The alignment matters: `CHUNK_SIZE_BYTES` is a multiple of 8, so no element of any dtype is ever split across two
chunks, and a voter can compare every sampled element as a number (a split float could otherwise be set to any
value unseen). Two states with the same names, dtypes, shapes and bits have the same bytes whatever their dict
order, device or memory layout.

**The tree** is over the bytes cut into `CHUNK_SIZE_BYTES` chunks (the last may be shorter, never empty), with
SHA-256 and one domain byte per kind of node:

- leaf: `H(0x00 || chunk)`;
- inner node: `H(0x01 || left || right)`;
- odd levels: the last node of a level with an odd count has no sibling and is carried up to the next level
  unchanged (it is not paired with itself, so no two different leaf lists give one tree);
- root: `H(0x02 || u64 chunk count || top)`, so a root commits to the number of chunks, and a proof is checked
  against both.

A proof of chunk `i` lists the siblings from the leaf up, skipping the levels where the node is carried. Its length
is fixed by `i` and the chunk count, so `verify_proof` accepts only exactly that many 32-byte hashes.

Memory: `CheckpointTree.from_state` copies the state once into one buffer (the tree must not change while training
goes on) and keeps the leaf hashes and inner levels, 64 bytes per chunk; no other copy of the model is made. A
10M-parameter (40 MB) state takes about 120 ms on a 2-core box, SHA-256 itself 80 ms of it
(`benchmarks/checkpoint_sampling.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from swarmgrad.core.errors import LocalProtocolError

CHUNK_SIZE_BYTES = 64 * 1024
"""The size of every chunk but the last: large enough that a 10M-parameter model is ~610 chunks (a proof of 10
hashes), small enough that sampling 8 of them costs a voter 512 KiB."""
ALIGN_BYTES = 8
HEADER_MAGIC = b"SGPRM\x00\x01\x00"
"""Names the layout and its version (1)."""
HASH_BYTES = 32
MAX_CHUNK_COUNT = 2**32
"""No tree has more chunks (256 TiB of parameters): bounds a proof to `MAX_PROOF_HASHES` hashes."""
MAX_PROOF_HASHES = 32

NUMERIC_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)
"""The dtypes a checkpoint may hold: those whose elements a voter can read as real numbers (`consensus.chunks`)."""

_LEAF = b"\x00"
_NODE = b"\x01"
_ROOT = b"\x02"
_U64 = struct.Struct("<Q")


# ---- canonical bytes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One tensor's place in the canonical bytes: `size_bytes` bytes from `offset`, elements of `dtype`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    size_bytes: int


@dataclass(frozen=True)
class ParameterLayout:
    """Where everything lies in the canonical bytes of one state: the header (`header_size_bytes`, padding
    included), each tensor's segment in name order, and the total size."""

    header: bytes
    segments: tuple[Segment, ...]
    total_size_bytes: int

    @property
    def header_size_bytes(self) -> int:
        return len(self.header)


def _pad(size: int) -> int:
    return -size % ALIGN_BYTES


def parameter_layout(state: Mapping[str, torch.Tensor]) -> ParameterLayout:
    """The layout of `state`'s canonical bytes (no tensor data is read). A dtype outside `NUMERIC_DTYPES` is a
    `LocalProtocolError`: the task built a model that cannot be checkpointed."""
    return layout_of((name, state[name].dtype, tuple(state[name].shape)) for name in state)


def layout_of(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> ParameterLayout:
    """The layout of the canonical bytes of tensors named, typed and shaped by `entries` (name, dtype, shape), in
    any order: what `parameter_layout` gives for a state of such tensors, without any tensor."""
    entries = sorted(entries, key=lambda entry: entry[0])
    listed = []
    for name, dtype, shape in entries:
        if dtype not in NUMERIC_DTYPES:
            raise LocalProtocolError(f"tensor {name!r} has dtype {dtype}, which a checkpoint cannot hold")
        listed.append([name, str(dtype).removeprefix("torch."), list(shape)])
    text = json.dumps(listed, separators=(",", ":"), ensure_ascii=False).encode()
    header = HEADER_MAGIC + _U64.pack(len(text)) + text
    header += bytes(_pad(len(header)))
    offset = len(header)
    segments = []
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        segments.append(Segment(name, dtype, tuple(shape), offset, size))
        offset += size + _pad(size)
    return ParameterLayout(header, tuple(segments), offset)


def canonical_bytes(state: Mapping[str, torch.Tensor]) -> memoryview:
    """The canonical parameter bytes of `state`, as one read-only buffer (a copy: later changes to the tensors do
    not show)."""
    return _fill(state, parameter_layout(state))


def _fill(state: Mapping[str, torch.Tensor], layout: ParameterLayout) -> memoryview:
    buffer = np.zeros(layout.total_size_bytes, dtype=np.uint8)  # zero padding; calloc'ed, so cheap
    buffer[: layout.header_size_bytes] = np.frombuffer(layout.header, dtype=np.uint8)
    for segment in layout.segments:
        tensor = state[segment.name].detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()  # native order; every supported host is little-endian
        buffer[segment.offset : segment.offset + segment.size_bytes] = raw
    buffer.flags.writeable = False
    return buffer.data  # read-only, as the array is


# ---- the tree -----------------------------------------------------------------------------------------------------


def chunk_count_of(size_bytes: int) -> int:
    """How many chunks `size_bytes` bytes make (at least one: the header is never empty)."""
    if size_bytes <= 0:
        raise LocalProtocolError(f"canonical bytes are never empty, got {size_bytes} bytes")
    return -(-size_bytes // CHUNK_SIZE_BYTES)


def expected_chunk_size(index: int, chunk_count: int) -> tuple[int, int]:
    """The (min, max) length a chunk at `index` may have: exactly `CHUNK_SIZE_BYTES` but for the last one, which
    holds 1 to `CHUNK_SIZE_BYTES` bytes."""
    if index < chunk_count - 1:
        return CHUNK_SIZE_BYTES, CHUNK_SIZE_BYTES
    return 1, CHUNK_SIZE_BYTES


def _leaf(chunk: bytes | memoryview) -> bytes:
    digest = hashlib.sha256(_LEAF)
    digest.update(chunk)
    return digest.digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _root(chunk_count: int, top: bytes) -> bytes:
    return hashlib.sha256(_ROOT + _U64.pack(chunk_count) + top).digest()


class CheckpointTree:
    """The Merkle tree of one state's canonical bytes: its root, its chunks and their proofs."""

    def __init__(self, data: memoryview, layout: ParameterLayout) -> None:
        if len(data) != layout.total_size_bytes:
            raise LocalProtocolError(f"{len(data)} bytes do not match a layout of {layout.total_size_bytes}")
        self.layout = layout
        self._data = data
        self.chunk_count = chunk_count_of(len(data))
        if self.chunk_count > MAX_CHUNK_COUNT:
            raise LocalProtocolError(f"{self.chunk_count} chunks exceed {MAX_CHUNK_COUNT}")
        level = [_leaf(self._chunk_view(i)) for i in range(self.chunk_count)]
        self._levels: list[list[bytes]] = [level]
        while len(level) > 1:
            pairs = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                pairs.append(level[-1])
            level = pairs
            self._levels.append(level)
        self.root = _root(self.chunk_count, level[0])

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> CheckpointTree:
        """The tree of `state` (copied: the tree does not see later changes to the tensors)."""
        layout = parameter_layout(state)
        return cls(_fill(state, layout), layout)

    @property
    def total_size_bytes(self) -> int:
        return len(self._data)

    @property
    def data(self) -> memoryview:
        """The canonical bytes (read-only)."""
        return self._data

    def chunk(self, index: int) -> bytes:
        """The bytes of chunk `index`."""
        self._check_index(index)
        return bytes(self._chunk_view(index))

    def _chunk_view(self, index: int) -> memoryview:
        return self._data[index * CHUNK_SIZE_BYTES : (index + 1) * CHUNK_SIZE_BYTES]

    def proof(self, index: int) -> tuple[bytes, ...]:
        """The sibling hashes from leaf `index` up to the top (levels where the node is carried have none)."""
        self._check_index(index)
        siblings = []
        position = index
        for level in self._levels[:-1]:
            sibling = position ^ 1
            if sibling < len(level):
                siblings.append(level[sibling])
            position //= 2
        return tuple(siblings)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.chunk_count:
            raise LocalProtocolError(f"chunk index {index} outside 0..{self.chunk_count - 1}")


def proof_length(index: int, chunk_count: int) -> int:
    """How many hashes the proof of chunk `index` of `chunk_count` holds."""
    length = 0
    position, width = index, chunk_count
    while width > 1:
        if position ^ 1 < width:
            length += 1
        position //= 2
        width = -(-width // 2)
    return length


def verify_proof(root: bytes, index: int, chunk_count: int, chunk: bytes, proof: Sequence[bytes]) -> bool:
    """Whether `chunk` is chunk `index` of the `chunk_count`-chunk tree named `root`, by `proof`.

    False, never an exception, for anything that does not fit: an index outside the tree, a chunk count of 0 or
    above `MAX_CHUNK_COUNT`, a chunk of a length chunk `index` cannot have, a proof of the wrong length (too long
    or too short) or with a hash that is not 32 bytes, or hashes that do not lead to `root`.
    """
    if len(root) != HASH_BYTES or not 1 <= chunk_count <= MAX_CHUNK_COUNT or not 0 <= index < chunk_count:
        return False
    low, high = expected_chunk_size(index, chunk_count)
    if not low <= len(chunk) <= high:
        return False
    if len(proof) != proof_length(index, chunk_count) or any(len(h) != HASH_BYTES for h in proof):
        return False
    node = _leaf(chunk)
    siblings = iter(proof)
    position, width = index, chunk_count
    while width > 1:
        if position ^ 1 < width:
            sibling = next(siblings)
            node = _node(node, sibling) if position % 2 == 0 else _node(sibling, node)
        position //= 2
        width = -(-width // 2)
    return _root(chunk_count, node) == root
