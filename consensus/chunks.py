"""The chunk fetch: how a voter checks a proposed checkpoint by sampling it, without downloading the model.

A proposal names the proposer's parameters by a Merkle root (`consensus.merkle`). Before it prevotes, a voter asks
the proposer for `s` chunks (`DEFAULT_SAMPLE_COUNT`, 8) at indices the proposer cannot predict, with their proofs,
and accepts the proposal only if every proof leads to the root and every sampled chunk lies near the voter's own
parameters at the same offsets. This module owns the wire messages of that exchange, the index sampling, the
server's answer and the voter's check; the agreement machine decides when to ask and what a verdict means. No I/O,
no clock, no global randomness.

**Indices.** `sample_indices(seed, chunk_count, count)` draws `count` distinct indices (all of them when the tree
is smaller), deterministically from `seed`, with SHA-256 in counter mode feeding a partial Fisher-Yates shuffle.
The voter's seed is its own Ed25519 signature over the proposal (under a domain of its own, distinct from any vote):
Ed25519 signatures are deterministic, so the seed is fixed per (voter, proposal), and nobody without the voter's key
can compute it, so the proposer cannot know in advance which chunks will be checked.

**Messages** (`SCHEMA`, protocol `PROTOCOL`): `ChunkRequest` (swarm id, epoch, root, 1 to
`MAX_CHUNKS_PER_REQUEST` distinct indices), answered by `ChunkReply` (each requested chunk with its proof, in the
requested order) or by `ChunkRefusal` (a `Refusal` code and a short detail). Every field is bounded by its
dataclass checks, and a reply to a request of `count` indices is at most `max_reply_bytes(count)` bytes
(`count` x (chunk + proof + framing) + a fixed overhead): `decode_reply` checks that before it decodes anything.
Bad bytes or a reply that answers another question raise a `ChunkProtocolError` (a `RemoteProtocolError`) naming
the peer.

**The check.** `check_sample` returns None when the sample supports the proposal, else a one-line reason. Every
chunk must carry a valid proof for its index, the reply must answer exactly the requested indices, and each chunk
must match the voter's own canonical bytes at the same offsets: bytes outside the tensors (the header, which holds
every name, dtype and shape, and the zero padding) exactly; the elements of the tensors, read as numbers by their
dtype, within relative distance `tolerance`:

    d(a, b) = ||a - b||_2 / max(||b||_2, TINY_NORM)

where `a` are the proposer's elements in the chunk, `b` the voter's own at the same offsets, both as float64, all
tensors that the chunk touches pooled. A non-finite element fails the check. `DEFAULT_TOLERANCE` (0.4) and how it
relates to the spread that gossip leaves between honest peers are in docs/consensus.md ("Checkpoint roots, chunk
sampling and the chain file").
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from enum import IntEnum

import torch

from consensus.chain_offer import ChainOffer, ChainQuery
from consensus.merkle import (
    CHUNK_SIZE_BYTES,
    HASH_BYTES,
    MAX_CHUNK_COUNT,
    MAX_PROOF_HASHES,
    CheckpointTree,
    verify_proof,
)
from swarmgrad.core.codec import Schema
from swarmgrad.core.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from swarmgrad.core.swarm_id import MAX_SWARM_ID_CHARS, SWARM_ID_RULE, is_valid_swarm_id

PROTOCOL = "/swarmgrad/consensus-chunks/1.1.0"
"""1.1: the chain offer messages (`consensus.chain_offer`) joined the chunk messages."""
MAX_CHUNKS_PER_REQUEST = 64
"""A request names at most this many chunks: a reply is then at most ~4 MiB."""
DEFAULT_SAMPLE_COUNT = 8
"""`s`: chunks a voter samples per proposal, 512 KiB of validity traffic whatever the model's size."""
DEFAULT_TOLERANCE = 0.4
"""Largest relative distance (see the module docstring) of a sampled chunk from the voter's own bytes: about twice
the most that honest peers were measured apart at an epoch boundary (0.19 in the digits demo), half of what a
model reset to its initial weights is (0.81); docs/consensus.md has the measurements."""
TINY_NORM = 1e-12
"""Floor of the denominator of the relative distance, so that an all-zero chunk of the voter's compares finitely."""
MAX_DETAIL_CHARS = 200
"""Bound on a refusal's free text."""

