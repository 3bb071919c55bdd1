"""The local training loop, driven through in-process averagers: learning, epochs and their hashes, checkpoints,
resume, stopping, and refusal of a broken averager's output."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from swarmgrad.core.errors import ConfigError, LocalProtocolError
from training.checkpoint import CheckpointStore, canonical_model_hash
from training.loop import Averaged, Averager, EpochReached, LoopConfig, RoundReport, TrainingLoop
from training.tasks import Task

LIMIT = 1 << 24


class LoneAverager:
    """A swarm of one: returns the parameters unchanged (or a broken vector, to test the loop's checks)."""

    def __init__(self, broken: str = "") -> None:
        self.rounds = 0
        self.broken = broken

    def average(self, params: torch.Tensor, not_before: int) -> Averaged:
        self.rounds += 1
        if self.broken == "shape":
            return Averaged(params[:-1], not_before)
        if self.broken == "nan":
            return Averaged(torch.full_like(params, float("nan")), not_before)
        return Averaged(params.clone(), not_before)  # a swarm of one runs the loop's own round

    def statistics(self) -> dict[str, float | int]:
        return {"rounds": self.rounds, "bytes_sent": 0}


class ExactMean:
    """An exact all-reduce among `n` threads: every peer gets the mean of everyone's vector each round."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: dict[int, torch.Tensor] = {}
        self.lock = threading.Lock()

    def member(self, index: int) -> ExactMeanMember:
        return ExactMeanMember(self, index)


class ExactMeanMember:
    def __init__(self, group: ExactMean, index: int) -> None:
        self.group = group
        self.index = index
        self.rounds = 0

    def average(self, params: torch.Tensor, not_before: int) -> Averaged:
        with self.group.lock:
            self.group.slots[self.index] = params.clone()
        self.group.barrier.wait()
        mean = torch.stack([self.group.slots[i] for i in sorted(self.group.slots)]).mean(dim=0)
        self.group.barrier.wait()  # nobody overwrites a slot before all have read it
        self.rounds += 1
        return Averaged(mean, not_before)

    def statistics(self) -> dict[str, float | int]:
        return {"rounds": self.rounds}


def make_loop(
    task: Task,
    averager: Averager,
    directory: Path,
    config: LoopConfig,
    peer: str = "peer-a",
    on_round: Callable[[RoundReport], None] | None = None,
    on_epoch: Callable[[EpochReached], None] | None = None,
) -> TrainingLoop:
    store = CheckpointStore(directory, keep=3, max_bytes=LIMIT)
    return TrainingLoop(
        task, averager, config, peer_id=peer, store=store, config_hash="cfg", on_round=on_round, on_epoch=on_epoch
    )


@pytest.mark.parametrize(
    ("field", "value"), [("inner_steps", 0), ("epoch_rounds", -1), ("eval_every_rounds", 1.5), ("max_rounds", -1)]
)
def test_loop_config_is_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        LoopConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == f"training.{field}"


def test_single_peer_learns_reports_and_checkpoints_every_epoch(digits: Task, tmp_path: Path) -> None:
    reports: list[RoundReport] = []
    epochs: list[EpochReached] = []
    config = LoopConfig(inner_steps=2, epoch_rounds=20, eval_every_rounds=10, max_rounds=70)
    loop = make_loop(digits, LoneAverager(), tmp_path, config, on_round=reports.append, on_epoch=epochs.append)
    last = loop.run(threading.Event())
    assert last is not None and last.round == 70 and loop.round == 70
    assert [r.round for r in reports] == list(range(1, 71))
    assert [r.round for r in reports if r.evaluation is not None] == [10, 20, 30, 40, 50, 60, 70]
    assert last.evaluation is not None and last.evaluation.value > 0.9
    assert last.samples == 70 * 2 * 32 and last.averager["rounds"] == 70
    assert [(e.epoch, e.round) for e in epochs] == [(1, 20), (2, 40), (3, 60)]
    store = CheckpointStore(tmp_path, keep=3, max_bytes=LIMIT)
    assert store.rounds() == [70, 60, 40]  # the stop at 70 saved too; keep=3 dropped round 20
    assert store.load(60, loop.spec).meta.model_hash == epochs[-1].model_hash
    assert store.load(70, loop.spec).meta.model_hash == canonical_model_hash(loop.model.state_dict())


class ScriptedSwarm:
    """An averager whose swarm rounds follow a script: `None` is a held round, an int the swarm round that ran."""

    def __init__(self, script: list[int | None]) -> None:
        self.script = list(script)
        self.asked: list[int] = []

    def average(self, params: torch.Tensor, not_before: int) -> Averaged:
        self.asked.append(not_before)
        return Averaged(params.clone(), self.script.pop(0))

    def statistics(self) -> dict[str, float | int]:
        return {}


def test_the_loop_round_epochs_and_checkpoints_follow_the_swarm_round(
    digits: Task, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that catches up skips ahead (and says so once); a held round does not count; epoch boundaries are
    the swarm's, so a jump over two of them reaches one epoch, checkpointed at the swarm round."""
    reports: list[RoundReport] = []
    epochs: list[EpochReached] = []
    swarm = ScriptedSwarm([0, 1, 2, 120, None, None, 121, 122, 10])
    config = LoopConfig(inner_steps=1, epoch_rounds=50, eval_every_rounds=100, max_rounds=0)
    loop = make_loop(digits, swarm, tmp_path, config, on_round=reports.append, on_epoch=epochs.append)
    with caplog.at_level(logging.INFO, logger="training.loop"):
        for _ in range(9):
            loop.run_round()
    assert [r.round for r in reports] == [1, 2, 3, 121, 121, 121, 122, 123, 123]  # a stale swarm round: no change
    assert swarm.asked == [0, 1, 2, 3, 121, 121, 121, 122, 123]  # the averager is told the loop's round
    assert [(e.epoch, e.round) for e in epochs] == [(2, 121)]
    assert [r.round for r in reports if r.evaluation is not None] == [121]
    assert CheckpointStore(tmp_path, keep=3, max_bytes=LIMIT).rounds() == [121]
    caught_up = [r.getMessage() for r in caplog.records if "caught up" in r.getMessage()]
    assert caught_up == ["caught up with the swarm: round 3 -> 121 (skipped 117)"]


def test_four_peers_with_exact_averaging_agree_on_every_epoch_hash(digits: Task, tmp_path: Path) -> None:
    group = ExactMean(4)
    config = LoopConfig(inner_steps=1, epoch_rounds=25, eval_every_rounds=25, max_rounds=100)
    epochs: dict[int, list[EpochReached]] = {i: [] for i in range(4)}
    loops = [
        make_loop(digits, group.member(i), tmp_path / f"p{i}", config, f"peer-{i}", on_epoch=epochs[i].append)
        for i in range(4)
    ]
    results: dict[int, RoundReport | None] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, loops[i].run(threading.Event()))) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    hashes = {i: [e.model_hash for e in epochs[i]] for i in range(4)}
    assert len(hashes[0]) == 4 and all(hashes[i] == hashes[0] for i in range(4))
    for i in range(4):
        report = results[i]
        assert report is not None and report.evaluation is not None and report.evaluation.value >= 0.9


