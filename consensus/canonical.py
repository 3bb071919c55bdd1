"""Canonical parameter bytes back to a model state: the checked inverse of `consensus.merkle.canonical_bytes`.

A certified checkpoint travels (and is kept on disk) as its canonical bytes, the very bytes its Merkle root names,
so that whoever holds them can check them against the certificate. This module turns such bytes back into tensors
for the local task, and trusts nothing in them. No I/O, no clock.

`decode_canonical(data, spec, max_bytes=...)` checks, in this order, and raises `CanonicalBytesError` (a
`DecodeError`) at the first failure, naming it:

1. the size: at most `max_bytes` (before anything is read);
2. the magic and its version (`HEADER_MAGIC`);
3. the declared layout length: at most `MAX_LAYOUT_BYTES` and within the data (a huge length is refused, never
   allocated);
4. the layout text: JSON `[[name, dtype, [dims...]], ...]`, then the same names, dtypes and shapes as the task's
   `spec`, then exactly the canonical text the task's layout has (so the decoded state re-encodes to the same bytes,
   and so to the same root);
5. the total length: exactly what the task's layout needs (truncated or extra bytes are refused);
6. zero padding after the header and after every tensor;
7. the values: bool elements are 0 or 1, floats are finite.

The expected layout comes from the task (`spec_layout`), never from the data, so every buffer this module allocates
has a size fixed by the task and bounded by `max_bytes`. `model_spec_hash(spec)` is the hash an `EpochValue`
carries for a task's model: SHA-256 over a domain tag and the canonical header (names, dtypes, shapes).

Bytes that came from a peer go through `decode_peer_body(peer, ...)`, which raises `BadCheckpointBody`, a
`RemoteProtocolError` naming the peer.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

import numpy as np
import torch

from consensus.merkle import ALIGN_BYTES, HEADER_MAGIC, NUMERIC_DTYPES, ParameterLayout, layout_of
from swarmgrad.core.errors import ConfigError, DecodeError, RemoteProtocolError
from training.tasks.base import TensorSpec

MAX_LAYOUT_BYTES = 16 * 1024 * 1024
"""Bound on the layout text a decoder parses (a model of 100,000 tensors with long names stays far below)."""
_SPEC_DOMAIN = b"swarmgrad/consensus/model-spec/v1\x00"
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in NUMERIC_DTYPES}
_U64 = struct.Struct("<Q")
_PREFIX_BYTES = len(HEADER_MAGIC) + _U64.size
_MAGIC_NAME = HEADER_MAGIC[:6]  # "SGPRM\0": the format; the two bytes after it are its version


class CanonicalBytesError(DecodeError):
    """Bytes that are not the canonical parameter bytes of a state of the task's model: says what is wrong."""


class BadCheckpointBody(RemoteProtocolError):
    """A peer sent checkpoint bytes that do not decode for our task (`reason` says why)."""


def spec_layout(spec: Mapping[str, TensorSpec]) -> ParameterLayout:
    """The layout of the canonical bytes of any state matching `spec`. Raises `ConfigError` for a dtype that a
    checkpoint cannot hold."""
    entries = []
    for name in sorted(spec):
        dtype = _DTYPES.get(spec[name].dtype)
        if dtype is None:
            raise ConfigError(f"model spec {name!r}", spec[name].dtype, f"one of {sorted(_DTYPES)}")
        entries.append((name, dtype, tuple(spec[name].shape)))
    return layout_of(entries)


def model_spec_hash(spec: Mapping[str, TensorSpec]) -> bytes:
    """The 32-byte hash of the model's names, dtypes and shapes that an `EpochValue` names."""
    return layout_spec_hash(spec_layout(spec))


def layout_spec_hash(layout: ParameterLayout) -> bytes:
    """`model_spec_hash` of the spec whose canonical layout is `layout` (from a state's tree, say)."""
    return hashlib.sha256(_SPEC_DOMAIN + layout.header).digest()


