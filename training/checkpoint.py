"""Checkpoints: model state as safetensors bytes plus a small JSON metadata file, and the canonical model hash.

This module owns the on-disk layout of a peer's checkpoints, the bytes a peer sends a late joiner (`encode_state`,
`decode_state`), and `canonical_model_hash`, the one hash the swarm agrees on for "epoch E reached, here is my
model" (the seam for epoch consensus). Nothing here is ever unpickled: bodies are safetensors, whose header is
checked against the task's parameter names, shapes and dtypes (`TensorSpec`) before any tensor is built, and
every float must be finite. It does no networking; it reads and writes only the directory it is given.

Layout: `<dir>/ckpt-<round, 10 digits>.safetensors`, `<dir>/ckpt-<round>.optimizer.safetensors` (the local
optimizer's momentum or moments, so that a restart loses nothing; never sent to peers), then `<dir>/ckpt-<round>.json`;
each is written to a temporary file and renamed, and the metadata is written last, so a checkpoint without its
metadata is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from swarmgrad.core.errors import ConfigError, DecodeError, LocalProtocolError
from training.tasks.base import TensorSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1024 * 1024
"""Upper bound on a safetensors header we are willing to parse (ours are a few hundred bytes per tensor)."""

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_HASH_DOMAIN = b"swarmgrad-model-v1\0"


# ---- hashing ------------------------------------------------------------------------------------------------------


def canonical_model_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every tensor in name order: name, dtype, shape, then the raw little-endian bytes.

    Two peers holding bit-identical models get the same hash whatever their dict order or memory layout; it is
    the value handed to epoch consensus.
    """
    digest = hashlib.sha256(_HASH_DOMAIN)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        header = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]).encode()
        digest.update(struct.pack("<Q", len(header)) + header)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_hash(settings: Mapping[str, object]) -> str:
    """SHA-256 (hex) of the settings as canonical JSON (sorted keys): peers that must agree on them compare it."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---- bodies -------------------------------------------------------------------------------------------------------


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """The model state as safetensors bytes (CPU, contiguous copies)."""
    return safetensors_save({name: state[name].detach().cpu().contiguous() for name in sorted(state)})


def _check_header(data: bytes, spec: Mapping[str, TensorSpec]) -> None:
    if len(data) < 8:
        raise DecodeError(f"checkpoint body of {len(data)} bytes is shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise DecodeError(f"checkpoint header length {header_len} exceeds the body or {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"checkpoint header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise DecodeError("checkpoint header is not a JSON object")
    names = set(header) - {"__metadata__"}
    if names != set(spec):
        missing, extra = sorted(set(spec) - names), sorted(names - set(spec))
        raise DecodeError(f"checkpoint tensors do not match the task: missing {missing}, unexpected {extra}")
    for name in sorted(names):
        entry = header[name]
        if not isinstance(entry, dict):
            raise DecodeError(f"checkpoint header entry for {name!r} is not an object")
        dtype = _SAFETENSORS_DTYPES.get(str(entry.get("dtype")))
        shape = entry.get("shape")
        expected = spec[name]
        if dtype != expected.dtype or not isinstance(shape, list) or tuple(shape) != expected.shape:
            raise DecodeError(
                f"checkpoint tensor {name!r} is {entry.get('dtype')}{shape}, "
                f"the task expects {expected.dtype}{list(expected.shape)}"
            )


def validate_state(state: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec]) -> None:
    """Raise `DecodeError` unless `state` has exactly the spec's names, shapes and dtypes and only finite floats."""
    if set(state) != set(spec):
        missing, extra = sorted(set(spec) - set(state)), sorted(set(state) - set(spec))
        raise DecodeError(f"model state does not match the task: missing {missing}, unexpected {extra}")
    for name in sorted(state):
        tensor, expected = state[name], spec[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tuple(tensor.shape) != expected.shape or dtype != expected.dtype:
            raise DecodeError(
                f"tensor {name!r} is {dtype}{list(tensor.shape)}, "
                f"the task expects {expected.dtype}{list(expected.shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DecodeError(f"tensor {name!r} holds NaN or infinite values")


def decode_state(data: bytes, spec: Mapping[str, TensorSpec], *, max_bytes: int) -> dict[str, torch.Tensor]:
    """Parse a safetensors body and check it against the task. Raises `DecodeError` on any mismatch or damage.

    The size is checked first, then the header (names, shapes, dtypes) before any tensor is built.
    """
    if len(data) > max_bytes:
        raise DecodeError(f"checkpoint body of {len(data)} bytes exceeds the limit of {max_bytes}")
    _check_header(data, spec)
    try:
        state = safetensors_load(data)
    except SafetensorError as exc:
        raise DecodeError(f"checkpoint body is damaged: {exc}") from exc
    validate_state(state, spec)
    return state


# ---- local optimizer state ----------------------------------------------------------------------------------------

_OPTIMIZER_STATE_KEYS = frozenset({"momentum_buffer", "step", "exp_avg", "exp_avg_sq"})
"""Per-parameter state of the optimizers a task may use (`OptimizerSettings`: SGD with momentum, AdamW)."""


def encode_optimizer_state(optimizer: torch.optim.Optimizer) -> bytes:
    """The optimizer's per-parameter state (momentum buffers, Adam moments and step counts) as safetensors bytes,
    one tensor per `<parameter index>.<key>`. Hyperparameters are not kept: they come from the task's settings on
    every start. This stays on the peer's disk; it is never sent to another peer."""
    tensors: dict[str, torch.Tensor] = {}
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if value is None:
                continue
            if key not in _OPTIMIZER_STATE_KEYS or not isinstance(value, torch.Tensor):
                raise LocalProtocolError(f"optimizer state {key!r} ({type(value).__name__}) cannot be checkpointed")
            tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
    return safetensors_save(tensors)


def restore_optimizer_state(optimizer: torch.optim.Optimizer, data: bytes, *, max_bytes: int) -> None:
    """Load what `encode_optimizer_state` wrote into `optimizer`, built over the same parameters. Raises
    `DecodeError`, leaving the optimizer as it was, when the bytes are damaged or do not fit its parameters."""
    if len(data) > max_bytes:
        raise DecodeError(f"optimizer state of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        tensors = safetensors_load(data)
    except SafetensorError as exc:
        raise DecodeError(f"optimizer state is damaged: {exc}") from exc
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        index_text, _, key = name.partition(".")
        if not index_text.isdigit() or int(index_text) >= len(params) or key not in _OPTIMIZER_STATE_KEYS:
            raise DecodeError(f"optimizer state entry {name!r} names no parameter state of this model")
        expected = () if key == "step" else tuple(params[int(index_text)].shape)
        if tuple(tensor.shape) != expected or not tensor.is_floating_point():
            raise DecodeError(f"optimizer state {name!r} is {tensor.dtype}{list(tensor.shape)}, expected {expected}")
        if not bool(torch.isfinite(tensor).all()):
            raise DecodeError(f"optimizer state {name!r} holds NaN or infinite values")
        state.setdefault(int(index_text), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# ---- metadata and the store ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint is: the round and epoch it was taken at, the model's canonical hash, the task name and the
    hash of the training settings it was trained with."""

    round: int
    epoch: int
    model_hash: str
    task: str
    config_hash: str
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for field in ("round", "epoch", "format"):
            value = getattr(self, field)
            if type(value) is not int or value < 0:
                raise DecodeError(f"checkpoint metadata `{field}` must be an integer >= 0, got {value!r}")
        for field in ("model_hash", "task", "config_hash"):
            if not isinstance(getattr(self, field), str):
                raise DecodeError(f"checkpoint metadata `{field}` must be a string, got {getattr(self, field)!r}")
        if self.format != FORMAT_VERSION:
            raise DecodeError(f"checkpoint format {self.format} is not the supported {FORMAT_VERSION}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CheckpointMeta:
        """Parse metadata; raises `DecodeError` on bad JSON, missing or unknown keys, or bad values."""
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"checkpoint metadata is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise DecodeError("checkpoint metadata is not a JSON object")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise DecodeError(f"checkpoint metadata has missing or unknown keys: {exc}") from exc


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back from disk: its metadata, its validated model state, where its body lies, and the
    local optimizer's state as written (None if it was not saved; `restore_optimizer_state` checks it)."""

    meta: CheckpointMeta
    state: dict[str, torch.Tensor]
    path: Path
    optimizer_body: bytes | None = None


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    """One peer's checkpoint directory. Keeps the newest `keep` checkpoints; `latest()` returns the newest one that
    is complete, undamaged, matches the task and whose body hashes to its metadata's `model_hash`. A damaged or
    incomplete one found on the way is moved into `damaged/` (logged once), where it no longer takes a `keep` slot
    and can still be inspected."""

    def __init__(self, directory: Path, *, keep: int, max_bytes: int) -> None:
        if keep < 1:
            raise ConfigError("checkpoint.keep", keep, "an integer >= 1")
        if max_bytes < 1:
            raise ConfigError("checkpoint.max_bytes", max_bytes, "an integer >= 1")
        self.directory = directory
        self.keep = keep
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)

    def _paths(self, round_: int) -> tuple[Path, Path]:
        stem = f"ckpt-{round_:010d}"
        return self.directory / f"{stem}.safetensors", self.directory / f"{stem}.json"

    def _optimizer_path(self, round_: int) -> Path:
        return self.directory / f"ckpt-{round_:010d}.optimizer.safetensors"

    def rounds(self) -> list[int]:
        """Rounds that have a metadata file, newest first."""
        found = []
        for path in self.directory.glob("ckpt-*.json"):
            digits = path.stem.removeprefix("ckpt-")
            if len(digits) == 10 and digits.isdigit():
                found.append(int(digits))
        return sorted(found, reverse=True)

    def save(
        self, state: Mapping[str, torch.Tensor], meta: CheckpointMeta, *, optimizer_body: bytes | None = None
    ) -> Path:
        """Write body (and the optimizer's state, if given) then metadata, each atomically; drop checkpoints beyond
        the newest `keep`. Returns the body's path."""
        body, meta_path = self._paths(meta.round)
        _write_atomically(body, encode_state(state))
        if optimizer_body is not None:
            _write_atomically(self._optimizer_path(meta.round), optimizer_body)
        _write_atomically(meta_path, meta.to_json().encode())
        for old in self.rounds()[self.keep :]:
            old_body, old_meta = self._paths(old)
            old_meta.unlink(missing_ok=True)  # metadata first: a half-deleted checkpoint is never trusted
            old_body.unlink(missing_ok=True)
            self._optimizer_path(old).unlink(missing_ok=True)
        return body

    def load(self, round_: int, spec: Mapping[str, TensorSpec]) -> Checkpoint:
        """Read and check one checkpoint. Raises `DecodeError` if it is damaged or does not match."""
        body, meta_path = self._paths(round_)
        try:
            meta = CheckpointMeta.from_json(meta_path.read_bytes())
            data = body.read_bytes()
        except FileNotFoundError as exc:
            raise DecodeError(f"checkpoint {round_} is incomplete: {exc}") from exc
        state = decode_state(data, spec, max_bytes=self.max_bytes)
        if canonical_model_hash(state) != meta.model_hash:
            raise DecodeError(f"checkpoint {round_}: body does not hash to its metadata's model_hash")
        if meta.round != round_:
            raise DecodeError(f"checkpoint file for round {round_} says round {meta.round}")
        try:
            optimizer_body: bytes | None = self._optimizer_path(round_).read_bytes()
        except FileNotFoundError:
            optimizer_body = None
        return Checkpoint(meta, state, body, optimizer_body)

    def _move_aside(self, round_: int) -> Path:
        """Move every file of checkpoint `round_` into `damaged/` (metadata first, so it is never trusted again)."""
        aside = self.directory / "damaged"
        aside.mkdir(exist_ok=True)
        body, meta_path = self._paths(round_)
        for path in (meta_path, body, self._optimizer_path(round_)):
            if path.exists():
                os.replace(path, aside / path.name)
        return aside

    def latest(self, spec: Mapping[str, TensorSpec], *, task: str) -> Checkpoint | None:
        """The newest usable checkpoint of `task`, or None. Damaged or foreign ones are logged and skipped."""
        for round_ in self.rounds():
            try:
                checkpoint = self.load(round_, spec)
            except DecodeError as exc:
                aside = self._move_aside(round_)
                log.warning("skipping checkpoint %d in %s: %s; moved to %s", round_, self.directory, exc, aside)
                continue
            if checkpoint.meta.task != task:
                log.warning("skipping checkpoint %d: it is for task %r, not %r", round_, checkpoint.meta.task, task)
                continue
            return checkpoint
        return None
