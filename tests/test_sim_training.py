"""Real training inside the simulation (`sim.training`): a tiny `digits` scenario through the simulator's command
line trains the task's real model between real gossip rounds, and the held-out accuracy rises; a run is the same
twice; a peer (re)starting without state trains exactly as a brand-new one; bad task fields name the field."""

from __future__ import annotations

import csv
import importlib.util
import tomllib
from pathlib import Path

import pytest
import torch

from sim.__main__ import main as sim_main
from sim.__main__ import panels
from sim.scenario import Scenario, scenario_from_dict
from sim.swarm import SwarmRun
from sim.training import TaskTraining
from swarmgrad.core.errors import ConfigError

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def load_text(text: str) -> Scenario:
    return scenario_from_dict(tomllib.loads(text))


TINY_DIGITS = """
[swarm]
peers = 4
rounds = 12
[model]
kind = "task"
task = "digits"
local_steps = 2
[gossip]
density = 0.05
[compute]
step_time_s = 0.05
[network]
latency_s = 0.001
"""


def test_a_tiny_digits_scenario_through_the_cli_raises_accuracy(tmp_path: Path) -> None:
    scenario = tmp_path / "digits.toml"
    scenario.write_text(TINY_DIGITS)
    for out in ("a", "b"):
        assert sim_main(["run", str(scenario), "--seed", "0", "--out", str(tmp_path / out)]) == 0
    rows = list(csv.DictReader((tmp_path / "a" / "rounds.csv").open()))
    assert len(rows) == 13
    first, last = float(rows[0]["accuracy"]), float(rows[-1]["accuracy"])
    assert first < 0.3 and last > first + 0.4, (first, last)  # measured 0.13 -> 0.80
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # the held-out loss
    assert int(rows[-1]["bytes_sent"]) > 0
    assert (tmp_path / "a" / "rounds.csv").read_bytes() == (tmp_path / "b" / "rounds.csv").read_bytes()
    assert (tmp_path / "a" / "rounds.png").exists() == HAS_MATPLOTLIB


def test_a_task_run_plots_accuracy_against_rounds_bytes_and_virtual_time() -> None:
    swarm = SwarmRun(load_text(TINY_DIGITS), 0)
    rows = swarm.run()
    loss_line, accuracy_line = panels(rows)
    assert [(x, y) for x, y, *_ in accuracy_line] == [
        ("round", "held-out accuracy"),
        ("bytes sent (all peers)", "held-out accuracy"),
        ("virtual time (s)", "held-out accuracy"),
    ]
    for _, _, xs, ys, log in accuracy_line:
        assert len(xs) == len(ys) == len(rows) and not log
        assert ys[-1] == rows[-1].accuracy and xs == sorted(xs)  # rounds, bytes and time only grow
    assert [y for _, y, *_ in loss_line] == ["loss", "loss", "loss", "consensus distance"]
    quadratic = SwarmRun(scenario_from_dict({"swarm": {"peers": 4, "rounds": 2}, "model": {"dim": 10}}), 0).run()
    assert len(panels(quadratic)) == 1  # no accuracy: the loss panels only


def test_a_fresh_start_resets_the_model_optimizer_and_data_stream() -> None:
    """What a join or a restart without state gets: the same three steps as a brand-new peer's."""
    trainer = TaskTraining("digits")
    start = trainer.fresh("p1")
    first = trainer.steps("p1", start, 3)
    assert torch.equal(start, trainer.initial) and not torch.equal(first, start)  # trained, its input untouched
    trainer.steps("p1", first, 5)  # momentum and the batch stream move on
    assert torch.equal(trainer.steps("p1", trainer.fresh("p1"), 3), first)


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ({"kind": "task"}, "model.task"),
        ({"kind": "quadratic", "task": "digits"}, "model.task"),
        ({"kind": "task", "task": "no such"}, "model.task"),
        ({"kind": "mlp"}, "model.kind"),
    ],
)
def test_bad_model_sections_name_the_field(model: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        scenario_from_dict({"swarm": {"peers": 4, "rounds": 3}, "model": model})
    assert caught.value.field == field