REPLY_OVERHEAD_BYTES = 256 + MAX_SWARM_ID_CHARS
"""Bytes of a reply besides its chunks: tag, array headers, swarm id, epoch, root."""
CHUNK_OVERHEAD_BYTES = 64
"""Bytes of one chunk entry besides the chunk and its hashes: array and bin headers, the index."""
MAX_PROOF_BYTES = MAX_PROOF_HASHES * (HASH_BYTES + 2)
"""A proof on the wire: at most `MAX_PROOF_HASHES` hashes, each with its 2-byte bin header."""

_SEED_DOMAIN = b"swarmgrad-chunk-sample-v1\x00"
_U64 = struct.Struct("<Q")


def max_reply_bytes(count: int) -> int:
    """The most bytes an honest reply to a request of `count` indices takes (a refusal is far smaller)."""
    return (
        REPLY_OVERHEAD_BYTES
        + MAX_DETAIL_CHARS * 4
        + count * (CHUNK_SIZE_BYTES + MAX_PROOF_BYTES + CHUNK_OVERHEAD_BYTES)
    )


MAX_MESSAGE_BYTES = max_reply_bytes(MAX_CHUNKS_PER_REQUEST)
"""The protocol's message limit, for the transport's frame check."""


# ---- wire messages ------------------------------------------------------------------------------------------------


def _check_question(swarm_id: str, epoch: int, root: bytes) -> None:
    if not is_valid_swarm_id(swarm_id):
        raise ValueError(f"swarm_id must be {SWARM_ID_RULE}, got {swarm_id[: MAX_SWARM_ID_CHARS + 1]!r}")
    if not 0 <= epoch < 2**63:
        raise ValueError(f"epoch must be in [0, 2**63), got {epoch}")
    if len(root) != HASH_BYTES:
        raise ValueError(f"root must be {HASH_BYTES} bytes, got {len(root)}")


def _check_indices(indices: tuple[int, ...]) -> None:
    if not 1 <= len(indices) <= MAX_CHUNKS_PER_REQUEST:
        raise ValueError(f"between 1 and {MAX_CHUNKS_PER_REQUEST} indices, got {len(indices)}")
    if any(not 0 <= index < MAX_CHUNK_COUNT for index in indices):
        raise ValueError(f"every index must be in [0, {MAX_CHUNK_COUNT})")
    if len(set(indices)) != len(indices):
        raise ValueError("indices must be distinct")


@dataclass(frozen=True)
class ChunkRequest:
    """Send me chunks `indices` of the tree named `root`, proposed for `epoch` of `swarm_id`."""

    swarm_id: str
    epoch: int
    root: bytes
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_question(self.swarm_id, self.epoch, self.root)
        _check_indices(self.indices)


@dataclass(frozen=True)
class ProvenChunk:
    """Chunk `index` and the sibling hashes that lead from it to the root."""

    index: int
    chunk: bytes
    proof: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_CHUNK_COUNT:
            raise ValueError(f"index must be in [0, {MAX_CHUNK_COUNT}), got {self.index}")
        if not 1 <= len(self.chunk) <= CHUNK_SIZE_BYTES:
            raise ValueError(f"a chunk holds 1 to {CHUNK_SIZE_BYTES} bytes, got {len(self.chunk)}")
        if len(self.proof) > MAX_PROOF_HASHES:
            raise ValueError(f"a proof holds at most {MAX_PROOF_HASHES} hashes, got {len(self.proof)}")
        if any(len(sibling) != HASH_BYTES for sibling in self.proof):
            raise ValueError(f"every proof hash must be {HASH_BYTES} bytes")


@dataclass(frozen=True)
class ChunkReply:
    """The chunks a `ChunkRequest` asked for, in its order, each with its proof."""

    swarm_id: str
    epoch: int
    root: bytes
    chunks: tuple[ProvenChunk, ...]

    def __post_init__(self) -> None:
        _check_question(self.swarm_id, self.epoch, self.root)
        _check_indices(tuple(chunk.index for chunk in self.chunks))


class Refusal(IntEnum):
    """Why a server does not answer with chunks. Never renumber: the code travels."""

    UNKNOWN_ROOT = 1
    """The server holds no tree with that root (for that swarm and epoch)."""
    BAD_INDEX = 2
    """An index is outside the tree."""
    BUSY = 3
    """The server sheds load; the asker may retry later."""


@dataclass(frozen=True)
class ChunkRefusal:
    """No chunks for the request (`swarm_id`, `epoch`, `root`): `code` says why, `detail` says more."""

    swarm_id: str
    epoch: int
    root: bytes
    code: int
    detail: str

    def __post_init__(self) -> None:
        _check_question(self.swarm_id, self.epoch, self.root)
        if self.code not in {refusal.value for refusal in Refusal}:
            raise ValueError(f"unknown refusal code {self.code}")
        if len(self.detail) > MAX_DETAIL_CHARS:
            raise ValueError(f"detail holds at most {MAX_DETAIL_CHARS} characters, got {len(self.detail)}")


