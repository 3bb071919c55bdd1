"""Scenarios: what one simulated run is, as validated dataclasses loaded from TOML.

Every section is a frozen dataclass checked at construction; loading checks every key (unknown keys, wrong types)
before that, so a bad file gives one `ConfigError` naming the field (`network.uplink_bytes_per_s`,
`partitions[0].groups`, ...). Peers are named `p0` ... `p{N-1}`. A file looks like:

    [swarm]
    peers = 16
    rounds = 50
    [model]
    dim = 1000
    [network]
    latency_s = 0.05
    uplink_bytes_per_s = 1.25e6
    [[partitions]]
    at_s = 5.0
    heal_at_s = 20.0
    groups = [["p0", "p1"], ["p2", "p3"]]
    [[churn]]
    at_s = 3.0
    peer = "p5"
    kind = "crash"
    [consensus]
    epoch_rounds = 10
    byzantine_peers = ["p3"]
    byzantine_role = "equivocate"

This module only describes runs; `sim.swarm` carries them out.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consensus.agreement import AgreementConfig
from consensus.chunks import DEFAULT_TOLERANCE
from consensus.messages import MAX_MEMBERS
from gossip.round import GossipConfig
from sim.consensus import CONSENSUS_ROLES
from sim.network import NetworkConfig
from sim.peers import BEHAVIOURS
from swarmgrad.core.errors import ConfigError
from training.tasks import resolve_task_name

CHURN_KINDS = ("join", "leave", "crash", "restart")
MODEL_KINDS = ("quadratic", "task")


def _positive(section: str, name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{section}.{name}", value, "a finite number > 0")


def _non_negative(section: str, name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{section}.{name}", value, "a finite number >= 0")


@dataclass(frozen=True)
class SwarmSection:
    """`peers` peers, `absent` of them not present at the start (they arrive by `join` churn); the run ends after
    `rounds` swarm rounds or `max_virtual_s` of virtual time, whichever comes first."""

    peers: int
    rounds: int
    absent: tuple[str, ...] = ()
    max_virtual_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.peers < 1:
            raise ConfigError("swarm.peers", self.peers, ">= 1")
        if self.rounds < 1:
            raise ConfigError("swarm.rounds", self.rounds, ">= 1")
        _positive("swarm", "max_virtual_s", self.max_virtual_s)


@dataclass(frozen=True)
class GossipSection:
    """The `GossipConfig` fields a scenario sets (the rest keep their defaults)."""

    density: float = 0.01
    neighbours_per_round: int = 3
    round_deadline_s: float = 2.0
    step_size: float = 0.5
    aggregation: str = "clipped"
    value_format: str = "fp16"
    error_feedback: bool = True

    def __post_init__(self) -> None:
        self.to_config(0)  # GossipConfig validates; its field names get this section's prefix

    def to_config(self, seed: int) -> GossipConfig:
        try:
            return GossipConfig(swarm_id="sim", seed=seed, **dataclasses.asdict(self))
        except ConfigError as exc:
            raise ConfigError(f"gossip.{exc.field}", exc.value, exc.expected) from exc


@dataclass(frozen=True)
class ModelSection:
    """What the peers train. `kind = "quadratic"`: the cheap model of training, a noisy quadratic: every peer's loss
    is `0.5 * mean((x - x*)^2)` with one common optimum x*; a local step is
    `x -= learning_rate * (x - x* + gradient_noise * N(0, 1))`; peers start at `x* + init_spread * N(0, 1)`, each
    its own draw. `kind = "task"`: the real model, shard, loss and optimizer of the task plug-in `task` (`digits`,
    or `package.module:factory`; see `sim.training`); `dim` then comes from the model and `learning_rate`,
    `gradient_noise` and `init_spread` do not apply. Either way a peer takes `local_steps` steps between rounds."""

    kind: str = "quadratic"
    dim: int = 1000
    learning_rate: float = 0.05
    gradient_noise: float = 0.1
    init_spread: float = 1.0
    local_steps: int = 1
    task: str = ""

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ConfigError("model.kind", self.kind, f"one of {MODEL_KINDS}")
        if (self.kind == "task") != bool(self.task):
            raise ConfigError("model.task", self.task, 'a task name (e.g. "digits") with kind = "task", and only then')
        if self.task:
            try:
                resolve_task_name(self.task)
            except ConfigError as exc:
                raise ConfigError("model.task", self.task, exc.expected) from exc
        if self.dim < 1:
            raise ConfigError("model.dim", self.dim, ">= 1")
        if not 0 <= self.learning_rate <= 1:
            raise ConfigError("model.learning_rate", self.learning_rate, "in [0, 1]")
        _non_negative("model", "gradient_noise", self.gradient_noise)
        _non_negative("model", "init_spread", self.init_spread)
        if self.local_steps < 0:
            raise ConfigError("model.local_steps", self.local_steps, ">= 0")


@dataclass(frozen=True)
class ComputeSection:
    """Virtual seconds per local step at nominal speed; each peer's factor is lognormal with sigma `speed_spread`."""

    step_time_s: float = 0.1
    speed_spread: float = 0.0

    def __post_init__(self) -> None:
        _non_negative("compute", "step_time_s", self.step_time_s)
        _non_negative("compute", "speed_spread", self.speed_spread)


