"""The seeded fault harness of the epoch consensus (`testing.consensus_faults`): the real machines hold agreement,
validity and liveness over many seeds, and the harness catches two protocols broken on purpose."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from consensus.provenance import verify_file
from testing.consensus_faults import FaultRun, Scenario, main, run_seed, write_chains

DEFAULT_SEEDS = 500
LONG_SEEDS = 100_000


def _violations(seeds: range, variant: str = "honest", stop_at_first: bool = False) -> list[str]:
    found = []
    for seed in seeds:
        result = run_seed(seed, variant)
        found.extend(str(v) for v in result.violations)
        if found and stop_at_first:
            break
    return found


def test_default_seeds_hold_agreement_validity_and_liveness() -> None:
    started = time.process_time()
    found = _violations(range(DEFAULT_SEEDS))
    assert not found, "\n".join(found[:5])
    assert time.process_time() - started < 120  # ~35 s of CPU on an idle core; the suite's budget is ~60 s


@pytest.mark.parametrize("variant", ["weak_quorum", "ignore_lock"])
def test_broken_protocols_are_caught_within_the_default_seeds(variant: str) -> None:
    found = _violations(range(DEFAULT_SEEDS), variant, stop_at_first=True)
    assert found, f"the {variant} variant survived {DEFAULT_SEEDS} seeds"
    assert "agreement" in found[0] or "validity" in found[0] or "liveness" in found[0]
    assert f"--variant {variant}" in found[0] and "replay: python -m testing.consensus_faults --seed" in found[0]


def test_a_run_is_deterministic_per_seed() -> None:
    first, second = run_seed(7), run_seed(7)
    assert first.events_run == second.events_run and first.decided_at == second.decided_at


def test_scenarios_cover_every_size_and_behaviour() -> None:
    scenarios = [Scenario.draw(seed) for seed in range(DEFAULT_SEEDS)]
    assert {s.n for s in scenarios} == {4, 7, 10, 31}
    assert {b for s in scenarios for b in s.behaviour_of.values()} == {"equivocate", "silent", "poison", "twins"}
    assert sum(bool(s.crashes) for s in scenarios) > 100
    assert sum(s.partition is not None for s in scenarios) > 100


def test_faults_are_really_injected_and_detected() -> None:
    totals: Counter[str] = Counter()
    for seed in range(100):
        totals.update(run_seed(seed).stats)
    assert totals["crashes_at_persist"] > 5 and totals["crashes"] > totals["crashes_at_persist"]
    assert totals["restored_from_persisted"] > 5
    assert totals["equivocations_found"] > 5


def test_harness_writes_chain_files_that_verify(tmp_path: Path) -> None:
    run = FaultRun(Scenario.draw(3))
    result = run.result()
    assert not result.violations
    paths = write_chains(result, run.members, tmp_path)
    assert len(paths) == len(result.certificates)
    for path in paths:
        genesis, summaries = verify_file(path)
        assert genesis.members == run.members
        assert [s.epoch for s in summaries] == list(range(1, result.scenario.epochs + 1))


def test_cli_prints_violations_with_a_replay_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "0", "--count", "2"]) == 0
    assert "2 of 2 seeds without violation" in capsys.readouterr().out
    assert main(["--seed", "1", "--variant", "weak_quorum"]) == 1
    out = capsys.readouterr().out
    assert "seed 1 (weak_quorum)" in out and "replay: python -m testing.consensus_faults --seed 1" in out


@pytest.mark.long
def test_long_sweep() -> None:
    found = _violations(range(LONG_SEEDS))
    assert not found, "\n".join(found[:5])
