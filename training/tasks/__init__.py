"""Task plug-ins: what a swarm trains, named `package.module:factory`.

A task bundles the model, this peer's data shard, the loss, the evaluation on a held-out set and the optimizer
settings (`training.tasks.base.Task`). `load_task(name)` resolves a name to a `Task`: the built-in short names
(`digits`, `charlm`) or any importable `package.module:factory` whose factory takes no argument and returns a
`Task`. This package owns the task interface and the built-in tasks; it does no networking and never downloads.
"""

from __future__ import annotations

import importlib

from swarmgrad.core.errors import ConfigError
from training.tasks.base import Evaluation, OptimizerSettings, Shard, Task, TensorSpec, model_spec, shard_indices

BUILTIN_TASKS: dict[str, str] = {
    "digits": "training.tasks.digits:make_task",
    "charlm": "training.tasks.charlm:make_task",
}
"""Short names of the tasks that ship with swarmgrad, and the factories they stand for."""

__all__ = [
    "BUILTIN_TASKS",
    "Evaluation",
    "OptimizerSettings",
    "Shard",
    "Task",
    "TensorSpec",
    "load_task",
    "model_spec",
    "resolve_task_name",
    "shard_indices",
]


def resolve_task_name(name: str) -> str:
    """Map a short built-in name to its `package.module:factory`; check the shape of any other name."""
    target = BUILTIN_TASKS.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ConfigError("task", name, f"one of {sorted(BUILTIN_TASKS)} or 'package.module:factory'")
    return target


def load_task(name: str) -> Task:
    """Import the task's factory and call it. Any failure to find or build it is a `ConfigError` on `task`."""
    target = resolve_task_name(name)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("task", name, f"an importable module ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError("task", name, f"a callable `{attr}` in module {module_name}")
    task = factory()
    if not isinstance(task, Task):
        raise ConfigError("task", name, f"a factory returning a Task, not {type(task).__name__}")
    return task
