"""The `swarmgrad id`, `keygen` and `node` subcommands: output, exit statuses, and one clear stderr line naming the
bad value for every input error (malformed or unreachable bootstrap, bad swarm id, port in use, bad key files),
with nothing left running or bound afterwards."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2p.host import HostConfig
from p2p.identity import load_or_create_identity, peer_id_of
from p2p.swarm import SwarmKey, write_swarm_key
from swarmgrad.cli import build_parser, main
from swarmgrad.netconfig import add_network_arguments, network_overrides
from swarmgrad.procs import reserve_port
from tests.node_processes import NodeGroup

PEER = "12D3KooWJ5sfJHRinwuoZS3LLPAeCZRzMcVTe6vSWaAq2xknveCN"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


FAIL_FAST_CEILING_S = 25.0
"""What "fails fast" means here: under the 30-40 s that a py-libp2p dial or handshake takes to time out on its own
(what these tests exclude), with room for a loaded 2-core box."""


def test_id_is_stable_across_restarts_and_prints_dialable_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["id", "--data-dir", str(tmp_path), "--listen", "/ip4/127.0.0.1/tcp/7400"]
    status, first, note = run(argv, capsys)
    assert status == 0 and "network.reachability = auto" in note
    peer_id, addr = first.split()
    assert addr == f"/ip4/127.0.0.1/tcp/7400/p2p/{peer_id}"
    assert oct(os.stat(tmp_path / "identity.key").st_mode & 0o777) == "0o600"
    status, second, _ = run([*argv, "--json"], capsys)
    assert status == 0 and json.loads(second)["peer_id"] == peer_id
    assert json.loads(second)["reachability"] == "auto"  # `id` runs no node: the configured setting
    status, third, _ = run([*argv, "--json", "--set", "network.reachability=private"], capsys)
    assert status == 0 and json.loads(third)["reachability"] == "private"


def test_id_on_the_unspecified_address_prints_interface_addresses_or_the_announced_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["id", "--data-dir", str(tmp_path), "--listen", "/ip4/0.0.0.0/tcp/7400", "--json"]
    status, out, _ = run(argv, capsys)
    printed = json.loads(out)
    assert status == 0 and printed["addrs"]
    for addr in printed["addrs"]:
        assert "/0.0.0.0/" not in addr and addr.endswith(f"/tcp/7400/p2p/{printed['peer_id']}"), addr
    status, out, _ = run([*argv, "--announce", "/ip4/203.0.113.7/tcp/9000"], capsys)
    assert status == 0 and json.loads(out)["addrs"] == [f"/ip4/203.0.113.7/tcp/9000/p2p/{printed['peer_id']}"]
    status, out, err = run([*argv, "--announce", "/ip4/0.0.0.0/tcp/7400"], capsys)
    assert status == 2 and out == "" and "announce" in err and "0.0.0.0" in err
    status, out, err = run([*argv, "--set", "network.hole_punch_timeout_s=0"], capsys)
    assert status == 2 and out == "" and "`network.hole_punch_timeout_s`" in err and "got 0.0" in err


def test_id_refuses_a_key_file_others_can_read_and_says_how_to_fix_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["id", "--data-dir", str(tmp_path)], capsys)[0] == 0
    (tmp_path / "identity.key").chmod(0o644)
    status, out, err = run(["id", "--data-dir", str(tmp_path)], capsys)
    assert status == 1 and out == ""
    assert "0644" in err and f"chmod 600 {tmp_path / 'identity.key'}" in err


def test_keygen_writes_a_private_key_file_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "swarm.key"
    assert run(["keygen", "--out", str(path)], capsys)[0] == 0
    lines = path.read_text().splitlines()
    assert lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"] and len(lines[2]) == 64
    assert os.stat(path).st_mode & 0o777 == 0o600
    status, _, err = run(["keygen", "--out", str(path)], capsys)
    assert status == 1 and "already exists" in err and path.read_text().splitlines() == lines


@pytest.mark.parametrize(
    ("extra", "status", "named"),
    [
        (["--swarm-id", "Not Valid"], 2, "'Not Valid'"),
        (["--swarm-id", "s", "--bootstrap", "/ip4/127.0.0.1/tcp/4001"], 2, "/ip4/127.0.0.1/tcp/4001"),
        (["--swarm-id", "s", "--bootstrap", "hello"], 2, "'hello'"),
        (["--swarm-id", "s", "--listen", "/ip4/127.0.0.1/udp/1"], 2, "/ip4/127.0.0.1/udp/1"),
        (["--swarm-id", "s", "--announce", "/ip4/192.0.2.1/udp/1"], 2, "/ip4/192.0.2.1/udp/1"),
        (["--swarm-id", "s", "--swarm-key", "/nonexistent/swarm.key"], 1, "/nonexistent/swarm.key"),
    ],
)
def test_node_input_errors_name_the_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], status: int, named: str
) -> None:
    got, out, err = run(["node", "--data-dir", str(tmp_path), "--listen", "/ip4/127.0.0.1/tcp/0", *extra], capsys)
    assert got == status
    assert out == ""
    assert err.startswith("swarmgrad node: error:") and named in err, err


def test_node_refuses_a_malformed_swarm_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "swarm.key"
    key.write_text("/key/swarm/psk/1.0.0/\n/base16/\nnot-hex\n")
    key.chmod(0o600)
    status, _, err = run(["node", "--data-dir", str(tmp_path), "--swarm-id", "s", "--swarm-key", str(key)], capsys)
    assert status == 1 and str(key) in err and "64 hexadecimal digits" in err


def test_node_on_a_port_in_use_fails_naming_the_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}"
        status, out, err = run(["node", "--data-dir", str(tmp_path), "--swarm-id", "s", "--listen", addr], capsys)
    assert status == 1 and out == ""
    assert addr in err and "in use" in err


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_node_bootstrapping_to_its_own_listener_fails_at_once_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    port = reserve_port()
    boot = f"/ip4/{host}/tcp/{port}/p2p/{PEER}"
    argv = ["node", "--data-dir", str(tmp_path), "--swarm-id", "s", "--listen", f"/ip4/0.0.0.0/tcp/{port}"]
    started = time.monotonic()
    status, out, err = run([*argv, "--bootstrap", boot], capsys)
    assert status in (1, 2) and out == ""
    assert boot in err and ("itself" in err or "0.0.0.0" in err) and "swarmgrad id" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - started < FAIL_FAST_CEILING_S


def test_node_with_an_unreachable_bootstrap_fails_fast_and_releases_its_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = reserve_port()
    dead = f"/ip4/127.0.0.1/tcp/{reserve_port()}/p2p/{PEER}"
    started = time.monotonic()
    status, out, err = run(
        [
            "node",
            "--data-dir",
            str(tmp_path),
            "--swarm-id",
            "s",
            "--listen",
            f"/ip4/127.0.0.1/tcp/{port}",
            "--bootstrap",
            dead,
        ],
        capsys,
    )
    assert status == 1
    assert dead in err and "no bootstrap peer could be reached" in err
    assert time.monotonic() - started < FAIL_FAST_CEILING_S
    assert "listening" not in out  # it never announced itself
    with socket.socket() as probe:  # nothing half-started: the listen port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_node_joining_a_bootstrap_peer_of_another_swarm_fails_naming_the_swarm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nodes: NodeGroup
) -> None:
    boot = nodes.start("boot", swarm_id="alpha")
    addr = boot.wait_listening()["addrs"][0]
    status, _, err = run(
        [
            "node",
            "--data-dir",
            str(tmp_path / "b"),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--swarm-id",
            "beta",
            "--bootstrap",
            addr,
            "--join-timeout-s",
            "3",
        ],
        capsys,
    )
    assert status == 1
    assert "no member of swarm 'beta'" in err and addr in err


def test_console_entry_point_lists_the_subcommands_without_importing_the_training_stack() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from swarmgrad.cli import main; code = main(['--help'])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for name in ("id", "keygen", "node", "peer"):
        assert f"    {name} " in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, swarmgrad.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "False"


# ---- the flags every swarm member shares, and what they reach -------------------------------------------------------

LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"


def _log_times(stderr: str, needle: str) -> list[float]:
    """The times (s since the epoch) of the log lines that contain `needle` (`swarmgrad --log-level` lines start
    with the local time to the millisecond)."""
    times = []
    for line in stderr.splitlines():
        if needle in line:
            stamp = datetime.datetime.strptime(line[:23], LOG_TIME_FORMAT)
            times.append(stamp.timestamp())
    return times


@pytest.mark.slow
@pytest.mark.parametrize("command", [pytest.param("node", marks=pytest.mark.long), "peer"])  # one path: a handshake
def test_a_wrong_swarm_key_is_reported_within_the_handshake_timeout_per_attempt(
    tmp_path: Path, nodes: NodeGroup, command: str
) -> None:
    """Both commands, against a real bootstrap peer of another private swarm: each attempt ends after the handshake
    timeout (not the TCP connect's), and the one error line names the swarm key."""
    ours, theirs = tmp_path / "ours.key", tmp_path / "theirs.key"
    write_swarm_key(ours, SwarmKey(b"\x01" * 32))
    write_swarm_key(theirs, SwarmKey(b"\x02" * 32))
    boot = nodes.start("boot", "--swarm-key", str(theirs))
    addr = boot.wait_listening()["addrs"][0]
    attempts, retry_s, port = 3, 0.5, reserve_port()
    argv = [sys.executable, "-m", "swarmgrad.cli", "--log-level", "INFO", command, "--data-dir", str(tmp_path / "j"),
            "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--swarm-id", "test", "--swarm-key", str(ours),
            "--bootstrap", addr, "--bootstrap-attempts", str(attempts),
            "--bootstrap-retry-s", str(retry_s)]  # fmt: skip
    if command == "peer":
        argv += ["--task", "digits", "--progress", "plain"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"swarmgrad {command}: error: no bootstrap peer could be reached in {attempts} attempts")
    assert addr in error and "wrong or missing swarm key" in error and "handshake" in error, error
    # From the start of the join to its last attempt: `attempts` handshake timeouts (1.5 s) and the pauses between
    # them, with 2 s of slack per attempt for a loaded box. The TCP connect's own bound (10 s) would need 31 s.
    (joining,) = _log_times(result.stderr, "joining swarm test")
    failed = _log_times(result.stderr, f"of {attempts}): TCP connected, but the handshake")
    assert len(failed) == attempts, result.stderr[-3000:]
    ceiling_s = attempts * (HostConfig.handshake_timeout_s + 2.0) + (attempts - 1) * retry_s
    assert failed[-1] - joining < ceiling_s, (failed[-1] - joining, result.stderr[-3000:])
    assert failed[0] - joining > HostConfig.handshake_timeout_s * 0.9  # each attempt did wait for the handshake
    with socket.socket() as probe:  # nothing left running: the listen port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_a_node_started_before_its_bootstrap_peer_retries_until_it_listens(tmp_path: Path, nodes: NodeGroup) -> None:
    """As in a StatefulSet starting every pod at once: the joiner's first attempt fails (a stand-in on the
    bootstrap's port accepts each TCP connection and closes it, until the joiner logs that attempt 1 failed:
    py-libp2p re-dials inside one attempt, so a single refusal may not end it), then the bootstrap peer comes up
    there and a later attempt finds it."""
    port = reserve_port()
    boot_id = peer_id_of(load_or_create_identity(tmp_path / "boot" / "identity.key"))
    boot_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot_id}"
    with socket.socket() as stand_in:
        stand_in.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stand_in.bind(("127.0.0.1", port))
        stand_in.listen()
        stand_in.settimeout(1.0)
        joiner = nodes.start(
            "joiner", "--bootstrap", boot_addr, "--bootstrap-attempts", "240", "--bootstrap-retry-s", "0.5"
        )
        for _ in range(180):  # bounded: until the joiner says its first attempt failed (or it exits)
            try:
                conn, _ = stand_in.accept()
            except TimeoutError:
                assert not joiner.exited(), joiner.tail()
            else:
                conn.close()
            if "(attempt 1 of 240)" in joiner.stderr():
                break
        else:
            pytest.fail(f"the joiner's first attempt never failed; {joiner.tail()}")
    boot = nodes.start("boot", listen=f"/ip4/127.0.0.1/tcp/{port}")
    assert boot.wait_listening()["peer_id"] == boot_id
    joiner.wait_for(
        lambda events: any(e["event"] == "peer_up" and e["peer"] == boot_id for e in events), 180, "the bootstrap up"
    )
    assert not joiner.exited()


