"""The live peer set of one swarm, as a sans-IO machine (`Membership`).

In: discovery results (`CandidateFound`: a verified member of our swarm, found through a bootstrap connection or a
DHT lookup), connection events (`ConnectionOpened` / `ConnectionClosed`), dial outcomes (`DialFailed`) and ping
outcomes (`PingSucceeded` / `PingFailed`), plus its own timers. Out: `Notify(PeerUp)` / `Notify(PeerDown)` for the
gossip and consensus machines, and the effects the driver carries out (`Dial`, `Disconnect`, `Ping`: the node's
effect runner reports each outcome back as one of the events above).

Rules:

* A peer is *up* when it is a verified candidate and a connection to it is open (in either order).
* At most `max_peers` peers are up or being dialled; further candidates wait (sorted by peer id) for a free slot.
* A failed dial is retried after an exponential backoff with jitter (from the seeded `random.Random`); after
  `max_dial_failures` failures in a row the candidate is forgotten (it comes back only if discovery finds it again).
* Every `ping_interval_s` the up peers are pinged; `max_ping_failures` failures in a row take a peer down (and ask
  the node to close its connection) exactly as a closed connection does.

This module does no I/O, reads no clock and logs nothing above DEBUG: everything observable is an action.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from swarmgrad.core.errors import ConfigError, LocalProtocolError
from swarmgrad.core.machine import (
    Action,
    Command,
    Dial,
    Disconnect,
    Event,
    Notify,
    PeerDown,
    PeerId,
    PeerUp,
    Ping,
    SetTimer,
    TimerFired,
)

VIA_BOOTSTRAP = "bootstrap"
VIA_DHT = "dht"
_VIAS = (VIA_BOOTSTRAP, VIA_DHT)
_PING_TIMER = ("membership", "ping")


@dataclass(frozen=True)
class MembershipConfig:
    """Limits of the live peer set."""

    max_peers: int = 32
    ping_interval_s: float = 2.0
    max_ping_failures: int = 2
    redial_base_s: float = 0.5
    redial_max_s: float = 30.0
    max_dial_failures: int = 4

    def __post_init__(self) -> None:
        for name in ("max_peers", "max_ping_failures", "max_dial_failures"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(name, value, "an integer >= 1")
        for name in ("ping_interval_s", "redial_base_s", "redial_max_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(name, value, "a finite number > 0")
        if self.redial_max_s < self.redial_base_s:
            raise ConfigError("redial_max_s", self.redial_max_s, f">= redial_base_s ({self.redial_base_s})")


# ---- inputs (commands) --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start(Command):
    """Begin the ping cycle. Sent once, first."""


@dataclass(frozen=True)
class CandidateFound(Command):
    """Discovery verified that `peer` is a member of our swarm, reachable at `addrs`, found `via` a bootstrap
    connection or a DHT lookup."""

    peer: PeerId
    addrs: tuple[str, ...]
    via: str

    def __post_init__(self) -> None:
        if self.via not in _VIAS:
            raise LocalProtocolError(f"CandidateFound.via must be one of {_VIAS}, got {self.via!r}")


@dataclass(frozen=True)
class ConnectionOpened(Command):
    """A connection to `peer` opened (dialled by us or by it)."""

    peer: PeerId


@dataclass(frozen=True)
class ConnectionClosed(Command):
    """The last connection to `peer` closed."""

    peer: PeerId


@dataclass(frozen=True)
class DialFailed(Command):
    """A `Dial` of `peer` failed."""

    peer: PeerId
    reason: str


@dataclass(frozen=True)
class PingSucceeded(Command):
    peer: PeerId


@dataclass(frozen=True)
class PingFailed(Command):
    peer: PeerId
    reason: str


# ---- notifications ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerDiscovered:
    """`peer` joined the live set, first found `via` bootstrap or dht (for logs and tests)."""

    peer: PeerId
    via: str


@dataclass(frozen=True)
class PeerForgotten:
    """`peer` was dropped from the candidates after `failures` failed dials in a row."""

    peer: PeerId
    failures: int


@dataclass
class _Candidate:
    addrs: tuple[str, ...]
    via: str
    dialing: bool = False
    dial_failures: int = 0
    ping_failures: int = 0
    waiting_redial: bool = False
    announced: bool = field(default=False)


class Membership:
    """The live peer set machine. See the module docstring."""

    def __init__(self, local_peer: PeerId, config: MembershipConfig, rng: random.Random) -> None:
        self.local_peer = local_peer
        self.config = config
        self._rng = rng
        self._candidates: dict[PeerId, _Candidate] = {}
        self._connected: set[PeerId] = set()
        self._up: set[PeerId] = set()
        self._counters: Counter[str] = Counter()

    # ---- inspection ------------------------------------------------------------------------------------------------

    def live_peers(self) -> list[PeerId]:
        """Peers up right now, sorted."""
        return sorted(self._up)

    def statistics(self) -> dict[str, int]:
        """Gauges (up, candidates, dialing, waiting_redial, connected) and counters (peer_up, peer_down,
        dial_failed, forgotten, ping_failed, ...)."""
        stats = dict(self._counters)
        stats["up"] = len(self._up)
        stats["candidates"] = len(self._candidates)
        stats["dialing"] = sum(c.dialing for c in self._candidates.values())
        stats["waiting_redial"] = sum(c.waiting_redial for c in self._candidates.values())
        stats["connected"] = len(self._connected)
        return stats

    # ---- machine ---------------------------------------------------------------------------------------------------

    def step(self, now: float, event: Event) -> list[Action]:
        actions: list[Action] = []
        if isinstance(event, Start):
            actions.append(SetTimer(_PING_TIMER, now + self.config.ping_interval_s))
        elif isinstance(event, CandidateFound):
            self._on_candidate(event, actions)
        elif isinstance(event, ConnectionOpened):
            self._on_opened(event.peer, actions)
        elif isinstance(event, ConnectionClosed):
            self._connected.discard(event.peer)
            self._take_down(now, event.peer, actions)
        elif isinstance(event, DialFailed):
            self._on_dial_failed(now, event.peer, actions)
        elif isinstance(event, PingSucceeded):
            candidate = self._candidates.get(event.peer)
            if candidate is not None:
                candidate.ping_failures = 0
        elif isinstance(event, PingFailed):
            self._on_ping_failed(now, event, actions)
        elif isinstance(event, TimerFired):
            self._on_timer(now, event, actions)
        else:
            raise LocalProtocolError(f"Membership cannot handle {event!r}")
        self._fill_slots(actions)
        return actions

    # ---- handlers --------------------------------------------------------------------------------------------------

    def _on_candidate(self, event: CandidateFound, actions: list[Action]) -> None:
        if event.peer == self.local_peer:
            return
        candidate = self._candidates.get(event.peer)
        if candidate is None:
            self._candidates[event.peer] = _Candidate(addrs=event.addrs, via=event.via)
            self._counters["candidates_found"] += 1
        elif event.addrs:
            candidate.addrs = event.addrs
        if event.peer in self._connected:
            self._bring_up(event.peer, actions)

    def _on_opened(self, peer: PeerId, actions: list[Action]) -> None:
        self._connected.add(peer)
        candidate = self._candidates.get(peer)
        if candidate is not None:
            candidate.dialing = False
            candidate.waiting_redial = False
            self._bring_up(peer, actions)

    def _bring_up(self, peer: PeerId, actions: list[Action]) -> None:
        candidate = self._candidates[peer]
        if peer in self._up:
            return
        if len(self._up) >= self.config.max_peers:
            self._counters["over_capacity"] += 1
            actions.append(Disconnect(peer, f"live set is full ({self.config.max_peers} peers)"))
            return
        candidate.dial_failures = 0
        candidate.ping_failures = 0
        self._up.add(peer)
        self._counters["peer_up"] += 1
        if not candidate.announced:
            candidate.announced = True
            actions.append(Notify(PeerDiscovered(peer, candidate.via)))
        actions.append(Notify(PeerUp(peer)))

    def _take_down(self, now: float, peer: PeerId, actions: list[Action]) -> None:
        if peer in self._up:
            self._up.discard(peer)
            self._counters["peer_down"] += 1
            actions.append(Notify(PeerDown(peer)))
            candidate = self._candidates.get(peer)
            if candidate is not None:
                self._schedule_redial(now, peer, candidate, actions)

    def _on_dial_failed(self, now: float, peer: PeerId, actions: list[Action]) -> None:
        candidate = self._candidates.get(peer)
        if candidate is None or not candidate.dialing:
            return
        candidate.dialing = False
        self._counters["dial_failed"] += 1
        self._schedule_redial(now, peer, candidate, actions)

    def _schedule_redial(self, now: float, peer: PeerId, candidate: _Candidate, actions: list[Action]) -> None:
        candidate.dial_failures += 1
        if candidate.dial_failures >= self.config.max_dial_failures:
            del self._candidates[peer]
            self._counters["forgotten"] += 1
            actions.append(Notify(PeerForgotten(peer, candidate.dial_failures)))
            return
        delay_s = redial_delay_s(candidate.dial_failures, self.config, self._rng)
        candidate.waiting_redial = True
        actions.append(SetTimer(("membership", "redial", peer), now + delay_s))

    def _on_ping_failed(self, now: float, event: PingFailed, actions: list[Action]) -> None:
        candidate = self._candidates.get(event.peer)
        if candidate is None or event.peer not in self._up:
            return
        candidate.ping_failures += 1
        self._counters["ping_failed"] += 1
        if candidate.ping_failures >= self.config.max_ping_failures:
            self._connected.discard(event.peer)
            actions.append(Disconnect(event.peer, f"{candidate.ping_failures} pings failed"))
            self._take_down(now, event.peer, actions)

    def _on_timer(self, now: float, event: TimerFired, actions: list[Action]) -> None:
        key = event.key
        if key == _PING_TIMER:
            actions.extend(Ping(peer) for peer in sorted(self._up))
            actions.append(SetTimer(_PING_TIMER, now + self.config.ping_interval_s))
        elif isinstance(key, tuple) and len(key) == 3 and key[:2] == ("membership", "redial"):
            candidate = self._candidates.get(key[2])
            if candidate is not None:
                candidate.waiting_redial = False
        else:
            raise LocalProtocolError(f"Membership got a timer it never set: {key!r}")

    def _fill_slots(self, actions: list[Action]) -> None:
        busy = len(self._up) + sum(c.dialing for c in self._candidates.values())
        for peer in sorted(self._candidates):
            if busy >= self.config.max_peers:
                return
            candidate = self._candidates[peer]
            if peer in self._up or peer in self._connected or candidate.dialing or candidate.waiting_redial:
                continue
            if not candidate.addrs:
                continue
            candidate.dialing = True
            busy += 1
            self._counters["dials"] += 1
            actions.append(Dial(peer, candidate.addrs))


def redial_delay_s(failures: int, config: MembershipConfig, rng: random.Random) -> float:
    """Backoff before redial number `failures` (1, 2, ...): `redial_base_s * 2**(failures-1)`, capped at
    `redial_max_s`, times a jitter in [0.5, 1)."""
    if failures < 1:
        raise LocalProtocolError(f"redial_delay_s: failures must be >= 1, got {failures}")
    base = min(config.redial_base_s * 2 ** (failures - 1), config.redial_max_s)
    return base * (0.5 + 0.5 * rng.random())
