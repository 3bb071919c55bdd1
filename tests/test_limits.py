"""`IpLimits` as a pure policy: identities, offences, connections and streams per IP, in explicit time."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2p.host import HostConfig
from p2p.limits import WINDOW_S, IpLimits, IpLimitsConfig
from swarmgrad.config import load_config
from swarmgrad.core.errors import ConfigError

IP = "198.51.100.7"
OTHER_IP = "198.51.100.8"


def test_one_ip_cycling_identities_is_banned_once_with_reason_and_duration() -> None:
    limits = IpLimits(IpLimitsConfig(max_new_identities_per_minute=3, ip_ban_duration_s=100.0))
    for i in range(3):
        assert limits.admit_connection(IP, f"peer{i}", now=float(i)) is None
        limits.release_connection(IP, f"peer{i}")
    refusal = limits.admit_connection(IP, "peer3", now=3.0)
    assert refusal is not None and refusal.ban is not None
    assert refusal.ban.ip == IP and refusal.ban.duration_s == 100.0 and refusal.ban.until == 103.0
    assert "more than 3 new identities within 60 s" in refusal.ban.reason
    # later refusals carry no ban (logged once); even a known identity is refused while the IP is banned
    for peer in ("peer4", "peer0"):
        again = limits.admit_connection(IP, peer, now=50.0)
        assert again is not None and again.ban is None and "banned" in again.reason
    assert limits.admit_connection(OTHER_IP, "peer5", now=50.0) is None
    assert limits.banned_ips(now=50.0) == [IP]
    assert limits.statistics()["ip_bans"] == 1
    # the ban ends, and the window has forgotten the old identities
    assert limits.admit_connection(IP, "peer6", now=103.0) is None


def test_honest_peers_reconnecting_from_one_ip_are_not_throttled() -> None:
    limits = IpLimits(IpLimitsConfig())  # the defaults: the demo's 4 peers on 127.0.0.1, each reconnecting often
    for round_ in range(200):
        now = round_ * 1.0
        for peer in ("a", "b", "c"):
            assert limits.admit_connection("127.0.0.1", peer, now) is None
        for peer in ("a", "b", "c"):
            limits.release_connection("127.0.0.1", peer)
    assert limits.statistics() == {"banned_ips": 0, "inbound_streams": 0}


def test_new_identities_are_counted_over_a_sliding_minute() -> None:
    limits = IpLimits(IpLimitsConfig(max_new_identities_per_minute=2))
    assert limits.admit_connection(IP, "a", now=0.0) is None
    assert limits.admit_connection(IP, "b", now=30.0) is None
    assert limits.admit_connection(IP, "c", now=WINDOW_S) is None  # "a" left the window
    refusal = limits.admit_connection(IP, "d", now=WINDOW_S + 1.0)
    assert refusal is not None and refusal.ban is not None


def test_offending_identities_from_one_ip_ban_it() -> None:
    limits = IpLimits(IpLimitsConfig(max_offending_identities_per_minute=2, ip_ban_duration_s=10.0))
    assert limits.offence(IP, "a", now=0.0) is None
    assert limits.offence(IP, "a", now=1.0) is None  # the same identity again: ScoringPolicy's business
    assert limits.offence(IP, "b", now=2.0) is None
    assert limits.offence(OTHER_IP, "c", now=2.0) is None
    ban = limits.offence(IP, "c", now=3.0)
    assert ban is not None and ban.duration_s == 10.0 and "3 identities caused errors" in ban.reason
    assert limits.offence(IP, "d", now=4.0) is None  # already banned: no second ban
    refusal = limits.admit_connection(IP, "e", now=5.0)
    assert refusal is not None and refusal.ban is None
    assert limits.admit_stream(IP, now=5.0) is not None
    assert not limits.banned(IP, now=13.0)
    assert limits.offence(IP, "a", now=14.0) is None  # offences before the ban are forgotten


def test_offences_older_than_a_minute_are_forgotten() -> None:
    limits = IpLimits(IpLimitsConfig(max_offending_identities_per_minute=1))
    assert limits.offence(IP, "a", now=0.0) is None
    assert limits.offence(IP, "b", now=WINDOW_S) is None
    assert limits.offence(IP, "c", now=WINDOW_S + 1.0) is not None


def test_concurrent_connections_and_streams_per_ip_are_capped_without_a_ban() -> None:
    limits = IpLimits(IpLimitsConfig(max_inbound_connections_per_ip=2, max_inbound_streams_per_ip=2))
    assert limits.admit_connection(IP, "a", 0.0) is None and limits.admit_connection(IP, "b", 0.0) is None
    assert limits.admit_connection(IP, "a", 0.0) is None  # a second connection of an admitted peer
    refusal = limits.admit_connection(IP, "c", 0.0)
    assert refusal is not None and refusal.ban is None and "over 2 inbound connections" in refusal.reason
    assert limits.admit_connection(OTHER_IP, "c", 0.0) is None
    limits.release_connection(IP, "a")
    assert limits.admit_connection(IP, "c", 0.0) is None

    assert limits.admit_stream(IP, 0.0) is None and limits.admit_stream(IP, 0.0) is None
    refused = limits.admit_stream(IP, 0.0)
    assert refused is not None and refused.ban is None and "over 2 inbound streams" in refused.reason
    limits.release_stream(IP)
    assert limits.admit_stream(IP, 0.0) is None
    stats = limits.statistics()
    assert stats["refused_connections_per_ip"] == 1 and stats["refused_streams_per_ip"] == 1
    assert stats["inbound_streams"] == 2 and stats["banned_ips"] == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_identities_per_minute", 0),
        ("max_offending_identities_per_minute", 1.5),
        ("max_inbound_connections_per_ip", True),
        ("max_inbound_streams_per_ip", -1),
        ("ip_ban_duration_s", 0.0),
        ("ip_ban_duration_s", float("inf")),
    ],
)
def test_config_errors_name_the_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        IpLimitsConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field and info.value.value == value


def test_the_limits_are_network_config_keys_with_the_policy_defaults(tmp_path: Path) -> None:
    path = tmp_path / "peer.toml"
    path.write_text("[network]\nmax_new_identities_per_minute = 7\nstream_idle_timeout_s = 30\n", encoding="utf-8")
    network = load_config(path, {"network.ip_ban_duration_s": 42}).network
    assert network.ip_limits_config() == IpLimitsConfig(max_new_identities_per_minute=7, ip_ban_duration_s=42.0)
    assert network.stream_idle_timeout_s == 30.0
    defaults = load_config(None).network
    assert defaults.ip_limits_config() == IpLimitsConfig()
    assert defaults.stream_idle_timeout_s == HostConfig.stream_idle_timeout_s
    for key, value in (("max_inbound_streams_per_ip", 0), ("stream_idle_timeout_s", -1.0)):
        with pytest.raises(ConfigError) as info:
            load_config(None, {f"network.{key}": value})
        assert info.value.field == f"network.{key}" and info.value.value == value
