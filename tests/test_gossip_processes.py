"""Real processes: 4 gossip peers on 127.0.0.1 (LibP2PTransport, Noise + yamux) average a 10M-element vector; one
peer is SIGKILLed, or in another run SIGSTOPped (hung: it stops reading), mid-run. The survivors finish every round
by its deadline (plus their own compute) and keep averaging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from testing.gossip_loopback import spawn_peers, stop_peers

PEERS = 4
NUMEL = 10_000_000
ROUNDS = 10
DEADLINE_S = 3.0
COMPUTE_SLACK_S = 6.0  # top-k, packing and averaging of 10M floats on a busy 2-core box, per round
START_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 300.0


def _rounds(directory: Path, index: int) -> list[dict[str, float]]:
    path = directory / f"peer{index}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for(predicate: object, timeout_s: float, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for proc in procs:
            if proc.poll() not in (None, 0, -signal.SIGKILL):
                raise AssertionError(f"a peer process exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)  # polling files written by other processes: there is no event to wait on


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_survivors_finish_rounds_by_the_deadline_and_keep_averaging(tmp_path: Path, fault: str) -> None:
    procs = spawn_peers(
        tmp_path, PEERS, ["--numel", str(NUMEL), "--rounds", str(ROUNDS), "--deadline-s", str(DEADLINE_S)]
    )
    victim = procs[PEERS - 1]
    survivors = range(PEERS - 1)
    try:
        _wait_for(lambda: all(len(_rounds(tmp_path, i)) >= 2 for i in range(PEERS)), START_TIMEOUT_S, "2 rounds", procs)
        fault_time = time.time()
        os.kill(victim.pid, signal.SIGKILL if fault == "SIGKILL" else signal.SIGSTOP)
        _wait_for(
            lambda: all((tmp_path / f"peer{i}.done").exists() for i in survivors), RUN_TIMEOUT_S, "survivors", procs
        )
        for i in survivors:
            rounds = _rounds(tmp_path, i)
            assert len(rounds) == ROUNDS, f"peer {i} completed {len(rounds)} rounds"
            slowest = max(r["seconds"] for r in rounds)
            assert slowest <= DEADLINE_S + COMPUTE_SLACK_S, f"peer {i}: a round took {slowest:.2f} s"
            after = [r for r in rounds if r["time"] - r["seconds"] > fault_time]  # rounds started after the fault
            assert after, f"peer {i} started no round after the fault"
            assert sum(r["heard"] > 0 for r in after) >= len(after) / 2, f"peer {i} stopped averaging: {after}"
        # Peer i starts near mean i. Peer 0 has only higher neighbours, so averaging can only raise its mean (a
        # middle peer's pulls from both sides may cancel); the survivors' means (0, 1, 2) come closer together.
        final_means = [_rounds(tmp_path, i)[-1]["mean"] for i in survivors]
        assert final_means[0] > 1e-3, f"peer 0 (starting near mean 0) never moved: {final_means}"
        assert max(final_means) - min(final_means) < 2.0 - 1e-3, final_means
    finally:
        stop_peers(procs)
