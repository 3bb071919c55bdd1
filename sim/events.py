"""The discrete-event core of the research simulator: virtual time, one heap, and the driver of sans-IO machines.

`EventLoop` is a heap of callbacks ordered by (virtual time, sequence number): two events at one instant run in
the order they were scheduled, so a run depends only on its inputs. `Simulator` is a driver of `Machine`s (the
same `gossip.round.GossipRound` and other machines the real peer runs) on that loop: it steps a peer's machine
with an event and carries out the actions it returns --

* `Send`: its size is the real wire encoding (`size_bytes`, e.g. `Schema.encode`; messages are immutable, so one
  sent to several peers in a row, the same object, is measured once), its arrival times come from the
  network model (none if lost or blocked, two if duplicated); an arrival is stepped as `Received` into the
  receiver's machine if it is still there. A send that cannot arrive by its deadline (or that goes to a peer with
  no machine) comes back as `SendFailed` at the deadline.
* `SetTimer` / `CancelTimer`: one timer per (peer, key); setting one replaces the earlier, and a replaced or
  cancelled timer never fires.
* `Compute`: run in place; its `Computed` is stepped after the virtual compute time the host gives (0 by default).
* `Notify` and `Effect`: handed to the host (the peer model), which may step machines in turn.

A peer that raises `RemoteProtocolError` on a message keeps running (the message is dropped, counted per
receiver and told to `on_rejected`), as in the real driver. Nothing here reads a clock, draws a random number or
touches trio: randomness belongs to the network and peer models, each with its own seeded `random.Random`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Protocol

from swarmgrad.core.errors import LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Compute,
    Computed,
    Effect,
    Event,
    Machine,
    Notify,
    PeerId,
    Received,
    Send,
    SendFailed,
    SetTimer,
    TimerFired,
)


class EventLoop:
    """Callbacks on a virtual clock, run in (time, sequence number) order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.events_run = 0

    def at(self, when_s: float, callback: Callable[[], None]) -> None:
        """Run `callback` at virtual time `when_s` (never in the past)."""
        if when_s < self.now:
            raise LocalProtocolError(f"cannot schedule at {when_s} s, the clock is at {self.now} s")
        heapq.heappush(self._heap, (when_s, next(self._seq), callback))

    def run(
        self, until_s: float = float("inf"), stop: Callable[[], bool] | None = None, max_events: int | None = None
    ) -> None:
        """Run events up to `until_s` inclusive (the clock then stands at the last event run), or until `stop()`.
        With `max_events`, a run that would take more events raises `LocalProtocolError` instead of going on (a
        schedule without end fails rather than hangs)."""
        heap = self._heap
        budget = -1 if max_events is None else max_events
        while heap and heap[0][0] <= until_s:
            if budget == 0:
                raise LocalProtocolError(f"more than {max_events} events by virtual time {self.now} s")
            budget -= 1
            self.now, _, callback = heapq.heappop(heap)
            self.events_run += 1
            callback()
            if stop is not None and stop():
                return

    @property
    def pending(self) -> int:
        return len(self._heap)


class Network(Protocol):
    """What the simulator needs of a network model (`sim.network.NetworkModel` is the real one)."""

    def transmit(self, now: float, sender: PeerId, receiver: PeerId, size_bytes: int) -> list[float]:
        """The virtual times at which a message sent now arrives: none if lost or blocked, several if duplicated."""
        ...


class Host(Protocol):
    """The peer model: what happens to the notifications and effects of a peer's machine."""

    def notified(self, peer: PeerId, event: object) -> None: ...

    def effect(self, peer: PeerId, effect: Effect) -> None: ...

    def compute_time_s(self, peer: PeerId, key: Hashable) -> float:
        """Virtual seconds that the `Compute(key, ...)` of `peer` takes."""
        ...