SCHEMA = Schema("consensus-chunks", {1: ChunkRequest, 2: ChunkReply, 3: ChunkRefusal, 4: ChainQuery, 5: ChainOffer})

ChunkAnswer = ChunkReply | ChunkRefusal


# ---- typed errors -------------------------------------------------------------------------------------------------


class ChunkProtocolError(RemoteProtocolError):
    """A peer broke the chunk-fetch protocol: the message is dropped and the peer reported."""


class MalformedChunkMessage(ChunkProtocolError):
    """The bytes are not a valid message of `SCHEMA`, or not the kind expected."""


class OversizedChunkReply(ChunkProtocolError):
    """A reply is larger than any honest answer to its request can be."""


class UnsolicitedChunkReply(ChunkProtocolError):
    """A reply answers another question (swarm, epoch or root) than the one asked."""


def decode_request(peer: str, body: bytes) -> ChunkRequest:
    """A request from `peer`, or `MalformedChunkMessage`."""
    msg = _decode(peer, body)
    if not isinstance(msg, ChunkRequest):
        raise MalformedChunkMessage(peer, f"expected a ChunkRequest, got {type(msg).__name__}")
    return msg


def decode_reply(peer: str, body: bytes, request: ChunkRequest) -> ChunkAnswer:
    """`peer`'s answer to `request`: its size is checked against `max_reply_bytes` before anything is decoded, then
    its kind and that it names the request's swarm, epoch and root. Which chunks it holds is `check_sample`'s
    concern (a wrong answer is a vote against the proposal, not only a bad message)."""
    limit = max_reply_bytes(len(request.indices))
    if len(body) > limit:
        raise OversizedChunkReply(peer, f"reply of {len(body)} bytes to {len(request.indices)} indices (limit {limit})")
    msg = _decode(peer, body)
    if not isinstance(msg, ChunkReply | ChunkRefusal):
        raise MalformedChunkMessage(peer, f"expected a ChunkReply or ChunkRefusal, got {type(msg).__name__}")
    if (msg.swarm_id, msg.epoch, msg.root) != (request.swarm_id, request.epoch, request.root):
        raise UnsolicitedChunkReply(peer, f"{type(msg).__name__} for epoch {msg.epoch} root {msg.root.hex()[:16]}")
    return msg


