"""What makes a swarm beyond its id (`swarmgrad.core.swarm_id`): its optional pre-shared key, and the admission
policy for strangers.

* **Swarm key** (private swarms): the libp2p pnet pre-shared key, 32 bytes, in the usual file format::

      /key/swarm/psk/1.0.0/
      /base16/
      <64 hex digits>

  `parse_swarm_key`, `format_swarm_key`, `load_swarm_key` and `write_swarm_key` (mode 0600, never overwrites).
* **`ScoringPolicy`** (public swarms): a `PeerPolicy` for a swarm where every peer is a stranger. Each remote
  error a transport or driver reports adds to the peer's score, which decays over time; a peer whose score
  reaches the threshold is banned for a while (longer each time it offends again). It also caps the number of
  inbound connections; together with the transport's per-peer in-flight bytes cap
  (`HostConfig.max_in_flight_bytes_per_peer`), one hostile peer cannot exhaust memory.

This module does no network I/O and reads no clock: the policy is handed a `clock` callable by its owner.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swarmgrad.core.errors import ConfigError, SwarmgradError

SWARM_KEY_CODEC = "/key/swarm/psk/1.0.0/"
SWARM_KEY_ENCODING = "/base16/"
SWARM_KEY_SIZE_BYTES = 32
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


# ---- swarm keys ---------------------------------------------------------------------------------------------------


class SwarmKeyError(SwarmgradError):
    """A swarm key file cannot be used; the message names the file and says why."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"swarm key file {path}: {reason}")


@dataclass(frozen=True, repr=False)
class SwarmKey:
    """A 32-byte libp2p pnet pre-shared key. Its repr never shows the key."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != SWARM_KEY_SIZE_BYTES:
            raise ConfigError("swarm_key", "<hidden>", f"{SWARM_KEY_SIZE_BYTES} bytes")

    @property
    def psk_hex(self) -> str:
        """The key as the 64 hex digits py-libp2p's `psk` argument takes."""
        return self.key.hex()

    def __repr__(self) -> str:
        return "SwarmKey(<hidden>)"


def parse_swarm_key(text: str) -> SwarmKey:
    """Parse the text of a swarm key file. Raises `ConfigError` naming what is wrong (never the key itself)."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) != 3:
        raise ConfigError("swarm_key", f"{len(lines)} lines", f"3 lines: {SWARM_KEY_CODEC}, {SWARM_KEY_ENCODING}, key")
    if lines[0] != SWARM_KEY_CODEC:
        raise ConfigError("swarm_key first line", lines[0][:40], repr(SWARM_KEY_CODEC))
    if lines[1] != SWARM_KEY_ENCODING:
        raise ConfigError("swarm_key encoding", lines[1][:40], f"{SWARM_KEY_ENCODING!r} (the only one supported)")
    if _HEX64.fullmatch(lines[2]) is None:
        raise ConfigError("swarm_key third line", f"{len(lines[2])} characters", "64 hexadecimal digits")
    return SwarmKey(bytes.fromhex(lines[2]))


def format_swarm_key(key: SwarmKey) -> str:
    """The file text of `key`."""
    return f"{SWARM_KEY_CODEC}\n{SWARM_KEY_ENCODING}\n{key.key.hex()}\n"


def load_swarm_key(path: Path) -> SwarmKey:
    """Read and parse the swarm key file at `path`. Raises `SwarmKeyError` naming the file: missing, unreadable,
    readable by group or others, or malformed."""
    try:
        info = path.stat()
        text = path.read_text(encoding="ascii")
    except FileNotFoundError as exc:
        raise SwarmKeyError(path, "does not exist (create one with `swarmgrad keygen --out FILE`)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SwarmKeyError(path, f"cannot be read ({exc})") from exc
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise SwarmKeyError(
            path,
            f"mode {stat.S_IMODE(info.st_mode):04o} lets group or others read the swarm key; "
            f"fix it with `chmod 600 {path}`",
        )
    try:
        return parse_swarm_key(text)
    except ConfigError as exc:
        raise SwarmKeyError(path, f"is not a swarm key ({exc})") from exc


def write_swarm_key(path: Path, key: SwarmKey) -> None:
    """Write `key` to a new file at `path` with mode 0600. Refuses to overwrite an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as exc:
        raise SwarmKeyError(path, "already exists; refusing to overwrite a swarm key") from exc
    except OSError as exc:
        raise SwarmKeyError(path, f"cannot be created ({exc.strerror})") from exc
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, format_swarm_key(key).encode("ascii"))
    finally:
        os.close(fd)


