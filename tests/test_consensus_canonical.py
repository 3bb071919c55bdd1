"""Canonical bytes back to a state: a round trip for every dtype, and every kind of hostile input refused by name."""

from __future__ import annotations

import struct

import pytest
import torch

from consensus.canonical import (
    MAX_LAYOUT_BYTES,
    BadCheckpointBody,
    CanonicalBytesError,
    decode_canonical,
    decode_peer_body,
    model_spec_hash,
    spec_layout,
)
from consensus.merkle import HEADER_MAGIC, CheckpointTree, canonical_bytes, parameter_layout
from swarmgrad.core.errors import DecodeError, RemoteProtocolError
from training.tasks.base import TensorSpec

LIMIT = 1 << 20


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        "w": torch.randn(3, 5, generator=generator),
        "b16": torch.randn(3, generator=generator).to(torch.bfloat16),
        "h": torch.randn(7, generator=generator).to(torch.float16),
        "d": torch.randn(2, 2, generator=generator, dtype=torch.float64),
        "count": torch.tensor(12345678901, dtype=torch.int64),
        "i8": torch.tensor([-3, 4, 5], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def _spec(state: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {n: TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in state.items()}


STATE = _state()
SPEC = _spec(STATE)
DATA = bytes(canonical_bytes(STATE))


def _refused(data: bytes, match: str, spec: dict[str, TensorSpec] = SPEC, limit: int = LIMIT) -> None:
    with pytest.raises(CanonicalBytesError, match=match):
        decode_canonical(data, spec, max_bytes=limit)


def test_round_trip_gives_the_same_tensors_bytes_and_root() -> None:
    state = decode_canonical(DATA, SPEC, max_bytes=LIMIT)
    assert sorted(state) == sorted(STATE)
    for name, tensor in STATE.items():
        assert state[name].dtype == tensor.dtype and state[name].shape == tensor.shape
        assert torch.equal(state[name], tensor)
    assert bytes(canonical_bytes(state)) == DATA
    assert CheckpointTree.from_state(state).root == CheckpointTree.from_state(STATE).root
    # a memoryview (what CheckpointTree.data holds) decodes too, and the tensors are copies
    state2 = decode_canonical(CheckpointTree.from_state(STATE).data, SPEC, max_bytes=LIMIT)
    state2["w"].add_(1.0)
    assert torch.equal(decode_canonical(DATA, SPEC, max_bytes=LIMIT)["w"], STATE["w"])


def test_spec_layout_is_the_layout_of_any_matching_state() -> None:
    assert spec_layout(SPEC) == parameter_layout(STATE)
    other = _spec({"w": torch.zeros(3, 6)})
    assert model_spec_hash(SPEC) == model_spec_hash(dict(reversed(SPEC.items())))
    assert model_spec_hash(SPEC) != model_spec_hash(other) and len(model_spec_hash(SPEC)) == 32


def test_size_is_checked_before_anything_else() -> None:
    _refused(DATA, f"{len(DATA)} bytes exceed the limit of {len(DATA) - 1}", limit=len(DATA) - 1)
    _refused(b"\xff" * 100, "exceed the limit of 99", limit=99)


@pytest.mark.parametrize("cut", [0, 5, 15, 16, 40, len(DATA) // 2, len(DATA) - 1])
def test_truncation_anywhere_is_refused(cut: int) -> None:
    with pytest.raises(CanonicalBytesError):
        decode_canonical(DATA[:cut], SPEC, max_bytes=LIMIT)


def test_truncated_tensors_and_extra_bytes_name_the_lengths() -> None:
    need = len(DATA)
    _refused(DATA[:-8], f"{need - 8} bytes where the model's layout needs {need} \\(truncated bytes\\)")
    _refused(DATA + bytes(8), f"{need + 8} bytes where the model's layout needs {need} \\(8 extra bytes\\)")


def test_bad_magic_and_version() -> None:
    _refused(b"PK\x03\x04" + DATA[4:], "bad magic")
    _refused(HEADER_MAGIC[:6] + b"\x02\x00" + DATA[8:], "unsupported layout version 0200")


def test_huge_declared_layout_length_is_refused_without_allocating() -> None:
    for declared in (2**64 - 1, MAX_LAYOUT_BYTES + 1, len(DATA)):
        _refused(DATA[:8] + struct.pack("<Q", declared) + DATA[16:], f"declared layout length {declared} exceeds")


def _with_layout(text: bytes, tail: bytes = DATA[spec_layout(SPEC).header_size_bytes :]) -> bytes:
    header = HEADER_MAGIC + struct.pack("<Q", len(text)) + text
    return header + bytes(-len(header) % 8) + tail


def test_layout_that_is_not_json_or_not_entries() -> None:
    _refused(_with_layout(b'[["w"'), "the layout is not JSON")
    _refused(_with_layout(b'{"w": 1}'), "not a list of \\[name, dtype, shape\\] entries")


def test_wrong_dtype_shape_or_names_are_refused_against_the_task() -> None:
    wrong_dtype = {**SPEC, "w": TensorSpec((3, 5), "float64")}
    _refused(DATA, "tensor 'w' is float32\\[3, 5\\], the task expects float64\\[3, 5\\]", spec=wrong_dtype)
    wrong_shape = {**SPEC, "w": TensorSpec((5, 3), "float32")}
    _refused(DATA, "tensor 'w' is float32\\[3, 5\\], the task expects float32\\[5, 3\\]", spec=wrong_shape)
    more = {**SPEC, "zz": TensorSpec((1,), "float32")}
    _refused(DATA, "missing \\['zz'\\], unexpected \\[\\]", spec=more)
    fewer = {n: s for n, s in SPEC.items() if n != "w"}
    _refused(DATA, "missing \\[\\], unexpected \\['w'\\]", spec=fewer)


def test_a_layout_that_means_the_same_but_is_not_canonical_is_refused() -> None:
    layout = spec_layout(SPEC)
    text = layout.header[16 : 16 + struct.unpack_from("<Q", layout.header, 8)[0]]
    spaced = text.replace(b",", b", ")
    _refused(_with_layout(spaced), "not in canonical form")


def test_non_zero_padding_is_refused() -> None:
    layout = spec_layout(SPEC)
    header_pad = layout.header_size_bytes - 1
    assert DATA[header_pad] == 0
    _refused(DATA[:header_pad] + b"\x01" + DATA[header_pad + 1 :], "padding after the header")
    b16 = next(s for s in layout.segments if s.name == "b16")  # 6 bytes of data, 2 of padding
    pad = b16.offset + b16.size_bytes
    _refused(DATA[:pad] + b"\x07" + DATA[pad + 1 :], "padding after tensor 'b16'")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["w", "b16", "h", "d"])
def test_non_finite_floats_are_refused(name: str, value: float) -> None:
    poisoned = dict(STATE)
    poisoned[name] = STATE[name].clone()
    poisoned[name].view(-1)[0] = value
    _refused(bytes(canonical_bytes(poisoned)), f"tensor '{name}' holds NaN or infinite values")


def test_a_bool_that_is_not_0_or_1_is_refused() -> None:
    mask = next(s for s in spec_layout(SPEC).segments if s.name == "mask")
    _refused(DATA[: mask.offset] + b"\x02" + DATA[mask.offset + 1 :], "tensor 'mask' holds a bool")


def test_bytes_from_a_peer_raise_a_remote_protocol_error_naming_it() -> None:
    with pytest.raises(BadCheckpointBody, match=r"peer p7: .*truncated") as info:
        decode_peer_body("p7", DATA[:-8], SPEC, max_bytes=LIMIT)
    assert isinstance(info.value, RemoteProtocolError) and info.value.peer == "p7"
    assert isinstance(info.value.__cause__, DecodeError)
    assert sorted(decode_peer_body("p7", DATA, SPEC, max_bytes=LIMIT)) == sorted(SPEC)
