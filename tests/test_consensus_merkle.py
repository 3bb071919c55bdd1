"""Checkpoint roots: the canonical parameter bytes, the Merkle tree over their chunks, and proof verification."""

from __future__ import annotations

import hashlib
import json
import random
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.merkle import (
    ALIGN_BYTES,
    CHUNK_SIZE_BYTES,
    HEADER_MAGIC,
    MAX_CHUNK_COUNT,
    CheckpointTree,
    ParameterLayout,
    canonical_bytes,
    chunk_count_of,
    parameter_layout,
    proof_length,
    verify_proof,
)
from swarmgrad.core.errors import LocalProtocolError


def _state(numel: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three tensors of mixed dtypes whose bytes total about `numel` * 4."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "b.weight": torch.randn(numel // 2, generator=gen),
        "a.bias": torch.randn(3, generator=gen).to(torch.float16),  # 6 bytes: the next tensor needs padding
        "c.steps": torch.tensor([7], dtype=torch.int64),
        "d.rest": torch.randn(numel - numel // 2, generator=gen),
    }


def test_canonical_bytes_are_header_then_aligned_tensors_in_name_order() -> None:
    state = _state(10)
    data = bytes(canonical_bytes(state))
    (text_len,) = struct.unpack_from("<Q", data, len(HEADER_MAGIC))
    assert data[: len(HEADER_MAGIC)] == HEADER_MAGIC
    text = data[len(HEADER_MAGIC) + 8 : len(HEADER_MAGIC) + 8 + text_len]
    assert json.loads(text) == [
        ["a.bias", "float16", [3]],
        ["b.weight", "float32", [5]],
        ["c.steps", "int64", [1]],
        ["d.rest", "float32", [5]],
    ]
    layout = parameter_layout(state)
    assert [s.name for s in layout.segments] == sorted(state)
    for segment in layout.segments:
        assert segment.offset % ALIGN_BYTES == 0
        raw = state[segment.name].reshape(-1).view(torch.uint8).numpy().tobytes()
        assert data[segment.offset : segment.offset + segment.size_bytes] == raw
    covered = {i for s in layout.segments for i in range(s.offset, s.offset + s.size_bytes)}
    padding = [data[i] for i in range(len(text) + len(HEADER_MAGIC) + 8, len(data)) if i not in covered]
    assert padding and set(padding) == {0}
    assert len(data) == layout.total_size_bytes


def test_bytes_do_not_depend_on_dict_order_or_memory_layout() -> None:
    state = _state(40)
    matrix = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    one = {**state, "m": matrix}
    other = {"m": matrix.t().contiguous().t(), **dict(reversed(list(state.items())))}
    assert not other["m"].is_contiguous()
    assert bytes(canonical_bytes(one)) == bytes(canonical_bytes(other))
    assert CheckpointTree.from_state(one).root == CheckpointTree.from_state(other).root


def test_tree_copies_the_state_and_any_change_moves_the_root() -> None:
    state = _state(40_000)
    tree = CheckpointTree.from_state(state)
    root = tree.root
    state["b.weight"][0] += 1.0
    assert CheckpointTree.from_state(state).root != root
    assert tree.root == root and CheckpointTree(tree.data, tree.layout).root == root  # the tree kept its copy
    assert tree.data.readonly
    renamed = {("z" if k == "c.steps" else k): v for k, v in state.items()}
    assert CheckpointTree.from_state(renamed).root != CheckpointTree.from_state(state).root
    reshaped = {**state, "c.steps": state["c.steps"].reshape(1, 1)}
    assert CheckpointTree.from_state(reshaped).root != CheckpointTree.from_state(state).root


def test_unsupported_dtype_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="complex64"):
        parameter_layout({"w": torch.zeros(2, dtype=torch.complex64)})


def test_bfloat16_and_bool_and_scalars_and_empty_tensors_are_laid_out() -> None:
    state = {
        "a": torch.ones(3, dtype=torch.bfloat16),
        "b": torch.tensor(True),
        "c": torch.zeros(0, 4),
        "d": torch.tensor(2.5, dtype=torch.float64),
    }
    tree = CheckpointTree.from_state(state)
    assert [s.size_bytes for s in tree.layout.segments] == [6, 1, 0, 8]
    assert tree.chunk_count == 1 and verify_proof(tree.root, 0, 1, tree.chunk(0), tree.proof(0))


