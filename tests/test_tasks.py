"""Task plug-ins: name resolution, deterministic shards and models, and that the built-in tasks actually learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from swarmgrad.core.errors import ConfigError
from training.tasks import BUILTIN_TASKS, load_task, model_spec, resolve_task_name, shard_indices
from training.tasks.base import OptimizerSettings, Task
from training.tasks.charlm import UNKNOWN, VOCAB_SIZE, encode
from training.tasks.digits import DigitsTask, digits_file, load_digits_arrays


def make_small_digits() -> Task:
    """A custom factory, loaded by its `package.module:factory` name in a test below."""
    return DigitsTask(hidden=8, optimizer=OptimizerSettings(kind="sgd", lr=0.05, batch_size=16))


def not_a_task() -> object:
    return 42


def test_builtin_names_resolve_to_factories() -> None:
    assert resolve_task_name("digits") == BUILTIN_TASKS["digits"]
    assert resolve_task_name("pkg.mod:factory") == "pkg.mod:factory"


@pytest.mark.parametrize("name", ["nosuch", "pkg.mod:", ":factory", "pkg.mod:not-an-id"])
def test_malformed_task_names_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_task_name(name)
    assert info.value.field == "task"


@pytest.mark.parametrize(
    "name", ["no_such_module_xyz:make", "tests.test_tasks:missing_factory", "tests.test_tasks:not_a_task"]
)
def test_unloadable_tasks_are_config_errors_naming_the_task(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_task(name)
    assert info.value.field == "task" and info.value.value == name


def test_custom_factory_by_module_path() -> None:
    task = load_task("tests.test_tasks:make_small_digits")
    assert isinstance(task, DigitsTask) and task.hidden == 8


def test_shards_are_deterministic_per_peer_and_differ_between_peers() -> None:
    a1 = shard_indices("peer-a", 1000, 0.5)
    a2 = shard_indices("peer-a", 1000, 0.5)
    b = shard_indices("peer-b", 1000, 0.5)
    assert torch.equal(a1, a2)
    assert len(a1) == len(b) == 500
    assert not torch.equal(a1, b)
    assert len(set(a1.tolist())) == 500 and 0 <= int(a1.min()) and int(a1.max()) < 1000


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, math.nan])
def test_shard_fraction_is_validated(fraction: float) -> None:
    with pytest.raises(ConfigError):
        shard_indices("p", 10, fraction)


def test_optimizer_settings_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        OptimizerSettings(kind="sgd", lr=-1.0, batch_size=1)
    assert info.value.field == "optimizer.lr"
    with pytest.raises(ConfigError):
        OptimizerSettings(kind="rmsprop", lr=0.1, batch_size=1)  # type: ignore[arg-type]


def test_models_are_identical_on_every_peer_and_leave_global_rng_alone(digits: Task) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    m1, m2 = digits.build_model(), digits.build_model()
    after = torch.rand(3)
    assert torch.equal(before, after)
    for (n1, t1), (n2, t2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2)
    spec = model_spec(m1)
    assert list(spec) == sorted(spec)
    assert spec["0.weight"].shape == (128, 64) and spec["0.weight"].dtype == "float32"


def test_digits_arrays_are_scikit_learns_whether_read_directly_or_through_load_digits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    assert digits_file() is not None  # this install is read without importing scikit-learn
    direct = load_digits_arrays()
    monkeypatch.setattr("training.tasks.digits.digits_file", lambda: None)
    fallback = load_digits_arrays()
    for got in (direct, fallback):
        assert np.array_equal(got[0], images) and np.array_equal(got[1], labels) and got[1].dtype.kind == "i"


def test_digits_shard_batches_cycle_within_the_shard(digits: Task) -> None:
    shard = digits.shard("peer-a")
    assert shard.num_examples == math.ceil(0.5 * len(digits.train_y))  # type: ignore[attr-defined]
    inputs, targets = next(shard.batches())
    assert inputs.shape == (32, 64) and targets.shape == (32,)
    assert float(inputs.min()) >= 0.0 and float(inputs.max()) <= 1.0


def test_digits_learns_above_90_percent_in_one_process(digits: Task) -> None:
    model = digits.build_model()
    start = digits.evaluate(model)
    optimizer = digits.optimizer.build(list(model.parameters()))
    batches = digits.shard("peer-a").batches()
    for _ in range(150):
        loss = digits.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = digits.evaluate(model)
    assert start.metric == "accuracy" and start.value < 0.3
    assert end.value > 0.9 and end.reaches(0.9) and end.loss < start.loss


def test_charlm_fixed_vocabulary_and_learning() -> None:
    task = load_task("charlm")
    assert encode("a\n\u00e9").tolist()[2] == UNKNOWN
    model = task.build_model()
    assert model_spec(model)["head.weight"].shape[0] == VOCAB_SIZE
    start = task.evaluate(model)
    assert start.metric == "bits_per_char" and not start.higher_is_better
    assert start.value > 5.0  # about log2(97) = 6.6 for an untrained model
    optimizer = task.optimizer.build(list(model.parameters()))
    batches = task.shard("peer-a").batches()
    for _ in range(25):
        loss = task.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = task.evaluate(model)
    assert end.value < start.value - 1.0 and end.reaches(start.value)
