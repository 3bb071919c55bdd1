"""The simulator's network model: latency, bandwidth with queueing, loss, duplication, reordering, partitions.

`NetworkModel.transmit(now, sender, receiver, size_bytes)` says when a message arrives (the event core,
`sim.events.Simulator`, schedules the arrivals). A transfer is cut-through over two FIFO queues: the sender's
uplink serialises its messages one after another at `uplink_bytes_per_s`, the first byte reaches the receiver one
latency after it left, and the receiver's downlink takes its messages one after another at
`downlink_bytes_per_s`. So one message of S bytes arrives at `latency + S / min(uplink, downlink)`, and a second
message on a busy uplink waits for the first to leave. Latency per directed link is fixed, drawn from a
distribution (uniform or lognormal, around `latency_s`), or read from a region-to-region matrix. Loss and
duplication are per message; reordering adds a random delay of up to `reorder_jitter_s` to each arrival (messages
may overtake each other). A partition blocks exactly the links it names, both directions, until healed; a blocked
message is lost. Every draw comes from the model's own `random.Random`, so a run is deterministic per seed.
This module knows nothing of any protocol.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from swarmgrad.core.errors import ConfigError
from swarmgrad.core.machine import PeerId

LATENCY_DISTRIBUTIONS = ("fixed", "uniform", "lognormal")


@dataclass(frozen=True)
class NetworkConfig:
    """The network of a scenario. Bandwidths are per peer (None: unlimited); `regions` lists region names and
    `region_latency_s` the one-way latency from row region to column region (both empty: no regions, `latency_s`
    and the distribution decide)."""

    latency_s: float = 0.05
    latency_distribution: str = "fixed"
    latency_spread: float = 0.5
    """uniform: latency in latency_s * [1 - spread, 1 + spread]; lognormal: sigma of log(latency / latency_s)."""
    uplink_bytes_per_s: float | None = None
    downlink_bytes_per_s: float | None = None
    loss: float = 0.0
    duplicate: float = 0.0
    reorder_jitter_s: float = 0.0
    regions: tuple[str, ...] = ()
    region_latency_s: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ConfigError("network.latency_s", self.latency_s, "a finite number >= 0")
        if self.latency_distribution not in LATENCY_DISTRIBUTIONS:
            raise ConfigError(
                "network.latency_distribution", self.latency_distribution, f"one of {LATENCY_DISTRIBUTIONS}"
            )
        if self.latency_spread < 0 or (self.latency_distribution == "uniform" and self.latency_spread > 1):
            raise ConfigError("network.latency_spread", self.latency_spread, ">= 0 (and <= 1 for uniform)")
        for name in ("uplink_bytes_per_s", "downlink_bytes_per_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"network.{name}", value, "a finite number > 0 (or absent: unlimited)")
        for name in ("loss", "duplicate"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"network.{name}", getattr(self, name), "a probability in [0, 1)")
        if not (math.isfinite(self.reorder_jitter_s) and self.reorder_jitter_s >= 0):
            raise ConfigError("network.reorder_jitter_s", self.reorder_jitter_s, "a finite number >= 0")
        if len(set(self.regions)) != len(self.regions):
            raise ConfigError("network.regions", self.regions, "distinct names")
        n = len(self.regions)
        if len(self.region_latency_s) != n or any(len(row) != n for row in self.region_latency_s):
            raise ConfigError("network.region_latency_s", self.region_latency_s, f"a {n} x {n} matrix (one per region)")
        if any(not (math.isfinite(v) and v >= 0) for row in self.region_latency_s for v in row):
            raise ConfigError("network.region_latency_s", self.region_latency_s, "finite numbers >= 0")


def _link(a: PeerId, b: PeerId) -> tuple[PeerId, PeerId]:
    return (a, b) if a <= b else (b, a)


@dataclass
class NetworkModel:
    """Per-peer queues and per-link latencies of one run; see the module docstring."""

    config: NetworkConfig
    rng: random.Random
    region_of: dict[PeerId, str] = field(default_factory=dict)
    _uplink_free_at: dict[PeerId, float] = field(default_factory=dict)
    _downlink_free_at: dict[PeerId, float] = field(default_factory=dict)
    _latency_of: dict[tuple[PeerId, PeerId], float] = field(default_factory=dict)
    _blocked: set[tuple[PeerId, PeerId]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._region_index = {name: i for i, name in enumerate(self.config.regions)}
        for peer, region in sorted(self.region_of.items()):
            if region not in self._region_index:
                raise ConfigError(f"region of {peer}", region, f"one of {self.config.regions}")

    def latency_s(self, sender: PeerId, receiver: PeerId) -> float:
        """The one-way latency of the directed link (drawn once per link, then fixed)."""
        key = (sender, receiver)
        latency = self._latency_of.get(key)
        if latency is None:
            latency = self._draw_latency(sender, receiver)
            self._latency_of[key] = latency
        return latency

    def _draw_latency(self, sender: PeerId, receiver: PeerId) -> float:
        cfg = self.config
        if sender in self.region_of and receiver in self.region_of:
            row, col = self._region_index[self.region_of[sender]], self._region_index[self.region_of[receiver]]
            base = cfg.region_latency_s[row][col]
        else:
            base = cfg.latency_s
        if cfg.latency_distribution == "uniform":
            return base * self.rng.uniform(1 - cfg.latency_spread, 1 + cfg.latency_spread)
        if cfg.latency_distribution == "lognormal":
            return base * math.exp(self.rng.gauss(0.0, cfg.latency_spread))
        return base

    def transmit(self, now: float, sender: PeerId, receiver: PeerId, size_bytes: int) -> list[float]:
        """Arrival times of a message of `size_bytes` sent now: [] if lost or blocked, two if duplicated."""
        cfg = self.config
        if _link(sender, receiver) in self._blocked:
            return []
        if cfg.loss and self.rng.random() < cfg.loss:
            return []
        up = cfg.uplink_bytes_per_s
        start = max(now, self._uplink_free_at.get(sender, now))
        left = start + (size_bytes / up if up else 0.0)
        if up:
            self._uplink_free_at[sender] = left
        latency = self.latency_s(sender, receiver)
        down = cfg.downlink_bytes_per_s
        first_byte = max(start + latency, self._downlink_free_at.get(receiver, 0.0))
        arrived = max(first_byte + (size_bytes / down if down else 0.0), left + latency)
        if down:
            self._downlink_free_at[receiver] = arrived
        copies = 2 if cfg.duplicate and self.rng.random() < cfg.duplicate else 1
        if cfg.reorder_jitter_s:
            return sorted(arrived + self.rng.uniform(0, cfg.reorder_jitter_s) for _ in range(copies))
        return [arrived] * copies

    # ---- partitions ---------------------------------------------------------------------------------------------

    def block(self, links: Iterable[tuple[PeerId, PeerId]]) -> None:
        """Block these links, both directions (messages on them are lost) until `heal`."""
        self._blocked.update(_link(a, b) for a, b in links)

    def heal(self, links: Iterable[tuple[PeerId, PeerId]]) -> None:
        """Restore these links."""
        self._blocked.difference_update(_link(a, b) for a, b in links)

    def blocked(self, a: PeerId, b: PeerId) -> bool:
        return _link(a, b) in self._blocked


def links_between(groups: Iterable[Iterable[PeerId]]) -> list[tuple[PeerId, PeerId]]:
    """Every link from a peer of one group to a peer of another (what a partition into these groups cuts)."""
    listed = [sorted(group) for group in groups]
    return [(a, b) for i, first in enumerate(listed) for second in listed[i + 1 :] for a in first for b in second]
