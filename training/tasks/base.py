"""The task interface and the helpers every task shares: shard assignment, optimizer settings, parameter specs.

A `Task` is synchronous torch code with no I/O beyond reading data that ships with installed packages. It must
build the same initial model on every peer (a fixed seed, without touching the caller's random state), give each
peer its own deterministic shard of the training data, and evaluate on a held-out set that is the same for all.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from swarmgrad.core.errors import ConfigError
from swarmgrad.core.machine import PeerId

Batch = tuple[torch.Tensor, torch.Tensor]
"""Inputs and targets of one training or evaluation batch."""


@dataclass(frozen=True)
class OptimizerSettings:
    """The local optimizer a task trains with. `kind` is `sgd` (with `momentum`) or `adamw`."""

    kind: Literal["sgd", "adamw"]
    lr: float
    batch_size: int
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adamw"):
            raise ConfigError("optimizer.kind", self.kind, "'sgd' or 'adamw'")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("optimizer.lr", self.lr, "a finite number > 0")
        if self.batch_size < 1:
            raise ConfigError("optimizer.batch_size", self.batch_size, "an integer >= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("optimizer.momentum", self.momentum, "in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError("optimizer.weight_decay", self.weight_decay, "a finite number >= 0")

    def build(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """A fresh optimizer over `params`."""
        if self.kind == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class Evaluation:
    """A model's score on the task's held-out set: mean `loss` and the task's headline `metric` (e.g. accuracy)."""

    loss: float
    metric: str
    value: float
    higher_is_better: bool

    def reaches(self, target: float) -> bool:
        """Whether `value` is at least as good as `target`."""
        return self.value >= target if self.higher_is_better else self.value <= target


@dataclass(frozen=True)
class TensorSpec:
    """What one named tensor of a model must look like: its shape and dtype (as torch's dtype name, e.g. `float32`)."""

    shape: tuple[int, ...]
    dtype: str


def model_spec(model: torch.nn.Module) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of the model's state, sorted by name: what a checkpoint body must match."""
    state = model.state_dict()
    return {
        name: TensorSpec(tuple(state[name].shape), str(state[name].dtype).removeprefix("torch."))
        for name in sorted(state)
    }


def peer_seed(peer_id: PeerId) -> int:
    """A 63-bit seed derived from the peer id (SHA-256), the same on every machine and Python hash seed."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "little") >> 1


def shard_indices(peer_id: PeerId, num_examples: int, fraction: float) -> torch.Tensor:
    """The sorted example indices this peer trains on: a pseudo-random `fraction` of `range(num_examples)` chosen
    from the peer id. Different peers get different (overlapping) subsets; the same peer always gets the same one."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError("shard_fraction", fraction, "in (0, 1]")
    count = max(1, math.ceil(fraction * num_examples))
    generator = torch.Generator().manual_seed(peer_seed(peer_id))
    return torch.randperm(num_examples, generator=generator)[:count].sort().values


class Shard:
    """One peer's training data: an endless stream of batches, reshuffled every pass with a seed from the peer id.

    `sample(indices)` turns a 1-D tensor of example indices into a batch; the task decides what an example is.
    """

    def __init__(
        self, peer_id: PeerId, indices: torch.Tensor, batch_size: int, sample: Callable[[torch.Tensor], Batch]
    ) -> None:
        if len(indices) == 0:
            raise ConfigError("shard", peer_id, "a non-empty set of examples")
        self.indices = indices
        self.batch_size = batch_size
        self._sample = sample
        self._generator = torch.Generator().manual_seed(peer_seed(peer_id) ^ 0x5EED)

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    def batches(self) -> Iterator[Batch]:
        """Batches of `batch_size` examples forever; the last short batch of each pass is dropped unless the shard
        is smaller than one batch."""
        size = min(self.batch_size, len(self.indices))
        while True:
            order = self.indices[torch.randperm(len(self.indices), generator=self._generator)]
            for start in range(0, len(order) - size + 1, size):
                yield self._sample(order[start : start + size])


class Task(ABC):
    """What a swarm trains. Subclasses set `name` and `optimizer` and implement the four methods."""

    name: str
    optimizer: OptimizerSettings

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The initial model, identical on every peer (seeded, leaving the caller's random state untouched)."""

    @abstractmethod
    def shard(self, peer_id: PeerId) -> Shard:
        """This peer's training data."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean training loss of `model` on `batch` (a scalar with a graph)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module) -> Evaluation:
        """Score `model` on the held-out set (no gradients; leaves the model in the mode it found it in)."""


def seeded_init(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Run `build` under torch's global generator reseeded to `seed`, restoring the caller's generator state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
