"""Whether other peers can dial this one: the verdict the NAT-traversal parts (relay service, relay reservations,
hole punching) act on.

`network.reachability` either forces the verdict ("public": this host is dialable at its advertised addresses;
"private": it is behind NAT or a firewall) or leaves it to the node ("auto"). The node announces each verdict once to
its subscribers as `ReachabilityChanged`; with "auto" no verdict exists until the `ReachabilityCheck` machine below
establishes one.

The check is swarmgrad's own dial-back, not py-libp2p's AutoNAT, whose server never really dials (docs/nat.md):

* **Asking** (`ReachabilityCheck`, sans-IO). It asks up to `servers` live members on distinct IPs (none of them ours),
  chosen with its seeded `random.Random` from the sorted candidates, to dial it back at its advertised addresses
  (`AskDialBack`, carried out by `p2p.dialback`). Each answer is a vote: *dialled* is a vote for public; *not
  dialled* for private; an answer whose observed IP (the IP the server sees us come from) is none of our own (our
  interface and announced addresses) is a vote for private whatever it says, since only a NAT rewrites our source
  address; while there is no verdict yet, that one answer says private at once (the check after `retry_s` confirms it
  with votes, so a lying server gets no lasting verdict out of it). *Cannot serve*, a timeout or a lost connection is
  no vote: that server is set aside for `retry_s` and the next candidate asked. `confirmations` agreeing votes decide;
  fewer candidates than that leave the verdict as it is and the check is retried after `retry_s` or as soon as a new
  member comes up, keeping the votes it has for twice `retry_s` (so a server is not asked again, and rate-limited,
  just because a new member came up). A verdict is re-checked after `recheck_s`, after `retry_s` when its votes
  disagreed, and at once when our addresses change.
* **Serving** (`DialBackServer`, sans-IO). A server dials only those of the requester's addresses whose IP is the
  one the request came from (so it cannot be used to make this host dial a third party), with a fresh connection,
  bounded by `dial_timeout_s`; a requester may ask once per `serve_interval_s`, and one IP at most
  `max_requests_per_ip` times per `serve_interval_s`. Only a peer that can itself be dialled serves: one whose verdict
  is public, or, while it has none, one that a peer on another IP already dialled (that breaks the start of a swarm,
  where nobody has a verdict yet); any other answers *cannot serve*.

No sockets, no clock reads (`now` is handed in), sorted iteration; the trio side is `p2p.dialback`.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from swarmgrad.core.codec import Schema
from swarmgrad.core.errors import ConfigError
from swarmgrad.core.machine import Action, Command, Effect, Event, Notify, PeerDown, PeerId, SetTimer, TimerFired

Reachability = Literal["public", "private"]
ReachabilitySetting = Literal["auto", "public", "private"]
REACHABILITY_SETTINGS: tuple[ReachabilitySetting, ...] = ("auto", "public", "private")

PROTOCOL = "/swarmgrad/dialback/1.0.0"
MAX_MESSAGE_BYTES = 4096
"""Bound on one dial-back message (a request carries at most `MAX_ADDRS` addresses of `MAX_ADDR_CHARS`)."""
MAX_ADDRS = 8
MAX_ADDR_CHARS = 256
MAX_REASON_CHARS = 256
MAX_IP_CHARS = 64
_MAX_NONCE = 2**63 - 1


@dataclass(frozen=True)
class ReachabilityChanged:
    """This peer's verdict is now `reachability`, for `reason` (one line, for logs and `--json`)."""

    reachability: Reachability
    reason: str


