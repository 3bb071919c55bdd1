"""PeerConfig: TOML loading, CLI overrides, and errors that name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from p2p.discovery import DiscoveryConfig
from p2p.hole_punch import HolePunchConfig
from p2p.host import HostConfig
from p2p.membership import MembershipConfig
from swarmgrad.config import LOG_LEVELS, PeerConfig, load_config, parse_override
from swarmgrad.core.errors import ConfigError
from swarmgrad.netconfig import CONFIG_TABLES, load_member_config

BOOTSTRAP = "/ip4/127.0.0.1/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"

FULL = f"""
[peer]
task = "charlm"
data_dir = "/var/lib/swarmgrad"
log_level = "debug"

[network]
swarm_id = "lab-7"
listen = ["/ip4/0.0.0.0/tcp/4101"]
bootstrap = ["{BOOTSTRAP}"]
swarm_key = "/etc/swarmgrad/swarm.key"
connect_timeout_s = 20
handshake_timeout_s = 3

[training]
inner_steps = 2
epoch_rounds = 100
eval_every_rounds = 5
max_rounds = 1000

[checkpoint]
keep = 5
fetch_from_peers = false

[gossip]
density = 0.05
round_deadline_s = 2.5

[metrics]
prometheus_port = 9100
progress = "plain"
"""


def test_defaults_are_valid() -> None:
    config = load_config(None)
    assert config == PeerConfig()
    assert config.peer.task == "digits" and config.network.bootstrap == () and config.metrics.prometheus_port == 0
    assert config.metrics.prometheus_host == "127.0.0.1"


def test_full_file_round_trips_into_typed_sections(tmp_path: Path) -> None:
    path = tmp_path / "peer.toml"
    path.write_text(FULL)
    config = load_config(path)
    assert config.peer.task == "charlm" and config.peer.data_dir == Path("/var/lib/swarmgrad")
    assert config.network.listen == ("/ip4/0.0.0.0/tcp/4101",) and config.network.bootstrap == (BOOTSTRAP,)
    assert config.network.swarm_key == Path("/etc/swarmgrad/swarm.key")
    assert config.network.handshake_timeout_s == 3.0 and isinstance(config.network.handshake_timeout_s, float)
    assert config.network.connect_timeout_s == 20.0
    assert config.training.inner_steps == 2 and config.training.max_rounds == 1000
    assert config.checkpoint.keep == 5 and config.checkpoint.fetch_from_peers is False
    assert config.gossip.density == 0.05
    gossip = config.gossip.gossip_config(swarm_id="lab-7", seed=3)
    assert gossip.density == 0.05 and gossip.swarm_id == "lab-7" and gossip.seed == 3
    assert config.metrics.prometheus_port == 9100 and config.metrics.progress == "plain"


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.toml"
    path.write_text(FULL)
    config = load_config(path, {"training.max_rounds": 7, "network.bootstrap": [], "peer.task": "digits"})
    assert config.training.max_rounds == 7 and config.network.bootstrap == () and config.peer.task == "digits"
    assert config.training.inner_steps == 2  # untouched keys keep the file's values


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("training.inner_steps=3", ("training.inner_steps", 3)),
        ("gossip.density=0.1", ("gossip.density", 0.1)),
        ("checkpoint.fetch_from_peers=false", ("checkpoint.fetch_from_peers", False)),
        ("peer.task=digits", ("peer.task", "digits")),
        ('network.listen=["/ip4/0.0.0.0/tcp/1"]', ("network.listen", ["/ip4/0.0.0.0/tcp/1"])),
    ],
)
def test_set_flags_parse_as_toml_values(text: str, expected: tuple[str, object]) -> None:
    assert parse_override(text) == expected


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"training.bogus": 1}, "training.bogus"),
        ({"nosection.key": 1}, "nosection"),
        ({"training.inner_steps": 0}, "training.inner_steps"),
        ({"training.inner_steps": "2"}, "training.inner_steps"),
        ({"training.inner_steps": True}, "training.inner_steps"),
        ({"gossip.density": 1.5}, "gossip.density"),
        ({"gossip.aggregation": "median-of-nothing"}, "gossip.aggregation"),
        ({"peer.task": "nosuch"}, "peer.task"),
        ({"peer.log_level": "loud"}, "peer.log_level"),
        ({"network.bootstrap": ["/ip4/1.2.3.4/tcp/1"]}, "network.bootstrap"),
        ({"network.bootstrap": ["not a multiaddr"]}, "network.bootstrap"),
        ({"network.listen": ["/ip4/999.0.0.1/tcp/1"]}, "network.listen"),
        ({"network.listen": []}, "network.listen"),
        ({"network.announce": ["/ip4/192.0.2.7/tcp/1/p2p/x"]}, "network.announce"),
        ({"network.swarm_id": "Bad Id"}, "network.swarm_id"),
        ({"network.bootstrap_attempts": 0}, "network.bootstrap_attempts"),
        ({"network.bootstrap_retry_s": 0}, "network.bootstrap_retry_s"),
        ({"network.handshake_timeout_s": 0}, "network.handshake_timeout_s"),
        ({"network.handshake_timeout_s": float("inf")}, "network.handshake_timeout_s"),
        ({"network.connect_timeout_s": -1}, "network.connect_timeout_s"),
        ({"network.max_peers": 0}, "network.max_peers"),
        ({"network.reachability": "dialable"}, "network.reachability"),
        ({"network.hole_punch_max_attempts": -1}, "network.hole_punch_max_attempts"),
        ({"network.hole_punch_max_attempts": 1.5}, "network.hole_punch_max_attempts"),
        ({"network.hole_punch_first_delay_s": -1}, "network.hole_punch_first_delay_s"),
        ({"network.hole_punch_retry_base_s": 0}, "network.hole_punch_retry_base_s"),
        ({"network.hole_punch_retry_max_s": 1}, "network.hole_punch_retry_max_s"),
        ({"network.hole_punch_jitter": 1}, "network.hole_punch_jitter"),
        ({"network.hole_punch_timeout_s": float("inf")}, "network.hole_punch_timeout_s"),
        ({"network.hole_punch_relay_close_grace_s": float("nan")}, "network.hole_punch_relay_close_grace_s"),
        ({"checkpoint.keep": 0}, "checkpoint.keep"),
        ({"metrics.prometheus_port": 70000}, "metrics.prometheus_port"),
        ({"metrics.progress": "fancy"}, "metrics.progress"),
        ({"training": 3}, "training"),
        ({"consensus.founders": ["not-a-peer-id"]}, "consensus.founders[0]"),
        ({"consensus.tolerance": -0.1}, "consensus.tolerance"),
        ({"consensus.sample_chunks": 65}, "consensus.sample_chunks"),
        ({"consensus.vote_timeout_s": 0}, "consensus.vote_timeout_s"),
        ({"consensus.body_timeout_s": float("inf")}, "consensus.body_timeout_s"),
        ({"consensus.drop_after_missed": 0}, "consensus.drop_after_missed"),
        ({"consensus.pending_epoch_wait_s": -1}, "consensus.pending_epoch_wait_s"),
        ({"consensus.pending_epoch_wait_s": float("nan")}, "consensus.pending_epoch_wait_s"),
        ({"consensus.enabled": "yes"}, "consensus.enabled"),
    ],
)
def test_bad_values_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.field == field, str(info.value)


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "peer.toml"
    path.write_text("[training]\ninner_step = 2\n")
    with pytest.raises(ConfigError, match="inner_steps") as info:
        load_config(path)
    assert info.value.field == "training.inner_step"


def test_missing_or_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.field == "config"
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_training_settings_hash_inputs_cover_what_peers_must_share() -> None:
    settings = PeerConfig().training_settings()
    assert set(settings) == {"task", "training", "gossip"}
    assert "info" in LOG_LEVELS


def test_network_defaults_are_the_components_own() -> None:
    """Each timeout and retry default is defined once, by the component that applies it; the peer's config and
    the node config it builds carry those same values."""
    network = load_config(None).network
    assert (network.connect_timeout_s, network.handshake_timeout_s) == (
        HostConfig.connect_timeout_s,
        HostConfig.handshake_timeout_s,
    )
    assert network.handshake_timeout_s == 1.5 and network.handshake_timeout_s < network.connect_timeout_s
    assert (network.bootstrap_attempts, network.bootstrap_retry_s) == (
        DiscoveryConfig.bootstrap_attempts,
        DiscoveryConfig.bootstrap_retry_s,
    )
    assert network.max_peers == MembershipConfig.max_peers


def test_the_network_config_reaches_the_host_and_discovery(tmp_path: Path) -> None:
    network = load_config(
        None,
        {
            "network.handshake_timeout_s": 2.5,
            "network.connect_timeout_s": 30,
            "network.bootstrap_attempts": 7,
            "network.reachability": "private",
        },
    ).network
    node = network.node_config(tmp_path / "identity.key", seed=3)
    assert (node.host.handshake_timeout_s, node.host.connect_timeout_s) == (2.5, 30.0)
    assert node.discovery.bootstrap_attempts == 7 and node.seed == 3 and node.reachability == "private"


def test_the_hole_punch_settings_reach_the_node_from_the_file_and_set(tmp_path: Path) -> None:
    assert load_config(None).network.node_config(tmp_path / "identity.key").hole_punch == HolePunchConfig()
    path = tmp_path / "peer.toml"
    path.write_text(
        "[network]\nhole_punch_max_attempts = 5\nhole_punch_retry_base_s = 1\nhole_punch_retry_max_s = 8\n"
        "hole_punch_jitter = 0\nhole_punch_timeout_s = 4\nhole_punch_relay_close_grace_s = 0\n"
    )
    overrides = dict([parse_override("network.hole_punch_first_delay_s=2.5")])
    for network in (load_config(path, overrides).network, load_member_config(path, overrides).network):
        assert network.node_config(tmp_path / "identity.key").hole_punch == HolePunchConfig(
            max_attempts=5,
            first_delay_s=2.5,
            retry_base_s=1.0,
            retry_max_s=8.0,
            jitter=0.0,
            punch_timeout_s=4.0,
            relay_close_grace_s=0.0,
        )
    off = load_member_config(path, dict([parse_override("network.hole_punch_max_attempts=0")])).network
    assert off.node_config(tmp_path / "identity.key").hole_punch.max_attempts == 0


def test_a_bad_hole_punch_setting_names_the_network_field_and_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_member_config(None, dict([parse_override("network.hole_punch_max_attempts=-2")]))
    assert (info.value.field, info.value.value) == ("network.hole_punch_max_attempts", -2)
    assert str(info.value) == "`network.hole_punch_max_attempts` must be an integer >= 0 (0: never punch), got -2"


def test_a_node_reads_the_peers_file_without_the_training_tables(tmp_path: Path) -> None:
    """`swarmgrad node` loads `[network]` and `peer.data_dir` of the same file as the peer, with the same checks;
    it does not build the training tables (that would import torch) but still refuses an unknown table."""
    path = tmp_path / "peer.toml"
    path.write_text(FULL)
    member = load_member_config(path, {"network.bootstrap_attempts": 9})
    assert member.network == load_config(path, {"network.bootstrap_attempts": 9}).network
    assert member.data_dir == Path("/var/lib/swarmgrad") and member.key_path.name == "identity.key"
    with pytest.raises(ConfigError) as info:
        load_member_config(path, {"network.handshake_timeout_s": 0})
    assert info.value.field == "network.handshake_timeout_s"
    with pytest.raises(ConfigError) as info:
        load_member_config(None, {"netwrok.swarm_id": "s"})
    assert info.value.field == "netwrok"
    assert CONFIG_TABLES == tuple(field.name for field in dataclasses.fields(PeerConfig))


A_ID = "12D3KooWDQFfwnYSqKBiDn5XaJ4wNE6MuA58KgWdZf1EMC8mfof7"
B_ID = "12D3KooWDQpjb1U7WzdmGwUUxyGfE8gmyxeRYssSncYd6tm5WEqi"


def test_the_genesis_rule_names_the_founders_or_the_bootstrap_peers_or_itself() -> None:
    from swarmgrad.peer import genesis_founders

    explicit = load_config(
        None, {"consensus.founders": [B_ID, A_ID], "network.bootstrap": [f"/ip4/1.2.3.4/tcp/1/p2p/{A_ID}"]}
    )
    assert genesis_founders(explicit, "me") == (B_ID, A_ID)
    bootstrapped = load_config(
        None, {"network.bootstrap": [f"/ip4/1.2.3.4/tcp/1/p2p/{B_ID}", f"/ip4/1.2.3.5/tcp/1/p2p/{A_ID}"]}
    )
    assert genesis_founders(bootstrapped, "me") == tuple(sorted((A_ID, B_ID)))
    assert genesis_founders(load_config(None), A_ID) == (A_ID,)