def _decode(peer: str, body: bytes) -> object:
    if len(body) > MAX_MESSAGE_BYTES:
        raise OversizedChunkReply(peer, f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return SCHEMA.decode(body)
    except DecodeError as exc:
        raise MalformedChunkMessage(peer, str(exc)) from exc


# ---- sampling -----------------------------------------------------------------------------------------------------


def sample_indices(seed: bytes, chunk_count: int, count: int) -> tuple[int, ...]:
    """`min(count, chunk_count)` distinct chunk indices, ascending, fixed by `seed`.

    Draw `k` is `SHA-256(domain || seed || u64 k)` read as a little-endian integer, reduced modulo the number of
    indices left (the bias is below 2**-200); it picks the next index of a partial Fisher-Yates shuffle of
    `0..chunk_count-1`, whose swaps are kept in a dict, so the cost is O(count) whatever the tree's size.
    """
    if not 1 <= chunk_count <= MAX_CHUNK_COUNT:
        raise LocalProtocolError(f"chunk_count must be in [1, {MAX_CHUNK_COUNT}], got {chunk_count}")
    if not 1 <= count <= MAX_CHUNKS_PER_REQUEST:
        raise LocalProtocolError(f"count must be in [1, {MAX_CHUNKS_PER_REQUEST}], got {count}")
    swapped: dict[int, int] = {}
    picked = []
    for k in range(min(count, chunk_count)):
        draw = int.from_bytes(hashlib.sha256(_SEED_DOMAIN + seed + _U64.pack(k)).digest(), "little")
        j = k + draw % (chunk_count - k)
        picked.append(swapped.get(j, j))
        swapped[j] = swapped.get(k, k)
    return tuple(sorted(picked))


# ---- serving ------------------------------------------------------------------------------------------------------


def serve(request: ChunkRequest, tree: CheckpointTree | None) -> ChunkAnswer:
    """The answer to `request` from the tree the server holds for the request's swarm and epoch (None: none)."""
    question = (request.swarm_id, request.epoch, request.root)
    if tree is None or tree.root != request.root:
        return ChunkRefusal(*question, Refusal.UNKNOWN_ROOT, "no checkpoint with that root")
    outside = [index for index in request.indices if index >= tree.chunk_count]
    if outside:
        return ChunkRefusal(*question, Refusal.BAD_INDEX, f"index {outside[0]} >= chunk count {tree.chunk_count}")
    chunks = tuple(ProvenChunk(index, tree.chunk(index), tree.proof(index)) for index in request.indices)
    return ChunkReply(*question, chunks)


# ---- the voter's check --------------------------------------------------------------------------------------------


def check_sample(
    root: bytes,
    chunk_count: int,
    indices: tuple[int, ...],
    reply: ChunkAnswer,
    own_tree: CheckpointTree,
    tolerance: float = DEFAULT_TOLERANCE,
) -> str | None:
    """None when `reply` supports the proposal of the `chunk_count`-chunk tree `root`, else why not (one line).

    `indices` are the ones the voter asked for; `own_tree` is the voter's own parameters at the same boundary.
    """
    if not 0 <= tolerance < math.inf:
        raise LocalProtocolError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if isinstance(reply, ChunkRefusal):
        name = Refusal(reply.code).name.lower().replace("_", " ")
        return f"proposer refused the sample: {name}: {reply.detail}"
    if reply.root != root:
        return f"reply names root {reply.root.hex()[:16]}, not the proposed {root.hex()[:16]}"
    if chunk_count != own_tree.chunk_count:
        return f"proposal has {chunk_count} chunks, our parameters {own_tree.chunk_count}"
    answered = tuple(chunk.index for chunk in reply.chunks)
    if answered != tuple(indices):
        return f"reply answers indices {list(answered)}, not the requested {list(indices)}"
    for proven in reply.chunks:
        if not verify_proof(root, proven.index, chunk_count, proven.chunk, proven.proof):
            return f"chunk {proven.index}: proof does not lead to the root"
    for proven in reply.chunks:
        reason = chunk_mismatch(proven.index, proven.chunk, own_tree, tolerance)
        if reason is not None:
            return f"chunk {proven.index}: {reason}"
    return None


def chunk_mismatch(index: int, chunk: bytes, own_tree: CheckpointTree, tolerance: float) -> str | None:
    """None when `chunk` lies within `tolerance` of chunk `index` of `own_tree` (see the module docstring), else
    why not."""
    distance = chunk_distance(index, chunk, own_tree)
    if isinstance(distance, str):
        return distance
    if not distance <= tolerance:
        return f"relative distance {distance:.3g} from our parameters exceeds the tolerance {tolerance:.3g}"
    return None


def chunk_distance(index: int, chunk: bytes, own_tree: CheckpointTree) -> float | str:
    """The relative distance of `chunk`'s tensor elements from those of chunk `index` of `own_tree` (0.0 for a
    chunk with none), or why the two cannot be compared: different lengths, different bytes outside the tensors,
    a non-finite element in `chunk`."""
    ours = own_tree.chunk(index)
    if len(chunk) != len(ours):
        return f"{len(chunk)} bytes where ours has {len(ours)}"
    start, end = index * CHUNK_SIZE_BYTES, index * CHUNK_SIZE_BYTES + len(ours)
    theirs_values, our_values = [], []
    cursor = start
    for segment in own_tree.layout.segments:
        if segment.offset >= end:
            break
        low, high = max(segment.offset, start), min(segment.offset + segment.size_bytes, end)
        if low >= high:
            continue
        if chunk[cursor - start : low - start] != ours[cursor - start : low - start]:
            return f"bytes outside the tensors (header or padding) differ in [{cursor}, {low})"
        theirs_values.append(_as_float64(chunk[low - start : high - start], segment.dtype))
        our_values.append(_as_float64(ours[low - start : high - start], segment.dtype))
        cursor = high
    if chunk[cursor - start :] != ours[cursor - start :]:
        return f"bytes outside the tensors (header or padding) differ in [{cursor}, {end})"
    if not theirs_values:
        return 0.0
    theirs_all, ours_all = torch.cat(theirs_values), torch.cat(our_values)
    if not bool(torch.isfinite(theirs_all).all()):
        return "holds a non-finite value"
    return float(torch.linalg.vector_norm(theirs_all - ours_all) / max(float(ours_all.norm()), TINY_NORM))


def _as_float64(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=dtype).to(torch.float64)
