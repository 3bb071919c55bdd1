"""The simulator's command line end to end: `swarmgrad sim run` on a tiny scenario writes the CSV, the summary and
(with matplotlib) the plot, and the progress bar leaves the outputs byte-identical; bad scenario files give one
line naming the field and exit 2; `swarmgrad sim sweep` over 2 seeds and 2 densities writes one table, its summary
and (with matplotlib) the comparison plot, in the same order whatever the pool does."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim import sweep
from sim.__main__ import main as sim_main
from swarmgrad.core.errors import ConfigError

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = """
[swarm]
peers = 4
rounds = 5
[model]
dim = 100
[gossip]
density = 0.1
[network]
latency_s = 0.01
"""


def swarmgrad(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed `swarmgrad` command, as a user runs it."""
    command = [sys.executable, "-c", "import sys; from swarmgrad.cli import main; sys.exit(main())", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_swarmgrad_sim_run_writes_csv_summary_and_plot(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    done = swarmgrad("sim", "run", str(scenario), "--seed", "4", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "5 rounds" in done.stdout and done.stderr == ""  # no terminal: no progress bar
    rows = list(csv.DictReader((tmp_path / "out" / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == list(range(6))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert int(rows[-1]["bytes_sent"]) > 0 and int(rows[-1]["live_peers"]) == 4
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["seed"] == 4 and summary["rounds"] == 5
    assert summary["replay"].startswith("swarmgrad sim run ") and summary["version"]
    assert (tmp_path / "out" / "rounds.png").exists() == HAS_MATPLOTLIB


def test_progress_bar_goes_to_stderr_and_outputs_stay_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    assert sim_main(["run", str(scenario), "--seed", "1", "--out", str(tmp_path / "quiet")]) == 0
    assert capsys.readouterr().err == ""
    assert sim_main(["run", str(scenario), "--seed", "1", "--out", str(tmp_path / "bar"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "5/5 rounds" in err and err.count("\r") == 6
    for name in ("rounds.csv", "summary.json", *(["rounds.png"] if HAS_MATPLOTLIB else [])):
        assert (tmp_path / "quiet" / name).read_bytes() == (tmp_path / "bar" / name).read_bytes(), name


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("[network]\nlatency_s = 0.01\nbandwith = 5\n", "network.bandwith"),
        ('[model]\ndim = "big"\n', "model.dim"),
        ('[[partitions]]\nat_s = 1.0\ngroups = [["p0", "p1"], ["p2", "p7"]]\n', "partitions[0].groups"),
        ("[network]\ndownlink_bytes_per_s = -1e6\n", "network.downlink_bytes_per_s"),
    ],
)
def test_bad_scenario_file_is_one_line_naming_the_field_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, field: str
) -> None:
    scenario = tmp_path / "bad.toml"
    scenario.write_text("[swarm]\npeers = 4\nrounds = 3\n" + extra)
    assert sim_main(["run", str(scenario), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err, err
    assert not (tmp_path / "out").exists()


def test_sweep_over_two_seeds_and_two_densities_writes_one_table(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "sweep"
    done = swarmgrad(
        "sim", "sweep", str(scenario), "--seeds", "0-1", "--set", "gossip.density=0.2,0.02", "--out", str(out),
        "--jobs", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert list(rows[0])[:3] == ["gossip.density", "seed", "round"]
    runs = [(r["gossip.density"], r["seed"]) for r in rows if r["round"] == "0"]
    assert runs == [("0.2", "0"), ("0.2", "1"), ("0.02", "0"), ("0.02", "1")]
    assert len(rows) == 4 * 6
    final = {(r["gossip.density"], r["seed"]): r for r in rows if r["round"] == "5"}
    # a denser gossip sends more bytes, and the seeds differ
    assert int(final[("0.2", "0")]["bytes_sent"]) > 1.5 * int(final[("0.02", "0")]["bytes_sent"])  # 20,400 vs 9,840
    assert final[("0.2", "0")]["loss"] != final[("0.2", "1")]["loss"]
    summary = json.loads((out / "sweep.json").read_text())
    assert [entry["set"] for entry in summary["final"]] == [{"gossip.density": 0.2}, {"gossip.density": 0.02}]
    assert summary["seeds"] == [0, 1] and "--set=gossip.density=0.2,0.02" in summary["replay"]
    assert (out / "sweep.png").exists() == HAS_MATPLOTLIB


def test_sweep_runs_match_single_runs(tmp_path: Path) -> None:
    """A worker's run is the run `sim run` makes: same scenario and seed, same rows."""
    import tomllib

    from sim.scenario import scenario_from_dict
    from sim.swarm import SwarmRun

    data = tomllib.loads(TINY)
    combination = (("gossip.density", 0.05),)
    data_alone = {**data, "gossip": {"density": 0.05}}
    alone = [tuple(r.as_row().values()) for r in SwarmRun(scenario_from_dict(data_alone), 3).run()]
    assert sweep._run((data, combination, 3)) == alone


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--seeds", "3-1"], "--seeds"),
        (["--set", "gossip.density"], "--set"),
        (["--set", "gossip.density=2.0"], "gossip.density"),
        (["--set", "gossip.colour=1"], "gossip.colour"),
    ],
)
def test_bad_sweep_options_name_the_field_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], field: str
) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    assert sim_main(["sweep", str(scenario), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err, err


def test_seed_and_set_parsing() -> None:
    assert sweep.parse_seeds("0-3") == [0, 1, 2, 3]
    assert sweep.parse_seeds("1,5,9") == [1, 5, 9]
    assert sweep.parse_set('gossip.aggregation="mean","clipped"') == ("gossip.aggregation", ["mean", "clipped"])
    with pytest.raises(ConfigError):
        sweep.parse_seeds("1,1")