@dataclass(frozen=True)
class ReachabilityConfig:
    """How the dial-back check runs, on both sides."""

    servers: int = 3
    """Servers asked per check (at most this many votes are collected)."""
    confirmations: int = 2
    """Agreeing votes that decide a verdict."""
    answer_timeout_s: float = 15.0
    """How long an asked server has to answer (it dials within `dial_timeout_s` first)."""
    recheck_s: float = 600.0
    """A verdict is checked again this long after it was reached."""
    retry_s: float = 30.0
    """A check without a verdict (too few servers, disagreeing votes) is tried again this long after; a server that
    could not serve is not asked again before this long."""
    dial_timeout_s: float = 5.0
    """Serving: bound on dialling a requester back (TCP and the handshake)."""
    serve_interval_s: float = 30.0
    """Serving: one request per requester in this long, and `max_requests_per_ip` per IP."""
    max_requests_per_ip: int = 4

    def __post_init__(self) -> None:
        for name in ("servers", "confirmations", "max_requests_per_ip"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 16):
                raise ConfigError(name, value, "an integer from 1 to 16")
        if self.confirmations > self.servers:
            raise ConfigError("confirmations", self.confirmations, f"at most servers ({self.servers})")
        for name in ("answer_timeout_s", "recheck_s", "retry_s", "dial_timeout_s", "serve_interval_s"):
            value = getattr(self, name)
            if not (
                isinstance(value, int | float) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
            ):
                raise ConfigError(name, value, "a finite number of seconds > 0")
        if self.answer_timeout_s <= self.dial_timeout_s:
            raise ConfigError(
                "answer_timeout_s", self.answer_timeout_s, f"more than dial_timeout_s ({self.dial_timeout_s})"
            )


# ---- wire messages (`/swarmgrad/dialback/1.0.0`) ------------------------------------------------------------------


@dataclass(frozen=True)
class DialBackRequest:
    """Please dial me back at one of `addrs` (/ip4|ip6/<ip>/tcp/<port>) and say whether it worked."""

    nonce: int
    addrs: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.nonce <= _MAX_NONCE:
            raise ValueError(f"nonce {self.nonce} out of range")
        if not 1 <= len(self.addrs) <= MAX_ADDRS:
            raise ValueError(f"a request carries 1 to {MAX_ADDRS} addresses, got {len(self.addrs)}")
        if any(len(addr) > MAX_ADDR_CHARS for addr in self.addrs):
            raise ValueError(f"an address longer than {MAX_ADDR_CHARS} characters")


DIALLED = 1
NOT_DIALLED = 2
CANNOT_SERVE = 3
_STATUSES = (DIALLED, NOT_DIALLED, CANNOT_SERVE)


@dataclass(frozen=True)
class DialBackResponse:
    """The answer to request `nonce`: `status` (`DIALLED`, `NOT_DIALLED`, `CANNOT_SERVE`), the IP the request came
    from as the server saw it (empty when it does not know), and why (one line)."""

    nonce: int
    status: int
    observed_ip: str
    reason: str

    def __post_init__(self) -> None:
        if not 0 <= self.nonce <= _MAX_NONCE:
            raise ValueError(f"nonce {self.nonce} out of range")
        if self.status not in _STATUSES:
            raise ValueError(f"unknown status {self.status}")
        if len(self.observed_ip) > MAX_IP_CHARS or len(self.reason) > MAX_REASON_CHARS:
            raise ValueError("observed_ip or reason too long")


SCHEMA = Schema("dialback", {1: DialBackRequest, 2: DialBackResponse})


# ---- the asking side ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressesChanged(Command):
    """What this peer advertises (`addrs`, dialable multiaddrs without /p2p) and every IP that is its own (interface
    and announced addresses). The first one starts the machine; a change starts a new check at once."""

    addrs: tuple[str, ...]
    own_ips: tuple[str, ...]


@dataclass(frozen=True)
class MemberUp(Command):
    """`peer` is a live member, connected from `ip` (None: unknown, e.g. a relayed connection: never asked)."""

    peer: PeerId
    ip: str | None


@dataclass(frozen=True)
class DialBackAnswered(Command):
    """`peer` answered our request `nonce` (the runner checked the nonce)."""

    peer: PeerId
    nonce: int
    response: DialBackResponse


@dataclass(frozen=True)
class DialBackFailed(Command):
    """Asking `peer` (request `nonce`) failed: no stream, no answer, a malformed answer."""

    peer: PeerId
    nonce: int
    reason: str