@dataclass(frozen=True)
class ByzantineSection:
    """Which peers are Byzantine and what they gossip (a name in `sim.peers.BEHAVIOURS`)."""

    peers: tuple[str, ...] = ()
    behaviour: str = "sign_flip"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.behaviour not in BEHAVIOURS:
            raise ConfigError("byzantine.behaviour", self.behaviour, f"one of {sorted(BEHAVIOURS)}")
        _non_negative("byzantine", "scale", self.scale)


@dataclass(frozen=True)
class ConsensusSection:
    """Epoch consensus (off while `epoch_rounds` is 0): every `epoch_rounds` gossip rounds the first `members` peers
    (0: all of them, at first) decide one checkpoint with the real `EpochChain`, checking proposals by sampled chunks
    within `tolerance`; `byzantine_peers` (members) take `byzantine_role` (one of `sim.consensus.CONSENSUS_ROLES`).
    The timeouts are `consensus.agreement.AgreementConfig`'s."""

    epoch_rounds: int = 0
    members: int = 0
    byzantine_peers: tuple[str, ...] = ()
    byzantine_role: str = "equivocate"
    tolerance: float = DEFAULT_TOLERANCE
    propose_timeout_s: float = 1.0
    vote_timeout_s: float = 0.5
    timeout_increase_s: float = 0.5

    def __post_init__(self) -> None:
        if self.epoch_rounds < 0:
            raise ConfigError("consensus.epoch_rounds", self.epoch_rounds, ">= 0 (0: no consensus)")
        if not 0 <= self.members <= MAX_MEMBERS:
            raise ConfigError("consensus.members", self.members, f"in [0, {MAX_MEMBERS}] (0: every peer)")
        if self.byzantine_role not in CONSENSUS_ROLES:
            raise ConfigError("consensus.byzantine_role", self.byzantine_role, f"one of {CONSENSUS_ROLES}")
        _non_negative("consensus", "tolerance", self.tolerance)
        self.agreement_config()

    def agreement_config(self) -> AgreementConfig:
        return AgreementConfig(
            propose_timeout_s=self.propose_timeout_s,
            vote_timeout_s=self.vote_timeout_s,
            timeout_increase_s=self.timeout_increase_s,
        )

    def member_names(self, peers: int) -> list[str]:
        return [f"p{i}" for i in range(self.members or min(peers, MAX_MEMBERS))]


@dataclass(frozen=True)
class PartitionSection:
    """From `at_s` (to `heal_at_s`, if set) every link between two of `groups` is blocked."""

    at_s: float
    groups: tuple[tuple[str, ...], ...]
    heal_at_s: float | None = None

    def __post_init__(self) -> None:
        _non_negative("partitions", "at_s", self.at_s)
        if len(self.groups) < 2:
            raise ConfigError("partitions.groups", self.groups, "at least two groups of peers")
        if self.heal_at_s is not None and not self.heal_at_s > self.at_s:
            raise ConfigError("partitions.heal_at_s", self.heal_at_s, f"after at_s ({self.at_s})")


@dataclass(frozen=True)
class ChurnSection:
    """At `at_s`, `peer` joins, leaves (the others learn at once), crashes (they learn `detect_s` later) or
    restarts (with its parameters if `keep_state`, else from a fresh start). A joiner starts fresh."""

    at_s: float
    peer: str
    kind: str
    keep_state: bool = True
    detect_s: float = 1.0

    def __post_init__(self) -> None:
        _non_negative("churn", "at_s", self.at_s)
        if self.kind not in CHURN_KINDS:
            raise ConfigError("churn.kind", self.kind, f"one of {CHURN_KINDS}")
        _non_negative("churn", "detect_s", self.detect_s)


