"""`PeerConfig`: everything `swarmgrad peer` is configured with, loaded from TOML and overridden from the CLI.

One frozen, validated dataclass per component (`PeerSection`, `NetworkConfig`, `LoopConfig`, `CheckpointConfig`,
`GossipSettings`, `MetricsConfig`), composed into `PeerConfig`; each TOML table is one of them:

    [peer]        task, data_dir, log_level, torch_threads
    [network]     swarm_id, listen, bootstrap, announce, swarm_key, max_peers, connect_timeout_s,
                  handshake_timeout_s, bootstrap_attempts, bootstrap_retry_s, min_peers, min_peers_timeout_s,
                  stream_idle_timeout_s, and the per-IP limits max_new_identities_per_minute,
                  max_offending_identities_per_minute, max_inbound_connections_per_ip,
                  max_inbound_streams_per_ip, ip_ban_duration_s (p2p.limits)   (swarmgrad.netconfig)
    [training]    inner_steps, epoch_rounds, eval_every_rounds, max_rounds      (training.loop.LoopConfig)
    [checkpoint]  keep, max_bytes, fetch_from_peers, fetch_timeout_s
    [gossip]      density, round_deadline_s, neighbours_per_round, step_size, aggregation, ...
    [metrics]     prometheus_port, prometheus_host, progress
    [consensus]   enabled, founders, tolerance, sample_chunks, propose_timeout_s, vote_timeout_s,
                  timeout_increase_s, sample_timeout_s, body_timeout_s, public, drop_after_missed

An unknown table or key, a value of the wrong type, or a value out of range is a `ConfigError` whose field is the
dotted path (`training.inner_steps`). CLI flags arrive as the same dotted paths (`load_config(path, overrides)`).
`[network]`, the loader and the flags every swarm member shares live in `swarmgrad.netconfig`, which imports no torch
(`swarmgrad node` loads the same file through it); this module adds the tables of a training peer. It reads the
config file it is given and nothing else; it opens no sockets and starts nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from consensus.agreement import AgreementConfig
from consensus.chunks import DEFAULT_SAMPLE_COUNT, DEFAULT_TOLERANCE, MAX_CHUNKS_PER_REQUEST
from consensus.membership import MembershipPolicy
from gossip.round import GossipConfig
from p2p.identity import public_key_of_peer_id
from swarmgrad.core.errors import ConfigError
from swarmgrad.netconfig import (
    DEFAULT_DATA_DIR,
    NetworkConfig,
    build_section,
    parse_override,
    read_config_table,
)
from training.loop import LoopConfig
from training.tasks import resolve_task_name

__all__ = [
    "LOG_LEVELS",
    "CheckpointConfig",
    "ConsensusConfig",
    "GossipSettings",
    "MetricsConfig",
    "NetworkConfig",
    "PeerConfig",
    "PeerSection",
    "load_config",
    "parse_override",
]

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class PeerSection:
    """Who this peer is and what it trains. `data_dir` holds `identity.key`, `checkpoints/` and `peer.log`."""

    task: str = "digits"
    data_dir: Path = DEFAULT_DATA_DIR
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
class ConsensusConfig:
    """Epoch consensus (docs/consensus.md). `founders`: the peer ids that vote in epoch 1; empty means the peers
    named in `network.bootstrap`, or this peer alone when it has none (see docs/consensus.md, "Genesis in the
    peer"). Every peer of a swarm must use the same founders, `tolerance` and `public`."""

    enabled: bool = True
    founders: tuple[str, ...] = ()
    tolerance: float = DEFAULT_TOLERANCE
    """Largest relative distance of a sampled chunk of a proposal from this peer's own parameters."""
    sample_chunks: int = DEFAULT_SAMPLE_COUNT
    propose_timeout_s: float = 1.0
    vote_timeout_s: float = 0.5
    timeout_increase_s: float = 0.5
    sample_timeout_s: float = 2.0
    body_timeout_s: float = 5.0
    public: bool = False
    """A public swarm admits at most max(1, n // 32) new voters an epoch (the admission bound)."""
    drop_after_missed: int = 3
    join_timeout_s: float = 5.0
    """How long a joiner waits for one neighbour's answer to one page of its chain (docs/consensus.md, "Joining from
    certified state")."""
    trust_epoch: str = ""
    """A certificate's value hash (64 hex digits) a joiner trusts: offered chains are verified from it instead of from
    genesis (`--trust-epoch`)."""
    pending_epoch_wait_s: float = 10.0
    """At `training.max_rounds`, how long the peer stays (consensus running, training done) for the epoch it
    checkpointed last to be certified before it leaves; 0: leave at once. Not waited on SIGINT/SIGTERM."""
    test_poison_proposals: bool = False
    """TEST ONLY, hostile: hand consensus the sign-flipped parameters at each boundary (training is unchanged),
    so that this peer proposes a poisoned checkpoint. tests/test_certified.py shows honest voters refuse it."""
    test_forge_offers: str = ""
    """TEST ONLY, hostile: serve joiners a forged offer, "certificate" (the served body's certificate with a signature
    altered) or "body" (chunks of another body under the certified root). tests/test_certified_join.py shows a joiner
    refuses it and asks the next neighbour."""

    def __post_init__(self) -> None:
        for index, founder in enumerate(self.founders):
            try:
                public_key_of_peer_id(founder)
            except ValueError as exc:
                raise ConfigError(f"consensus.founders[{index}]", founder, f"an Ed25519 peer id ({exc})") from exc
        if not 0 <= self.tolerance < float("inf"):
            raise ConfigError("consensus.tolerance", self.tolerance, "a finite number >= 0")
        if not 1 <= self.sample_chunks <= MAX_CHUNKS_PER_REQUEST:
            raise ConfigError("consensus.sample_chunks", self.sample_chunks, f"an integer 1-{MAX_CHUNKS_PER_REQUEST}")
        if self.trust_epoch and not (len(self.trust_epoch) == 64 and _is_hex(self.trust_epoch)):
            raise ConfigError("consensus.trust_epoch", self.trust_epoch, "a certificate hash of 64 hex digits")
        if self.test_forge_offers not in ("", "certificate", "body"):
            raise ConfigError("consensus.test_forge_offers", self.test_forge_offers, '"", "certificate" or "body"')
        for name in ("sample_timeout_s", "body_timeout_s", "join_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ConfigError(f"consensus.{name}", value, "a finite number of seconds > 0")
        if not 0 <= self.pending_epoch_wait_s < float("inf"):
            raise ConfigError(
                "consensus.pending_epoch_wait_s", self.pending_epoch_wait_s, "a finite number of seconds >= 0"
            )
        self.agreement_config()
        self.policy()

    def agreement_config(self) -> AgreementConfig:
        return AgreementConfig(
            propose_timeout_s=self.propose_timeout_s,
            vote_timeout_s=self.vote_timeout_s,
            timeout_increase_s=self.timeout_increase_s,
        )

    def policy(self) -> MembershipPolicy:
        return MembershipPolicy(public=self.public, drop_after_missed=self.drop_after_missed)

    @property
    def trusted_hash(self) -> bytes | None:
        return bytes.fromhex(self.trust_epoch) if self.trust_epoch else None


def _is_hex(text: str) -> bool:
    return all(char in "0123456789abcdefABCDEF" for char in text)


@dataclass(frozen=True)
class PeerConfig:
    """The whole configuration of one peer: one validated section per component."""

    peer: PeerSection = field(default_factory=PeerSection)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    training: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    gossip: GossipSettings = field(default_factory=GossipSettings)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)

    def training_settings(self) -> dict[str, object]:
        """What peers must agree on to average meaningfully: hashed into every checkpoint's `config_hash`."""
        return {
            "task": self.peer.task,
            "training": dataclasses.asdict(self.training),
            "gossip": dataclasses.asdict(self.gossip),
        }


# ---- loading ------------------------------------------------------------------------------------------------------


def load_config(path: Path | None, overrides: Mapping[str, object] | None = None) -> PeerConfig:
    """Read the TOML file at `path` (or start from the defaults), apply `overrides` (dotted keys), validate.
    Raises `ConfigError` naming the field; an unreadable file is a `ConfigError` on `config`."""
    config: PeerConfig = build_section(PeerConfig, read_config_table(path, overrides), "")
    return config
