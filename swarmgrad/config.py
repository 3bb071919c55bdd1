"""`PeerConfig`: everything `swarmgrad peer` is configured with, loaded from TOML and overridden from the CLI.

One frozen, validated dataclass per component (`PeerSection`, `NetworkConfig`, `LoopConfig`, `CheckpointConfig`,
`GossipSettings`, `MetricsConfig`), composed into `PeerConfig`; each TOML table is one of them:

    [peer]        task, data_dir, log_level, torch_threads
    [network]     swarm_id, listen, bootstrap, announce, swarm_key, dial_timeout_s, bootstrap_attempts,
                  bootstrap_retry_s, min_peers, min_peers_timeout_s, stream_idle_timeout_s, and the per-IP limits
                  max_new_identities_per_minute, max_offending_identities_per_minute,
                  max_inbound_connections_per_ip, max_inbound_streams_per_ip, ip_ban_duration_s (p2p.limits)
    [training]    inner_steps, epoch_rounds, eval_every_rounds, max_rounds      (training.loop.LoopConfig)
    [checkpoint]  keep, max_bytes, fetch_from_peers, fetch_timeout_s
    [gossip]      density, round_deadline_s, neighbours_per_round, step_size, aggregation, ...
    [metrics]     prometheus_port, prometheus_host, progress

An unknown table or key, a value of the wrong type, or a value out of range is a `ConfigError` whose field is the
dotted path (`training.inner_steps`). CLI flags arrive as the same dotted paths (`load_config(path, overrides)`).
This module reads the config file it is given and nothing else; it opens no sockets and starts nothing.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gossip.round import GossipConfig
from p2p.addrs import check_announce_addr, check_listen_addr, parse_peer_addr
from p2p.host import HostConfig
from p2p.limits import IpLimitsConfig
from swarmgrad.core.codec import field_hints
from swarmgrad.core.errors import ConfigError
from swarmgrad.core.swarm_id import validate_swarm_id
from training.loop import LoopConfig
from training.tasks import resolve_task_name

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class PeerSection:
    """Who this peer is and what it trains. `data_dir` holds `identity.key`, `checkpoints/` and `peer.log`."""

    task: str = "digits"
    data_dir: Path = field(default_factory=lambda: Path.home() / ".swarmgrad")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level of the log file `<data_dir>/peer.log` (the console follows `swarmgrad --log-level`)."""
    torch_threads: int = 0
    """Threads torch may use for training; 0 keeps torch's default (one per core)."""

    def __post_init__(self) -> None:
        resolve_task_name(self.task)
        if self.torch_threads < 0:
            raise ConfigError("peer.torch_threads", self.torch_threads, "an integer >= 0 (0: torch's default)")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("peer.log_level", self.log_level, f"one of {LOG_LEVELS}")