@dataclass(frozen=True)
class Scenario:
    swarm: SwarmSection
    gossip: GossipSection = field(default_factory=GossipSection)
    model: ModelSection = field(default_factory=ModelSection)
    compute: ComputeSection = field(default_factory=ComputeSection)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    byzantine: ByzantineSection = field(default_factory=ByzantineSection)
    consensus: ConsensusSection = field(default_factory=ConsensusSection)
    partitions: tuple[PartitionSection, ...] = ()
    churn: tuple[ChurnSection, ...] = ()

    def __post_init__(self) -> None:
        names = set(self.peer_names)
        for where, named in [("swarm.absent", self.swarm.absent), ("byzantine.peers", self.byzantine.peers)]:
            self._check_peers(where, named, names)
        for i, partition in enumerate(self.partitions):
            self._check_peers(f"partitions[{i}].groups", [p for g in partition.groups for p in g], names)
        for i, event in enumerate(self.churn):
            self._check_peers(f"churn[{i}].peer", [event.peer], names)
        if self.consensus.members > self.swarm.peers:
            raise ConfigError("consensus.members", self.consensus.members, f"<= swarm.peers ({self.swarm.peers})")
        members = set(self.consensus.member_names(self.swarm.peers))
        for peer in self.consensus.byzantine_peers:
            if peer not in members:
                raise ConfigError("consensus.byzantine_peers", peer, f"a member (p0 ... p{len(members) - 1})")
        if self.network.regions and not self.network.region_latency_s:
            raise ConfigError("network.region_latency_s", (), "a latency matrix for the regions")

    @staticmethod
    def _check_peers(where: str, named: typing.Iterable[str], names: set[str]) -> None:
        for peer in named:
            if peer not in names:
                raise ConfigError(where, peer, f"a peer of the swarm (p0 ... p{len(names) - 1})")

    @property
    def peer_names(self) -> list[str]:
        return [f"p{i}" for i in range(self.swarm.peers)]


# ---- loading ------------------------------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "swarm": SwarmSection,
    "gossip": GossipSection,
    "model": ModelSection,
    "compute": ComputeSection,
    "network": NetworkConfig,
    "byzantine": ByzantineSection,
    "consensus": ConsensusSection,
}
_LISTS: dict[str, type] = {"partitions": PartitionSection, "churn": ChurnSection}


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; raises `ConfigError` naming the first bad field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("scenario", str(path), f"valid TOML ({exc})") from exc
    return scenario_from_dict(data)


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    for key in data:
        if key not in _SECTIONS and key not in _LISTS:
            raise ConfigError(key, data[key], f"a known section: one of {sorted([*_SECTIONS, *_LISTS])}")
    if "swarm" not in data:
        raise ConfigError("swarm", None, "a [swarm] section with peers and rounds")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in data:
            kwargs[name] = _build(cls, _table(data[name], name), name)
    for name, cls in _LISTS.items():
        if name in data:
            entries = data[name]
            if not isinstance(entries, list):
                raise ConfigError(name, entries, f"an array of tables ([[{name}]])")
            kwargs[name] = tuple(_build(cls, _table(e, f"{name}[{i}]"), f"{name}[{i}]") for i, e in enumerate(entries))
    return Scenario(**kwargs)


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(where, value, "a table")
    return value


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """`cls(**table)` after checking every key and type; errors name `where.key`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{where}.{key}", value, f"a known key of [{where}]: one of {sorted(fields)}")
        values[key] = _convert(value, hints[key], f"{where}.{key}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in table and _required(f)]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}", None, "set (it has no default)")
    try:
        return cls(**values)
    except ConfigError as exc:
        # sections name their fields by section; entries of a list are named by position
        if where.endswith("]") and exc.field.startswith(where.split("[")[0] + "."):
            raise ConfigError(where + exc.field[len(where.split("[")[0]) :], exc.value, exc.expected) from exc
        raise


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(value: object, hint: Any, where: str) -> object:
    """`value` as the annotation `hint` wants it (TOML arrays become tuples), or `ConfigError`."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(value, inner, where)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(where, value, "an array")
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(where, value, "a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, value, "an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, value, "true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(where, value, "a string")
        return value
    raise ConfigError(where, value, f"a value of type {hint}")
