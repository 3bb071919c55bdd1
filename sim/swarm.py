"""`SwarmRun`: one scenario carried out in virtual time -- real `GossipRound` machines, the real top-k compressor
with error feedback, training between rounds (the cheap noisy quadratic, or a real task plug-in's model with
`sim.training`), epoch consensus when the scenario turns it on (`sim.consensus`), the network and peer models,
and the metrics.

Each live peer loops: `model.local_steps` local steps (taking `step_time_s` times its speed factor each, in
virtual time), then a gossip round (`StartRound` into its machine; the `RoundCompleted` it notifies hands the
mixed vector back), and again. A Byzantine peer trains its own vector the same way but never adopts what it
mixes, and hands its machine the corrupted vector of its behaviour each round (ALIE and IPM read the honest
peers' statistics of the current swarm round). Churn and partitions happen at their scheduled times. A *swarm
round* ends each time the honest peers have completed, on average, one more round (rounds held by the round clock
do not count); at its end one metrics row is recorded: virtual time, mean loss (for a task: held-out loss, and the
held-out accuracy) and consensus distance of the live honest peers, gossip bytes and messages sent so far, live
peers. Consensus traffic is counted apart, per epoch (`SwarmConsensus.epoch_rows`).

Randomness: one `random.Random` per purpose (network, compute speeds, each machine) and one `torch.Generator`
(the quadratic's draws), all derived from the scenario seed by name; peers are iterated in sorted order. So the
same scenario and seed give the same rows, whatever the host or `PYTHONHASHSEED`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from functools import partial

import msgpack
import torch

from gossip.messages import SCHEMA, SparseUpdate, model_fingerprint
from gossip.round import GossipRound, PeersUp, RoundCompleted, StartRound
from sim.consensus import SwarmConsensus
from sim.events import EventLoop, Simulator
from sim.network import NetworkModel, links_between
from sim.peers import BEHAVIOURS, Behaviour, ReplayingMachine, compute_speeds
from sim.scenario import ChurnSection, PartitionSection, Scenario
from sim.training import TaskTraining
from swarmgrad.core.errors import LocalProtocolError
from swarmgrad.core.machine import Effect, Machine, PeerDown, PeerId, PeerUp
from training.topk import TopKSelector


@dataclass(frozen=True)
class RoundMetrics:
    """One row of the per-round table."""

    round: int
    virtual_time_s: float
    loss: float
    consensus_distance: float
    bytes_sent: int
    messages_sent: int
    live_peers: int
    accuracy: float | None = None
    """The task's held-out metric (accuracy for `digits`), mean over the live honest peers; None (and no column)
    for the quadratic."""

    def as_row(self) -> dict[str, object]:
        row = asdict(self)
        if self.accuracy is None:
            del row["accuracy"]
        return row


def derived_seed(seed: int, purpose: str) -> int:
    """A 64-bit seed for `purpose`, from the scenario seed (string seeding is independent of PYTHONHASHSEED)."""
    return random.Random(f"{seed}/{purpose}").getrandbits(64)


class _Peer:
    def __init__(self, name: PeerId, params: torch.Tensor, speed: float, behaviour: Behaviour | None) -> None:
        self.name = name
        self.params = params
        self.speed = speed
        self.behaviour = behaviour
        self.live = False
        self.in_round = False
        self.generation = 0  # bumped on every leave, crash and restart: a stale scheduled step is ignored


class _HonestView:
    """`sim.peers.HonestView` of one swarm round: the statistics are computed once, when first read."""

    def __init__(self, round_: int, vectors: Callable[[], list[torch.Tensor]]) -> None:
        self.round = round_
        self._vectors = vectors
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def _computed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stats is None:
            stacked = torch.stack(self._vectors())
            std = stacked.std(dim=0) if len(stacked) > 1 else torch.zeros(stacked.shape[1])
            self._stats = (stacked.mean(dim=0), std)
        return self._stats

    @property
    def mean(self) -> torch.Tensor:
        return self._computed()[0]

    @property
    def std(self) -> torch.Tensor:
        return self._computed()[1]


class GossipWireSizes:
    """`len(SCHEMA.encode(msg))` without encoding every message. A `SparseUpdate` encodes to a size that depends
    only on its swarm id, fingerprint and reply flag, the encoded lengths of its round and clock, and its payload's
    numel, k and formats (these fix the length of each array), so each such key is encoded once; other messages are
    encoded."""

    def __init__(self) -> None:
        self._sizes: dict[tuple[object, ...], int] = {}

    def __call__(self, msg: object) -> int:
        if type(msg) is not SparseUpdate:
            return len(SCHEMA.encode(msg))
        payload = msg.payload
        key = (
            msg.swarm_id,
            msg.fingerprint,
            msg.reply,
            len(msgpack.packb(msg.round)),
            len(msgpack.packb(msg.clock)),
            payload.numel,
            payload.k,
            payload.index_format,
            payload.value_format,
        )
        size = self._sizes.get(key)
        if size is None:
            size = self._sizes[key] = len(SCHEMA.encode(msg))
        return size


class SwarmRun:
    """Build with a scenario and seed, then `run()`; `rows` holds the per-round metrics, and `on_row` (if given) is
    told each row as it is recorded (a progress bar; it must not touch the run)."""

    def __init__(
        self,
        scenario: Scenario,
        seed: int,
        selector: TopKSelector | None = None,
        on_row: Callable[[RoundMetrics], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.on_row = on_row
        self.seed = seed
        self.gossip_config = scenario.gossip.to_config(seed)
        self.selector = TopKSelector() if selector is None else selector
        self.trainer = TaskTraining(scenario.model.task) if scenario.model.kind == "task" else None
        dim = scenario.model.dim if self.trainer is None else self.trainer.dim
        self.dim = dim
        self.fingerprint = model_fingerprint([(dim,)])
        self.generator = torch.Generator().manual_seed(derived_seed(seed, "model"))
        self.optimum = torch.randn(dim, generator=self.generator)
        self.loop = EventLoop()
        names = scenario.peer_names
        regions = scenario.network.regions
        region_of = {p: regions[i % len(regions)] for i, p in enumerate(names)} if regions else {}
        self.network = NetworkModel(scenario.network, random.Random(derived_seed(seed, "network")), region_of)
        self.sim = Simulator(self.loop, self.network, GossipWireSizes(), host=self)
        speeds = compute_speeds(names, scenario.compute.speed_spread, random.Random(derived_seed(seed, "speed")))
        byzantine = set(scenario.byzantine.peers)
        behaviour_cls = BEHAVIOURS[scenario.byzantine.behaviour]
        self.peers = {
            name: _Peer(
                name,
                self._fresh_params(name),
                speeds[name],
                behaviour_cls(scenario.byzantine.scale) if name in byzantine else None,
            )
            for name in names
        }
        self.honest = [p for p in names if p not in byzantine]
        self._sorted_names = sorted(self.peers)  # sorted once: a bring-up or take-down walks it (not n log n each)
        self.rows: list[RoundMetrics] = []
        self.consensus: SwarmConsensus | None = None
        if scenario.consensus.epoch_rounds:
            self.consensus = SwarmConsensus.from_section(
                scenario.consensus,
                scenario.swarm.peers,
                scenario.swarm.rounds,
                self.loop,
                self.network,
                seed,
                hashlib.sha256(self.fingerprint).digest(),
                lambda name: self.peers[name].params,
            )
        self._machines_built = 0
        self._view: _HonestView | None = None
        self._honest_rounds_completed = 0  # rounds run by honest peers, all together (a swarm round per len(honest))

    # ---- setup and the run --------------------------------------------------------------------------------------

    def _fresh_params(self, name: PeerId) -> torch.Tensor:
        if self.trainer is not None:
            return self.trainer.fresh(name)
        spread = self.scenario.model.init_spread
        return self.optimum + spread * torch.randn(self.dim, generator=self.generator)

    def run(self) -> list[RoundMetrics]:
        absent = set(self.scenario.swarm.absent)
        self._bring_up_together([name for name in self._sorted_names if name not in absent])
        for partition in self.scenario.partitions:
            self._schedule_partition(partition)
        for event in self.scenario.churn:
            self.loop.at(event.at_s, partial(self._churn, event))
        self._record()
        self.loop.run(
            until_s=self.scenario.swarm.max_virtual_s, stop=lambda: len(self.rows) > self.scenario.swarm.rounds
        )
        return self.rows

    def _bring_up_together(self, names: list[PeerId]) -> None:
        """The start: `_bring_up` of each of `names` in turn, with the same outcome, but each machine told of all
        the others in one `PeersUp` (n events, not n^2 `PeerUp`s; they produce no actions, so nothing else moves)."""
        for name in names:
            self._add_machine(name)
        everyone = PeersUp(tuple(names))
        for name in names:
            self.sim.step(name, everyone)
        for name in names:
            self._start_peer(name)

    def _bring_up(self, name: PeerId) -> None:
        self._add_machine(name)
        for other in self._sorted_names:
            if other != name and self.peers[other].live:
                self.sim.step(name, PeerUp(other))
                self.sim.step(other, PeerUp(name))
        self._start_peer(name)

    def _add_machine(self, name: PeerId) -> None:
        peer = self.peers[name]
        self._machines_built += 1
        rng = random.Random(derived_seed(self.seed, f"machine/{name}/{self._machines_built}"))
        machine: Machine = GossipRound(self.gossip_config, name, self.dim, self.fingerprint, rng, self.selector)
        if peer.behaviour is not None and peer.behaviour.replays_rounds_back:
            machine = ReplayingMachine(machine, peer.behaviour.replays_rounds_back)
        self.sim.add(name, machine)
        peer.live, peer.in_round = True, False

    def _start_peer(self, name: PeerId) -> None:
        if self.consensus is not None:
            self.consensus.peer_up(name)
        self._train_then_start(self.peers[name])

    def _take_down(self, name: PeerId, others_learn_at_s: float) -> None:
        peer = self.peers[name]
        if not peer.live:
            return
        peer.live = False
        peer.generation += 1
        self.sim.remove(name)
        if self.consensus is not None:
            self.consensus.peer_down(name)

        def tell() -> None:
            for other in self._sorted_names:
                if other != name and self.peers[other].live:
                    self.sim.step(other, PeerDown(name))

        self.loop.at(others_learn_at_s, tell)

    def _churn(self, event: ChurnSection) -> None:
        peer = self.peers[event.peer]
        now = self.loop.now
        if event.kind == "leave":
            self._take_down(event.peer, now)
        elif event.kind == "crash":
            self._take_down(event.peer, now + event.detect_s)
        elif not peer.live:  # join, or restart of a peer that is down
            if event.kind == "join" or not event.keep_state:
                peer.params = self._fresh_params(event.peer)
            self._bring_up(event.peer)
        elif event.kind == "restart":  # a live peer restarts: it is down for no virtual time
            self._take_down(event.peer, now)
            if not event.keep_state:
                peer.params = self._fresh_params(event.peer)
            self._bring_up(event.peer)

    def _schedule_partition(self, partition: PartitionSection) -> None:
        links = links_between(partition.groups)
        self.loop.at(partition.at_s, lambda: self.network.block(links))
        if partition.heal_at_s is not None:
            self.loop.at(partition.heal_at_s, lambda: self.network.heal(links))

    # ---- a peer's loop ------------------------------------------------------------------------------------------

    def _train_then_start(self, peer: _Peer) -> None:
        model = self.scenario.model
        if self.trainer is not None:
            peer.params = self.trainer.steps(peer.name, peer.params, model.local_steps)
        for _ in range(model.local_steps if self.trainer is None else 0):
            noise = torch.randn(model.dim, generator=self.generator)
            peer.params -= model.learning_rate * (peer.params - self.optimum + model.gradient_noise * noise)
        duration_s = model.local_steps * self.scenario.compute.step_time_s * peer.speed
        generation = peer.generation
        self.loop.at(self.loop.now + duration_s, lambda: self._start_round(peer, generation))

    def _start_round(self, peer: _Peer, generation: int) -> None:
        if not peer.live or peer.generation != generation:
            return
        told = peer.params
        if peer.behaviour is not None:
            told = peer.behaviour.corrupt(peer.params, self.generator, self._honest_view())
        peer.in_round = True
        self.sim.step(peer.name, StartRound(told))

    def _honest_view(self) -> _HonestView:
        """The live honest peers' mean and spread, as of this swarm round (what ALIE and IPM read)."""
        if self._view is None or self._view.round != len(self.rows):
            self._view = _HonestView(len(self.rows), self._live_honest_params)
        return self._view

    def _live_honest_params(self) -> list[torch.Tensor]:
        live = [self.peers[p].params for p in self.honest if self.peers[p].live]
        return live or [self.optimum]

    # ---- the Host protocol of the event core --------------------------------------------------------------------

    def notified(self, name: PeerId, event: object) -> None:
        if not isinstance(event, RoundCompleted):
            return
        peer = self.peers[name]
        peer.in_round = False
        if peer.behaviour is None:
            peer.params = event.params
        if not event.held and self.consensus is not None:
            self.consensus.round_completed(name, event.round)
        if not event.held and peer.behaviour is None:
            self._honest_rounds_completed += 1
            self._maybe_record()
        self._train_then_start(peer)

    def effect(self, peer: PeerId, effect: Effect) -> None:
        raise LocalProtocolError(f"the swarm simulation carries out no {type(effect).__name__}")

    def compute_time_s(self, peer: PeerId, key: Hashable) -> float:
        return 0.0  # top-k and aggregation time are part of a step's `step_time_s`

    # ---- metrics ------------------------------------------------------------------------------------------------

    def _maybe_record(self) -> None:
        if self._honest_rounds_completed >= len(self.rows) * len(self.honest):
            self._record()

    def _record(self) -> None:
        live = [self.peers[p] for p in self.honest if self.peers[p].live]
        if live:
            stacked = torch.stack([p.params for p in live])
            loss = float(0.5 * ((stacked - self.optimum) ** 2).mean())
            spread = float((stacked - stacked.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt())
            accuracy: float | None = None
            if self.trainer is not None:  # the task's held-out loss and metric, averaged over the peers' models
                scores = [self.trainer.evaluate(p.params) for p in live]
                loss = sum(e.loss for e in scores) / len(scores)
                accuracy = sum(e.value for e in scores) / len(scores)
        else:
            loss = spread = float("nan")
            accuracy = None if self.trainer is None else float("nan")
        self.rows.append(
            RoundMetrics(
                round=len(self.rows),
                virtual_time_s=self.loop.now,
                loss=loss,
                consensus_distance=spread,
                bytes_sent=sum(self.sim.bytes_sent.values()),
                messages_sent=self.sim.counters["messages_sent"],
                live_peers=sum(1 for p in self.peers.values() if p.live),
                accuracy=accuracy,
            )
        )
        if self.on_row is not None:
            self.on_row(self.rows[-1])

    def summary(self) -> dict[str, object]:
        """The run's totals: counters of the event core and of every machine, and the last row."""
        statistics: dict[str, int] = {}
        for name in self.sim.peers:
            machine = self.sim.machine(name)
            if isinstance(machine, GossipRound):
                for key, value in machine.statistics().items():
                    statistics[key] = statistics.get(key, 0) + value
        last = self.rows[-1].as_row() if self.rows else {}
        return {
            "rounds": len(self.rows) - 1,
            "virtual_time_s": self.loop.now,
            "events_run": self.loop.events_run,
            "final": last,
            "network": dict(sorted(self.sim.counters.items())),
            "rejected_messages": sum(self.sim.rejected.values()),
            "gossip": dict(sorted(statistics.items())),
            **({} if self.consensus is None else {"consensus": self.consensus.summary()}),
        }
