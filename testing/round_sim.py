"""`GossipRound` machines in virtual time, deterministic per seed: the discrete-event runner of the gossip simulations.

`EventQueue` is a heap of `(virtual time, sequence number, callback)`: ties run in the order they were scheduled,
so a run depends only on its inputs and its seed (no trio scheduler, no wall clock, no thread). `RoundSim` runs one
machine per simulated peer on it and carries out their actions: a `Send` is delivered after a latency drawn from
the run's `random.Random`, a timer fires unless it was cancelled first, a `Compute` runs in place (`settle`: it takes
no virtual time). A `RemoteProtocolError` is recorded as `(receiver, sender, reason)` and the message dropped, as the
driver does. Each `RoundCompleted` goes to the caller's `on_completed`, which decides when that peer starts its next
round (`start`). Outsiders -- Byzantine peers with no machine -- are callbacks that receive messages and `send`
through the run. It holds no protocol logic.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from gossip.messages import SparseUpdate, model_fingerprint
from gossip.round import GossipConfig, GossipRound, RoundCompleted, StartRound
from swarmgrad.core.errors import LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Event,
    Notify,
    PeerUp,
    Received,
    Send,
    SetTimer,
    TimerFired,
    settle,
)
from training.topk import TopKSelector

MAX_EVENTS = 2_000_000
"""Bound on the events of one `EventQueue.run`: a run that schedules without end fails instead of hanging."""

_SELECTOR = TopKSelector()  # built once: loading the native kernel is not part of any simulated step


class EventQueue:
    """Callbacks at virtual times, run in (time, scheduling order)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, callback: Callable[[], None]) -> None:
        if when < self.now:
            raise LocalProtocolError(f"cannot schedule at {when}, before now ({self.now})")
        heapq.heappush(self._heap, (when, next(self._seq), callback))

    def run(self, until_s: float, max_events: int = MAX_EVENTS) -> None:
        """Run every callback due by `until_s` (those they schedule included), or until none is left."""
        for _ in range(max_events):
            if not self._heap or self._heap[0][0] > until_s:
                return
            self.now, _, callback = heapq.heappop(self._heap)
            callback()
        raise LocalProtocolError(f"more than {max_events} events by virtual time {self.now}")


@dataclass
class SimPeer:
    name: str
    machine: GossipRound
    params: torch.Tensor
    loop_round: int  # the training loop's round: where it started, then one past the last round it ran
    started_at: float = 0.0  # when its current (or last) round started


Outsider = Callable[[str, SparseUpdate], None]
"""(sender, message) -> None: a peer with no machine, told each message sent to it."""


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
        self.queue = EventQueue()
        self.numel = numel
        self.fingerprint = model_fingerprint([(numel,)])
        self.latency_s = latency_s
        self.peers: dict[str, SimPeer] = {}
        self.blamed: list[tuple[str, str, str]] = []  # (receiver, sender, reason) of every RemoteProtocolError
        self._outsiders: dict[str, Outsider] = {}
        self._on_completed = on_completed
        self._timers: dict[tuple[str, Hashable], int] = {}  # the pending timers: which SetTimer set each one
        self._timer_seq = itertools.count()

    @property
    def now(self) -> float:
        return self.queue.now

    def add_peer(
        self, name: str, config: GossipConfig, params: torch.Tensor, rng: random.Random, loop_round: int = 0
    ) -> SimPeer:
        machine = GossipRound(config, name, self.numel, self.fingerprint, rng, _SELECTOR)
        peer = self.peers[name] = SimPeer(name, machine, params, loop_round)
        return peer

    def add_outsider(self, name: str, on_message: Outsider) -> None:
        self._outsiders[name] = on_message

    def connect_all(self) -> None:
        """Every machine sees every other peer and outsider up (in sorted order)."""
        everyone = sorted([*self.peers, *self._outsiders])
        for peer in self.peers.values():
            for other in everyone:
                if other != peer.name:
                    self._step(peer, PeerUp(other))

    def start(self, name: str, when: float) -> None:
        """`name` starts its next round with its current params at `when`."""

        def begin() -> None:
            peer = self.peers[name]
            peer.started_at = self.now
            self._step(peer, StartRound(peer.params, peer.loop_round))

        self.queue.at(when, begin)

    def send(self, sender: str, receiver: str, msg: SparseUpdate) -> None:
        """Deliver `msg` after a random latency (for outsiders; machines' `Send`s go the same way)."""
        self.queue.at(self.now + self.rng.uniform(*self.latency_s), lambda: self._deliver(sender, receiver, msg))

    def run(self, until_s: float) -> None:
        self.queue.run(until_s)

    def honest_senders_blamed(self) -> list[tuple[str, str, str]]:
        return [blame for blame in self.blamed if blame[1] in self.peers]

    def _deliver(self, sender: str, receiver: str, msg: SparseUpdate) -> None:
        if receiver in self._outsiders:
            self._outsiders[receiver](sender, msg)
            return
        try:
            self._step(self.peers[receiver], Received(sender, msg))
        except RemoteProtocolError as exc:
            self.blamed.append((receiver, sender, str(exc)))

    def _fire(self, peer: SimPeer, key: Hashable, number: int) -> None:
        if self._timers.get((peer.name, key)) == number:  # neither cancelled nor set again since
            del self._timers[(peer.name, key)]
            self._step(peer, TimerFired(key))

    def _step(self, peer: SimPeer, event: Event) -> None:
        self._carry_out(peer, settle(peer.machine, self.now, event))

    def _carry_out(self, peer: SimPeer, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.send(peer.name, action.peer, action.msg)  # type: ignore[arg-type]
            elif isinstance(action, SetTimer):
                number = self._timers[(peer.name, action.key)] = next(self._timer_seq)
                self.queue.at(action.deadline, functools.partial(self._fire, peer, action.key, number))
            elif isinstance(action, CancelTimer):
                self._timers.pop((peer.name, action.key), None)
            elif isinstance(action, Notify) and isinstance(action.event, RoundCompleted):
                done = action.event
                peer.params = done.params
                if not done.held:
                    peer.loop_round = max(peer.loop_round, done.round + 1)
                self._on_completed(peer, done)