# ---- public-swarm admission policy --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringConfig:
    """Limits of `ScoringPolicy`. Each remote error adds 1.0 to a peer's score, which halves every
    `score_half_life_s`; a peer whose score reaches `ban_threshold` is banned, first for `ban_duration_s`, then twice
    as long on each new ban up to `max_ban_duration_s`. The default threshold (4.5) bans on the fifth error in quick
    succession; a peer that errs less than about once a minute is never banned."""

    ban_threshold: float = 4.5
    score_half_life_s: float = 60.0
    ban_duration_s: float = 60.0
    max_ban_duration_s: float = 3600.0
    max_inbound_connections: int = 64

    def __post_init__(self) -> None:
        for name in ("ban_threshold", "score_half_life_s", "ban_duration_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(name, value, "a finite number > 0")
        if not self.max_ban_duration_s >= self.ban_duration_s:
            raise ConfigError(
                "max_ban_duration_s", self.max_ban_duration_s, f">= ban_duration_s ({self.ban_duration_s})"
            )
        if not (isinstance(self.max_inbound_connections, int) and self.max_inbound_connections >= 1):
            raise ConfigError("max_inbound_connections", self.max_inbound_connections, "an integer >= 1")


@dataclass(frozen=True)
class PeerBan:
    """`peer` is banned for `duration_s` because of `reason` (its latest remote error)."""

    peer: str
    reason: str
    duration_s: float


OnReport = Callable[[str, str, "PeerBan | None"], None]
"""Called with (peer, reason, the ban this report made or None) after each report."""


class ScoringPolicy:
    """A `PeerPolicy` for public swarms: per-peer scores from remote errors, temporary bans, an inbound
    connection cap and a per-peer in-flight bytes cap. `clock()` returns seconds on a monotonic clock; `on_report`,
    when given, learns of every report and of each ban once (the owner logs bans and accounts offences per IP)."""

    def __init__(self, config: ScoringConfig, clock: Callable[[], float], on_report: OnReport | None = None) -> None:
        self.config = config
        self._clock = clock
        self._on_report = on_report
        self._score: dict[str, tuple[float, float]] = {}  # peer -> (score, at)
        self._banned_until: dict[str, float] = {}
        self._offences: Counter[str] = Counter()  # bans so far, per peer
        self._inbound: set[str] = set()
        self._counters: Counter[str] = Counter()

    # ---- PeerPolicy ------------------------------------------------------------------------------------------------

    def allows(self, peer: str) -> bool:
        """False while `peer` is banned."""
        until = self._banned_until.get(peer)
        if until is None:
            return True
        if self._clock() >= until:
            del self._banned_until[peer]
            return True
        self._counters["refused_banned"] += 1
        return False

    def report(self, peer: str, reason: str) -> None:
        """Count one remote error of `peer`; ban it when its decayed score reaches the threshold."""
        now = self._clock()
        score = self.score(peer) + 1.0
        self._score[peer] = (score, now)
        self._counters["reports"] += 1
        ban = None
        if score >= self.config.ban_threshold and peer not in self._banned_until:
            duration = min(self.config.ban_duration_s * 2 ** self._offences[peer], self.config.max_ban_duration_s)
            self._offences[peer] += 1
            self._banned_until[peer] = now + duration
            self._score[peer] = (0.0, now)
            self._counters["bans"] += 1
            ban = PeerBan(peer, reason, duration)
        if self._on_report is not None:
            self._on_report(peer, reason, ban)

    # ---- inbound connections and in-flight bytes ---------------------------------------------------------------

    def admit_inbound(self, peer: str) -> bool:
        """Account a new inbound connection from `peer`; False (and nothing accounted) when it is banned or the
        inbound cap is reached: the caller closes the connection."""
        if not self.allows(peer):
            return False
        if peer in self._inbound:
            return True
        if len(self._inbound) >= self.config.max_inbound_connections:
            self._counters["refused_inbound_cap"] += 1
            return False
        self._inbound.add(peer)
        return True

    def release_inbound(self, peer: str) -> None:
        """The inbound connection from `peer` closed."""
        self._inbound.discard(peer)

    # ---- inspection ------------------------------------------------------------------------------------------------

    def score(self, peer: str) -> float:
        """`peer`'s current (decayed) score."""
        entry = self._score.get(peer)
        if entry is None:
            return 0.0
        score, at = entry
        return score * 0.5 ** ((self._clock() - at) / self.config.score_half_life_s)

    def banned_peers(self) -> list[str]:
        """Peers banned right now, sorted."""
        now = self._clock()
        return sorted(peer for peer, until in self._banned_until.items() if until > now)

    def statistics(self) -> dict[str, int]:
        """Counters (reports, bans, refusals by cause) and current gauges."""
        stats = dict(self._counters)
        stats["banned"] = len(self.banned_peers())
        stats["inbound_connections"] = len(self._inbound)
        return stats
