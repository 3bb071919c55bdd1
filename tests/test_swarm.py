"""Unit tests for `p2p.swarm`: swarm key files, and the public-swarm `ScoringPolicy`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2p.swarm import (
    ScoringConfig,
    ScoringPolicy,
    SwarmKey,
    SwarmKeyError,
    format_swarm_key,
    load_swarm_key,
    parse_swarm_key,
    write_swarm_key,
)
from swarmgrad.core.errors import ConfigError

KEY = SwarmKey(bytes(range(32)))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_key_file_round_trip(tmp_path: Path) -> None:
    text = format_swarm_key(KEY)
    assert text.splitlines() == ["/key/swarm/psk/1.0.0/", "/base16/", bytes(range(32)).hex()]
    assert parse_swarm_key(text) == KEY
    path = tmp_path / "swarm.key"
    write_swarm_key(path, KEY)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_swarm_key(path) == KEY
    assert KEY.psk_hex == bytes(range(32)).hex()
    assert "hidden" in repr(KEY) and KEY.psk_hex not in repr(KEY)


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    write_swarm_key(path, KEY)
    with pytest.raises(SwarmKeyError, match="already exists"):
        write_swarm_key(path, SwarmKey(bytes(32)))
    assert load_swarm_key(path) == KEY


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("/key/swarm/psk/1.0.0/\n/base16/\n", "swarm_key"),
        ("/key/swarm/psk/2.0.0/\n/base16/\n" + "00" * 32, "swarm_key first line"),
        ("/key/swarm/psk/1.0.0/\n/base64/\n" + "00" * 32, "swarm_key encoding"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "00" * 31, "swarm_key third line"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32, "swarm_key third line"),
    ],
)
def test_malformed_key_text_is_refused(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_swarm_key(text)
    assert info.value.field == field


def test_bad_key_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(SwarmKeyError, match="does not exist") as info:
        load_swarm_key(missing)
    assert str(missing) in str(info.value)
    loose = tmp_path / "loose.key"
    loose.write_text(format_swarm_key(KEY))
    loose.chmod(0o644)
    with pytest.raises(SwarmKeyError, match="chmod 600"):
        load_swarm_key(loose)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello\n")
    garbage.chmod(0o600)
    with pytest.raises(SwarmKeyError, match="is not a swarm key"):
        load_swarm_key(garbage)


def test_repeated_errors_ban_a_peer_for_a_while_then_longer() -> None:
    clock = FakeClock()
    policy = ScoringPolicy(ScoringConfig(ban_threshold=3, ban_duration_s=10, max_ban_duration_s=15), clock)
    for _ in range(2):
        policy.report("evil", "oversized frame")
    assert policy.allows("evil")
    policy.report("evil", "oversized frame")
    assert not policy.allows("evil")
    assert policy.allows("honest")
    assert policy.banned_peers() == ["evil"]
    clock.now = 10.0
    assert policy.allows("evil")
    for _ in range(3):
        policy.report("evil", "garbage")
    clock.now = 24.9  # second ban: 20 s, capped at 15 s
    assert not policy.allows("evil")
    clock.now = 25.0
    assert policy.allows("evil")
    stats = policy.statistics()
    assert stats["bans"] == 2 and stats["reports"] == 6 and stats["refused_banned"] == 2


def test_scores_decay_so_rare_errors_never_ban() -> None:
    clock = FakeClock()
    policy = ScoringPolicy(ScoringConfig(ban_threshold=3, score_half_life_s=1.0), clock)
    for i in range(50):
        clock.now = 2.0 * i
        policy.report("flaky", "timeout")
    assert policy.allows("flaky")
    assert policy.score("flaky") < 2.0


def test_inbound_cap_and_banned_peers_are_refused() -> None:
    clock = FakeClock()
    policy = ScoringPolicy(ScoringConfig(max_inbound_connections=2, ban_threshold=1), clock)
    assert policy.admit_inbound("a") and policy.admit_inbound("a") and policy.admit_inbound("b")
    assert not policy.admit_inbound("c")
    policy.release_inbound("a")
    assert policy.admit_inbound("c")
    policy.report("d", "garbage")
    policy.release_inbound("b")
    assert not policy.admit_inbound("d")
    assert policy.statistics()["refused_inbound_cap"] == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ban_threshold", 0),
        ("score_half_life_s", float("inf")),
        ("max_inbound_connections", 0),
        ("max_ban_duration_s", 1),
    ],
)
def test_scoring_config_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        ScoringConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field