def test_restart_resumes_from_the_latest_checkpoint(digits: Task, tmp_path: Path) -> None:
    first = make_loop(digits, LoneAverager(), tmp_path, LoopConfig(epoch_rounds=20, max_rounds=30))
    first.run(threading.Event())
    saved = canonical_model_hash(first.model.state_dict())
    second = make_loop(digits, LoneAverager(), tmp_path, LoopConfig(epoch_rounds=20, max_rounds=40))
    meta = second.resume()
    assert meta is not None and meta.round == 30 and meta.model_hash == saved
    assert second.round == 30 and canonical_model_hash(second.model.state_dict()) == saved
    # the momentum buffers come back too: nothing of the local optimizer is lost on a restart
    first_state, second_state = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert sorted(first_state) == sorted(second_state) and first_state
    for index, values in first_state.items():
        assert torch.equal(values["momentum_buffer"], second_state[index]["momentum_buffer"])
    last = second.run(threading.Event())
    assert last is not None and last.round == 40 and last.samples == 10 * 32


def test_a_damaged_optimizer_state_restarts_the_optimizer_but_keeps_the_model(
    digits: Task, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_loop(digits, LoneAverager(), tmp_path, LoopConfig(epoch_rounds=20, max_rounds=20))
    first.run(threading.Event())
    (optimizer_file,) = tmp_path.rglob("*.optimizer.safetensors")
    optimizer_file.write_bytes(b"garbage")
    second = make_loop(digits, LoneAverager(), tmp_path, LoopConfig(epoch_rounds=20, max_rounds=40))
    meta = second.resume()
    assert meta is not None and meta.round == 20 and not second.optimizer.state_dict()["state"]
    assert "optimizer state of checkpoint 20 not used" in caplog.text


def test_fresh_directory_has_nothing_to_resume(digits: Task, tmp_path: Path) -> None:
    assert make_loop(digits, LoneAverager(), tmp_path, LoopConfig()).resume() is None


def test_stop_finishes_the_round_and_saves(digits: Task, tmp_path: Path) -> None:
    stop = threading.Event()

    def stop_at_five(report: RoundReport) -> None:
        if report.round == 5:
            stop.set()

    loop = make_loop(digits, LoneAverager(), tmp_path, LoopConfig(epoch_rounds=50), on_round=stop_at_five)
    last = loop.run(stop)
    assert last is not None and last.round == 5
    assert CheckpointStore(tmp_path, keep=3, max_bytes=LIMIT).rounds() == [5]


def test_stopped_before_the_first_round_runs_and_saves_nothing(digits: Task, tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    assert make_loop(digits, LoneAverager(), tmp_path, LoopConfig()).run(stop) is None
    assert CheckpointStore(tmp_path, keep=3, max_bytes=LIMIT).rounds() == []


@pytest.mark.parametrize(("broken", "message"), [("shape", "expected float32"), ("nan", "NaN")])
def test_broken_averager_output_is_a_local_bug(digits: Task, tmp_path: Path, broken: str, message: str) -> None:
    loop = make_loop(digits, LoneAverager(broken), tmp_path, LoopConfig())
    before = canonical_model_hash(loop.model.state_dict())
    with pytest.raises(LocalProtocolError, match=message):
        loop.run_round()
    assert loop.round == 0 and canonical_model_hash(loop.model.state_dict()) != before  # the local step ran


class HandOver:
    """A swarm of one whose round 3 hands `state` over from another thread while the training thread waits in
    it (the peer's event loop adopting a certified checkpoint mid-round); records each round's input vector."""

    def __init__(self, loop_of: Callable[[], TrainingLoop], state: dict[str, torch.Tensor]) -> None:
        self.loop_of = loop_of
        self.state = state
        self.seen: list[torch.Tensor] = []
        self.asked: list[int] = []

    def average(self, params: torch.Tensor, not_before: int) -> Averaged:
        self.seen.append(params.clone())
        self.asked.append(not_before)
        if len(self.seen) == 3:
            other = threading.Thread(target=self.loop_of().adopt, args=(self.state, 100))
            other.start()
            other.join()
        return Averaged(params.clone(), not_before)

    def statistics(self) -> dict[str, float | int]:
        return {}


def test_a_handed_over_state_is_loaded_by_the_training_thread_at_the_next_round(digits: Task, tmp_path: Path) -> None:
    probe = digits.build_model()
    target = {name: torch.full_like(tensor, 5.0) for name, tensor in probe.state_dict().items()}
    loops: list[TrainingLoop] = []
    swarm = HandOver(lambda: loops[0], target)
    loops.append(make_loop(digits, swarm, tmp_path, LoopConfig(epoch_rounds=1000)))
    loop = loops[0]
    for _ in range(3):
        loop.run_round()
    # handed over during round 3: round 3 ended on its own averaged vector, untouched by the other thread
    assert loop.round == 3 and float(swarm.seen[2].abs().max()) < 5.0
    loop.run_round()
    # round 4 started from the handed-over state (one local step away from all 5s) at the handed-over round
    assert swarm.asked == [0, 1, 2, 100] and loop.round == 101
    assert float((swarm.seen[3] - 5.0).abs().mean()) < 0.1 < float((swarm.seen[2] - 5.0).abs().mean())
    loop.run_round()
    assert swarm.asked[-1] == 101  # applied once
