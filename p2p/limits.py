"""`IpLimits`: per-IP admission for a public swarm, where a peer id costs nothing.

Bans by peer id (`p2p.swarm.ScoringPolicy`) are dodged by a client that makes a fresh identity for each attack, so
this policy accounts by the remote IP address:

* **new identities per minute**: an IP that shows more than `max_new_identities_per_minute` peer ids we had not seen
  from it in the last minute is banned for `ip_ban_duration_s`;
* **offending identities per minute**: an IP from which more than `max_offending_identities_per_minute` distinct
  peer ids caused a remote error (a bad frame, a bad record) within a minute is banned likewise. One identity that
  errs repeatedly is `ScoringPolicy`'s business; this counts identities, so churning them no longer helps;
* **concurrent inbound connections and inbound streams** per IP are capped (a refusal, not a ban).

Every decision returns data: `None` (admitted) or a `Refusal`, which carries a `Ban` only on the call that made the
ban, so the owner logs each ban exactly once. The class does no I/O, reads no clock (`now` is passed in, seconds
on a monotonic clock) and uses no randomness; its owner closes connections and streams.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from swarmgrad.core.errors import ConfigError

WINDOW_S = 60.0
"""The window of the per-minute limits."""


@dataclass(frozen=True)
class IpLimitsConfig:
    """Limits of `IpLimits`, per remote IP address. The defaults leave room for many honest peers behind one
    address (a NAT, or the demo's peers on 127.0.0.1) while cutting an identity-churning client off within a
    minute; docs/p2p.md explains each."""

    max_new_identities_per_minute: int = 30
    max_offending_identities_per_minute: int = 3
    max_inbound_connections_per_ip: int = 16
    max_inbound_streams_per_ip: int = 128
    ip_ban_duration_s: float = 600.0

    def __post_init__(self) -> None:
        for name in (
            "max_new_identities_per_minute",
            "max_offending_identities_per_minute",
            "max_inbound_connections_per_ip",
            "max_inbound_streams_per_ip",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, value, "an integer >= 1")
        value = self.ip_ban_duration_s
        if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
            raise ConfigError("ip_ban_duration_s", value, "a finite number of seconds > 0")


@dataclass(frozen=True)
class Ban:
    """`ip` is banned until `until` (monotonic seconds) for `duration_s`, because of `reason`."""

    ip: str
    reason: str
    duration_s: float
    until: float


@dataclass(frozen=True)
class Refusal:
    """Why a connection or stream from `ip` is refused; `ban` is set only on the call that made a ban."""

    ip: str
    reason: str
    ban: Ban | None = None


class IpLimits:
    """Per-IP accounting of identities, offences, connections and streams. See the module docstring."""

    def __init__(self, config: IpLimitsConfig) -> None:
        self.config = config
        self._seen: dict[str, dict[str, float]] = {}  # ip -> peer -> when first seen within the window
        self._offenders: dict[str, dict[str, float]] = {}  # ip -> peer -> its latest offence
        self._banned_until: dict[str, float] = {}
        self._connections: dict[str, set[str]] = {}  # ip -> peers with an inbound connection from it
        self._streams: Counter[str] = Counter()
        self._counters: Counter[str] = Counter()

    # ---- connections --------------------------------------------------------------------------------------------

    def admit_connection(self, ip: str, peer: str, now: float) -> Refusal | None:
        """Account a new inbound connection from `peer` at `ip`; a `Refusal` (nothing accounted) when the IP is
        banned, its new identities exceed the rate (which bans it) or its connections are at the cap."""
        refusal = self._refuse_banned(ip, now)
        if refusal is not None:
            return refusal
        seen = _prune(self._seen, ip, now)
        if peer not in seen:
            if len(seen) >= self.config.max_new_identities_per_minute:
                reason = f"more than {self.config.max_new_identities_per_minute} new identities within {WINDOW_S:g} s"
                return self._ban(ip, reason, now)
            seen[peer] = now
            self._seen[ip] = seen
        peers = self._connections.setdefault(ip, set())
        if peer not in peers and len(peers) >= self.config.max_inbound_connections_per_ip:
            self._counters["refused_connections_per_ip"] += 1
            return Refusal(ip, f"over {self.config.max_inbound_connections_per_ip} inbound connections from {ip}")
        peers.add(peer)
        return None

    def release_connection(self, ip: str, peer: str) -> None:
        """The inbound connection from `peer` at `ip` closed."""
        peers = self._connections.get(ip)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self._connections[ip]

    # ---- streams ------------------------------------------------------------------------------------------------

    def admit_stream(self, ip: str, now: float) -> Refusal | None:
        """Account a new inbound stream from `ip`; a `Refusal` when the IP is banned or at its stream cap."""
        refusal = self._refuse_banned(ip, now)
        if refusal is not None:
            return refusal
        if self._streams[ip] >= self.config.max_inbound_streams_per_ip:
            self._counters["refused_streams_per_ip"] += 1
            return Refusal(ip, f"over {self.config.max_inbound_streams_per_ip} inbound streams from {ip}")
        self._streams[ip] += 1
        return None

    def release_stream(self, ip: str) -> None:
        """An inbound stream from `ip` ended."""
        self._streams[ip] -= 1
        if self._streams[ip] <= 0:
            del self._streams[ip]

    # ---- offences -----------------------------------------------------------------------------------------------

    def offence(self, ip: str, peer: str, now: float) -> Ban | None:
        """`peer` at `ip` caused a remote error: the `Ban` when this makes too many offending identities."""
        if self.banned(ip, now):
            return None
        offenders = _prune(self._offenders, ip, now)
        offenders[peer] = now
        self._offenders[ip] = offenders
        limit = self.config.max_offending_identities_per_minute
        if len(offenders) <= limit:
            return None
        ban = self._ban(ip, f"{len(offenders)} identities caused errors within {WINDOW_S:g} s (limit {limit})", now)
        return ban.ban

    # ---- inspection ---------------------------------------------------------------------------------------------

    def banned(self, ip: str, now: float) -> bool:
        """Whether `ip` is banned at `now`."""
        until = self._banned_until.get(ip)
        if until is None:
            return False
        if now >= until:
            del self._banned_until[ip]
            return False
        return True

    def banned_ips(self, now: float) -> list[str]:
        """IPs banned at `now`, sorted."""
        return sorted(ip for ip, until in self._banned_until.items() if until > now)

    def statistics(self) -> dict[str, int]:
        """Counters (bans, refusals by cause) and current gauges."""
        stats = dict(self._counters)
        stats["banned_ips"] = len(self._banned_until)
        stats["inbound_streams"] = sum(self._streams.values())
        return stats

    # ---- internals ----------------------------------------------------------------------------------------------

    def _refuse_banned(self, ip: str, now: float) -> Refusal | None:
        if not self.banned(ip, now):
            return None
        self._counters["refused_banned_ip"] += 1
        return Refusal(ip, f"{ip} is banned")

    def _ban(self, ip: str, reason: str, now: float) -> Refusal:
        duration_s = self.config.ip_ban_duration_s
        self._banned_until[ip] = now + duration_s
        self._seen.pop(ip, None)
        self._offenders.pop(ip, None)
        self._counters["ip_bans"] += 1
        return Refusal(ip, reason, Ban(ip, reason, duration_s, now + duration_s))


def _prune(table: dict[str, dict[str, float]], ip: str, now: float) -> dict[str, float]:
    """`table[ip]` without the entries older than the window (the table forgets an IP whose entries all expired)."""
    entries = {peer: at for peer, at in table.pop(ip, {}).items() if now - at < WINDOW_S}
    if entries:
        table[ip] = entries
    return entries