@pytest.mark.slow
def test_a_node_with_a_forced_reachability_reports_it_once(tmp_path: Path, nodes: NodeGroup) -> None:
    node = nodes.start("forced", "--set", "network.reachability=public")
    events = node.wait_for(lambda ev: any(e["event"] == "reachability" for e in ev), 60, "a reachability event")
    (verdict,) = [e for e in events if e["event"] == "reachability"]
    assert verdict["reachability"] == "public" and verdict["reason"] == "set by network.reachability"


def test_node_peer_and_id_accept_the_same_network_flags() -> None:
    """One definition (`swarmgrad.netconfig.add_network_arguments`): every shared flag parses the same way under
    each subcommand and reaches the same config keys."""
    argv = ["--config", "swarm.toml", "--set", "network.handshake_timeout_s=3", "--json", "--data-dir", "/srv/sg",
            "--swarm-id", "lab", "--swarm-key", "swarm.key", "--listen", "/ip4/0.0.0.0/tcp/7400",
            "--bootstrap", f"/ip4/192.0.2.1/tcp/7400/p2p/{PEER}", "--announce", "/ip4/203.0.113.7/tcp/7400",
            "--max-peers", "9", "--bootstrap-attempts", "30", "--bootstrap-retry-s", "2"]  # fmt: skip
    reference = argparse.ArgumentParser()
    add_network_arguments(reference)
    every_flag = vars(reference.parse_args(argv))
    assert all(value not in (None, [], False) for value in every_flag.values()), every_flag  # argv sets them all
    expected = network_overrides(reference.parse_args(argv))
    assert expected["network.bootstrap_attempts"] == 30 and expected["network.handshake_timeout_s"] == 3
    for command in ("node", "peer", "id"):
        args = build_parser(command).parse_args([command, *argv])
        assert {k: getattr(args, k) for k in every_flag} == every_flag, command
        assert network_overrides(args) == expected, command
