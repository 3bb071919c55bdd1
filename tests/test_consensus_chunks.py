"""The chunk fetch: index sampling, the messages and their bounded decoding, the server's answer, the voter's check."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.chunks import (
    DEFAULT_SAMPLE_COUNT,
    DEFAULT_TOLERANCE,
    MAX_CHUNKS_PER_REQUEST,
    MAX_MESSAGE_BYTES,
    SCHEMA,
    ChunkProtocolError,
    ChunkRefusal,
    ChunkReply,
    ChunkRequest,
    MalformedChunkMessage,
    OversizedChunkReply,
    ProvenChunk,
    Refusal,
    UnsolicitedChunkReply,
    check_sample,
    decode_reply,
    decode_request,
    max_reply_bytes,
    sample_indices,
    serve,
)
from consensus.merkle import CHUNK_SIZE_BYTES, MAX_PROOF_HASHES, CheckpointTree
from swarmgrad.core.errors import LocalProtocolError, RemoteProtocolError

SWARM = "lab"


def _state(seed: int = 0, numel: int = 110_000) -> dict[str, torch.Tensor]:
    """About 480 kB in three tensors of two dtypes: 8 chunks."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer1.weight": torch.randn(numel, generator=gen),
        "layer1.bias": torch.randn(50, generator=gen).to(torch.bfloat16),
        "layer2.weight": torch.randn(numel // 10, generator=gen),
    }