def decode_canonical(
    data: bytes | memoryview, spec: Mapping[str, TensorSpec], *, max_bytes: int
) -> dict[str, torch.Tensor]:
    """The state whose canonical bytes are `data`, checked against `spec` (see the module docstring). Every tensor
    is a fresh CPU copy. Raises `CanonicalBytesError`."""
    if len(data) > max_bytes:
        raise CanonicalBytesError(f"{len(data)} bytes exceed the limit of {max_bytes}")
    view = memoryview(data).cast("B")
    layout = spec_layout(spec)
    _check_header(view, layout, spec)
    if len(view) != layout.total_size_bytes:
        how = "truncated" if len(view) < layout.total_size_bytes else f"{len(view) - layout.total_size_bytes} extra"
        raise CanonicalBytesError(
            f"{len(view)} bytes where the model's layout needs {layout.total_size_bytes} ({how} bytes)"
        )
    raw = np.frombuffer(view, dtype=np.uint8)
    if raw[_text_end(layout) : layout.header_size_bytes].any():
        raise CanonicalBytesError("the padding after the header is not zero")
    state: dict[str, torch.Tensor] = {}
    for segment in layout.segments:
        end = segment.offset + segment.size_bytes
        if raw[end : end + (-segment.size_bytes % ALIGN_BYTES)].any():
            raise CanonicalBytesError(f"the padding after tensor {segment.name!r} is not zero")
        tensor = torch.empty(segment.shape, dtype=segment.dtype)  # its size is the task's, already matched
        if segment.size_bytes:
            tensor.view(-1).view(torch.uint8).numpy()[:] = raw[segment.offset : end]
        if segment.dtype == torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
            raise CanonicalBytesError(f"tensor {segment.name!r} holds a bool that is neither 0 nor 1")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CanonicalBytesError(f"tensor {segment.name!r} holds NaN or infinite values")
        state[segment.name] = tensor
    return state


def decode_peer_body(
    peer: str, data: bytes | memoryview, spec: Mapping[str, TensorSpec], *, max_bytes: int
) -> dict[str, torch.Tensor]:
    """`decode_canonical` for bytes `peer` sent: raises `BadCheckpointBody` naming the peer instead."""
    try:
        return decode_canonical(data, spec, max_bytes=max_bytes)
    except CanonicalBytesError as exc:
        raise BadCheckpointBody(peer, str(exc)) from exc


def _text_end(layout: ParameterLayout) -> int:
    """Where the layout text of `layout`'s header ends (its padding starts)."""
    return _PREFIX_BYTES + _U64.unpack_from(layout.header, len(HEADER_MAGIC))[0]


def _check_header(view: memoryview, layout: ParameterLayout, spec: Mapping[str, TensorSpec]) -> None:
    if len(view) < _PREFIX_BYTES:
        raise CanonicalBytesError(f"{len(view)} bytes are too short for the {_PREFIX_BYTES}-byte header prefix")
    magic = bytes(view[: len(HEADER_MAGIC)])
    if magic != HEADER_MAGIC:
        if magic.startswith(_MAGIC_NAME):
            raise CanonicalBytesError(f"unsupported layout version {magic[6:].hex()} (this build reads 0100)")
        raise CanonicalBytesError(f"bad magic {magic!r}: not canonical parameter bytes")
    (text_bytes,) = _U64.unpack_from(view, len(HEADER_MAGIC))
    if text_bytes > min(MAX_LAYOUT_BYTES, len(view) - _PREFIX_BYTES):
        raise CanonicalBytesError(
            f"declared layout length {text_bytes} exceeds the {len(view) - _PREFIX_BYTES} bytes left "
            f"or the limit of {MAX_LAYOUT_BYTES}"
        )
    text = bytes(view[_PREFIX_BYTES : _PREFIX_BYTES + text_bytes])
    try:
        entries = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CanonicalBytesError(f"the layout is not JSON: {exc}") from exc
    _check_entries(entries, spec)
    if text != layout.header[_PREFIX_BYTES : _text_end(layout)]:
        raise CanonicalBytesError("the layout is not in canonical form (order, spacing or escapes)")


def _check_entries(entries: object, spec: Mapping[str, TensorSpec]) -> None:
    if not isinstance(entries, list) or not all(
        isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str) for e in entries
    ):
        raise CanonicalBytesError("the layout is not a list of [name, dtype, shape] entries")
    found = {e[0]: e for e in entries}
    if len(found) != len(entries) or set(found) != set(spec):
        missing, extra = sorted(set(spec) - set(found)), sorted(set(found) - set(spec))
        raise CanonicalBytesError(
            f"tensors do not match the task: missing {missing}, unexpected {extra}"
            + ("" if len(found) == len(entries) else ", a name listed twice")
        )
    for name in sorted(spec):
        _, dtype, shape = found[name]
        expected = spec[name]
        if dtype != expected.dtype or not isinstance(shape, list) or tuple(shape) != tuple(expected.shape):
            raise CanonicalBytesError(
                f"tensor {name!r} is {dtype}{shape}, the task expects {expected.dtype}{list(expected.shape)}"
            )
