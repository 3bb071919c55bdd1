"""End to end: real `swarmgrad peer` processes on 127.0.0.1 (a swarm through a freeze, a crash and a late joiner is
tests/test_chaos.py).

* a peer offered a model with the wrong shapes, then a corrupted one, refuses both with a log line and trains on;
* bad configurations fail fast with an error naming the problem, a non-zero status, and nothing left running.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from p2p.discovery import DiscoveryConfig
from p2p.host import HostConfig
from p2p.libp2p_transport import LibP2PTransport
from p2p.model_fetch import MESSAGE_OVERHEAD_BYTES, PROTOCOL, SCHEMA, ModelFetch, ModelRequested, ServeModel
from p2p.node import NodeConfig, open_node
from swarmgrad.core.driver import Driver
from swarmgrad.demo import PeerProcess, peer_args
from training.checkpoint import encode_state
from training.tasks.base import OptimizerSettings
from training.tasks.digits import DigitsTask

if TYPE_CHECKING:  # libp2p installs trio-typing, whose stale `trio-stubs` hide trio's own `TaskStatus` from mypy
    from trio_typing import TaskStatus

pytestmark = pytest.mark.slow

START_S = 150.0  # interpreter start + torch/libp2p imports, several processes on 2 busy cores


def test_bad_model_offers_are_refused_and_training_goes_on(tmp_path: Path) -> None:
    good = DigitsTask(optimizer=OptimizerSettings(kind="sgd", lr=0.1, batch_size=32)).build_model().state_dict()
    wrong_shapes = encode_state(
        DigitsTask(hidden=8, optimizer=OptimizerSettings(kind="sgd", lr=0.1, batch_size=32)).build_model().state_dict()
    )
    corrupted = bytearray(encode_state(good))
    corrupted[12:20] = b"\xff" * 8  # inside the JSON header
    trio.run(_bad_offers_scenario, tmp_path, [wrong_shapes, bytes(corrupted)])


async def _bad_offers_scenario(tmp_path: Path, bodies: list[bytes]) -> None:
    async with trio.open_nursery() as nursery:
        addresses: list[str] = []
        for index, body in enumerate(bodies):
            host = HostConfig(key_path=tmp_path / f"fake-{index}.key", listen_addrs=("/ip4/127.0.0.1/tcp/0",))
            discovery = DiscoveryConfig(swarm_id="e2e-bad", bootstrap_addrs=tuple(addresses[:1]))
            addresses.append(await nursery.start(_fake_member, NodeConfig(host=host, discovery=discovery), body))
        peer = PeerProcess(
            "victim",
            peer_args(
                tmp_path / "victim",
                swarm_id="e2e-bad",
                rounds=5,
                bootstrap=addresses[0],
                extra=["--set", "network.min_peers=2", "--set", "gossip.round_deadline_s=0.5"],
            ),
            tmp_path / "victim.log",
        )
        try:
            refusals = [await trio.to_thread.run_sync(peer.read_until, "model_refused", START_S) for _ in bodies]
            model = await trio.to_thread.run_sync(peer.read_until, "model", 60.0)
            finished = await trio.to_thread.run_sync(peer.read_until, "finished", 120.0)
            status = await trio.to_thread.run_sync(peer.wait, 30.0)
        finally:
            await trio.to_thread.run_sync(peer.stop)
        nursery.cancel_scope.cancel()
    reasons = " | ".join(r["reason"] for r in refusals)
    assert "F32[8], the task expects float32[128]" in reasons, reasons
    assert "header" in reasons, reasons
    assert model["source"] == "initial"
    assert finished["round"] == 5 and status == 0
    log_text = (tmp_path / "victim.log").read_text()
    assert log_text.count("refused the model offered by") == 2


async def _fake_member(
    config: NodeConfig, body: bytes, *, task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    async with open_node(config) as node, trio.open_nursery() as nursery:
        transport = LibP2PTransport(node.host, config.host, node.policy, nursery)
        driver = Driver(
            ModelFetch(5.0), transport, PROTOCOL, SCHEMA, max_message_bytes=MESSAGE_OVERHEAD_BYTES + len(body)
        )
        await nursery.start(driver.run)
        task_status.started(node.listen_multiaddrs[0])
        async for note in driver.notifications:
            if isinstance(note, ModelRequested):
                driver.submit(ServeModel(note.peer, note.nonce, 10, "digits", body))


def _peer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarmgrad.cli", "peer", *args]


def test_bad_configurations_fail_fast_naming_the_problem(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[training]\ninner_step = 2\n")
    cases = {
        "unknown task": (["--task", "nosuch", "--data-dir", str(tmp_path / "a")], "peer.task"),
        "bad multiaddr": (
            ["--bootstrap", "/ip4/1.2.3.4/tcp/1", "--data-dir", str(tmp_path / "b")],
            "network.bootstrap",
        ),
        "unreadable data dir": (["--data-dir", str(not_a_dir / "sub")], "peer.data_dir"),
        "unknown config key": (["--config", str(bad_config), "--data-dir", str(tmp_path / "c")], "training.inner_step"),
        "missing config file": (["--config", str(tmp_path / "absent.toml")], "config"),
    }
    processes = {
        name: subprocess.Popen(_peer_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, _) in cases.items()
    }
    for name, process in processes.items():
        _out, err = process.communicate(timeout=START_S)
        assert process.returncode == 2, f"{name}: status {process.returncode}, stderr {err[-2000:]}"
        assert cases[name][1] in err and "error" in err, f"{name}: {err[-2000:]}"
        assert "Traceback" not in err


def test_a_metrics_port_in_use_fails_with_one_line_and_status_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [
            "--data-dir",
            str(tmp_path / "p"),
            "--swarm-id",
            "m",
            "--task",
            "digits",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ]
        process = subprocess.run(
            _peer_command(*args, "--metrics-port", str(port)), capture_output=True, text=True, timeout=START_S
        )
    assert process.returncode == 1, process.stderr[-2000:]
    assert f"error: cannot serve metrics on 127.0.0.1:{port} (--metrics-port): the port is in use" in process.stderr
    assert "Traceback" not in process.stderr