@dataclass(frozen=True)
class NetworkConfig:
    """Which swarm to join and how. A private swarm names a `swarm_key` file (libp2p pnet); a public one does not.
    `bootstrap` is empty only on a swarm's first peer."""

    swarm_id: str = "swarmgrad"
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/7400",)
    bootstrap: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()
    """Dialable /ip4/<address>/tcp/<port> addresses to advertise instead of the listen addresses (behind a port
    mapping, or to choose among several interfaces); empty: the listen addresses, 0.0.0.0 expanded into this host's
    interface addresses."""
    swarm_key: Path | None = None
    dial_timeout_s: float = 10.0
    """Bound on dialling one bootstrap peer (handshake included): a wrong swarm key fails after this long."""
    bootstrap_attempts: int = 3
    """Rounds of dialling the bootstrap peers before giving up: raise it where peers may start before their
    bootstrap peer listens (a Kubernetes StatefulSet with parallel pod start)."""
    bootstrap_retry_s: float = 1.0
    """Pause between two rounds of bootstrap dials."""
    min_peers: int = 0
    """Wait until this many other peers are live before the first round (bounded by `min_peers_timeout_s`)."""
    min_peers_timeout_s: float = 60.0
    stream_idle_timeout_s: float = HostConfig.stream_idle_timeout_s
    """An inbound stream on which no byte arrives for this long is reset (`p2p.host.HostConfig`)."""
    # the per-IP limits of a public swarm; their defaults, and why, are `p2p.limits.IpLimitsConfig`'s
    max_new_identities_per_minute: int = IpLimitsConfig.max_new_identities_per_minute
    max_offending_identities_per_minute: int = IpLimitsConfig.max_offending_identities_per_minute
    max_inbound_connections_per_ip: int = IpLimitsConfig.max_inbound_connections_per_ip
    max_inbound_streams_per_ip: int = IpLimitsConfig.max_inbound_streams_per_ip
    ip_ban_duration_s: float = IpLimitsConfig.ip_ban_duration_s

    def ip_limits_config(self) -> IpLimitsConfig:
        """The per-IP limits as `p2p.limits.IpLimitsConfig` (validated)."""
        return IpLimitsConfig(
            max_new_identities_per_minute=self.max_new_identities_per_minute,
            max_offending_identities_per_minute=self.max_offending_identities_per_minute,
            max_inbound_connections_per_ip=self.max_inbound_connections_per_ip,
            max_inbound_streams_per_ip=self.max_inbound_streams_per_ip,
            ip_ban_duration_s=self.ip_ban_duration_s,
        )

    def __post_init__(self) -> None:
        try:
            validate_swarm_id(self.swarm_id)
        except ConfigError as exc:
            raise ConfigError("network.swarm_id", self.swarm_id, exc.expected) from exc
        if not self.listen:
            raise ConfigError("network.listen", self.listen, "at least one multiaddr")
        for text in self.listen:
            check_listen_addr("network.listen", text)
        for text in self.announce:
            check_announce_addr("network.announce", text)
        for text in self.bootstrap:
            parse_peer_addr("network.bootstrap", text)
        if not 0 < self.dial_timeout_s < float("inf"):
            raise ConfigError("network.dial_timeout_s", self.dial_timeout_s, "a finite number of seconds > 0")
        if self.bootstrap_attempts < 1:
            raise ConfigError("network.bootstrap_attempts", self.bootstrap_attempts, "an integer >= 1")
        if not 0 < self.bootstrap_retry_s < float("inf"):
            raise ConfigError("network.bootstrap_retry_s", self.bootstrap_retry_s, "a finite number of seconds > 0")
        if self.min_peers < 0:
            raise ConfigError("network.min_peers", self.min_peers, "an integer >= 0")
        if not 0 < self.min_peers_timeout_s < float("inf"):
            raise ConfigError("network.min_peers_timeout_s", self.min_peers_timeout_s, "a finite number of seconds > 0")
        if not 0 < self.stream_idle_timeout_s < float("inf"):
            raise ConfigError(
                "network.stream_idle_timeout_s", self.stream_idle_timeout_s, "a finite number of seconds > 0"
            )
        try:
            self.ip_limits_config()
        except ConfigError as exc:
            raise ConfigError(f"network.{exc.field}", exc.value, exc.expected) from exc


@dataclass(frozen=True)
class CheckpointConfig:
    """How many checkpoints to keep, and how a peer that starts without one fetches the model from a neighbour."""

    keep: int = 3
    max_bytes: int = 256 * 1024 * 1024
    """Largest checkpoint body accepted, from disk or from a peer; checked before anything is allocated."""
    fetch_from_peers: bool = True
    """A peer with no checkpoint of its own asks a neighbour for the current model before training."""
    fetch_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ConfigError("checkpoint.keep", self.keep, "an integer >= 1")
        if self.max_bytes < 1024:
            raise ConfigError("checkpoint.max_bytes", self.max_bytes, "an integer >= 1024")
        if not 0 < self.fetch_timeout_s < float("inf"):
            raise ConfigError("checkpoint.fetch_timeout_s", self.fetch_timeout_s, "a finite number of seconds > 0")


