"""Real training inside the simulation: every simulated peer trains a task plug-in's model (`digits`, or any
`package.module:factory`) on its own shard, with the task's own optimizer, exactly as `training.loop.TrainingLoop`
does between two averaging rounds -- only the averaging is the simulated `GossipRound`, and the time a step takes
is virtual (the scenario's `compute.step_time_s` times the peer's speed), so results do not depend on the host.

`TaskTraining` holds one model, optimizer and batch stream per peer (a few MB each for `digits`: meant for small
swarms; 10,000-peer runs use the quadratic model of `sim.swarm`). Parameters travel as the flat fp32 vector the
real loop hands its averager (`parameters_to_vector`). Everything is seeded: the model's initial weights are the
task's (the same on every peer), the batches come from the peer id, and torch runs on one thread.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector

from swarmgrad.core.machine import PeerId
from training.tasks import load_task
from training.tasks.base import Batch, Evaluation, Task


class _PeerTrainer:
    def __init__(self, task: Task, name: PeerId) -> None:
        self.model = task.build_model()
        self.model.train()
        self.optimizer = task.optimizer.build(list(self.model.parameters()))
        self.batches = task.shard(name).batches()


class TaskTraining:
    """The task's model for each peer; `steps` trains one peer, `evaluate` scores a parameter vector."""

    def __init__(self, task_name: str) -> None:
        self.task = load_task(task_name)
        template = self.task.build_model()
        self.shapes = [tuple(p.shape) for p in template.parameters()]
        self.initial = parameters_to_vector(list(template.parameters())).detach().to(torch.float32)
        self.dim = self.initial.numel()
        self._template = template
        self._peers: dict[PeerId, _PeerTrainer] = {}

    def fresh(self, name: PeerId) -> torch.Tensor:
        """A peer (re)starting from scratch: the task's initial weights and a fresh optimizer and data stream."""
        self._peers[name] = _PeerTrainer(self.task, name)
        return self.initial.clone()

    def steps(self, name: PeerId, params: torch.Tensor, count: int) -> torch.Tensor:
        """`count` optimizer steps of `name` from `params` (what its last gossip round left); the new vector."""
        trainer = self._peers.get(name)
        if trainer is None:
            trainer = self._peers[name] = _PeerTrainer(self.task, name)
        weights = list(trainer.model.parameters())
        _load(params, weights)
        for _ in range(count):
            batch: Batch = next(trainer.batches)
            loss = self.task.loss(trainer.model, batch)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
        with torch.no_grad():
            return parameters_to_vector(weights).to(torch.float32)

    def evaluate(self, params: torch.Tensor) -> Evaluation:
        """The task's held-out evaluation of the model with these parameters."""
        _load(params, list(self._template.parameters()))
        return self.task.evaluate(self._template)


def _load(params: torch.Tensor, weights: list[torch.nn.Parameter]) -> None:
    """Copy the flat vector into the weights (`vector_to_parameters` would make them views of it, and training
    would then write into a vector the caller still holds)."""
    offset = 0
    with torch.no_grad():
        for weight in weights:
            count = weight.numel()
            weight.copy_(params[offset : offset + count].view_as(weight))
            offset += count
