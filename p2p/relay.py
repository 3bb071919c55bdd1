"""Circuit relays without a coordinator: the limits a public peer relays under, and the sans-IO machine with which a
private peer keeps its reservations (`RelayClient`).

Any peer whose verdict is "public" (`p2p.reachability`) relays for the others (circuit relay v2, the hop side) under
the limits of `RelayServiceConfig`, and provides `relays_key(swarm_id)` in the DHT. Every peer accepts circuits (the
stop side). A peer whose verdict is "private" cannot be dialled, so it reserves a slot on up to
`RelayClientConfig.relays` relays and advertises, instead of its own unreachable addresses, one circuit address per
relay address: `<relay addr>/p2p/<relay>/p2p-circuit/p2p/<self>`. Whoever dials that address reaches it through
the relay; in a private swarm the relay's two legs are pnet connections and the inner one is a Noise session between
the two ends, so a relay needs the swarm key to serve and sees only encrypted bytes.

`RelayClient` decides which relays to reserve on and when; `p2p.relay_host` carries out its effects and `p2p.node`
feeds it. In: `ReachabilityIs` (the node's verdict), `RelaysFound` (a DHT lookup of the relays key), `Reserved` /
`ReserveFailed` (the outcome of a `Reserve`), `RelayDown` (membership took a relay down), its own timers. Out: the
effects `FindRelays` and `Reserve`, and notifications `RelayAddrsChanged` (the circuit addresses to advertise, after
each change) and `RelayDropped` (for the log).

Rules:

* Only a private peer reserves. Any other verdict (or none yet) holds no reservation and advertises nothing here.
* It looks the relays up at once when it turns private, then every `find_interval_s` while it holds fewer than
  `relays` reservations.
* Among the known relays it holds no reservation on, has no request out to, and that did not fail in the last
  `retry_s`, it picks the ones it lacks with its seeded `random.Random` from the sorted list (so two private peers
  spread over the relays, and a run is reproducible).
* A reservation is renewed after `refresh_fraction` of the lifetime the relay granted. A failed request (first or
  renewal) or a relay that goes down drops that reservation at once and another relay is picked.

No I/O, no clock reads, no global randomness, sorted iteration: everything observable is an action.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from p2p.reachability import Reachability
from swarmgrad.core.errors import ConfigError, LocalProtocolError
from swarmgrad.core.machine import Action, CancelTimer, Command, Effect, Event, Notify, PeerId, SetTimer, TimerFired

MAX_CIRCUIT_ADDRS = 8
"""At most this many circuit addresses are advertised (a host advertises at most 8 addresses)."""
_FIND_TIMER = ("relay", "find")


def relays_key(swarm_id: str) -> str:
    """The DHT key every relay of `swarm_id` provides."""
    return f"/swarmgrad/{swarm_id}/relays"


def circuit_addr(relay_addr: str, relay: PeerId, target: PeerId) -> str:
    """The address at which `target` is reached through its reservation on `relay`, listening at `relay_addr`
    (a multiaddr without `/p2p/`)."""
    return f"{relay_addr}/p2p/{relay}/p2p-circuit/p2p/{target}"


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "an integer >= 1")


def _positive_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigError(name, value, "a finite number of seconds > 0")


@dataclass(frozen=True)
class RelayServiceConfig:
    """The limits a public peer relays under (`network.relay_*`). A circuit that exceeds its byte or time budget is
    reset by the relay, and with it the relayed connection it carries (the two ends' membership re-dials)."""

    max_reservations: int = 32
    """Private peers holding a slot on this relay at once; one more is refused with RESOURCE_LIMIT_EXCEEDED."""
    max_circuits_per_peer: int = 8
    """Circuits open at once to one peer holding a reservation."""
    max_circuit_bytes: int = 64 * 1024 * 1024
    """Bytes one circuit carries, both directions and all streams together. The demo's top-k gossip updates are a
    few KiB a round; 64 MiB is thousands of rounds, and a checkpoint or two."""
    max_circuit_duration_s: int = 1800
    """Seconds one circuit lives."""
    reservation_ttl_s: int = 600
    """Seconds a reservation lasts unless renewed; a slot of a peer that vanished is freed when it runs out."""

    def __post_init__(self) -> None:
        for name in ("max_reservations", "max_circuits_per_peer", "max_circuit_bytes"):
            _positive_int(name, getattr(self, name))
        for name in ("max_circuit_duration_s", "reservation_ttl_s"):
            _positive_int(name, getattr(self, name))  # the relay protocol carries whole seconds


@dataclass(frozen=True)
class RelayClientConfig:
    """How a private peer keeps its reservations."""

    relays: int = 2
    """Reservations to hold (each relay adds its circuit addresses to the member record)."""
    refresh_fraction: float = 0.5
    """Renew a reservation after this fraction of the lifetime the relay granted."""
    find_interval_s: float = 5.0
    """While short of `relays` reservations, look the relays up again this often."""
    retry_s: float = 30.0
    """A relay that refused or failed is not asked again for this long."""

    def __post_init__(self) -> None:
        _positive_int("relays", self.relays)
        if not (isinstance(self.refresh_fraction, int | float) and 0 < self.refresh_fraction < 1):
            raise ConfigError("refresh_fraction", self.refresh_fraction, "a number in (0, 1)")
        _positive_seconds("find_interval_s", self.find_interval_s)
        _positive_seconds("retry_s", self.retry_s)


# ---- inputs -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReachabilityIs(Command):
    """The node's verdict is now `reachability`."""

    reachability: Reachability


@dataclass(frozen=True)
class RelayInfo:
    """A relay and the addresses it listens at (multiaddrs without `/p2p/`)."""

    peer: PeerId
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class RelaysFound(Command):
    """The outcome of `FindRelays`: the providers of the relays key (possibly none)."""

    relays: tuple[RelayInfo, ...]


@dataclass(frozen=True)
class Reserved(Command):
    """`relay` granted (or renewed) a reservation for `ttl_s` seconds."""

    relay: PeerId
    ttl_s: float


@dataclass(frozen=True)
class ReserveFailed(Command):
    """A `Reserve` on `relay` failed: refused (with the relay's status) or unreachable."""

    relay: PeerId
    reason: str


@dataclass(frozen=True)
class RelayDown(Command):
    """Membership took `relay` down (its connection closed or its pings failed)."""

    relay: PeerId


# ---- outputs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FindRelays(Effect):
    """Look up the providers of the relays key; then `RelaysFound`."""


@dataclass(frozen=True)
class Reserve(Effect):
    """Ask `relay` (at `addrs`) for a reservation, or to renew ours; then `Reserved` or `ReserveFailed`."""

    relay: PeerId
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class RelayAddrsChanged:
    """The circuit addresses to advertise now (empty: none), over the relays in `relays`."""

    addrs: tuple[str, ...]
    relays: tuple[PeerId, ...]


@dataclass(frozen=True)
class RelayDropped:
    """The reservation on `relay` is gone, for `reason`."""

    relay: PeerId
    reason: str


class RelayClient:
    """The reservations of one private peer. See the module docstring."""

    def __init__(self, local_peer: PeerId, config: RelayClientConfig, rng: random.Random) -> None:
        self.local_peer = local_peer
        self.config = config
        self._rng = rng
        self._active = False
        self._known: dict[PeerId, tuple[str, ...]] = {}
        self._reserved: dict[PeerId, float] = {}  # relay -> expiry of its reservation
        self._asking: set[PeerId] = set()  # a Reserve is out
        self._failed_until: dict[PeerId, float] = {}
        self._finding = False
        self._find_timer_set = False
        self._advertised: tuple[str, ...] = ()
        self._counters: Counter[str] = Counter()

    def reserved_relays(self) -> list[PeerId]:
        """The relays holding a reservation of ours, sorted."""
        return sorted(self._reserved)

    def statistics(self) -> dict[str, int]:
        """Gauges (reserved, known) and counters (reserve_requests, reservations, reserve_failures, ...)."""
        stats = dict(self._counters)
        stats["reserved"] = len(self._reserved)
        stats["known"] = len(self._known)
        return stats

    def step(self, now: float, event: Event) -> list[Action]:
        actions: list[Action] = []
        if isinstance(event, ReachabilityIs):
            self._on_reachability(event.reachability, actions)
        elif isinstance(event, RelaysFound):
            self._finding = False
            for info in sorted(event.relays, key=lambda info: info.peer):
                if info.peer != self.local_peer and info.addrs:
                    self._known[info.peer] = info.addrs
        elif isinstance(event, Reserved):
            self._on_reserved(now, event, actions)
        elif isinstance(event, ReserveFailed):
            self._counters["reserve_failures"] += 1
            self._drop(now, event.relay, event.reason, actions)
        elif isinstance(event, RelayDown):
            if event.relay in self._reserved or event.relay in self._asking:
                self._drop(now, event.relay, "the relay went down", actions)
        elif isinstance(event, TimerFired):
            self._on_timer(event, actions)
        else:
            raise LocalProtocolError(f"RelayClient cannot handle {event!r}")
        self._fill(now, actions)
        self._advertise(actions)
        return actions

    # ---- handlers -----------------------------------------------------------------------------------------------

    def _on_reachability(self, reachability: Reachability, actions: list[Action]) -> None:
        active = reachability == "private"
        if active == self._active:
            return
        self._active = active
        if active:
            self._finding = True
            self._counters["lookups"] += 1
            actions.append(FindRelays())
            return
        for relay in sorted(self._reserved):
            actions.append(CancelTimer(("relay", "refresh", relay)))
            actions.append(Notify(RelayDropped(relay, f"this peer is {reachability} now")))
        self._reserved.clear()
        self._asking.clear()
        if self._find_timer_set:
            self._find_timer_set = False
            actions.append(CancelTimer(_FIND_TIMER))

    def _on_reserved(self, now: float, event: Reserved, actions: list[Action]) -> None:
        if event.relay not in self._asking:
            return  # answered after this peer stopped wanting it (turned public, or the relay was dropped)
        self._asking.discard(event.relay)
        first = event.relay not in self._reserved
        self._reserved[event.relay] = now + event.ttl_s
        self._counters["reservations" if first else "renewals"] += 1
        renew_at = now + max(event.ttl_s, 0.0) * self.config.refresh_fraction
        actions.append(SetTimer(("relay", "refresh", event.relay), renew_at))

    def _drop(self, now: float, relay: PeerId, reason: str, actions: list[Action]) -> None:
        self._asking.discard(relay)
        self._failed_until[relay] = now + self.config.retry_s
        if self._reserved.pop(relay, None) is not None:
            actions.append(CancelTimer(("relay", "refresh", relay)))
            actions.append(Notify(RelayDropped(relay, reason)))

    def _on_timer(self, event: TimerFired, actions: list[Action]) -> None:
        key = event.key
        if key == _FIND_TIMER:
            self._find_timer_set = False
            if self._active and self._short():
                self._finding = True
                self._counters["lookups"] += 1
                actions.append(FindRelays())
        elif isinstance(key, tuple) and len(key) == 3 and key[:2] == ("relay", "refresh"):
            relay = key[2]
            if self._active and relay in self._reserved and relay not in self._asking:
                self._ask(relay, actions)
        else:
            raise LocalProtocolError(f"RelayClient got a timer it never set: {key!r}")

    # ---- decisions ----------------------------------------------------------------------------------------------

    def _short(self) -> bool:
        return len(set(self._reserved) | self._asking) < self.config.relays

    def _ask(self, relay: PeerId, actions: list[Action]) -> None:
        self._asking.add(relay)
        self._counters["reserve_requests"] += 1
        actions.append(Reserve(relay, self._known[relay]))

    def _fill(self, now: float, actions: list[Action]) -> None:
        if not self._active:
            return
        wanted = self.config.relays - len(set(self._reserved) | self._asking)
        if wanted > 0:
            candidates = [
                relay
                for relay in sorted(self._known)
                if relay not in self._reserved
                and relay not in self._asking
                and self._failed_until.get(relay, -math.inf) <= now
            ]
            for relay in sorted(self._rng.sample(candidates, min(wanted, len(candidates)))):
                self._ask(relay, actions)
        if self._short() and not self._finding and not self._find_timer_set:
            self._find_timer_set = True
            actions.append(SetTimer(_FIND_TIMER, now + self.config.find_interval_s))

    def _advertise(self, actions: list[Action]) -> None:
        relays = sorted(self._reserved)
        per_relay = MAX_CIRCUIT_ADDRS // max(len(relays), 1)
        addrs = tuple(
            circuit_addr(addr, relay, self.local_peer) for relay in relays for addr in self._known[relay][:per_relay]
        )
        if addrs != self._advertised:
            self._advertised = addrs
            actions.append(Notify(RelayAddrsChanged(addrs, tuple(relays))))
