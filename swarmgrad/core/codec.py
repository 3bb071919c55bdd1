"""Wire encoding: stream frames and typed messages. Nothing here does I/O, and nothing here ever unpickles.

Two layers:

* **Frames** carry one message on a stream: a 12-byte header (`b"SG"`, format version, flags, little-endian u64
  body length) then the body. `parse_frame_header` checks the announced length against the protocol's maximum
  *before* anyone allocates a buffer for it.
* **Messages** are frozen dataclasses registered in a `Schema` under a stable 16-bit tag. A body is the tag
  (u16, little-endian) followed by the message's fields as one msgpack array, in field order. Tensors (numpy
  arrays) travel as msgpack extension type 1: dtype code, rank, little-endian u64 dims, then the raw
  little-endian buffer. Decoding checks every field's type against the dataclass annotations and then runs the
  dataclass's own `__post_init__` checks; any failure is a `DecodeError`.

Why msgpack: it is small, fast, well kept (C extension, fuzzed upstream), has hard limits on every container it
builds, and carries raw bytes without base64 or copies through a schema compiler. Protobuf (which py-libp2p uses)
would need generated code and a second description of each message; our messages are already dataclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import types
import typing
from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np

from swarmgrad.core.errors import DecodeError, LocalProtocolError

FRAME_MAGIC = b"SG"
FRAME_VERSION = 1
_FRAME_HEADER = struct.Struct("<2sBBQ")
FRAME_HEADER_SIZE = _FRAME_HEADER.size

_TAG = struct.Struct("<H")
_TENSOR_EXT = 1
_MAX_RANK = 8

# Stable wire codes of tensor dtypes. Never renumber; bfloat16 travels as uint16 bits (numpy has no bfloat16).
_DTYPE_CODES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f8"),
    4: np.dtype("i1"),
    5: np.dtype("u1"),
    6: np.dtype("<i2"),
    7: np.dtype("<u2"),
    8: np.dtype("<i4"),
    9: np.dtype("<u4"),
    10: np.dtype("<i8"),
    11: np.dtype("<u8"),
    12: np.dtype("?"),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in _DTYPE_CODES.items()}


# ---- frames -------------------------------------------------------------------------------------------------------


def encode_frame_header(body_size_bytes: int) -> bytes:
    """The header that precedes a body of `body_size_bytes` on a stream."""
    return _FRAME_HEADER.pack(FRAME_MAGIC, FRAME_VERSION, 0, body_size_bytes)


def parse_frame_header(header: bytes, max_body_bytes: int) -> int:
    """Validate a frame header and return the announced body size. Raises `DecodeError` on a bad magic, an unknown
    version or flags, or a body larger than `max_body_bytes` (checked before anything is allocated)."""
    if len(header) != FRAME_HEADER_SIZE:
        raise DecodeError(f"frame header must be {FRAME_HEADER_SIZE} bytes, got {len(header)}")
    magic, version, flags, size = _FRAME_HEADER.unpack(header)
    if magic != FRAME_MAGIC:
        raise DecodeError(f"bad frame magic {magic!r}")
    if version != FRAME_VERSION:
        raise DecodeError(f"unsupported frame version {version}")
    if flags != 0:
        raise DecodeError(f"unknown frame flags {flags:#x}")
    if size > max_body_bytes:
        raise DecodeError(f"frame announces {size} bytes, limit is {max_body_bytes}")
    return int(size)


# ---- tensors ------------------------------------------------------------------------------------------------------


def _pack_tensor(array: np.ndarray) -> msgpack.ExtType:
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _CODE_OF_DTYPE.get(np.dtype(dtype))
    if code is None:
        raise LocalProtocolError(f"dtype {array.dtype} cannot travel on the wire")
    if array.ndim > _MAX_RANK:
        raise LocalProtocolError(f"tensor rank {array.ndim} exceeds {_MAX_RANK}")
    data = np.ascontiguousarray(array, dtype=dtype)
    header = struct.pack(f"<BB{array.ndim}Q", code, array.ndim, *array.shape)
    return msgpack.ExtType(_TENSOR_EXT, header + data.tobytes())


def _unpack_tensor(data: bytes) -> np.ndarray:
    if len(data) < 2:
        raise DecodeError("tensor header truncated")
    code, rank = data[0], data[1]
    dtype = _DTYPE_CODES.get(code)
    if dtype is None:
        raise DecodeError(f"unknown tensor dtype code {code}")
    if rank > _MAX_RANK:
        raise DecodeError(f"tensor rank {rank} exceeds {_MAX_RANK}")
    offset = 2 + 8 * rank
    if len(data) < offset:
        raise DecodeError("tensor shape truncated")
    shape = struct.unpack_from(f"<{rank}Q", data, 2)
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != len(data) - offset:
        raise DecodeError(f"tensor of shape {shape} and dtype {dtype} does not match {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _ext_hook(code: int, data: bytes) -> np.ndarray:
    if code != _TENSOR_EXT:
        raise DecodeError(f"unknown extension type {code}")
    return _unpack_tensor(data)


# ---- field type checking ------------------------------------------------------------------------------------------


def _to_wire(value: object) -> object:
    if isinstance(value, np.ndarray):
        return _pack_tensor(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, tuple):
        return [_to_wire(item) for item in value]
    return value


def _from_wire(value: object, hint: Any, where: str) -> object:
    """Check `value` (as msgpack produced it) against the type `hint`; return it in its Python form."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _from_wire(value, option, where)
            except DecodeError:
                continue
        raise DecodeError(f"{where}: {type(value).__name__} matches none of {hint}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_wire(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise DecodeError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(
            _from_wire(item, arg, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if hint is np.ndarray:
        if not isinstance(value, np.ndarray):
            raise DecodeError(f"{where}: expected a tensor, got {type(value).__name__}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise DecodeError(f"{where}: expected a bool, got {type(value).__name__}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise DecodeError(f"{where}: expected an int, got {type(value).__name__}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DecodeError(f"{where}: expected a float, got {type(value).__name__}")
        return float(value)
    if hint in (str, bytes):
        if not isinstance(value, hint):
            raise DecodeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    raise LocalProtocolError(f"{where}: field type {hint!r} is not supported on the wire")


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """The resolved type of each field of the dataclass `cls`, computed once per class: `typing.get_type_hints`
    evaluates every annotation string again on each call, which was 3/4 of the time to decode a gossip message.
    The config loader reads field types through this too."""
    return typing.get_type_hints(cls)


def _build(cls: type, value: object, where: str) -> object:
    fields = dataclasses.fields(cls)
    if not isinstance(value, list) or len(value) != len(fields):
        raise DecodeError(f"{where}: expected {len(fields)} fields")
    hints = field_hints(cls)
    kwargs = {
        f.name: _from_wire(item, hints[f.name], f"{where}.{f.name}") for f, item in zip(fields, value, strict=True)
    }
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"{where}: {exc}") from exc


# ---- schemas ------------------------------------------------------------------------------------------------------


class Schema:
    """The messages of one protocol, each a frozen dataclass under a stable tag.

    Supported field types: `int`, `float`, `bool`, `str`, `bytes`, `numpy.ndarray`, `X | None`, `tuple[X, ...]`,
    fixed tuples and nested dataclasses made of the same. A message's `__post_init__` may raise `ValueError` to
    reject values that are well typed but invalid; on decode this becomes a `DecodeError`.
    """

    def __init__(self, name: str, messages: dict[int, type]) -> None:
        self.name = name
        self._by_tag = dict(messages)
        self._tag_of: dict[type, int] = {}
        for tag, cls in messages.items():
            if not 0 <= tag <= 0xFFFF:
                raise LocalProtocolError(f"{name}: tag {tag} does not fit 16 bits")
            if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
                raise LocalProtocolError(f"{name}: {cls!r} must be a frozen dataclass")
            if cls in self._tag_of:
                raise LocalProtocolError(f"{name}: {cls.__name__} registered twice")
            self._tag_of[cls] = tag

    @property
    def message_types(self) -> Iterable[type]:
        return self._by_tag.values()

    def encode(self, msg: object) -> bytes:
        """The body of a frame carrying `msg`."""
        tag = self._tag_of.get(type(msg))
        if tag is None:
            raise LocalProtocolError(f"{self.name}: {type(msg).__name__} is not a message of this schema")
        return _TAG.pack(tag) + msgpack.packb(_to_wire(msg), use_bin_type=True)

    def decode(self, body: bytes | bytearray | memoryview) -> object:
        """Parse a frame body into a message. Raises `DecodeError` on anything else."""
        data = bytes(body)
        if len(data) < _TAG.size:
            raise DecodeError(f"{self.name}: body of {len(data)} bytes has no tag")
        (tag,) = _TAG.unpack_from(data)
        cls = self._by_tag.get(tag)
        if cls is None:
            raise DecodeError(f"{self.name}: unknown message tag {tag}")
        try:
            value = msgpack.unpackb(
                memoryview(data)[_TAG.size :],
                raw=False,
                use_list=True,
                strict_map_key=True,
                ext_hook=_ext_hook,
            )
        except DecodeError:
            raise
        except (ValueError, msgpack.UnpackException) as exc:
            raise DecodeError(f"{self.name}: malformed body: {exc}") from exc
        return _build(cls, value, cls.__name__)
