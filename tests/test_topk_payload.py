"""Sparse payload: round trips in every format (directly and inside a codec message), and every corruption is a
DecodeError with nothing returned."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmgrad.core.codec import Schema
from swarmgrad.core.errors import ConfigError, DecodeError, LocalProtocolError
from training.topk import SparsePayload, pack_sparse, unpack_sparse
from training.topk.payload import INDEX_FORMATS, SCALE_BLOCK, VALUE_FORMATS, choose_index_format


@dataclasses.dataclass(frozen=True)
class SparseUpdate:
    round: int
    sender: str
    payload: SparsePayload


@dataclasses.dataclass(frozen=True, eq=False)
class UncheckedPayload:
    """The same wire layout as SparsePayload without its checks: what a faulty or hostile peer could send."""

    numel: int
    k: int
    index_format: str
    value_format: str
    indices: np.ndarray
    values: np.ndarray
    chunk_counts: np.ndarray | None
    scales: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class UncheckedUpdate:
    round: int
    sender: str
    payload: UncheckedPayload


SCHEMA = Schema("topk-test", {1: SparseUpdate})
HOSTILE_SCHEMA = Schema("topk-test", {1: UncheckedUpdate})


def random_selection(numel: int, k: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.sort(torch.randperm(numel, generator=gen)[:k]).values
    return indices, torch.randn(k, generator=gen) * scale


def assert_values_close(got: torch.Tensor, want: torch.Tensor, value_format: str) -> None:
    if value_format == "fp32":
        assert torch.equal(got, want)
    elif value_format == "fp16":
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)
    elif value_format == "bf16":
        torch.testing.assert_close(got, want.bfloat16().float(), rtol=0, atol=0)
    else:
        k = want.numel()
        blocks = torch.zeros(-(-k // SCALE_BLOCK) * SCALE_BLOCK)
        blocks[:k] = want.abs()
        step = blocks.view(-1, SCALE_BLOCK).amax(dim=1).repeat_interleave(SCALE_BLOCK)[:k] / 127
        assert bool(((got - want).abs() <= step * 0.5 + 1e-6 * want.abs()).all())


@settings(max_examples=80, deadline=None)
@given(
    numel=st.integers(1, 300_000),
    fraction=st.floats(0.0, 1.0),
    index_format=st.sampled_from([*INDEX_FORMATS, "auto"]),
    value_format=st.sampled_from(VALUE_FORMATS),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_every_format_through_the_codec(
    numel: int, fraction: float, index_format: str, value_format: str, scale: float, seed: int
) -> None:
    k = min(numel, int(fraction * min(numel, 5000)))
    indices, values = random_selection(numel, k, seed, scale)
    payload = pack_sparse(indices, values, numel, value_format=value_format, index_format=index_format)
    assert payload.k == k and payload.value_format == value_format
    if index_format != "auto":
        assert payload.index_format == index_format
    decoded = SCHEMA.decode(SCHEMA.encode(SparseUpdate(7, "peer-a", payload)))
    assert isinstance(decoded, SparseUpdate) and decoded.round == 7 and decoded.sender == "peer-a"
    got_indices, got_values = unpack_sparse(decoded.payload, numel, max_k=k)
    assert got_indices.dtype == np.int64 and got_values.dtype == np.float32
    assert np.array_equal(got_indices, indices.numpy())
    assert_values_close(torch.from_numpy(got_values), values, value_format)
    # numpy arrays in, the same payload out
    same = pack_sparse(indices.numpy(), values.numpy(), numel, value_format=value_format, index_format=index_format)
    assert SCHEMA.encode(SparseUpdate(7, "peer-a", same)) == SCHEMA.encode(SparseUpdate(7, "peer-a", payload))


def test_codec_message_fields_survive_exactly() -> None:
    indices, values = random_selection(200_000, 3000, seed=1)
    payload = pack_sparse(indices, values, 200_000, value_format="int8", index_format="u16_chunk")
    decoded = SCHEMA.decode(SCHEMA.encode(SparseUpdate(1, "p", payload)))
    assert isinstance(decoded, SparseUpdate)
    for field in dataclasses.fields(SparsePayload):
        want, got = getattr(payload, field.name), getattr(decoded.payload, field.name)
        if isinstance(want, np.ndarray):
            assert isinstance(got, np.ndarray) and got.dtype == want.dtype and np.array_equal(got, want)
        else:
            assert got == want


def test_unsorted_input_is_sorted_and_auto_picks_the_smaller_index_format() -> None:
    payload = pack_sparse(torch.tensor([9, 2, 5]), torch.tensor([1.0, 2.0, 3.0]), 10, value_format="fp32")
    indices, values = unpack_sparse(payload, 10)
    assert indices.tolist() == [2, 5, 9] and values.tolist() == [2.0, 3.0, 1.0]
    assert choose_index_format(10_000_000, 100_000) == "u16_chunk"
    assert choose_index_format(10_000_000, 100) == "int32"
    dense = pack_sparse(*random_selection(10_000_000, 100_000, seed=2), 10_000_000, value_format="fp16")
    assert dense.index_format == "u16_chunk"
    assert dense.size_bytes == 100_000 * 4 + 4 * 153  # 2 B index + 2 B value per entry, 153 chunk counts


def test_pack_refuses_what_a_receiver_would_reject() -> None:
    with pytest.raises(LocalProtocolError):
        pack_sparse(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]), 10)
    with pytest.raises(LocalProtocolError):
        pack_sparse(torch.tensor([10]), torch.tensor([1.0]), 10)
    with pytest.raises(LocalProtocolError):
        pack_sparse(torch.tensor([-1]), torch.tensor([1.0]), 10)
    with pytest.raises(LocalProtocolError):
        pack_sparse(torch.tensor([1]), torch.tensor([float("nan")]), 10)
    with pytest.raises(LocalProtocolError):
        pack_sparse(torch.tensor([1]), torch.tensor([7e4]), 10, value_format="fp16")
    with pytest.raises(LocalProtocolError):
        pack_sparse(torch.tensor([1]), torch.tensor([3.4e38]), 10, value_format="bf16")
    with pytest.raises(ConfigError):
        pack_sparse(torch.tensor([1]), torch.tensor([1.0]), 10, value_format="fp8")
    with pytest.raises(ConfigError):
        pack_sparse(torch.tensor([1]), torch.tensor([1.0]), 10, index_format="varint")


def hostile(payload: SparsePayload, **changes: object) -> bytes:
    """The bytes of an update whose payload has `changes` applied, with no sender-side checks."""
    fields = {f.name: getattr(payload, f.name) for f in dataclasses.fields(SparsePayload)}
    fields.update(changes)
    return HOSTILE_SCHEMA.encode(UncheckedUpdate(3, "mallory", UncheckedPayload(**fields)))  # type: ignore[arg-type]


def receive(body: bytes, numel: int, max_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    msg = SCHEMA.decode(body)
    assert isinstance(msg, SparseUpdate)
    indices, values = unpack_sparse(msg.payload, numel, max_k)
    return torch.from_numpy(indices), torch.from_numpy(values)


def test_every_kind_of_semantic_corruption_is_a_decode_error() -> None:
    numel = 300_000
    indices, values = random_selection(numel, 1000, seed=3)
    i32 = pack_sparse(indices, values, numel, value_format="fp32", index_format="int32")
    u16 = pack_sparse(indices, values, numel, value_format="int8", index_format="u16_chunk")
    bf = pack_sparse(indices, values, numel, value_format="bf16", index_format="int32")
    assert u16.chunk_counts is not None and u16.scales is not None
    bad_index = i32.indices.copy()
    bad_index[-1] = numel
    negative = i32.indices.copy()
    negative[0] = -5
    duplicate = i32.indices.copy()
    duplicate[1] = duplicate[0]
    nan_values = i32.values.copy()
    nan_values[3] = np.nan
    inf_values = i32.values.copy()
    inf_values[3] = -np.inf
    bf_nan = bf.values.copy()
    bf_nan[0] = 0x7FC0
    moved_count = u16.chunk_counts.copy()
    moved_count[0] += 1
    moved_count[1] -= 1
    neg_scale = u16.scales.copy()
    neg_scale[0] = -1.0
    inf_scale = u16.scales.copy()
    inf_scale[0] = np.inf
    low_code = u16.values.copy()
    low_code[0] = -128
    for untouched in (i32, u16, bf):  # the hostile encoder itself produces valid bytes when nothing is changed
        assert torch.equal(receive(hostile(untouched), numel)[0], indices)
    cases = [
        hostile(i32, indices=bad_index),
        hostile(i32, indices=negative),
        hostile(i32, indices=duplicate),
        hostile(i32, values=nan_values),
        hostile(i32, values=inf_values),
        hostile(bf, values=bf_nan),
        hostile(i32, k=1001),
        hostile(i32, k=-1),
        hostile(i32, numel=999),
        hostile(i32, index_format="int64"),
        hostile(i32, value_format="fp8"),
        hostile(i32, indices=i32.indices.astype(np.int64)),
        hostile(i32, values=i32.values.astype(np.float64)),
        hostile(i32, values=i32.values.reshape(10, 100)),
        hostile(i32, values=i32.values[:-1]),
        hostile(i32, chunk_counts=u16.chunk_counts),
        hostile(i32, scales=u16.scales),
        hostile(u16, chunk_counts=None),
        hostile(u16, chunk_counts=moved_count),
        hostile(u16, chunk_counts=u16.chunk_counts[:-1]),
        hostile(u16, scales=None),
        hostile(u16, scales=neg_scale),
        hostile(u16, scales=inf_scale),
        hostile(u16, values=low_code),
        hostile(u16, numel=2**40),
        hostile(i32, numel=2**40, k=1000),
    ]
    for body in cases:
        with pytest.raises(DecodeError):
            receive(body, numel)
    # Valid on its own, but not for this receiver: other model size, or more entries than it accepts.
    body = SCHEMA.encode(SparseUpdate(1, "p", i32))
    with pytest.raises(DecodeError):
        receive(body, numel + 1)
    with pytest.raises(DecodeError):
        receive(body, numel, max_k=999)
    assert receive(body, numel, max_k=1000)[0].shape == (1000,)


@settings(max_examples=150, deadline=None)
@given(
    value_format=st.sampled_from(VALUE_FORMATS),
    index_format=st.sampled_from(INDEX_FORMATS),
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 2**31)),
)
def test_corrupted_bytes_never_raise_anything_but_decode_error(
    value_format: str, index_format: str, flips: list[tuple[int, int]], cut: int | None
) -> None:
    numel = 100_000
    indices, values = random_selection(numel, 300, seed=4)
    body = bytearray(
        SCHEMA.encode(SparseUpdate(2, "p", pack_sparse(indices, values, numel, value_format, index_format)))
    )
    for position, mask in flips:
        body[position % len(body)] ^= mask
    if cut is not None:
        del body[cut % len(body) :]
    try:
        got_indices, got_values = receive(bytes(body), numel, max_k=300)
    except DecodeError:
        return
    # A flip that still decodes must still be a valid update for this receiver.
    assert got_indices.shape == got_values.shape and got_indices.numel() <= 300
    if got_indices.numel():
        assert int(got_indices[0]) >= 0 and int(got_indices[-1]) < numel
        assert bool((got_indices[1:] > got_indices[:-1]).all())
    assert bool(torch.isfinite(got_values).all())
