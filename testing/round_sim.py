"""`GossipRound` machines in virtual time, deterministic per seed: the gossip simulations of the tests, on the
research simulator's discrete-event core (`sim.events`), so the project has one event loop.

`RoundSim` runs one real machine per simulated peer on a `sim.events.Simulator` and is its host: a `Send` arrives
after a latency drawn per message from the run's `random.Random` (`UniformLatency`, no bandwidth), timers and
`Compute` are the core's (a computation takes no virtual time). A `RemoteProtocolError` is recorded as
`(receiver, sender, reason)` and the message dropped, as the driver does. Each `RoundCompleted` goes to the
caller's `on_completed`, which decides when that peer starts its next round (`start`). Outsiders -- Byzantine peers
with no machine -- are callbacks told each message sent to them; they `send` through the same network. It holds no
protocol logic.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from gossip.messages import SparseUpdate, model_fingerprint
from gossip.round import GossipConfig, GossipRound, RoundCompleted, StartRound
from sim.events import EventLoop, Simulator
from swarmgrad.core.errors import LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import Action, Effect, Event, PeerId, PeerUp, Received, Send
from training.topk import TopKSelector

MAX_EVENTS = 2_000_000
"""Bound on the events of one `RoundSim.run`: a run that schedules without end fails instead of hanging."""

_SELECTOR = TopKSelector()  # built once: loading the native kernel is not part of any simulated step


@dataclass
class UniformLatency:
    """The network of these runs: each message arrives after a latency drawn uniformly from `latency_s`, never lost."""

    rng: random.Random
    latency_s: tuple[float, float]

    def transmit(self, now: float, sender: PeerId, receiver: PeerId, size_bytes: int) -> list[float]:
        return [now + self.rng.uniform(*self.latency_s)]


@dataclass
class SimPeer:
    name: str
    machine: GossipRound
    params: torch.Tensor
    loop_round: int  # the training loop's round: where it started, then one past the last round it ran
    started_at: float = 0.0  # when its current (or last) round started


Outsider = Callable[[str, SparseUpdate], None]
"""(sender, message) -> None: a peer with no machine, told each message sent to it."""


@dataclass
class _OutsiderMachine:
    """An outsider in the event core: a machine that hands each message to the callback and does nothing itself."""

    on_message: Outsider

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Received):
            self.on_message(event.peer, event.msg)  # type: ignore[arg-type]
        return []


class RoundSim:
    """Machines named `add_peer`, outsiders named `add_outsider`, all connected to each other (`connect_all`)."""

    def __init__(
        self,
        seed: int,
        numel: int,
        latency_s: tuple[float, float],
        on_completed: Callable[[SimPeer, RoundCompleted], None],
    ) -> None:
        self.rng = random.Random(seed)
        self.loop = EventLoop()
        # this runner measures rounds and values, not bytes: sizes are not encoded
        self.core = Simulator(
            self.loop, UniformLatency(self.rng, latency_s), size_bytes=lambda msg: 0, host=self,
            on_rejected=self._rejected,
        )  # fmt: skip
        self.numel = numel
        self.fingerprint = model_fingerprint([(numel,)])
        self.peers: dict[str, SimPeer] = {}
        self.blamed: list[tuple[str, str, str]] = []  # (receiver, sender, reason) of every RemoteProtocolError
        self._outsiders: list[str] = []
        self._on_completed = on_completed

    @property
    def now(self) -> float:
        return self.loop.now

    def add_peer(
        self, name: str, config: GossipConfig, params: torch.Tensor, rng: random.Random, loop_round: int = 0
    ) -> SimPeer:
        machine = GossipRound(config, name, self.numel, self.fingerprint, rng, _SELECTOR)
        peer = self.peers[name] = SimPeer(name, machine, params, loop_round)
        self.core.add(name, machine)
        return peer

    def add_outsider(self, name: str, on_message: Outsider) -> None:
        self._outsiders.append(name)
        self.core.add(name, _OutsiderMachine(on_message))

    def connect_all(self) -> None:
        """Every machine sees every other peer and outsider up (in sorted order)."""
        everyone = sorted([*self.peers, *self._outsiders])
        for name in self.peers:
            for other in everyone:
                if other != name:
                    self.core.step(name, PeerUp(other))

    def start(self, name: str, when: float) -> None:
        """`name` starts its next round with its current params at `when`."""

        def begin() -> None:
            peer = self.peers[name]
            peer.started_at = self.now
            self.core.step(name, StartRound(peer.params, peer.loop_round))

        self.loop.at(when, begin)

    def send(self, sender: str, receiver: str, msg: SparseUpdate) -> None:
        """Send `msg` through the network (for outsiders; machines' `Send`s go the same way)."""
        self.core.send(sender, Send(receiver, msg))

    def run(self, until_s: float) -> None:
        self.loop.run(until_s, max_events=MAX_EVENTS)

    def honest_senders_blamed(self) -> list[tuple[str, str, str]]:
        return [blame for blame in self.blamed if blame[1] in self.peers]

    def _rejected(self, receiver: PeerId, sender: PeerId, error: RemoteProtocolError) -> None:
        self.blamed.append((receiver, sender, str(error)))

    # ---- the Host protocol of the event core --------------------------------------------------------------------

    def notified(self, name: PeerId, event: object) -> None:
        if not isinstance(event, RoundCompleted):
            return
        peer = self.peers[name]
        peer.params = event.params
        if not event.held:
            peer.loop_round = max(peer.loop_round, event.round + 1)
        self._on_completed(peer, event)

    def effect(self, peer: PeerId, effect: Effect) -> None:
        raise LocalProtocolError(f"the round simulation carries out no {type(effect).__name__}")

    def compute_time_s(self, peer: PeerId, key: Hashable) -> float:
        return 0.0
