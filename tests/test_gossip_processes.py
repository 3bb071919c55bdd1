"""Real processes: 4 gossip peers on 127.0.0.1 (LibP2PTransport, Noise + yamux) average a 10M-element vector; one
peer is SIGKILLed, or in another run SIGSTOPped (hung: it stops reading), mid-run. The survivors finish every round
(none waits past its deadline: a round on the dead or hung peer ends well under a generous ceiling instead of never)
and keep averaging. Waits are on the peers' JSON events, each with a ceiling; no wall-clock limit is the test."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from swarmgrad.procs import ChildProcess, Event
from testing.gossip_loopback import spawn_peers, stop_peers

PEERS = 4
NUMEL = 10_000_000
ROUNDS = 10
DEADLINE_S = 3.0
ROUND_CEILING_S = 60.0  # far above a round on a loaded 2-core box (deadline + top-k of 10M floats), far below a hang
START_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 600.0  # ceilings on waiting for events, not limits the test is about


def _rounds(proc: ChildProcess) -> list[Event]:
    return [e for e in proc.snapshot() if e["event"] == "round"]


def _has(kind: str, count: int = 1) -> Callable[[list[Event]], bool]:
    return lambda events: sum(e["event"] == kind for e in events) >= count


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    # a killed and a frozen peer, both also in test_chaos (which make test runs): these are the long variants
    [pytest.param("SIGKILL", marks=pytest.mark.long), pytest.param("SIGSTOP", marks=pytest.mark.long)],
)
def test_survivors_finish_rounds_by_the_deadline_and_keep_averaging(tmp_path: Path, fault: str) -> None:
    procs = spawn_peers(
        tmp_path, PEERS, ["--numel", str(NUMEL), "--rounds", str(ROUNDS), "--deadline-s", str(DEADLINE_S)]
    )
    victim = procs[PEERS - 1]
    survivors = procs[: PEERS - 1]
    try:
        for proc in procs:
            proc.wait_for(_has("round", 2), START_TIMEOUT_S, "2 rounds")
        fault_time = time.time()
        os.kill(victim.pid, signal.SIGKILL if fault == "SIGKILL" else signal.SIGSTOP)
        for proc in survivors:
            proc.wait_for(_has("done"), RUN_TIMEOUT_S, "every round done")
        for proc in survivors:
            rounds = _rounds(proc)
            assert len(rounds) == ROUNDS, f"{proc.name} completed {len(rounds)} rounds"
            slowest = max(r["seconds"] for r in rounds)
            assert slowest <= ROUND_CEILING_S, f"{proc.name}: a round took {slowest:.2f} s: it waited past its deadline"
            after = [r for r in rounds if r["time"] - r["seconds"] > fault_time]  # rounds started after the fault
            assert after, f"{proc.name} started no round after the fault"
            assert sum(r["heard"] > 0 for r in after) >= len(after) / 2, f"{proc.name} stopped averaging: {after}"
        # Peer i starts near mean i. Peer 0 has only higher neighbours, so averaging can only raise its mean (a
        # middle peer's pulls from both sides may cancel); the survivors' means (0, 1, 2) come closer together.
        final_means = [_rounds(proc)[-1]["mean"] for proc in survivors]
        print(f"\n{fault}: survivors' final means {final_means}")
        # measured (3 runs, SIGKILL and SIGSTOP): peer 0 at 0.126-0.144, spread 1.826-1.831; real processes are not
        # deterministic, so the bounds ask for about a quarter of the movement measured
        assert final_means[0] > 0.03, f"peer 0 (starting near mean 0) hardly moved: {final_means}"
        assert max(final_means) - min(final_means) < 1.95, f"the survivors came no closer: {final_means}"
    finally:
        stop_peers(procs)
