"""When discovery dials, looks up and publishes: the policy of `p2p.discovery`, as a sans-IO machine.

`DiscoverySchedule` decides; `p2p.discovery.Discovery` carries out its effects over the DHT and reports back.
In: `Start`, the outcomes of its effects (`BootstrapDialed`, `DhtJoined`, `LookupDone`, `Published`), `Wake` (a
stranger connected: maybe a new member) and its own timers. Out: the effects `DialBootstrap`, `JoinDht`, `Lookup`,
`Publish`, and notifications for the log and the caller (`BootstrapAttemptFailed`, `Joined`, `JoinFailed`).

Rules:

* **Joining.** With no bootstrap address the peer is the first of its swarm: joined at once. Otherwise an attempt
  dials every bootstrap address at once; when all have answered or failed, the peer joins the DHT through those
  that answered (`JoinDht`), if any.
  If none did, the next attempt starts `bootstrap_retry_s` later, up to `bootstrap_attempts` attempts, then
  `JoinFailed` names every address with its distinct reasons. A failure is reported for the log with `repeated`
  set when that address failed the same way before and attempts remain (a peer that is not up yet: worth an INFO
  line, not a WARNING).
* **Publishing.** Once joined, the peer's records are published at once and then `republish_interval_s` after
  each publish completed.
* **Looking up.** Once joined, a lookup runs at once; the gap to the next starts at `min_lookup_interval_s` and
  doubles after each lookup that found nobody new (and no unverified provider), up to `max_lookup_interval_s`;
  it falls back to the minimum after a lookup that found someone. `Wake` starts a lookup now (or, if one is
  running, another right after it) at the minimum gap.

No I/O, no clock reads, no randomness: everything observable is an action.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmgrad.core.errors import LocalProtocolError
from swarmgrad.core.machine import Action, CancelTimer, Command, Effect, Event, Notify, PeerId, SetTimer, TimerFired

_RETRY_TIMER = ("discovery", "bootstrap-retry")
_LOOKUP_TIMER = ("discovery", "lookup")
_PUBLISH_TIMER = ("discovery", "publish")


@dataclass(frozen=True)
class ScheduleConfig:
    """The schedule's numbers (validated by `p2p.discovery.DiscoveryConfig`, which owns their defaults)."""

    bootstrap_addrs: tuple[str, ...]
    bootstrap_attempts: int
    bootstrap_retry_s: float
    republish_interval_s: float
    min_lookup_interval_s: float
    max_lookup_interval_s: float


# ---- inputs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start(Command):
    """Begin joining. Sent once, first."""


@dataclass(frozen=True)
class Wake(Command):
    """Look up now, at the shortest gap (a stranger connected: it may be a new member)."""


@dataclass(frozen=True)
class BootstrapDialed(Command):
    """The outcome of `DialBootstrap(addr)`: `peer` answered (`reason` None), or the dial failed for `reason`."""

    addr: str
    peer: PeerId
    reason: str | None


@dataclass(frozen=True)
class DhtJoined(Command):
    """`JoinDht` finished."""


@dataclass(frozen=True)
class LookupDone(Command):
    """A `Lookup` finished: `new` members were reported, `unverified` providers could not be checked yet."""

    new: int
    unverified: int


@dataclass(frozen=True)
class Published(Command):
    """A `Publish` finished (whether every DHT peer took the records or not)."""


# ---- effects --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DialBootstrap(Effect):
    """Dial this bootstrap address, add the peer to the DHT when it answers; report `BootstrapDialed`."""

    addr: str
    attempt: int


@dataclass(frozen=True)
class JoinDht(Effect):
    """The bootstrap peers in `peers` answered: check their member records, fill the routing table with our
    neighbours (a lookup of our own id); then `DhtJoined`."""

    peers: tuple[PeerId, ...]


@dataclass(frozen=True)
class Lookup(Effect):
    """Look up the swarm's members and report each verified one; then `LookupDone`."""


@dataclass(frozen=True)
class Publish(Effect):
    """Publish this peer's member record and provider entry; then `Published`."""


# ---- notifications --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapAttemptFailed:
    """A bootstrap dial failed (`attempt` of `attempts`); `repeated`: the same reason as before, attempts remain."""

    addr: str
    attempt: int
    attempts: int
    reason: str
    repeated: bool


@dataclass(frozen=True)
class Joined:
    """Joined through `peers` (none: the first peer of its swarm), at `now`."""

    peers: tuple[PeerId, ...]


@dataclass(frozen=True)
class JoinFailed:
    """No bootstrap peer answered in any attempt; `message` names every address and its reasons."""

    message: str


@dataclass
class _Attempt:
    number: int
    waiting: set[str]
    joined: list[PeerId] = field(default_factory=list)


