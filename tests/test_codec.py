"""Codec: every message type round-trips, and no corruption of a valid frame escapes as anything but DecodeError."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmgrad.core.codec import (
    FRAME_HEADER_SIZE,
    Schema,
    encode_frame_header,
    parse_frame_header,
)
from swarmgrad.core.errors import DecodeError, LocalProtocolError


@dataclasses.dataclass(frozen=True)
class Ping:
    nonce: int
    note: str


@dataclasses.dataclass(frozen=True)
class Blob:
    round: int
    tensor: np.ndarray
    scale: float | None
    tags: tuple[str, ...]
    raw: bytes
    flag: bool

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ValueError(f"round must be >= 0, got {self.round}")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Blob)
            and (self.round, self.scale, self.tags, self.raw, self.flag)
            == (other.round, other.scale, other.tags, other.raw, other.flag)
            and self.tensor.dtype == other.tensor.dtype
            and np.array_equal(self.tensor, other.tensor, equal_nan=self.tensor.dtype.kind == "f")
        )

    __hash__ = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class Nested:
    inner: Ping
    others: tuple[Ping, ...]


SCHEMA = Schema("test", {1: Ping, 2: Blob, 7: Nested})

_dtypes = st.sampled_from(["<f4", "<f2", "<f8", "i1", "u1", "<i4", "<i8", "<u2", "?"])


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(_dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize, max_size=int(np.prod(shape)) * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy() if dtype != np.dtype("?") else np.zeros(shape, bool)


pings = st.builds(Ping, nonce=st.integers(-(2**63), 2**64 - 1), note=st.text(max_size=20))
blobs = st.builds(
    Blob,
    round=st.integers(0, 2**40),
    tensor=tensors(),
    scale=st.none() | st.floats(allow_nan=False),
    tags=st.lists(st.text(max_size=5), max_size=3).map(tuple),
    raw=st.binary(max_size=30),
    flag=st.booleans(),
)
nesteds = st.builds(Nested, inner=pings, others=st.lists(pings, max_size=3).map(tuple))
messages = st.one_of(pings, blobs, nesteds)


@given(messages)
def test_every_message_type_round_trips(msg: object) -> None:
    assert SCHEMA.decode(SCHEMA.encode(msg)) == msg


@settings(max_examples=60, deadline=None)
@given(messages, st.randoms(use_true_random=False))
def test_single_byte_corruption_is_decode_error_or_valid_message(msg: object, rng: random.Random) -> None:
    body = SCHEMA.encode(msg)
    for position in range(len(body)):
        corrupted = bytearray(body)
        corrupted[position] = (body[position] + rng.randrange(1, 256)) % 256
        try:
            decoded = SCHEMA.decode(bytes(corrupted))
        except DecodeError:
            continue
        assert type(decoded) in SCHEMA.message_types
        assert isinstance(SCHEMA.encode(decoded), bytes)  # a valid message: it encodes again


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_decode_error(raw: bytes) -> None:
    try:
        SCHEMA.decode(raw)
    except DecodeError:
        pass


def test_truncations_are_rejected() -> None:
    body = SCHEMA.encode(Blob(3, np.arange(10, dtype=np.float32), 1.5, ("a",), b"xy", True))
    for cut in range(len(body)):
        with pytest.raises(DecodeError):
            SCHEMA.decode(body[:cut])


def test_unknown_tag_and_bad_field_types_are_decode_errors() -> None:
    with pytest.raises(DecodeError, match="unknown message tag 9"):
        SCHEMA.decode(b"\x09\x00\x90")
    wrong = SCHEMA.encode(Ping(1, "x")).replace(b"\xa1x", b"\x05")  # note: an int where a str belongs
    with pytest.raises(DecodeError, match="note"):
        SCHEMA.decode(wrong)


def test_post_init_rejection_is_a_decode_error() -> None:
    body = bytearray(SCHEMA.encode(Blob(0, np.zeros(1, np.float32), None, (), b"", False)))
    # The round is encoded as positive fixint 0 right after the tag and the array header.
    assert body[3] == 0
    body[3] = 0xFF  # negative fixint -1
    with pytest.raises(DecodeError, match="round must be >= 0"):
        SCHEMA.decode(bytes(body))


def test_tensor_travels_little_endian_and_shape_must_match_bytes() -> None:
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    decoded = SCHEMA.decode(SCHEMA.encode(Blob(1, big_endian, None, (), b"", False)))
    assert isinstance(decoded, Blob)
    assert decoded.tensor.dtype == np.dtype("<i4")
    assert decoded.tensor.tolist() == [[0, 1, 2], [3, 4, 5]]
    body = SCHEMA.encode(Blob(1, np.zeros(4, np.float32), None, (), b"", False))
    shape_at = body.index(bytes([1, 1]) + (4).to_bytes(8, "little"))
    tampered = body[: shape_at + 2] + (5).to_bytes(8, "little") + body[shape_at + 10 :]
    with pytest.raises(DecodeError, match="does not match"):
        SCHEMA.decode(tampered)


def test_encoding_a_foreign_type_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        SCHEMA.encode(object())


def test_frame_header_limit_is_checked_before_allocation() -> None:
    header = encode_frame_header(4 * 1024**3)
    assert len(header) == FRAME_HEADER_SIZE
    with pytest.raises(DecodeError, match="limit"):
        parse_frame_header(header, max_body_bytes=256 * 1024**2)
    assert parse_frame_header(encode_frame_header(10), max_body_bytes=10) == 10
    for bad in (b"XX" + header[2:], header[:2] + b"\x02" + header[3:], header[:3] + b"\x01" + header[4:], header[:5]):
        with pytest.raises(DecodeError):
            parse_frame_header(bad, max_body_bytes=2**63)
