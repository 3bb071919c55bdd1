"""When to try turning a relayed connection into a direct one, as a sans-IO machine (`HolePunch`).

In: `ConnectionsChanged(peer, relayed, direct, initiator)` after every connection open or close (what this node holds
to `peer` now), `PunchDone(peer, direct, reason)` for the outcome of each `UpgradeDirect`, and its own timers. Out:
`UpgradeDirect(peer)` (one bounded DCUtR hole punch, carried out by the node), `CloseRelayed(peer)` once a direct
connection has held for `relay_close_grace_s`, and `Notify` of each outcome (`PunchSucceeded`, `PunchFailed`).

Rules:

* Only a peer this node holds nothing but relayed connections to is punched, and only by the side that accepted the
  relayed connection (`initiator`: the DCUtR spec's initiator is the peer a circuit was dialled to); the other side
  answers the punch through DCUtR's stream handler. So two swarmgrad peers never run two punches at each other.
* The first attempt waits `first_delay_s` (plus jitter) after the relayed connection opened, so that identify has
  told both sides their observed address first; a failed attempt is retried after an exponential backoff
  (`retry_base_s`, doubled per failure up to `retry_max_s`, each delay scaled by a factor drawn from
  [1 - jitter, 1 + jitter] with the seeded `random.Random`). After `max_attempts` failures the peer keeps its
  relayed connection and is not punched again while that connection lasts; with `max_attempts = 0` no peer is
  punched at all (the node still answers punches, through DCUtR's stream handler).
* A direct connection ends it: no attempt is made or retried while one exists, whoever opened it.
* When every connection to a peer is gone, the peer is forgotten (a later relayed connection starts afresh).

This module does no I/O, reads no clock and logs nothing: everything observable is an action or a counter.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from swarmgrad.core.errors import ConfigError, LocalProtocolError
from swarmgrad.core.machine import Action, CancelTimer, Command, Effect, Event, Notify, PeerId, SetTimer, TimerFired

_PUNCH = "punch"
_CLOSE = "close-relayed"


@dataclass(frozen=True)
class HolePunchConfig:
    """How often, and how patiently, a relayed peer is punched."""

    max_attempts: int = 3
    """Attempts per relayed peer; 0 turns punching off (this node still answers a peer that punches it)."""
    first_delay_s: float = 1.0
    retry_base_s: float = 5.0
    retry_max_s: float = 60.0
    jitter: float = 0.25
    """Each delay is scaled by a factor drawn uniformly from [1 - jitter, 1 + jitter]."""
    punch_timeout_s: float = 15.0
    """Bound on one attempt (the node's `punch_direct` call)."""
    relay_close_grace_s: float = 5.0
    """How long the relayed connection stays open beside a verified direct one (streams in flight finish)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.max_attempts, int) and self.max_attempts >= 0):
            raise ConfigError("max_attempts", self.max_attempts, "an integer >= 0 (0: never punch)")
        for name in ("first_delay_s", "relay_close_grace_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(name, value, "a finite number of seconds >= 0")
        for name in ("retry_base_s", "retry_max_s", "punch_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(name, value, "a finite number of seconds > 0")
        if self.retry_max_s < self.retry_base_s:
            raise ConfigError("retry_max_s", self.retry_max_s, f">= the retry base ({self.retry_base_s} s)")
        if not (isinstance(self.jitter, int | float) and 0 <= self.jitter < 1):
            raise ConfigError("jitter", self.jitter, "a number in [0, 1)")


# ---- inputs (commands) --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionsChanged(Command):
    """What this node holds to `peer` right now: any relayed connection, any direct one, and whether it accepted a
    relayed one (`initiator`: it is the side that punches)."""

    peer: PeerId
    relayed: bool
    direct: bool
    initiator: bool


@dataclass(frozen=True)
class PunchDone(Command):
    """The outcome of an `UpgradeDirect(peer)`: whether a direct connection exists now; `reason` says why not."""

    peer: PeerId
    direct: bool
    reason: str = ""


# ---- outputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpgradeDirect(Effect):
    """Try one hole punch to `peer`, within `timeout_s`; report `PunchDone`."""

    peer: PeerId
    timeout_s: float


@dataclass(frozen=True)
class CloseRelayed(Effect):
    """Close this node's relayed connections to `peer` (a direct one is open); reports nothing."""

    peer: PeerId


@dataclass(frozen=True)
class PunchSucceeded:
    """Attempt `attempt` (from 1) to `peer` gave a direct connection, `elapsed_s` after the relayed one opened;
    the attempt itself took `attempt_s`."""

    peer: PeerId
    attempt: int
    elapsed_s: float
    attempt_s: float


@dataclass(frozen=True)
class PunchFailed:
    """Attempt `attempt` to `peer` failed for `reason`; `final` when no attempt follows (the peer stays relayed)."""

    peer: PeerId
    attempt: int
    reason: str
    final: bool


@dataclass
class _Peer:
    since: float
    """When the relayed-only state began."""
    attempts: int = 0
    attempt_started: float = 0.0
    in_flight: bool = False
    gave_up: bool = False
    direct: bool = False


class HolePunch:
    """The punch schedule of one node; see the module docstring."""

    def __init__(self, config: HolePunchConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._peers: dict[PeerId, _Peer] = {}
        self._counters: Counter[str] = Counter()

    def statistics(self) -> dict[str, int]:
        """`punches_tried`, `punches_succeeded`, `punches_failed`, `peers_given_up`, `relayed_closed`."""
        return dict(self._counters)

    def relayed_peers(self) -> list[PeerId]:
        """Peers this machine follows that have no direct connection, sorted."""
        return sorted(peer for peer, state in self._peers.items() if not state.direct)

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, ConnectionsChanged):
            return self._on_connections(now, event)
        if isinstance(event, PunchDone):
            return self._on_done(now, event)
        if isinstance(event, TimerFired) and isinstance(event.key, tuple) and len(event.key) == 2:
            kind, peer = event.key
            if kind == _PUNCH:
                return self._on_punch_timer(now, peer)
            if kind == _CLOSE:
                return self._on_close_timer(peer)
        raise LocalProtocolError(f"the hole-punch machine got an unexpected event: {event!r}")

    # ---- handlers -----------------------------------------------------------------------------------------------

    def _on_connections(self, now: float, event: ConnectionsChanged) -> list[Action]:
        peer = event.peer
        state = self._peers.get(peer)
        if not event.relayed and not event.direct:
            if state is None:
                return []
            del self._peers[peer]
            return [CancelTimer((_PUNCH, peer)), CancelTimer((_CLOSE, peer))]
        if event.direct:
            if state is None:
                return []  # never relayed: nothing to do
            if state.direct:
                return []
            state.direct = True
            actions: list[Action] = [CancelTimer((_PUNCH, peer))]
            if event.relayed:
                actions.append(SetTimer((_CLOSE, peer), now + self.config.relay_close_grace_s))
            return actions
        # relayed only
        if state is None:
            if not event.initiator or self.config.max_attempts == 0:
                return []
            self._peers[peer] = _Peer(since=now)
            return [SetTimer((_PUNCH, peer), now + self._jittered(self.config.first_delay_s))]
        if state.direct:  # the direct connection went, the relayed one stayed: punch afresh
            self._peers[peer] = _Peer(since=now)
            return [
                CancelTimer((_CLOSE, peer)),
                SetTimer((_PUNCH, peer), now + self._jittered(self.config.first_delay_s)),
            ]
        return []

    def _on_punch_timer(self, now: float, peer: PeerId) -> list[Action]:
        state = self._peers.get(peer)
        if state is None or state.direct or state.in_flight or state.gave_up:
            return []
        state.in_flight = True
        state.attempt_started = now
        state.attempts += 1
        self._counters["punches_tried"] += 1
        return [UpgradeDirect(peer, self.config.punch_timeout_s)]

    def _on_done(self, now: float, event: PunchDone) -> list[Action]:
        peer = event.peer
        state = self._peers.get(peer)
        if state is None or not state.in_flight:
            return []  # the peer went meanwhile: its outcome no longer matters
        state.in_flight = False
        if event.direct:
            self._counters["punches_succeeded"] += 1
            state.direct = True
            return [
                Notify(PunchSucceeded(peer, state.attempts, now - state.since, now - state.attempt_started)),
                SetTimer((_CLOSE, peer), now + self.config.relay_close_grace_s),
            ]
        self._counters["punches_failed"] += 1
        if state.direct:  # a direct connection came another way meanwhile
            return [Notify(PunchFailed(peer, state.attempts, event.reason, final=True))]
        if state.attempts >= self.config.max_attempts:
            state.gave_up = True
            self._counters["peers_given_up"] += 1
            return [Notify(PunchFailed(peer, state.attempts, event.reason, final=True))]
        delay_s = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (state.attempts - 1))
        return [
            Notify(PunchFailed(peer, state.attempts, event.reason, final=False)),
            SetTimer((_PUNCH, peer), now + self._jittered(delay_s)),
        ]

    def _on_close_timer(self, peer: PeerId) -> list[Action]:
        state = self._peers.get(peer)
        if state is None or not state.direct:
            return []
        self._counters["relayed_closed"] += 1
        return [CloseRelayed(peer)]

    def _jittered(self, delay_s: float) -> float:
        jitter = self.config.jitter
        return delay_s * self._rng.uniform(1 - jitter, 1 + jitter) if jitter else delay_s