class DiscoverySchedule:
    """The discovery policy machine. See the module docstring."""

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        self._attempt: _Attempt | None = None
        self._failures: dict[str, list[str]] = {}  # address -> its distinct reasons, first one first
        self.joined = False
        self._joining: tuple[PeerId, ...] | None = None  # bootstrap peers answered; the DHT join is running
        self._lookup_running = False
        self._wake_pending = False
        self._interval_s = config.min_lookup_interval_s

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Start):
            if self._attempt is not None or self._joining is not None or self.joined:
                raise LocalProtocolError("DiscoverySchedule was started twice")
            if not self.config.bootstrap_addrs:
                return self._join(now, ())
            return self._start_attempt(1)
        if isinstance(event, BootstrapDialed):
            return self._dialed(now, event)
        if isinstance(event, TimerFired):
            if event.key == _RETRY_TIMER and self._attempt is not None:
                return self._start_attempt(self._attempt.number + 1)
            if event.key == _LOOKUP_TIMER and self.joined and not self._lookup_running:
                return self._lookup()
            if event.key == _PUBLISH_TIMER and self.joined:
                return [Publish()]
            raise LocalProtocolError(f"DiscoverySchedule got a timer it has no use for: {event.key!r}")
        if isinstance(event, DhtJoined):
            if self._joining is None:
                raise LocalProtocolError("DhtJoined without a JoinDht")
            return self._joined(self._joining)
        if isinstance(event, LookupDone):
            return self._lookup_done(now, event)
        if isinstance(event, Published):
            return [SetTimer(_PUBLISH_TIMER, now + self.config.republish_interval_s)]
        if isinstance(event, Wake):
            return self._wake()
        raise LocalProtocolError(f"DiscoverySchedule cannot handle {event!r}")

    # ---- joining ----------------------------------------------------------------------------------------------------

    def _start_attempt(self, number: int) -> list[Action]:
        addrs = self.config.bootstrap_addrs
        self._attempt = _Attempt(number, set(addrs))
        return [DialBootstrap(addr, number) for addr in addrs]

    def _dialed(self, now: float, event: BootstrapDialed) -> list[Action]:
        attempt = self._attempt
        if attempt is None or event.addr not in attempt.waiting:
            raise LocalProtocolError(f"an outcome for a dial of {event.addr} that is not running")
        attempt.waiting.discard(event.addr)
        actions: list[Action] = []
        if event.reason is None:
            attempt.joined.append(event.peer)
        else:
            reasons = self._failures.setdefault(event.addr, [])
            attempts = self.config.bootstrap_attempts
            repeated = event.reason in reasons and attempt.number < attempts
            if event.reason not in reasons:
                reasons.append(event.reason)
            actions.append(Notify(BootstrapAttemptFailed(event.addr, attempt.number, attempts, event.reason, repeated)))
        if attempt.waiting:
            return actions
        if attempt.joined:
            self._attempt = None
            return actions + self._join(now, tuple(sorted(attempt.joined)))
        if attempt.number < self.config.bootstrap_attempts:
            return [*actions, SetTimer(_RETRY_TIMER, now + self.config.bootstrap_retry_s)]
        self._attempt = None
        message = f"no bootstrap peer could be reached in {self.config.bootstrap_attempts} attempts: " + "; ".join(
            f"{addr}: {' / '.join(reasons)}" for addr, reasons in self._failures.items()
        )
        return [*actions, Notify(JoinFailed(message))]

    def _join(self, now: float, peers: tuple[PeerId, ...]) -> list[Action]:
        if peers:
            self._joining = peers
            return [JoinDht(peers)]
        return self._joined(())

    def _joined(self, peers: tuple[PeerId, ...]) -> list[Action]:
        self.joined = True
        self._joining = None
        return [Notify(Joined(peers)), Publish(), *self._lookup()]

    # ---- lookups ----------------------------------------------------------------------------------------------------

    def _lookup(self) -> list[Action]:
        self._lookup_running = True
        self._wake_pending = False
        return [Lookup()]

    def _lookup_done(self, now: float, event: LookupDone) -> list[Action]:
        if not self._lookup_running:
            raise LocalProtocolError("LookupDone without a running lookup")
        self._lookup_running = False
        if event.new or event.unverified or self._wake_pending:
            self._interval_s = self.config.min_lookup_interval_s
        else:
            self._interval_s = min(self._interval_s * 2, self.config.max_lookup_interval_s)
        if self._wake_pending:
            return self._lookup()
        return [SetTimer(_LOOKUP_TIMER, now + self._interval_s)]

    def _wake(self) -> list[Action]:
        if not self.joined:
            return []  # joining looks up as soon as it is done
        self._interval_s = self.config.min_lookup_interval_s
        if self._lookup_running:
            self._wake_pending = True
            return []
        return [CancelTimer(_LOOKUP_TIMER), *self._lookup()]