@dataclass(frozen=True)
class AskDialBack(Effect):
    """Send `DialBackRequest(nonce, addrs)` to `peer` and feed back `DialBackAnswered` or `DialBackFailed`."""

    peer: PeerId
    nonce: int
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class CheckInconclusive:
    """A check ended without a verdict (for logs): `reason`, and when the next one starts."""

    reason: str
    retry_at: float


_RECHECK = ("reachability", "recheck")


@dataclass
class _Check:
    asked: dict[PeerId, int] = field(default_factory=dict)  # peer -> nonce, answers still awaited
    ips: set[str] = field(default_factory=set)  # IPs of the servers asked in this check
    votes: dict[PeerId, tuple[Reachability, str]] = field(default_factory=dict)
    voted_at: dict[PeerId, float] = field(default_factory=dict)


class ReachabilityCheck:
    """The asking side of the dial-back check; see the module docstring. Events: `AddressesChanged`, `MemberUp`,
    `PeerDown`, `DialBackAnswered`, `DialBackFailed`, `TimerFired`. Actions: `AskDialBack`, `SetTimer`,
    `Notify(ReachabilityChanged)`, `Notify(CheckInconclusive)`."""

    def __init__(self, config: ReachabilityConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._addrs: tuple[str, ...] = ()
        self._own_ips: frozenset[str] = frozenset()
        self._members: dict[PeerId, str] = {}
        self._recent: dict[PeerId, tuple[float, str, tuple[Reachability, str]]] = {}  # votes of the last check
        self._set_aside: dict[PeerId, float] = {}  # server -> not asked again before this time
        self._check: _Check | None = None
        self._nonce = 0
        self._waiting = False  # no verdict, no check running: the next MemberUp starts one
        self.verdict: Reachability | None = None
        self._counters = {"checks": 0, "asked": 0, "votes": 0, "no_votes": 0, "inconclusive": 0}

    def statistics(self) -> dict[str, int]:
        return dict(self._counters)

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, AddressesChanged):
            if (event.addrs, frozenset(event.own_ips)) == (self._addrs, self._own_ips):
                return []
            self._addrs, self._own_ips = event.addrs, frozenset(event.own_ips)
            self._recent.clear()  # votes on other addresses
            return self._start_check(now)
        if isinstance(event, MemberUp):
            if event.ip is None:
                self._members.pop(event.peer, None)
                return []
            self._members[event.peer] = event.ip
            if self._waiting:
                return self._start_check(now)
            if self._check is not None and len(self._check.asked) + len(self._check.votes) < self.config.servers:
                return self._ask_more(now)
            return []
        if isinstance(event, PeerDown):
            self._members.pop(event.peer, None)
            return self._no_vote(now, event.peer, None, "disconnected")
        if isinstance(event, DialBackAnswered):
            return self._answered(now, event)
        if isinstance(event, DialBackFailed):
            return self._no_vote(now, event.peer, event.nonce, event.reason)
        if isinstance(event, TimerFired):
            if event.key == _RECHECK:
                return [] if self._check is not None else self._start_check(now)  # a running check sets its own
            if isinstance(event.key, tuple) and len(event.key) == 3 and event.key[:1] == ("dialback",):
                _, peer, nonce = event.key
                return self._no_vote(now, peer, nonce, f"no answer within {self.config.answer_timeout_s:g} s")
        return []

    # ---- checks -------------------------------------------------------------------------------------------------

    def _start_check(self, now: float) -> list[Action]:
        self._waiting = False
        if not self._addrs:
            self._check = None
            return []
        self._counters["checks"] += 1
        self._check = _Check()
        for peer, (at, ip, vote) in sorted(self._recent.items()):
            if at > now - 2 * self.config.retry_s and peer in self._members:  # an inconclusive check's votes count
                self._check.votes[peer] = vote
                self._check.voted_at[peer] = at
                self._check.ips.add(ip)
        self._recent.clear()
        return self._ask_more(now)

    def _candidates(self, now: float, check: _Check) -> list[tuple[PeerId, str]]:
        by_ip: dict[str, list[PeerId]] = {}
        for peer, ip in sorted(self._members.items()):
            if ip in self._own_ips or ip in check.ips or peer in check.votes or peer in check.asked:
                continue
            if self._set_aside.get(peer, -math.inf) > now:
                continue
            by_ip.setdefault(ip, []).append(peer)
        choices = [(self._rng.choice(peers), ip) for ip, peers in sorted(by_ip.items())]
        self._rng.shuffle(choices)
        return choices

    def _ask_more(self, now: float) -> list[Action]:
        check = self._check
        assert check is not None
        actions: list[Action] = []
        room = self.config.servers - len(check.asked) - len(check.votes)
        for peer, ip in self._candidates(now, check)[: max(room, 0)]:
            self._nonce += 1
            check.asked[peer] = self._nonce
            check.ips.add(ip)
            self._counters["asked"] += 1
            actions.append(AskDialBack(peer, self._nonce, self._addrs))
            actions.append(SetTimer(("dialback", peer, self._nonce), now + self.config.answer_timeout_s))
        if not check.asked:
            actions.extend(self._conclude(now))
        return actions

    def _answered(self, now: float, event: DialBackAnswered) -> list[Action]:
        check = self._check
        if check is None or check.asked.get(event.peer) != event.nonce:
            return []  # an answer to an older check, or after its timeout
        response = event.response
        if response.status == CANNOT_SERVE:
            return self._no_vote(now, event.peer, event.nonce, f"cannot serve: {response.reason}")
        del check.asked[event.peer]
        self._counters["votes"] += 1
        if response.observed_ip and response.observed_ip not in self._own_ips:
            vote: tuple[Reachability, str] = ("private", f"seen from {response.observed_ip}, not an address of ours")
            if self.verdict is None:  # behind a NAT: private at once, confirmed by the check after retry_s
                check.votes[event.peer] = vote
                return self._decide(now, check, "private", recheck_s=self.config.retry_s)
        elif response.status == DIALLED:
            vote = ("public", "dialled back")
        else:
            vote = ("private", f"not dialled back: {response.reason}")
        check.votes[event.peer] = vote
        check.voted_at[event.peer] = now
        decided = self._decided(check)
        if decided is not None:
            return self._decide(now, check, decided)
        return self._ask_more(now)

    def _no_vote(self, now: float, peer: PeerId, nonce: int | None, reason: str) -> list[Action]:
        check = self._check
        if check is None or peer not in check.asked or (nonce is not None and check.asked[peer] != nonce):
            return []
        del check.asked[peer]
        self._counters["no_votes"] += 1
        self._set_aside[peer] = now + self.config.retry_s
        return self._ask_more(now)

    def _decided(self, check: _Check) -> Reachability | None:
        for side in ("public", "private"):
            if sum(1 for vote, _ in check.votes.values() if vote == side) >= self.config.confirmations:
                return side  # type: ignore[return-value]
        return None

    def _decide(self, now: float, check: _Check, verdict: Reachability, recheck_s: float | None = None) -> list[Action]:
        agreeing = sorted(peer for peer, (vote, _) in check.votes.items() if vote == verdict)
        disagreeing = len(check.votes) - len(agreeing)
        why = check.votes[agreeing[0]][1]
        reason = f"{len(agreeing)} of {len(check.votes)} servers: {why}"
        self._check = None
        self._recent.clear()
        self._prune(now)
        retry = self.config.retry_s if disagreeing else self.config.recheck_s if recheck_s is None else recheck_s
        actions: list[Action] = [SetTimer(_RECHECK, now + retry)]
        if verdict != self.verdict:
            self.verdict = verdict
            actions.append(Notify(ReachabilityChanged(verdict, reason)))
        return actions

    def _conclude(self, now: float) -> list[Action]:
        """No answer outstanding and no candidate left, without a verdict."""
        check = self._check
        assert check is not None
        public = sum(1 for vote, _ in check.votes.values() if vote == "public")
        reason = (
            f"{len(check.votes)} vote(s) ({public} public), {self.config.confirmations} agreeing needed: "
            "too few members could serve"
            if len(check.votes) < self.config.confirmations
            else "votes disagree"
        )
        self._check = None
        self._recent = {
            peer: (check.voted_at[peer], self._members[peer], vote)
            for peer, vote in sorted(check.votes.items())
            if peer in self._members
        }
        self._counters["inconclusive"] += 1
        self._prune(now)
        self._waiting = self.verdict is None
        retry_at = now + self.config.retry_s
        return [SetTimer(_RECHECK, retry_at), Notify(CheckInconclusive(reason, retry_at))]

    def _prune(self, now: float) -> None:
        for peer in [peer for peer, until in self._set_aside.items() if until <= now]:
            del self._set_aside[peer]


