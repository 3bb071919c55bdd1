"""What every swarm member is configured with, shared by `swarmgrad node` and `swarmgrad peer`: the `[network]`
table (`NetworkConfig`), the data directory, the command-line flags that set them, and the TOML / `--set` loading
every table of the config goes through.

The network flags are defined once, here (`add_network_arguments`), and map to dotted config keys in one table
(`network_overrides`), so both subcommands accept the same `--config FILE`, `--set section.key=VALUE`, `--json`,
`--data-dir`, `--swarm-id`, `--swarm-key`, `--listen`, `--bootstrap`, `--announce`, `--max-peers`,
`--bootstrap-attempts` and `--bootstrap-retry-s`, with the same meaning and the same defaults.
`NetworkConfig.node_config` turns a validated `[network]` table into the `p2p.node.NodeConfig` both run.

This module imports neither torch nor the training stack (`swarmgrad node` and `swarmgrad id` load their config
through `load_member_config` without paying for them); `swarmgrad.config` builds the peer's other tables with the
same loader. It reads the config file it is given and nothing else; it opens no sockets and starts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from p2p.addrs import check_announce_addr, check_listen_addr, parse_peer_addr
from p2p.discovery import DiscoveryConfig
from p2p.hole_punch import HolePunchConfig
from p2p.host import HostConfig
from p2p.identity import load_or_create_identity, peer_id_of
from p2p.limits import IpLimitsConfig
from p2p.membership import MembershipConfig
from p2p.node import NodeConfig
from p2p.reachability import REACHABILITY_SETTINGS, ReachabilityConfig, ReachabilitySetting
from p2p.relay import RelayServiceConfig
from p2p.swarm import load_swarm_key
from swarmgrad.core.codec import field_hints
from swarmgrad.core.errors import ConfigError
from swarmgrad.core.swarm_id import validate_swarm_id

DEFAULT_DATA_DIR = Path.home() / ".swarmgrad"
IDENTITY_FILE = "identity.key"
CONFIG_TABLES = ("peer", "network", "training", "checkpoint", "gossip", "metrics", "consensus")
"""The tables of a config file (`swarmgrad.config.PeerConfig`'s sections); `swarmgrad node` reads `[network]` and
`peer.data_dir` and leaves the others, which only a training peer uses, to `swarmgrad peer`."""


@dataclass(frozen=True)
class NetworkConfig:
    """Which swarm to join and how. A private swarm names a `swarm_key` file (libp2p pnet); a public one does not.
    `bootstrap` is empty only on a swarm's first peer. Each timeout's default is the one of the component that
    applies it (`p2p.host.HostConfig`, `p2p.discovery.DiscoveryConfig`, ...), imported, never restated."""

    swarm_id: str = "swarmgrad"
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/7400",)
    bootstrap: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()
    """Dialable /ip4/<address>/tcp/<port> addresses to advertise instead of the listen addresses (behind a port
    mapping, or to choose among several interfaces); empty: the listen addresses, 0.0.0.0 expanded into this host's
    interface addresses."""
    swarm_key: Path | None = None
    max_peers: int = MembershipConfig.max_peers
    """Bound on the live peer set."""
    connect_timeout_s: float = HostConfig.connect_timeout_s
    """Bound on the TCP connect of one dial (a slow or distant link)."""
    handshake_timeout_s: float = HostConfig.handshake_timeout_s
    """Bound on the handshake once TCP is up (pnet, Noise, yamux): a peer with another swarm key never completes
    it, so a wrong key is reported after this long per attempt, with a message naming the key."""
    bootstrap_attempts: int = DiscoveryConfig.bootstrap_attempts
    """Rounds of dialling the bootstrap peers before giving up: raise it where peers may start before their
    bootstrap peer listens (a Kubernetes StatefulSet with parallel pod start)."""
    bootstrap_retry_s: float = DiscoveryConfig.bootstrap_retry_s
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
    reachability: ReachabilitySetting = "auto"
    """Whether other peers can dial this host: "public", "private" (behind NAT or a firewall), or "auto" to leave
    the verdict to the node (`p2p.reachability`)."""
    # the dial-back check of "auto"; defaults and meaning: `p2p.reachability.ReachabilityConfig`
    reachability_recheck_s: float = ReachabilityConfig.recheck_s
    reachability_retry_s: float = ReachabilityConfig.retry_s
    dialback_timeout_s: float = ReachabilityConfig.dial_timeout_s
    # what a public peer relays for private ones; their defaults, and why, are `p2p.relay.RelayServiceConfig`'s
    relay_max_reservations: int = RelayServiceConfig.max_reservations
    relay_max_circuits_per_peer: int = RelayServiceConfig.max_circuits_per_peer
    relay_max_circuit_bytes: int = RelayServiceConfig.max_circuit_bytes
    relay_max_circuit_duration_s: int = RelayServiceConfig.max_circuit_duration_s
    relay_reservation_ttl_s: int = RelayServiceConfig.reservation_ttl_s
    # when, and how patiently, a relayed peer is punched; defaults and meaning: `p2p.hole_punch.HolePunchConfig`
    hole_punch_max_attempts: int = HolePunchConfig.max_attempts
    """0 turns hole punching off: this peer starts no punch (it still answers one)."""
    hole_punch_first_delay_s: float = HolePunchConfig.first_delay_s
    hole_punch_retry_base_s: float = HolePunchConfig.retry_base_s
    hole_punch_retry_max_s: float = HolePunchConfig.retry_max_s
    hole_punch_jitter: float = HolePunchConfig.jitter
    hole_punch_timeout_s: float = HolePunchConfig.punch_timeout_s
    hole_punch_relay_close_grace_s: float = HolePunchConfig.relay_close_grace_s

    def dialback_config(self) -> ReachabilityConfig:
        """The dial-back check as `p2p.reachability.ReachabilityConfig` (validated); a server's answer is awaited
        for twice its dial bound plus 5 s."""
        return ReachabilityConfig(
            recheck_s=self.reachability_recheck_s,
            retry_s=self.reachability_retry_s,
            dial_timeout_s=self.dialback_timeout_s,
            answer_timeout_s=2 * self.dialback_timeout_s + 5.0,
            serve_interval_s=min(ReachabilityConfig.serve_interval_s, self.reachability_retry_s),
        )

    def relay_config(self) -> RelayServiceConfig:
        """The relay limits as `p2p.relay.RelayServiceConfig` (validated)."""
        return RelayServiceConfig(
            max_reservations=self.relay_max_reservations,
            max_circuits_per_peer=self.relay_max_circuits_per_peer,
            max_circuit_bytes=self.relay_max_circuit_bytes,
            max_circuit_duration_s=self.relay_max_circuit_duration_s,
            reservation_ttl_s=self.relay_reservation_ttl_s,
        )

    def hole_punch_config(self) -> HolePunchConfig:
        """The punch schedule as `p2p.hole_punch.HolePunchConfig` (validated)."""
        return HolePunchConfig(
            max_attempts=self.hole_punch_max_attempts,
            first_delay_s=self.hole_punch_first_delay_s,
            retry_base_s=self.hole_punch_retry_base_s,
            retry_max_s=self.hole_punch_retry_max_s,
            jitter=self.hole_punch_jitter,
            punch_timeout_s=self.hole_punch_timeout_s,
            relay_close_grace_s=self.hole_punch_relay_close_grace_s,
        )

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
        if self.max_peers < 1:
            raise ConfigError("network.max_peers", self.max_peers, "an integer >= 1")
        if self.bootstrap_attempts < 1:
            raise ConfigError("network.bootstrap_attempts", self.bootstrap_attempts, "an integer >= 1")
        if self.min_peers < 0:
            raise ConfigError("network.min_peers", self.min_peers, "an integer >= 0")
        if self.reachability not in REACHABILITY_SETTINGS:
            raise ConfigError("network.reachability", self.reachability, " | ".join(REACHABILITY_SETTINGS))
        for name in (
            "connect_timeout_s",
            "handshake_timeout_s",
            "bootstrap_retry_s",
            "min_peers_timeout_s",
            "stream_idle_timeout_s",
        ):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ConfigError(f"network.{name}", value, "a finite number of seconds > 0")
        try:
            self.ip_limits_config()
        except ConfigError as exc:
            raise ConfigError(f"network.{exc.field}", exc.value, exc.expected) from exc
        names = {"recheck_s": "reachability_recheck_s", "retry_s": "reachability_retry_s"}
        try:
            self.dialback_config()
        except ConfigError as exc:
            field_name = names.get(exc.field, "dialback_timeout_s")
            raise ConfigError(f"network.{field_name}", exc.value, exc.expected) from exc
        try:
            self.relay_config()
        except ConfigError as exc:
            raise ConfigError(f"network.relay_{exc.field}", exc.value, exc.expected) from exc
        try:
            self.hole_punch_config()
        except ConfigError as exc:
            field_name = "timeout_s" if exc.field == "punch_timeout_s" else exc.field
            raise ConfigError(f"network.hole_punch_{field_name}", exc.value, exc.expected) from exc

    def node_config(self, key_path: Path, *, seed: int = 0) -> NodeConfig:
        """The `p2p.node.NodeConfig` of a member with the identity at `key_path` (created if missing) and this
        network config. Bootstrap addresses of this member itself are left out (the first pod of a StatefulSet is
        given its own address). Raises `SwarmKeyError` / `IdentityError` naming an unusable file."""
        swarm_key = None if self.swarm_key is None else load_swarm_key(self.swarm_key)
        own = f"/p2p/{peer_id_of(load_or_create_identity(key_path))}"
        return NodeConfig(
            host=HostConfig(
                key_path=key_path,
                listen_addrs=self.listen,
                announce_addrs=self.announce,
                psk=None if swarm_key is None else swarm_key.key,
                connect_timeout_s=self.connect_timeout_s,
                handshake_timeout_s=self.handshake_timeout_s,
                stream_idle_timeout_s=self.stream_idle_timeout_s,
            ),
            discovery=DiscoveryConfig(
                swarm_id=self.swarm_id,
                bootstrap_addrs=tuple(addr for addr in self.bootstrap if not addr.endswith(own)),
                bootstrap_attempts=self.bootstrap_attempts,
                bootstrap_retry_s=self.bootstrap_retry_s,
            ),
            membership=MembershipConfig(max_peers=self.max_peers),
            ip_limits=self.ip_limits_config(),
            seed=seed,
            reachability=self.reachability,
            dialback=self.dialback_config(),
            relay=self.relay_config(),
            hole_punch=self.hole_punch_config(),
        )


@dataclass(frozen=True)
class MemberConfig:
    """What a member that does not train (`swarmgrad node`, `swarmgrad id`) reads of a config file."""

    data_dir: Path = DEFAULT_DATA_DIR
    network: NetworkConfig = field(default_factory=NetworkConfig)

    @property
    def key_path(self) -> Path:
        return self.data_dir / IDENTITY_FILE


# ---- the shared flags ---------------------------------------------------------------------------------------------


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every swarm member (`swarmgrad node`, `swarmgrad peer`, `swarmgrad id`): the config file, `--set`,
    `--json`, and the flags of the data directory and the `[network]` table. Each flag only overrides the config
    when given (`network_overrides`); the defaults are the config's."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any config value, e.g. network.handshake_timeout_s=3 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per line on stdout")
    parser.add_argument(
        "--data-dir", type=Path, help=f"identity ({IDENTITY_FILE}) and state live here; default {DEFAULT_DATA_DIR}"
    )
    parser.add_argument("--swarm-id", help="the swarm's name: a-z, 0-9, '.', '_', '-' (network.swarm_id)")
    parser.add_argument(
        "--swarm-key",
        type=Path,
        metavar="FILE",
        help="private swarm key file, see `swarmgrad keygen` (network.swarm_key)",
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="TCP multiaddr to listen on, repeatable; port 0 picks a free port (network.listen)",
    )
    parser.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="a peer of the swarm, /ip4/<ip>/tcp/<port>/p2p/<peer id>, repeatable (network.bootstrap)",
    )
    parser.add_argument(
        "--announce",
        action="append",
        metavar="MULTIADDR",
        help="dialable /ip4/<address>/tcp/<port> to advertise instead of the interface addresses, repeatable: "
        "port mappings, NAT (network.announce)",
    )
    parser.add_argument("--max-peers", type=int, help="bound on the live peer set (network.max_peers)")
    parser.add_argument(
        "--bootstrap-attempts", type=int, help="rounds of bootstrap dials before giving up (network.bootstrap_attempts)"
    )
    parser.add_argument(
        "--bootstrap-retry-s",
        type=float,
        help="pause between two rounds of bootstrap dials (network.bootstrap_retry_s)",
    )


NETWORK_FLAGS = {
    "data_dir": "peer.data_dir",
    "swarm_id": "network.swarm_id",
    "swarm_key": "network.swarm_key",
    "listen": "network.listen",
    "bootstrap": "network.bootstrap",
    "announce": "network.announce",
    "max_peers": "network.max_peers",
    "bootstrap_attempts": "network.bootstrap_attempts",
    "bootstrap_retry_s": "network.bootstrap_retry_s",
}
"""The attribute of each flag of `add_network_arguments` -> the dotted config key it overrides."""


def network_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The `--set` values, then the network flags that were given, as dotted config keys. Raises `ConfigError`
    for a malformed `--set`."""
    overrides: dict[str, object] = dict(parse_override(text) for text in args.set)
    for attribute, dotted in NETWORK_FLAGS.items():
        value = getattr(args, attribute)
        if value is not None:
            overrides[dotted] = str(value) if isinstance(value, Path) else value
    return overrides


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


def build_section(cls: type, table: object, path: str) -> Any:
    """The dataclass `cls` from a TOML table found at dotted `path` ("" for the whole file): every key known and
    of the field's type, nested dataclasses built the same way. Raises `ConfigError` naming the dotted field."""
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
            kwargs[name] = build_section(hint, table[name], where)  # type: ignore[arg-type]
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


def read_config_table(path: Path | None, overrides: Mapping[str, object] | None = None) -> dict[str, Any]:
    """The TOML file at `path` (or an empty table) with `overrides` (dotted keys) applied; not yet validated. An
    unreadable or malformed file is a `ConfigError` on `config`."""
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
    return table


def load_member_config(path: Path | None, overrides: Mapping[str, object] | None = None) -> MemberConfig:
    """`[network]` and `peer.data_dir` of the config file at `path` (or the defaults) with `overrides` applied,
    validated like `swarmgrad.config.load_config` validates them. An unknown table is an error; the keys of the
    tables only a training peer uses are not checked here. Raises `ConfigError` naming the field."""
    table = read_config_table(path, overrides)
    for name in sorted(set(table) - set(CONFIG_TABLES)):
        raise ConfigError(name, table[name], f"a known table (one of {', '.join(sorted(CONFIG_TABLES))})")
    peer = table.get("peer", {})
    if not isinstance(peer, Mapping):
        raise ConfigError("peer", peer, "a table")
    data_dir = DEFAULT_DATA_DIR if "data_dir" not in peer else _convert("peer.data_dir", peer["data_dir"], Path)
    network: NetworkConfig = build_section(NetworkConfig, table.get("network", {}), "network")
    return MemberConfig(data_dir=Path(str(data_dir)), network=network)
