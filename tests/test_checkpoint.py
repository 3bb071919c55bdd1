"""Checkpoints: canonical hash, safetensors bodies checked against the task, atomic store with resume."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save

from swarmgrad.core.errors import ConfigError, DecodeError
from training.checkpoint import (
    CheckpointMeta,
    CheckpointStore,
    canonical_model_hash,
    config_hash,
    decode_state,
    encode_optimizer_state,
    encode_state,
    restore_optimizer_state,
)
from training.tasks.base import TensorSpec

SPEC = {"a.weight": TensorSpec((3, 2), "float32"), "a.bias": TensorSpec((3,), "float32")}
LIMIT = 1 << 20


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 2, generator=generator), "a.bias": torch.randn(3, generator=generator)}


def meta_for(state: dict[str, torch.Tensor], round_: int) -> CheckpointMeta:
    return CheckpointMeta(round_, round_ // 10, canonical_model_hash(state), "digits", config_hash({"lr": 0.1}))


def test_hash_ignores_dict_order_and_layout_but_not_values() -> None:
    state = make_state()
    reordered = {"a.bias": state["a.bias"].clone(), "a.weight": state["a.weight"].t().contiguous().t()}
    assert not reordered["a.weight"].is_contiguous()
    assert canonical_model_hash(state) == canonical_model_hash(reordered)
    bumped = dict(state, **{"a.bias": state["a.bias"] + 1e-7})
    assert canonical_model_hash(bumped) != canonical_model_hash(state)
    renamed = {"b.weight": state["a.weight"], "a.bias": state["a.bias"]}
    assert canonical_model_hash(renamed) != canonical_model_hash(state)
    as_double = {name: t.double() for name, t in state.items()}
    assert canonical_model_hash(as_double) != canonical_model_hash(state)


def test_config_hash_is_key_order_independent() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_body_round_trip() -> None:
    state = make_state()
    decoded = decode_state(encode_state(state), SPEC, max_bytes=LIMIT)
    assert canonical_model_hash(decoded) == canonical_model_hash(state)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(3)}, "a.weight"),
        ({"a.weight": torch.zeros(3, 2, dtype=torch.float64), "a.bias": torch.zeros(3)}, "F64"),
        ({"a.weight": torch.zeros(3, 2)}, "missing ['a.bias']"),
        ({"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3), "evil": torch.zeros(1)}, "unexpected ['evil']"),
        ({"a.weight": torch.full((3, 2), float("nan")), "a.bias": torch.zeros(3)}, "NaN"),
    ],
)
def test_bodies_that_do_not_match_the_task_are_refused(state: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(DecodeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_state(encode_state(state), SPEC, max_bytes=LIMIT)


def test_oversized_and_bad_headers_are_refused() -> None:
    body = encode_state(make_state())
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_state(body, SPEC, max_bytes=len(body) - 1)
    with pytest.raises(DecodeError, match="shorter"):
        decode_state(b"\x01", SPEC, max_bytes=LIMIT)
    with pytest.raises(DecodeError, match="header length"):
        decode_state(struct.pack("<Q", 1 << 40) + b"{}", SPEC, max_bytes=LIMIT)
    with pytest.raises(DecodeError, match="not JSON"):
        decode_state(struct.pack("<Q", 3) + b"{{{", SPEC, max_bytes=LIMIT)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_corrupted_body_is_refused_or_decodes_to_the_right_shapes(data: st.DataObject) -> None:
    body = bytearray(encode_state(make_state()))
    position = data.draw(st.integers(0, len(body) - 1))
    body[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(1, len(body)))
    try:
        state = decode_state(bytes(body[:cut]), SPEC, max_bytes=LIMIT)
    except DecodeError:
        return
    # a flipped bit inside the tensor data still parses: the shapes are right and the values finite
    assert {name: tuple(t.shape) for name, t in state.items()} == {name: s.shape for name, s in SPEC.items()}
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


def test_meta_json_round_trip_and_rejects_bad_metadata() -> None:
    meta = meta_for(make_state(), 20)
    assert CheckpointMeta.from_json(meta.to_json()) == meta
    for bad in ["[]", "{", json.dumps({**json.loads(meta.to_json()), "extra": 1}), json.dumps({"round": 1})]:
        with pytest.raises(DecodeError):
            CheckpointMeta.from_json(bad)
    with pytest.raises(DecodeError, match="round"):
        CheckpointMeta.from_json(json.dumps({**json.loads(meta.to_json()), "round": -1}))
    with pytest.raises(DecodeError, match="format"):
        CheckpointMeta.from_json(json.dumps({**json.loads(meta.to_json()), "format": 99}))


def test_store_keeps_newest_and_resumes_from_latest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt", keep=2, max_bytes=LIMIT)
    assert store.latest(SPEC, task="digits") is None
    for round_ in (10, 20, 30):
        store.save(make_state(round_), meta_for(make_state(round_), round_))
    assert store.rounds() == [30, 20]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "ckpt-0000000020.json",
        "ckpt-0000000020.safetensors",
        "ckpt-0000000030.json",
        "ckpt-0000000030.safetensors",
    ]
    latest = store.latest(SPEC, task="digits")
    assert latest is not None and latest.meta.round == 30 and latest.meta.epoch == 3
    assert canonical_model_hash(latest.state) == canonical_model_hash(make_state(30))


def test_store_skips_damaged_and_foreign_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path, keep=5, max_bytes=LIMIT)
    store.save(make_state(1), meta_for(make_state(1), 10))
    body = store.save(make_state(2), meta_for(make_state(2), 20))
    data = bytearray(body.read_bytes())
    data[-1] ^= 0xFF  # flips a value: parses, but no longer hashes to the metadata
    body.write_bytes(bytes(data))
    latest = store.latest(SPEC, task="digits")
    assert latest is not None and latest.meta.round == 10
    assert "skipping checkpoint 20" in caplog.text and "damaged" in caplog.text
    # moved aside, with all its files: it no longer takes a `keep` slot, and is not looked at again
    assert store.rounds() == [10]
    assert sorted(p.name for p in (tmp_path / "damaged").iterdir()) == ["ckpt-0000000020.json", body.name]
    caplog.clear()
    assert store.latest(SPEC, task="digits") is not None and "skipping" not in caplog.text
    assert store.latest(SPEC, task="charlm") is None
    (tmp_path / "ckpt-0000000010.safetensors").unlink()
    assert store.latest(SPEC, task="digits") is None
    assert "incomplete" in caplog.text


def test_store_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CheckpointStore(tmp_path, keep=0, max_bytes=LIMIT)


def trained_optimizer(kind: str) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=0.1)
    )
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 2)).square().sum().backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_state_round_trips_into_a_fresh_optimizer(kind: str) -> None:
    optimizer = trained_optimizer(kind)
    fresh = trained_optimizer(kind)
    fresh.state.clear()
    restore_optimizer_state(fresh, encode_optimizer_state(optimizer), max_bytes=LIMIT)
    want, got = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    assert sorted(want) == sorted(got) and want
    for index in want:
        assert sorted(want[index]) == sorted(got[index])
        for key in want[index]:
            assert torch.equal(want[index][key], got[index][key]), (index, key)


def test_optimizer_state_that_does_not_fit_the_parameters_is_refused_and_changes_nothing() -> None:
    optimizer = trained_optimizer("sgd")
    before = {i: v["momentum_buffer"].clone() for i, v in optimizer.state_dict()["state"].items()}
    good = encode_optimizer_state(optimizer)
    for data, message in [
        (good[:-3], "damaged"),
        (safetensors_save({"0.momentum_buffer": torch.zeros(5)}), "expected"),
        (safetensors_save({"7.momentum_buffer": torch.zeros(3, 2)}), "names no parameter"),
        (safetensors_save({"0.pickle": torch.zeros(3, 2)}), "names no parameter"),
        (safetensors_save({"0.momentum_buffer": torch.full((3, 2), float("nan"))}), "NaN"),
        (good, "exceeds"),
    ]:
        with pytest.raises(DecodeError, match=message):
            restore_optimizer_state(optimizer, data, max_bytes=len(good) - 1 if message == "exceeds" else LIMIT)
    for index, value in optimizer.state_dict()["state"].items():
        assert torch.equal(value["momentum_buffer"], before[index])


def test_a_damaged_checkpoint_never_costs_a_good_one_its_slot(tmp_path: Path) -> None:
    """The newest of three is damaged; after resuming from the second and saving two more, keep=3 holds the three
    newest good ones (the damaged one used to keep its slot and push the oldest good one out)."""
    store = CheckpointStore(tmp_path, keep=3, max_bytes=LIMIT)
    for round_ in (10, 20, 30):
        store.save(make_state(round_), meta_for(make_state(round_), round_))
    (tmp_path / "ckpt-0000000030.safetensors").write_bytes(b"not a checkpoint")
    latest = store.latest(SPEC, task="digits")
    assert latest is not None and latest.meta.round == 20
    for round_ in (21, 22):
        store.save(make_state(round_), meta_for(make_state(round_), round_))
    assert store.rounds() == [22, 21, 20]