# ---- the serving side ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DialAddrs:
    """Serve the request: dial `addrs` (all on the requester's observed IP), one after the other, within
    `dial_timeout_s` in all."""

    addrs: tuple[str, ...]


@dataclass(frozen=True)
class Answer:
    """Answer at once with `response`, without dialling."""

    response: DialBackResponse


def _ip_of(addr: str) -> str | None:
    """The IP of a /ip4|ip6/<ip>/tcp/<port> multiaddr (anything else: None)."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    if not parts[4].isdigit() or not 0 < int(parts[4]) < 65536 or any(p for p in parts[5:]):
        return None
    return parts[2]


class DialBackServer:
    """What to do with a dial-back request (module docstring, "Serving"); bounded state, `now` handed in."""

    MAX_TRACKED = 4096
    """Requesters and IPs remembered for rate limiting; beyond it the oldest entries are forgotten early."""

    def __init__(self, config: ReachabilityConfig) -> None:
        self.config = config
        self._last_by_peer: dict[PeerId, float] = {}
        self._recent_by_ip: dict[str, deque[float]] = {}
        self.counters = {"served": 0, "refused": 0, "rate_limited": 0, "no_matching_addr": 0}

    def decide(
        self, now: float, requester: PeerId, observed_ip: str | None, request: DialBackRequest, can_serve: bool
    ) -> DialAddrs | Answer:
        def answer(status: int, reason: str) -> Answer:
            return Answer(DialBackResponse(request.nonce, status, observed_ip or "", reason))

        if not can_serve:
            self.counters["refused"] += 1
            return answer(CANNOT_SERVE, "this peer is not known to be publicly dialable")
        if observed_ip is None:
            self.counters["refused"] += 1
            return answer(CANNOT_SERVE, "the request came over a connection without an IP (relayed?)")
        if not self._admit(now, requester, observed_ip):
            self.counters["rate_limited"] += 1
            return answer(CANNOT_SERVE, f"rate limited (one request per {self.config.serve_interval_s:g} s)")
        matching = tuple(sorted({addr for addr in request.addrs if _ip_of(addr) == observed_ip}))
        if not matching:
            self.counters["no_matching_addr"] += 1
            return answer(NOT_DIALLED, f"no offered address is on the observed IP {observed_ip}")
        self.counters["served"] += 1
        return DialAddrs(matching)

    def _admit(self, now: float, requester: PeerId, ip: str) -> bool:
        window = self.config.serve_interval_s
        last = self._last_by_peer.get(requester)
        if last is not None and now - last < window:
            return False
        recent = self._recent_by_ip.setdefault(ip, deque())
        while recent and now - recent[0] >= window:
            recent.popleft()
        if len(recent) >= self.config.max_requests_per_ip:
            return False
        recent.append(now)
        self._last_by_peer[requester] = now
        self._forget_old(now)
        return True

    def _forget_old(self, now: float) -> None:
        window = self.config.serve_interval_s
        if len(self._last_by_peer) > self.MAX_TRACKED:
            for peer in sorted(self._last_by_peer, key=lambda p: (self._last_by_peer[p], p))[: self.MAX_TRACKED // 2]:
                del self._last_by_peer[peer]
        if len(self._recent_by_ip) > self.MAX_TRACKED:
            for ip in sorted(self._recent_by_ip):
                recent = self._recent_by_ip[ip]
                if not recent or now - recent[-1] >= window:
                    del self._recent_by_ip[ip]