def _nudged(state: dict[str, torch.Tensor], relative: float, seed: int = 1) -> dict[str, torch.Tensor]:
    """`state` with every tensor moved by noise of about `relative` times its own norm."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        values = tensor.to(torch.float64)
        noise = torch.randn(values.shape, generator=gen, dtype=torch.float64)
        out[name] = (values + relative * noise * values.norm() / noise.norm()).to(tensor.dtype)
    return out


@pytest.fixture(scope="module")
def proposer() -> CheckpointTree:
    return CheckpointTree.from_state(_state())


@pytest.fixture(scope="module")
def voter() -> CheckpointTree:
    return CheckpointTree.from_state(_nudged(_state(), 0.01))


def _ask(tree: CheckpointTree, seed: bytes = b"signature") -> ChunkRequest:
    indices = sample_indices(seed, tree.chunk_count, DEFAULT_SAMPLE_COUNT)
    return ChunkRequest(SWARM, 3, tree.root, indices)


def _check(proposer: CheckpointTree, request: ChunkRequest, reply: object, voter: CheckpointTree) -> str | None:
    return check_sample(proposer.root, proposer.chunk_count, request.indices, reply, voter)  # type: ignore[arg-type]


# ---- sampling -----------------------------------------------------------------------------------------------------


def test_sample_indices_are_distinct_sorted_deterministic_and_seed_dependent() -> None:
    picks = sample_indices(b"a", 1000, 8)
    assert len(set(picks)) == 8 and list(picks) == sorted(picks) and all(0 <= i < 1000 for i in picks)
    assert sample_indices(b"a", 1000, 8) == picks
    assert sample_indices(b"b", 1000, 8) != picks
    assert sample_indices(b"a", 5, 8) == (0, 1, 2, 3, 4)
    assert sample_indices(b"a", 2**32, 64)[-1] < 2**32


def test_sample_indices_cover_the_tree_evenly() -> None:
    counts = [0] * 20
    for seed in range(2000):
        for index in sample_indices(seed.to_bytes(4, "little"), 20, 3):
            counts[index] += 1
    assert min(counts) > 0.8 * 300 and max(counts) < 1.2 * 300  # 2000 x 3 / 20 each


def test_sample_indices_reject_out_of_range_arguments() -> None:
    for chunk_count, count in [(0, 1), (2**32 + 1, 1), (10, 0), (10, MAX_CHUNKS_PER_REQUEST + 1)]:
        with pytest.raises(LocalProtocolError):
            sample_indices(b"x", chunk_count, count)


# ---- serving and checking -----------------------------------------------------------------------------------------


def test_an_honest_proposal_passes_a_close_voters_check(proposer: CheckpointTree, voter: CheckpointTree) -> None:
    assert proposer.chunk_count == 8 and proposer.root != voter.root
    request = _ask(proposer)
    reply = serve(request, proposer)
    assert isinstance(reply, ChunkReply)
    assert [c.index for c in reply.chunks] == list(request.indices)
    assert _check(proposer, request, reply, voter) is None
    assert _check(proposer, request, SCHEMA.decode(SCHEMA.encode(reply)), voter) is None


def test_a_far_proposal_is_refused_with_its_distance(proposer: CheckpointTree) -> None:
    far = CheckpointTree.from_state(_nudged(_state(), 3 * DEFAULT_TOLERANCE))
    request = _ask(proposer)
    reason = _check(proposer, request, serve(request, proposer), far)
    assert reason is not None and "relative distance" in reason and "exceeds the tolerance 0.4" in reason
    stranger = CheckpointTree.from_state(_state(seed=9))  # another model altogether (a stale or garbage one)
    assert "relative distance" in str(_check(proposer, request, serve(request, proposer), stranger))


def test_the_default_tolerance_admits_gossip_spread_and_refuses_a_reset_model(proposer: CheckpointTree) -> None:
    """0.2 is about the most honest digits peers were measured apart at an epoch boundary, 0.8 a model reset to its
    initial weights (docs/consensus.md)."""
    request = _ask(proposer)
    reply = serve(request, proposer)
    assert _check(proposer, request, reply, CheckpointTree.from_state(_nudged(_state(), 0.2))) is None
    assert "relative distance" in str(
        _check(proposer, request, reply, CheckpointTree.from_state(_nudged(_state(), 0.8)))
    )


def test_a_poisoned_chunk_with_a_valid_proof_is_caught_when_sampled(voter: CheckpointTree) -> None:
    state = _state()
    state["layer1.weight"][CHUNK_SIZE_BYTES // 4 * 2] = float("nan")  # in chunk 2 (or 3: the header shifts it)
    poisoned = CheckpointTree.from_state(state)
    bad = next(
        i for i in range(poisoned.chunk_count) if poisoned.chunk(i) != CheckpointTree.from_state(_state()).chunk(i)
    )
    request = ChunkRequest(SWARM, 3, poisoned.root, (bad,))
    reason = _check(poisoned, request, serve(request, poisoned), voter)
    assert reason == f"chunk {bad}: holds a non-finite value"
    state["layer1.weight"][CHUNK_SIZE_BYTES // 4 * 2] = 1e6  # finite, but far
    poisoned = CheckpointTree.from_state(state)
    request = ChunkRequest(SWARM, 3, poisoned.root, (bad,))
    assert "relative distance" in str(_check(poisoned, request, serve(request, poisoned), voter))


def test_a_bad_proof_or_a_substituted_chunk_is_refused(proposer: CheckpointTree, voter: CheckpointTree) -> None:
    request = _ask(proposer)
    reply = serve(request, proposer)
    assert isinstance(reply, ChunkReply)
    first = reply.chunks[0]
    broken = bytearray(first.proof[0])
    broken[5] ^= 1
    bad_proof = dataclasses.replace(first, proof=(bytes(broken), *first.proof[1:]))
    forged = dataclasses.replace(reply, chunks=(bad_proof, *reply.chunks[1:]))
    assert _check(proposer, request, forged, voter) == f"chunk {first.index}: proof does not lead to the root"
    # the voter's own (close, honest) chunk in place of the proposer's: close, but not what the root names
    swapped = dataclasses.replace(first, chunk=voter.chunk(first.index))
    forged = dataclasses.replace(reply, chunks=(swapped, *reply.chunks[1:]))
    assert "proof does not lead to the root" in str(_check(proposer, request, forged, voter))


def test_the_reply_must_answer_exactly_the_requested_indices(proposer: CheckpointTree, voter: CheckpointTree) -> None:
    request = ChunkRequest(SWARM, 3, proposer.root, (1, 4, 6))
    reply = serve(request, proposer)
    assert isinstance(reply, ChunkReply)
    others = serve(
        ChunkRequest(SWARM, 3, proposer.root, tuple(i for i in range(8) if i not in request.indices)), proposer
    )
    assert isinstance(others, ChunkReply)
    for chunks in (reply.chunks[:-1], tuple(reversed(reply.chunks)), (*reply.chunks[:-1], others.chunks[0])):
        reason = _check(proposer, request, dataclasses.replace(reply, chunks=chunks), voter)
        assert reason is not None and reason.startswith("reply answers indices")


def test_refusals_and_mismatched_trees(proposer: CheckpointTree, voter: CheckpointTree) -> None:
    request = _ask(proposer)
    unknown = serve(request, voter)
    assert isinstance(unknown, ChunkRefusal) and unknown.code == Refusal.UNKNOWN_ROOT
    assert (
        _check(proposer, request, unknown, voter)
        == "proposer refused the sample: unknown root: no checkpoint with that root"
    )
    assert serve(request, None) == unknown
    outside = serve(ChunkRequest(SWARM, 3, proposer.root, (0, 8)), proposer)
    assert isinstance(outside, ChunkRefusal) and outside.code == Refusal.BAD_INDEX
    smaller = CheckpointTree.from_state(_state(numel=60_000))
    assert "our parameters 8" in str(
        check_sample(
            smaller.root, smaller.chunk_count, (0,), serve(ChunkRequest(SWARM, 3, smaller.root, (0,)), smaller), voter
        )
    )  # type: ignore[arg-type]
    reply = serve(request, proposer)
    assert "not the proposed" in str(check_sample(voter.root, proposer.chunk_count, request.indices, reply, voter))


def test_the_header_must_match_exactly(voter: CheckpointTree) -> None:
    """Same sizes, one tensor renamed (same length): every number is equal, but the layouts differ."""
    state = _nudged(_state(), 0.01)
    renamed = {("layer1.bia5" if k == "layer1.bias" else k): v for k, v in state.items()}
    other = CheckpointTree.from_state(renamed)
    assert other.chunk_count == voter.chunk_count
    request = ChunkRequest(SWARM, 3, other.root, (0, 5))
    reason = _check(other, request, serve(request, other), voter)
    assert reason is not None and reason.startswith("chunk 0: bytes outside the tensors (header or padding) differ")


def test_tolerance_bounds_are_inclusive_and_validated(proposer: CheckpointTree, voter: CheckpointTree) -> None:
    request = _ask(proposer)
    reply = serve(request, proposer)
    assert check_sample(proposer.root, proposer.chunk_count, request.indices, reply, proposer, tolerance=0.0) is None
    assert check_sample(proposer.root, proposer.chunk_count, request.indices, reply, voter, tolerance=0.001) is not None
    for tolerance in (-0.1, float("nan"), float("inf")):
        with pytest.raises(LocalProtocolError):
            check_sample(proposer.root, proposer.chunk_count, request.indices, reply, voter, tolerance=tolerance)


# ---- messages and decoding ----------------------------------------------------------------------------------------


def test_messages_reject_invalid_fields() -> None:
    root = bytes(32)
    for kwargs in (
        {"swarm_id": "Bad Id"},
        {"epoch": -1},
        {"root": bytes(31)},
        {"indices": ()},
        {"indices": (1, 1)},
        {"indices": (-1,)},
        {"indices": tuple(range(MAX_CHUNKS_PER_REQUEST + 1))},
    ):
        with pytest.raises(ValueError):
            ChunkRequest(**{"swarm_id": SWARM, "epoch": 0, "root": root, "indices": (0,), **kwargs})  # type: ignore[arg-type]
    for index, chunk, proof in [
        (0, b"", ()),
        (0, bytes(CHUNK_SIZE_BYTES + 1), ()),
        (0, b"x", (b"short",)),
        (0, b"x", (bytes(32),) * (MAX_PROOF_HASHES + 1)),
        (-1, b"x", ()),
    ]:
        with pytest.raises(ValueError):
            ProvenChunk(index, chunk, proof)
    with pytest.raises(ValueError):
        ChunkReply(SWARM, 0, root, (ProvenChunk(0, b"x", ()), ProvenChunk(0, b"y", ())))
    with pytest.raises(ValueError):
        ChunkRefusal(SWARM, 0, root, 99, "")
    with pytest.raises(ValueError):
        ChunkRefusal(SWARM, 0, root, Refusal.BUSY, "x" * 201)


def test_a_largest_reply_fits_its_bound() -> None:
    chunk = ProvenChunk(0, bytes(CHUNK_SIZE_BYTES), (b"\xff" * 32,) * MAX_PROOF_HASHES)
    swarm = "s" * 63
    for count in (1, DEFAULT_SAMPLE_COUNT, MAX_CHUNKS_PER_REQUEST):
        chunks = tuple(dataclasses.replace(chunk, index=2**32 - 1 - i) for i in range(count))
        body = SCHEMA.encode(ChunkReply(swarm, 2**63 - 1, bytes(32), chunks))
        assert len(body) <= max_reply_bytes(count) < len(body) * 1.01 + 2048
    refusal = SCHEMA.encode(ChunkRefusal(swarm, 2**63 - 1, bytes(32), Refusal.BUSY, "\U0001f600" * 200))
    assert len(refusal) <= max_reply_bytes(1)
    assert MAX_MESSAGE_BYTES == max_reply_bytes(MAX_CHUNKS_PER_REQUEST) < 4.3e6


def test_decode_reply_checks_size_kind_and_question(proposer: CheckpointTree) -> None:
    request = _ask(proposer)
    body = SCHEMA.encode(serve(request, proposer))
    assert decode_reply("p", body, request) == serve(request, proposer)
    small = ChunkRequest(SWARM, 3, proposer.root, request.indices[:1])
    with pytest.raises(OversizedChunkReply) as caught:
        decode_reply("p", body, small)  # eight chunks to a question of one
    assert isinstance(caught.value, RemoteProtocolError) and caught.value.peer == "p"
    with pytest.raises(MalformedChunkMessage, match="expected a ChunkReply"):
        decode_reply("p", SCHEMA.encode(request), request)
    with pytest.raises(UnsolicitedChunkReply):
        decode_reply("p", body, dataclasses.replace(request, epoch=4))
    with pytest.raises(MalformedChunkMessage, match="expected a ChunkRequest"):
        decode_request("p", body)
    assert decode_request("p", SCHEMA.encode(request)) == request
    with pytest.raises(OversizedChunkReply):
        decode_request("p", bytes(MAX_MESSAGE_BYTES + 1))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_corrupted_messages_raise_only_chunk_protocol_errors(data: st.DataObject) -> None:
    tree = CheckpointTree.from_state({"w": torch.arange(20_000, dtype=torch.float32)})  # 2 chunks
    request = ChunkRequest(SWARM, 1, tree.root, (0, 1))
    messages = [request, serve(request, tree), ChunkRefusal(SWARM, 1, tree.root, Refusal.BUSY, "later")]
    body = bytearray(SCHEMA.encode(data.draw(st.sampled_from(messages))))
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = rng.randrange(3) if body else 2
        if kind == 0:
            body[rng.randrange(len(body))] = rng.randrange(256)
        elif kind == 1:
            del body[rng.randrange(len(body)) :]
        else:
            body.insert(rng.randrange(len(body) + 1), rng.randrange(256))
    try:
        msg = decode_reply("p", bytes(body), request)
    except ChunkProtocolError:
        return
    # it still decoded: then it is a well-formed answer, and the check gives a verdict, never an exception
    verdict = check_sample(tree.root, tree.chunk_count, request.indices, msg, tree)
    assert verdict is None or isinstance(verdict, str)