class Simulator:
    """Drives one machine per peer on an `EventLoop` through a network model; see the module docstring."""

    def __init__(
        self,
        loop: EventLoop,
        network: Network,
        size_bytes: Callable[[object], int],
        host: Host | None = None,
        on_rejected: Callable[[PeerId, PeerId, RemoteProtocolError], None] | None = None,
        on_sent: Callable[[object, int], None] | None = None,
    ) -> None:
        """`on_rejected(receiver, sender, error)` is told each message a receiver's machine refused; `on_sent(msg,
        size_bytes)` each message sent (a broadcast once per receiver)."""
        self.loop = loop
        self.on_rejected = on_rejected
        self.on_sent = on_sent
        self.network = network
        self.host = host
        self._size_bytes = size_bytes
        self._last_sized: tuple[object, int] | None = None  # the message last measured and its size
        self._machines: dict[PeerId, Machine] = {}
        self._timers: dict[tuple[PeerId, Hashable], int] = {}
        self._timer_seq = itertools.count()
        self.counters: Counter[str] = Counter()
        self.bytes_sent: Counter[PeerId] = Counter()
        self.rejected: Counter[PeerId] = Counter()  # messages a receiver's machine refused (RemoteProtocolError)

    # ---- membership of the simulation ---------------------------------------------------------------------------

    def add(self, peer: PeerId, machine: Machine) -> None:
        """Give `peer` its machine (a join, or a restart with a fresh machine)."""
        self._machines[peer] = machine

    def remove(self, peer: PeerId) -> None:
        """Take `peer`'s machine away (a leave or a crash): its timers die, messages to it fail."""
        self._machines.pop(peer, None)
        for key in [k for k in self._timers if k[0] == peer]:
            del self._timers[key]

    def has(self, peer: PeerId) -> bool:
        return peer in self._machines

    def machine(self, peer: PeerId) -> Machine:
        return self._machines[peer]

    @property
    def peers(self) -> list[PeerId]:
        return sorted(self._machines)

    # ---- driving ------------------------------------------------------------------------------------------------

    def step(self, peer: PeerId, event: Event) -> None:
        """Step `peer`'s machine with `event` now and carry out its actions (nothing if the peer has no machine)."""
        machine = self._machines.get(peer)
        if machine is None:
            return
        try:
            actions = machine.step(self.loop.now, event)
        except RemoteProtocolError as exc:
            if not isinstance(event, Received):
                raise
            self.rejected[peer] += 1
            if self.on_rejected is not None:
                self.on_rejected(peer, event.peer, exc)
            return
        if actions:
            self._carry_out(peer, machine, actions)

    def _carry_out(self, peer: PeerId, machine: Machine, actions: list[Action]) -> None:
        for action in actions:
            if self._machines.get(peer) is not machine:  # the host removed or replaced this peer meanwhile
                return
            if isinstance(action, Send):
                self._send(peer, action)
            elif isinstance(action, SetTimer):
                self._set_timer(peer, action)
            elif isinstance(action, CancelTimer):
                self._timers.pop((peer, action.key), None)
            elif isinstance(action, Compute):
                self._compute(peer, machine, action)
            elif isinstance(action, Notify):
                if self.host is not None:
                    self.host.notified(peer, action.event)
            elif isinstance(action, Effect):
                if self.host is not None:
                    self.host.effect(peer, action)
            else:
                raise LocalProtocolError(f"unknown action {type(action).__name__}")

    def send(self, sender: PeerId, action: Send) -> None:
        """Carry out `action` as if `sender`'s machine had returned it (for peers a harness scripts by hand)."""
        self._send(sender, action)

    def _send(self, sender: PeerId, action: Send) -> None:
        last = self._last_sized
        if last is not None and last[0] is action.msg:
            size = last[1]
        else:
            size = self._size_bytes(action.msg)
            self._last_sized = (action.msg, size)
        self.counters["messages_sent"] += 1
        self.bytes_sent[sender] += size
        if self.on_sent is not None:
            self.on_sent(action.msg, size)
        deadline = action.deadline
        if action.peer not in self._machines:
            self._fail_at(sender, action.peer, self.loop.now if deadline is None else deadline, "unreachable")
            return
        arrivals = self.network.transmit(self.loop.now, sender, action.peer, size)
        if not arrivals:
            self.counters["messages_lost"] += 1
        for when in arrivals:
            if deadline is not None and when > deadline:
                self.counters["messages_late"] += 1
                self._fail_at(sender, action.peer, deadline, "deadline")
                continue
            self.loop.at(when, self._deliverer(sender, action.peer, action.msg))

    def _deliverer(self, sender: PeerId, receiver: PeerId, msg: object) -> Callable[[], None]:
        def deliver() -> None:
            if receiver in self._machines:
                self.counters["messages_delivered"] += 1
                self.step(receiver, Received(sender, msg))

        return deliver

    def _fail_at(self, sender: PeerId, receiver: PeerId, when_s: float, reason: str) -> None:
        self.loop.at(max(when_s, self.loop.now), lambda: self.step(sender, SendFailed(receiver, reason)))

    def _set_timer(self, peer: PeerId, action: SetTimer) -> None:
        token = next(self._timer_seq)
        self._timers[(peer, action.key)] = token
        key = action.key

        def fire() -> None:
            if self._timers.get((peer, key)) == token:
                del self._timers[(peer, key)]
                self.step(peer, TimerFired(key))

        self.loop.at(max(action.deadline, self.loop.now), fire)

    def _compute(self, peer: PeerId, machine: Machine, action: Compute) -> None:
        result = action.work()
        delay_s = 0.0 if self.host is None else self.host.compute_time_s(peer, action.key)
        if delay_s <= 0:
            self._step_machine(peer, machine, Computed(action.key, result))
            return
        self.loop.at(self.loop.now + delay_s, lambda: self._step_machine(peer, machine, Computed(action.key, result)))

    def _step_machine(self, peer: PeerId, machine: Machine, event: Event) -> None:
        """Step exactly `machine` (a computation's result never reaches a later machine of a restarted peer)."""
        if self._machines.get(peer) is machine:
            self._carry_out(peer, machine, machine.step(self.loop.now, event))
