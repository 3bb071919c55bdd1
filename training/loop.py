"""The local training loop: a few optimizer steps on this peer's shard, then one averaging round, repeated.

Synchronous torch, readable top to bottom. It owns the model, the local optimizer, the round counter and the
checkpoints; it talks to the swarm only through the `Averager` it is handed (the gossip service on a real peer, a
simulated or in-process averager in tests), so the same loop runs everywhere. No trio, no sockets, no clock reads:
whoever runs it reads clocks, and asks it to stop by setting the `threading.Event` it was given.

The seam for epoch consensus: every `epoch_rounds` rounds the loop saves a checkpoint and calls `on_epoch` with an
`EpochReached` (epoch, round, canonical model hash, checkpoint path). The peer hands its parameters to epoch
consensus there (`consensus.service`), without waiting for the epoch to be decided. The way back is `adopt(state,
round)`, callable from any thread: the state (a certified checkpoint this peer diverged from) is loaded by the
training thread itself at the start of its next round, so no other thread ever writes the model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from swarmgrad.core.errors import ConfigError, DecodeError, LocalProtocolError
from swarmgrad.core.machine import PeerId
from training.checkpoint import (
    CheckpointMeta,
    CheckpointStore,
    canonical_model_hash,
    encode_optimizer_state,
    restore_optimizer_state,
)
from training.tasks.base import Evaluation, Task, model_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Averaged:
    """What one averaging call gave: the vector to load, and the swarm round it was (None when no round ran: the
    averager held, waiting for the swarm to catch up)."""

    params: torch.Tensor
    round: int | None


class Averager(Protocol):
    """Averages this peer's parameters with the swarm's, one blocking call per outer round, from the training
    thread. Implemented by `gossip.service.GossipService`."""

    def average(self, params: torch.Tensor, not_before: int) -> Averaged:
        """Take the flat fp32 parameter vector after the local steps and this peer's round (the swarm round it
        reached; the round run is numbered at least that); block for at most about one round deadline;
        return the vector to load (the peer's own if no neighbour answered) and the swarm round. The averager takes
        `params`: it may return that very tensor, updated in place, so the caller must not keep using it as the
        vector it was before the call."""
        ...

    def statistics(self) -> dict[str, float | int]:
        """Counters such as `bytes_sent` and `rounds`."""
        ...


@dataclass(frozen=True)
class LoopConfig:
    """How the loop paces itself. Defaults are the ones the `digits` demo reaches 95 % with."""

    inner_steps: int = 1
    """Local optimizer steps between two averaging rounds."""
    epoch_rounds: int = 50
    """Rounds per epoch: at every epoch boundary the model is hashed and checkpointed."""
    eval_every_rounds: int = 10
    """Evaluate on the held-out set every this many rounds (and at the last round)."""
    max_rounds: int = 0
    """Stop at this swarm round (rounds are the swarm's: see `Averager`); 0 runs until stopped."""

    def __post_init__(self) -> None:
        for field in ("inner_steps", "epoch_rounds", "eval_every_rounds"):
            value = getattr(self, field)
            if type(value) is not int or value < 1:
                raise ConfigError(f"training.{field}", value, "an integer >= 1")
        if type(self.max_rounds) is not int or self.max_rounds < 0:
            raise ConfigError("training.max_rounds", self.max_rounds, "an integer >= 0 (0: until stopped)")


@dataclass(frozen=True)
class RoundReport:
    """What one round did: the mean local training loss, the held-out evaluation when it was run, the samples this
    peer has trained on so far, and the averager's counters."""

    round: int
    epoch: int
    train_loss: float
    evaluation: Evaluation | None
    samples: int
    averager: Mapping[str, float | int]


@dataclass(frozen=True)
class EpochReached:
    """Epoch `epoch` ended at round `round`; the model hashes to `model_hash` and is checkpointed at `checkpoint`.
    The hand-off point to epoch consensus."""

    epoch: int
    round: int
    model_hash: str
    checkpoint: Path


class TrainingLoop:
    """Trains `task`'s model on this peer's shard, averaging through `averager` after every `inner_steps` steps."""

    def __init__(
        self,
        task: Task,
        averager: Averager,
        config: LoopConfig,
        *,
        peer_id: PeerId,
        store: CheckpointStore,
        config_hash: str,
        on_round: Callable[[RoundReport], None] | None = None,
        on_epoch: Callable[[EpochReached], None] | None = None,
    ) -> None:
        self.task = task
        self.averager = averager
        self.config = config
        self.store = store
        self.config_hash = config_hash
        self.on_round = on_round
        self.on_epoch = on_epoch
        self.model = task.build_model()
        self.model.train()
        self.spec = model_spec(self.model)
        self.optimizer = task.optimizer.build(list(self.model.parameters()))
        self.batches = task.shard(peer_id).batches()
        self.round = 0
        self.samples = 0
        self.last_evaluation: Evaluation | None = None
        self._adopt_lock = threading.Lock()
        self._adoption: tuple[dict[str, torch.Tensor], int] | None = None

    # ---- state --------------------------------------------------------------------------------------------------

    def resume(self) -> CheckpointMeta | None:
        """Load this peer's newest usable checkpoint, if any; training continues from its round."""
        checkpoint = self.store.latest(self.spec, task=self.task.name)
        if checkpoint is None:
            return None
        round_ = checkpoint.meta.round
        self.load_state(checkpoint.state, round_)
        if checkpoint.optimizer_body is None:
            log.warning("checkpoint %d has no optimizer state: the optimizer starts afresh", round_)
        else:
            try:
                restore_optimizer_state(self.optimizer, checkpoint.optimizer_body, max_bytes=self.store.max_bytes)
            except DecodeError as exc:
                log.warning("optimizer state of checkpoint %d not used (%s): it starts afresh", round_, exc)
        log.info("resumed from checkpoint at round %d (%s)", round_, checkpoint.path)
        return checkpoint.meta

    def load_state(self, state: Mapping[str, torch.Tensor], round_: int) -> None:
        """Adopt a validated model state (own checkpoint or a neighbour's) as of round `round_`, with a fresh local
        optimizer (`resume` then restores its own)."""
        self.model.load_state_dict(dict(state))
        self.optimizer = self.task.optimizer.build(list(self.model.parameters()))
        self.round = round_

    def adopt(self, state: Mapping[str, torch.Tensor], round_: int) -> None:
        """From any thread: load the validated `state` (of round `round_`) at the next round boundary, before the
        next round's local steps; the training thread is the only one that touches the model. A later call before
        then replaces an earlier one. The round becomes the larger of the loop's and `round_`."""
        with self._adopt_lock:
            self._adoption = (dict(state), round_)

    def _apply_adoption(self) -> bool:
        with self._adopt_lock:
            pending, self._adoption = self._adoption, None
        if pending is None:
            return False
        state, round_ = pending
        self.load_state(state, max(self.round, round_))
        log.info("adopted the handed-over model state at round %d", self.round)
        return True

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the model state, safe to hand to another thread."""
        return {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}

    def save(self) -> tuple[Path, CheckpointMeta]:
        """Checkpoint the current model (called at epoch boundaries and when stopping); returns the body's path and
        the metadata written."""
        state = self.state()
        meta = CheckpointMeta(
            round=self.round,
            epoch=self.round // self.config.epoch_rounds,
            model_hash=canonical_model_hash(state),
            task=self.task.name,
            config_hash=self.config_hash,
        )
        return self.store.save(state, meta, optimizer_body=encode_optimizer_state(self.optimizer)), meta

    # ---- the loop -----------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> RoundReport | None:
        """Run rounds until `stop` is set or `max_rounds` is reached, then save a checkpoint. Returns the last
        round's report (None if no round ran)."""
        report = None
        while not stop.is_set() and not (self.config.max_rounds and self.round >= self.config.max_rounds):
            report = self.run_round()
        if report is not None and self.round % self.config.epoch_rounds:
            self.save()  # the epoch boundary already saved this round
        return report

    def run_round(self) -> RoundReport:
        """One round: a handed-over state (`adopt`) loaded first, then local steps, one averaging round, then
        evaluation and checkpoint when due."""
        self._apply_adoption()
        # 1. local steps on this peer's shard
        losses = []
        for _ in range(self.config.inner_steps):
            inputs, targets = next(self.batches)
            loss = self.task.loss(self.model, (inputs, targets))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            self.samples += len(targets)

        # 2. average the parameters with the swarm (blocks about one gossip round)
        params = list(self.model.parameters())
        with torch.no_grad():
            flat = parameters_to_vector(params).to(torch.float32)
            result = self.averager.average(flat, self.round)
            averaged = result.params
            if averaged.shape != flat.shape or averaged.dtype != torch.float32:
                raise LocalProtocolError(
                    f"averager returned {averaged.dtype}{list(averaged.shape)}, expected float32{list(flat.shape)}"
                )
            if not bool(torch.isfinite(averaged).all()):
                raise LocalProtocolError("averager returned NaN or infinite parameters")
            vector_to_parameters(averaged, params)
        before = self.round
        self._follow_swarm(result.round)

        # 3. evaluate, checkpoint and report (at the boundaries this round reached or passed)
        last = self.config.max_rounds and self.round >= self.config.max_rounds
        evaluation = None
        if self.round // self.config.eval_every_rounds > before // self.config.eval_every_rounds or last:
            evaluation = self.last_evaluation = self.task.evaluate(self.model)
        epoch = self.round // self.config.epoch_rounds
        if epoch > before // self.config.epoch_rounds:
            path, meta = self.save()
            reached = EpochReached(epoch, self.round, meta.model_hash, path)
            log.info("epoch %d reached at round %d, model %s", epoch, self.round, reached.model_hash[:16])
            if self.on_epoch is not None:
                self.on_epoch(reached)
        if evaluation is not None:
            log.debug("round %d: train loss %.4f, %s %.4f", self.round, losses[-1], evaluation.metric, evaluation.value)
        report = RoundReport(
            round=self.round,
            epoch=epoch,
            train_loss=sum(losses) / len(losses),
            evaluation=evaluation,
            samples=self.samples,
            averager=self.averager.statistics(),
        )
        if self.on_round is not None:
            self.on_round(report)
        return report

    def _follow_swarm(self, swarm_round: int | None) -> None:
        """Take the swarm's round: after swarm round r the loop is at r + 1. A round that did not run (the averager
        held) leaves it where it is; a jump (this peer caught up with the swarm) is logged once per jump."""
        if swarm_round is None:
            return
        reached = swarm_round + 1
        if reached > self.round + 1:
            skipped = reached - self.round - 1
            log.info("caught up with the swarm: round %d -> %d (skipped %d)", self.round, reached, skipped)
        self.round = max(self.round, reached)