@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 7, 8, 13])
def test_every_proof_verifies_and_fits_exactly(chunks: int) -> None:
    tree = CheckpointTree(_bytes(chunks), _fake_layout(chunks))
    assert tree.chunk_count == chunks
    for i in range(chunks):
        chunk, proof = tree.chunk(i), tree.proof(i)
        assert len(proof) == proof_length(i, chunks)
        assert verify_proof(tree.root, i, chunks, chunk, proof)
        assert not verify_proof(tree.root, i, chunks, chunk, (*proof, proof[0] if proof else b"\0" * 32))  # too long
        if proof:
            assert not verify_proof(tree.root, i, chunks, chunk, proof[:-1])  # too short
            bad = bytearray(proof[0])
            bad[0] ^= 1
            assert not verify_proof(tree.root, i, chunks, chunk, (bytes(bad), *proof[1:]))
            assert not verify_proof(tree.root, i, chunks, chunk, (proof[0][:31], *proof[1:]))  # a short hash
        for other in range(chunks):
            if other != i:
                assert not verify_proof(tree.root, other, chunks, chunk, proof)  # wrong index
        assert not verify_proof(tree.root, i, chunks + 1, chunk, proof)  # wrong count
        assert not verify_proof(tree.root, chunks, chunks, chunk, proof)  # index outside
        assert not verify_proof(tree.root, -1, chunks, chunk, proof)
        flipped = bytearray(chunk)
        flipped[len(chunk) // 2] ^= 0x80
        assert not verify_proof(tree.root, i, chunks, bytes(flipped), proof)
        assert not verify_proof(tree.root, i, chunks, chunk + b"\0", proof)  # wrong length


def _fake_layout(chunks: int) -> ParameterLayout:
    """A layout of as many bytes as `_bytes(chunks)`: the tree looks only at its size."""
    return ParameterLayout(b"", (), len(_bytes(chunks)))


def _bytes(chunks: int) -> memoryview:
    """`chunks` chunks of random bytes (no two alike), the last one 256 bytes short."""
    return memoryview(random.Random(chunks).randbytes(CHUNK_SIZE_BYTES * chunks - 256))


def test_tree_rule_by_hand_for_three_chunks() -> None:
    """Leaves 0x00-prefixed, inner nodes 0x01, the odd last node carried up, the count bound in the root."""
    tree = CheckpointTree(_bytes(3), _fake_layout(3))
    leaves = [hashlib.sha256(b"\x00" + tree.chunk(i)).digest() for i in range(3)]
    top = hashlib.sha256(b"\x01" + hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest() + leaves[2]).digest()
    assert tree.root == hashlib.sha256(b"\x02" + struct.pack("<Q", 3) + top).digest()
    assert tree.proof(2) == (hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest(),)
    assert len(tree.chunk(2)) == CHUNK_SIZE_BYTES - 256


def test_a_one_chunk_tree_is_not_its_leaf_and_counts_are_bound() -> None:
    tree = CheckpointTree.from_state({"w": torch.ones(4)})
    assert tree.proof(0) == ()
    assert tree.root != hashlib.sha256(b"\x00" + tree.chunk(0)).digest()
    assert not verify_proof(tree.root, 0, 2, tree.chunk(0), ())
    assert not verify_proof(tree.root, 0, 0, tree.chunk(0), ())
    assert not verify_proof(tree.root, 0, MAX_CHUNK_COUNT + 1, tree.chunk(0), ())
    assert not verify_proof(tree.root[:31], 0, 1, tree.chunk(0), ())
    assert not verify_proof(tree.root, 0, 1, b"", ())


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 3000), index=st.integers(0, 2999))
def test_proof_length_matches_the_tree(count: int, index: int) -> None:
    """`proof_length` agrees with a direct count over the levels (no tree built: only the arithmetic)."""
    index %= count
    expected, position, width = 0, index, count
    while width > 1:
        expected += position ^ 1 < width
        position, width = position // 2, (width + 1) // 2
    assert proof_length(index, count) == expected <= 12


def test_chunk_count_and_index_bounds() -> None:
    assert (
        chunk_count_of(1) == 1 and chunk_count_of(CHUNK_SIZE_BYTES) == 1 and chunk_count_of(CHUNK_SIZE_BYTES + 1) == 2
    )
    with pytest.raises(LocalProtocolError):
        chunk_count_of(0)
    tree = CheckpointTree.from_state({"w": torch.ones(4)})
    with pytest.raises(LocalProtocolError):
        tree.chunk(1)
    with pytest.raises(LocalProtocolError):
        tree.proof(-1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_state_on_the_gpu_has_the_root_of_the_same_state_on_the_cpu() -> None:
    state = _state(200_000)
    on_gpu = {name: tensor.cuda() for name, tensor in state.items()}
    assert CheckpointTree.from_state(on_gpu).root == CheckpointTree.from_state(state).root
