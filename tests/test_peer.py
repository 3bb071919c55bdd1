"""`swarmgrad peer` glue, without a network: flags over the config file, the data directory check, the progress
display in both modes, JSON events and the Prometheus endpoint."""

from __future__ import annotations

import io
import json
import socket
import urllib.request
from pathlib import Path

import pytest

from swarmgrad.cli import build_parser
from swarmgrad.core.errors import ConfigError
from swarmgrad.peer import EventLog, Metrics, MetricsError, Progress, config_from_args, prepare_data_dir
from training.loop import RoundReport
from training.tasks.base import Evaluation

BOOTSTRAP = "/ip4/127.0.0.1/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def parse(*argv: str) -> object:
    return build_parser("peer").parse_args(["peer", *argv])


def report(round_: int, sent: int, evaluation: Evaluation | None = None) -> RoundReport:
    return RoundReport(round_, round_ // 10, 0.5, evaluation, round_ * 32, {"bytes_sent": sent})


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.toml"
    path.write_text('[peer]\ntask = "charlm"\n[training]\nmax_rounds = 9\ninner_steps = 3\n')
    args = parse(
        "--config", str(path), "--task", "digits", "--bootstrap", BOOTSTRAP, "--max-rounds", "4",
        "--set", "gossip.density=0.05", "--data-dir", str(tmp_path / "d"), "--swarm-id", "lab",
        "--announce", "/ip4/192.0.2.7/tcp/7400",
    )  # fmt: skip
    config = config_from_args(args)  # type: ignore[arg-type]
    assert config.peer.task == "digits" and config.peer.data_dir == tmp_path / "d"
    assert config.training.max_rounds == 4 and config.training.inner_steps == 3
    assert config.network.bootstrap == (BOOTSTRAP,) and config.network.swarm_id == "lab"
    assert config.gossip.density == 0.05 and config.network.announce == ("/ip4/192.0.2.7/tcp/7400",)


def test_bad_flags_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_args(parse("--max-rounds", "-3"))  # type: ignore[arg-type]
    assert info.value.field == "training.max_rounds"
    with pytest.raises(ConfigError) as info:
        config_from_args(parse("--set", "gossip.nope=1"))  # type: ignore[arg-type]
    assert info.value.field == "gossip.nope"
    with pytest.raises(ConfigError) as info:
        config_from_args(parse("--trust-epoch", "ab12"))  # type: ignore[arg-type]
    assert info.value.field == "consensus.trust_epoch"
    with pytest.raises(ConfigError) as info:
        config_from_args(parse("--set", "consensus.test_forge_offers=everything"))  # type: ignore[arg-type]
    assert info.value.field == "consensus.test_forge_offers"


def test_a_trusted_certificate_hash_is_taken_from_the_flag() -> None:
    config = config_from_args(parse("--trust-epoch", "0f" * 32))  # type: ignore[arg-type]
    assert config.consensus.trusted_hash == bytes([15]) * 32
    assert config_from_args(parse()).consensus.trusted_hash is None  # type: ignore[arg-type]


def test_data_dir_is_created_or_refused(tmp_path: Path) -> None:
    assert prepare_data_dir(tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as info:
        prepare_data_dir(blocker / "sub")
    assert info.value.field == "peer.data_dir"
    with pytest.raises(ConfigError):
        prepare_data_dir(blocker)


def test_plain_progress_prints_one_line_per_evaluation() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(stream, live=False, clock=lambda: now[0])
    progress.update(report(1, 100), 3, None)
    now[0] = 2.0
    accuracy = Evaluation(0.3, "accuracy", 0.9123, True)
    progress.update(report(10, 2000, accuracy), 3, accuracy)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "round     10" in lines[0] and "accuracy 0.9123" in lines[0] and "peers   3" in lines[0]
    assert "1.0 kB/s" in lines[0]  # 2000 bytes over 2 s


def test_live_progress_rewrites_one_line_at_most_four_times_a_second() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(stream, live=True, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] = step * 0.1
        progress.update(report(step, step), 2, None)
    progress.close()
    text = stream.getvalue()
    assert text.count("\r\x1b[2K") == 4  # at 0.1, 0.4, 0.7, 1.0 s
    assert text.endswith("\n") and "\n" not in text[:-1]


def test_event_log_writes_json_lines_or_nothing() -> None:
    stream = io.StringIO()
    EventLog(stream).emit("round", round=3, value=0.5)
    EventLog(None).emit("round", round=4)
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "round" and event["round"] == 3 and "unix_s" in event


def test_prometheus_endpoint_serves_the_gauges_on_loopback() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics = Metrics("127.0.0.1", port)
    try:
        accuracy = Evaluation(0.3, "accuracy", 0.93, True)
        metrics.update(report(20, 4096, accuracy), 3)
        metrics.reachability.state("private")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    finally:
        metrics.close()
    assert "swarmgrad_round 20.0" in body
    assert 'swarmgrad_eval_value{metric="accuracy"} 0.93' in body
    assert "swarmgrad_peers 3.0" in body and "swarmgrad_gossip_bytes_sent 4096.0" in body
    assert 'swarmgrad_reachability{swarmgrad_reachability="private"} 1.0' in body
    assert 'swarmgrad_reachability{swarmgrad_reachability="unknown"} 0.0' in body


def test_a_metrics_port_in_use_is_one_clear_error_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port} .*: the port is in use"):
            Metrics("127.0.0.1", port)
