"""`swarmgrad sim sweep --ray ADDRESS` against a real local Ray cluster: a head started with `ray start` (its own
processes, as on a cluster's head node), the sweep connecting to it by address. The table is the same bytes as the
process pool's, and the summary differs only in the replay command (which names `--ray`). Skipped where Ray is not
installed (`pip install 'swarmgrad[ray]'`; the test extra that `make setup` installs has it). The teardown's
`ray stop --force` stops every Ray process of this machine, as `ray stop` does."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_sim_cli import TINY  # the CLI tests' 4-peer, 5-round scenario

pytest.importorskip("ray")

RAY_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _ray(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "ray"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=RAY_TIMEOUT_S)


@pytest.fixture
def ray_head() -> Iterator[str]:
    """The address of a fresh Ray head on this machine (2 CPUs); stopped afterwards. Its folder is short: Ray's
    Unix sockets live under it, and a socket path may not pass 107 bytes."""
    folder = tempfile.mkdtemp(prefix="sg-ray-", dir="/tmp")
    port = _free_port()
    started = _ray(
        "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={folder}",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _ray("stop", "--force")
        shutil.rmtree(folder, ignore_errors=True)


def _sweep(scenario: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sim", "sweep", str(scenario), "--seeds", "0-1"]
    command += ["--set", "gossip.density=0.2,0.02", "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=RAY_TIMEOUT_S)


def test_a_sweep_on_a_ray_cluster_writes_what_the_process_pool_writes(tmp_path: Path, ray_head: str) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    on_ray = _sweep(scenario, tmp_path / "ray", "--ray", ray_head)
    assert on_ray.returncode == 0, on_ray.stderr
    on_pool = _sweep(scenario, tmp_path / "pool", "--jobs", "2")
    assert on_pool.returncode == 0, on_pool.stderr
    table = (tmp_path / "ray" / "sweep.csv").read_bytes()
    assert table == (tmp_path / "pool" / "sweep.csv").read_bytes()
    assert table.count(b"\n") == 1 + 4 * 6  # the header, then 2 densities x 2 seeds x rounds 0-5
    ray_summary = json.loads((tmp_path / "ray" / "sweep.json").read_text())
    pool_summary = json.loads((tmp_path / "pool" / "sweep.json").read_text())
    assert ray_summary.pop("replay").endswith(f"--ray {ray_head}")
    pool_summary.pop("replay")
    assert ray_summary == pool_summary