@dataclass(frozen=True)
class GossipSettings:
    """The user-tunable part of `gossip.round.GossipConfig` (the peer adds the swarm id and its seed). Every
    member of a swarm must use the same `density` and `value_format`."""

    density: float = 0.01
    round_deadline_s: float = 1.0
    neighbours_per_round: int = 3
    step_size: float = 0.5
    aggregation: str = "clipped"
    error_feedback: bool = True
    value_format: str = "fp16"

    def __post_init__(self) -> None:
        try:
            self.gossip_config(swarm_id="validation", seed=0)
        except ConfigError as exc:
            raise ConfigError(f"gossip.{exc.field}", exc.value, exc.expected) from exc

    def gossip_config(self, *, swarm_id: str, seed: int) -> GossipConfig:
        return GossipConfig(swarm_id=swarm_id, seed=seed, **dataclasses.asdict(self))


@dataclass(frozen=True)
class MetricsConfig:
    """Progress display and the optional Prometheus endpoint (off while `prometheus_port` is 0)."""

    prometheus_port: int = 0
    prometheus_host: str = "127.0.0.1"
    progress: Literal["auto", "tty", "plain"] = "auto"
    """`auto`: a live status line on a terminal, plain log lines otherwise."""

    def __post_init__(self) -> None:
        if not 0 <= self.prometheus_port <= 65535:
            raise ConfigError("metrics.prometheus_port", self.prometheus_port, "a TCP port 1-65535, or 0 for off")
        if self.progress not in ("auto", "tty", "plain"):
            raise ConfigError("metrics.progress", self.progress, "'auto', 'tty' or 'plain'")


@dataclass(frozen=True)
class PeerConfig:
    """The whole configuration of one peer: one validated section per component."""

    peer: PeerSection = field(default_factory=PeerSection)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    training: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    gossip: GossipSettings = field(default_factory=GossipSettings)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def training_settings(self) -> dict[str, object]:
        """What peers must agree on to average meaningfully: hashed into every checkpoint's `config_hash`."""
        return {
            "task": self.peer.task,
            "training": dataclasses.asdict(self.training),
            "gossip": dataclasses.asdict(self.gossip),
        }


# ---- loading ------------------------------------------------------------------------------------------------------


def _convert(path: str, value: object, hint: Any) -> object:
    """Check one TOML value against a field's type and convert it (list -> tuple, str -> Path, int -> float)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(path, value, options[0])
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(path, value, f"one of {list(typing.get_args(hint))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(path, value, "a list")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_convert(path, v, item) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, value, "a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "a string")
        return value
    if hint is Path:
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(path, value, "a path")
        return Path(value)
    raise ConfigError(path, value, f"a value of type {hint}")


def _build(cls: type, table: object, path: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(path, table, "a table")
    hints = field_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(table) - known):
        where = f"{path}.{key}" if path else key
        raise ConfigError(where, table[key], f"a known key (one of {', '.join(sorted(known))})")
    kwargs = {}
    for name in sorted(table):
        where = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, table[name], where)  # type: ignore[arg-type]
        else:
            kwargs[name] = _convert(where, table[name], hint)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if path and not exc.field.startswith(f"{path}."):
            raise ConfigError(f"{path}.{exc.field}", exc.value, exc.expected) from exc
        raise


def _set_dotted(table: dict[str, Any], dotted: str, value: object) -> None:
    section, _, key = dotted.partition(".")
    if not key or "." in key:
        raise ConfigError(dotted, value, "a key of the form section.key")
    target = table.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(section, target, "a table")
    target[key] = value


def parse_override(text: str) -> tuple[str, object]:
    """Parse a `--set section.key=VALUE` flag; VALUE is read as TOML (`2`, `0.5`, `true`, `["a", "b"]`), and as a
    plain string when it is not valid TOML (`digits`)."""
    dotted, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError("--set", text, "section.key=VALUE")
    try:
        value: object = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return dotted.strip(), value


def load_config(path: Path | None, overrides: Mapping[str, object] | None = None) -> PeerConfig:
    """Read the TOML file at `path` (or start from the defaults), apply `overrides` (dotted keys), validate.
    Raises `ConfigError` naming the field; an unreadable file is a `ConfigError` on `config`."""
    table: dict[str, Any] = {}
    if path is not None:
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError("config", str(path), f"a readable file ({exc.strerror})") from exc
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("config", str(path), f"a valid TOML file ({exc})") from exc
    for dotted, value in sorted((overrides or {}).items()):
        _set_dotted(table, dotted, value)
    config: PeerConfig = _build(PeerConfig, table, "")
    return config
