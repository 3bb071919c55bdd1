"""`python -m sim sweep SCENARIO.toml --seeds 0-3 --set gossip.density=0.01,0.001 --out DIR [--ray ADDRESS]`: many
runs of one scenario, over the machine's cores or a Ray cluster.

Each `--set section.field=v1,v2,...` gives the values of one field (TOML values: `0.01`, `true`, `"mean"`); the
sweep runs every combination of them (the product over all `--set`s) with every seed, each run a `SwarmRun` in a
worker of a process pool (`--jobs`, default: the cores). Every combination is validated as a scenario before any
run starts, so a bad value is one error naming the field (exit 2). Outputs, all in the order of (combination,
seed) whatever order the workers finish in, so a sweep is as deterministic as its runs:

* `DIR/sweep.csv`: one row per (combination, seed, round): the swept fields, the seed, then the columns of
  `rounds.csv`;
* `DIR/sweep.json`: the scenario file's text, the seeds, the swept values, the software version, the command that
  replays it, and per combination the final loss and consensus distance over seeds (mean, min, max);
* `DIR/sweep.png` (with matplotlib): loss and consensus distance against rounds, one line per combination (the
  mean over seeds) in a band from the lowest to the highest seed.

With `--ray ADDRESS` the runs are Ray tasks of one CPU each instead (Ray is an optional extra:
`pip install 'swarmgrad[ray]'`): ADDRESS is what `ray.init` takes -- `auto` (the cluster `ray start` made that
this machine belongs to), `HOST:PORT` of a cluster's head, or `local` (a fresh single-machine instance for this
sweep). Every node must have this swarmgrad installed (its version is in `sweep.json`); the results are gathered in
job order, so the outputs are the same bytes as the process pool's. No scheduler of our own: Ray places the tasks.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import csv
import dataclasses
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import multiprocessing
import os
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

from sim.scenario import Scenario, scenario_from_dict
from sim.swarm import RoundMetrics, SwarmRun
from swarmgrad.core.errors import ConfigError, SwarmgradError

EXIT_FAILURE = 1
EXIT_USAGE = 2
MAX_RUNS = 10_000
"""Bound on the runs of one sweep (combinations times seeds)."""

Combination = tuple[tuple[str, Any], ...]
"""((section.field, value), ...) in the order of the `--set` options."""


def add_parser(commands: Any) -> None:
    sweep = commands.add_parser("sweep", help="run one scenario over seeds and swept values, on a process pool")
    sweep.add_argument("scenario", type=Path, metavar="SCENARIO.toml")
    sweep.add_argument("--seeds", default="0", help="seeds: 0-3, or 1,5,9, or 7 (default 0)")
    sweep.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=V1,V2", dest="sets")
    sweep.add_argument("--out", type=Path, required=True, metavar="DIR")
    sweep.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: cores)")
    sweep.add_argument(
        "--ray", metavar="ADDRESS", help="run on a Ray cluster instead: auto, HOST:PORT of its head, or local"
    )


def parse_seeds(text: str) -> list[int]:
    """`0-3` -> [0, 1, 2, 3]; `1,5,9`; `7`."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            low = int(first)
            high = int(last) if last else low
            if high < low:
                raise ValueError(part)
            seeds.extend(range(low, high + 1))
    except ValueError as exc:
        raise ConfigError("--seeds", text, "seeds such as 0-3, 1,5,9 or 7") from exc
    if len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds", text, "distinct seeds")
    return seeds


def parse_set(text: str) -> tuple[str, list[Any]]:
    """`gossip.density=0.01,0.001` -> ("gossip.density", [0.01, 0.001]); each value is read as TOML."""
    key, equals, values = text.partition("=")
    section, dot, name = key.partition(".")
    if not equals or not dot or not section or not name or not values:
        raise ConfigError("--set", text, "SECTION.FIELD=V1,V2,... (e.g. gossip.density=0.01,0.001)")
    try:
        parsed = tomllib.loads(f"v = [{values}]")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--set {key}", values, "TOML values separated by commas") from exc
    return key, parsed


def combinations(sets: list[tuple[str, list[Any]]]) -> list[Combination]:
    keys = [key for key, _ in sets]
    return [tuple(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in sets))]


def apply(data: dict[str, Any], combination: Combination) -> Scenario:
    """The scenario of `data` with the combination's fields set (validated: errors name the field)."""
    changed = copy.deepcopy(data)
    for key, value in combination:
        section, _, name = key.partition(".")
        table = changed.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {key}", value, f"a field of a section ([{section}] is a list)")
        table[name] = value
    return scenario_from_dict(changed)


def _run(job: tuple[dict[str, Any], Combination, int]) -> list[tuple[object, ...]]:
    """One run in a worker: its rows as plain tuples."""
    import torch

    torch.set_num_threads(1)
    data, combination, seed = job
    rows = SwarmRun(apply(data, combination), seed).run()
    return [tuple(row.as_row().values()) for row in rows]


class RayUnavailable(SwarmgradError):
    """The Ray cluster named by `--ray` could not be reached, or a run failed on it."""


def run_on_ray(address: str, jobs: list[tuple[dict[str, Any], Combination, int]]) -> list[Any]:
    """Each job as a one-CPU Ray task on the cluster at `address`; the results in job order. Raises `ConfigError`
    when Ray is not installed, `RayUnavailable` when the cluster cannot be reached or a task failed."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray", address, "Ray installed (pip install 'swarmgrad[ray]')") from exc
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"--ray {address}: cannot start or reach a Ray cluster ({exc})") from exc
    try:
        task = ray.remote(num_cpus=1)(_run)
        return list(ray.get([task.remote(job) for job in jobs]))
    except ray.exceptions.RayError as exc:
        raise RayUnavailable(f"--ray {address}: a run failed on the cluster ({exc})") from exc
    finally:
        ray.shutdown()


def main(args: argparse.Namespace) -> int:
    try:
        text = args.scenario.read_text(encoding="utf-8")
        data = tomllib.loads(text)
        seeds = parse_seeds(args.seeds)
        sets = [parse_set(s) for s in args.sets]
        combos = combinations(sets)
        for combination in combos:
            apply(data, combination)
        if len(combos) * len(seeds) > MAX_RUNS:
            raise ConfigError("--seeds/--set", len(combos) * len(seeds), f"at most {MAX_RUNS} runs")
        if args.jobs < 1:
            raise ConfigError("--jobs", args.jobs, ">= 1")
    except tomllib.TOMLDecodeError as exc:
        print(f"swarmgrad sim: error: {args.scenario}: not valid TOML ({exc})", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, OSError) as exc:
        print(f"swarmgrad sim: error: {args.scenario}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    jobs = [(data, combination, seed) for combination in combos for seed in seeds]
    if args.ray is not None:
        try:
            results = run_on_ray(args.ray, jobs)
        except ConfigError as exc:
            print(f"swarmgrad sim: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except RayUnavailable as exc:
            print(f"swarmgrad sim: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    else:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch state
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)), mp_context=context) as pool:
            results = list(pool.map(_run, jobs))
    args.out.mkdir(parents=True, exist_ok=True)
    keys = [key for key, _ in sets]
    write_table(args.out / "sweep.csv", keys, jobs, results)
    replay = shlex.join(
        ["swarmgrad", "sim", "sweep", str(args.scenario), "--seeds", args.seeds]
        + [f"--set={s}" for s in args.sets]
        + ["--out", "DIR"]
        + ([] if args.ray is None else ["--ray", args.ray])
    )
    by_combination = _group(jobs, results)
    summary = {
        "scenario_text": text,
        "seeds": seeds,
        "sets": {key: values for key, values in sets},
        "version": importlib.metadata.version("swarmgrad"),
        "replay": replay,
        "final": [{"set": dict(combination), **_final(runs)} for combination, runs in by_combination.items()],
    }
    (args.out / "sweep.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if importlib.util.find_spec("matplotlib") is not None:
        plot_sweep(args.out / "sweep.png", by_combination)
    print(f"{len(jobs)} runs ({len(combos)} combinations x {len(seeds)} seeds) -> {args.out}")
    return 0


_COLUMNS = [field.name for field in dataclasses.fields(RoundMetrics)]


def write_table(
    path: Path, keys: list[str], jobs: list[tuple[dict[str, Any], Combination, int]], results: list[Any]
) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        width = len(results[0][0]) if results and results[0] else len(_COLUMNS)
        writer.writerow([*keys, "seed", *_COLUMNS[:width]])  # a quadratic run has no accuracy (the last column)
        for (_, combination, seed), rows in zip(jobs, results, strict=True):
            values = [repr(v) if isinstance(v, float) else v for _, v in combination]
            for row in rows:
                writer.writerow([*values, seed, *(repr(v) if isinstance(v, float) else v for v in row)])


def _group(jobs: list[tuple[dict[str, Any], Combination, int]], results: list[Any]) -> dict[Combination, list[Any]]:
    grouped: dict[Combination, list[Any]] = {}
    for (_, combination, _), rows in zip(jobs, results, strict=True):
        grouped.setdefault(combination, []).append(rows)
    return grouped


def _final(runs: list[Any]) -> dict[str, object]:
    loss, distance = _COLUMNS.index("loss"), _COLUMNS.index("consensus_distance")
    out: dict[str, object] = {}
    for name, column in (("loss", loss), ("consensus_distance", distance)):
        values = [rows[-1][column] for rows in runs]
        out[name] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return out


def _label(combination: Combination) -> str:
    return ", ".join(f"{key}={value}" for key, value in combination) or "scenario"


def plot_sweep(path: Path, by_combination: dict[Combination, list[Any]]) -> None:
    """Loss and consensus distance against rounds: per combination the mean over seeds, in a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 2, figsize=(11, 3.8))
    for combination, runs in by_combination.items():
        rounds = min(len(rows) for rows in runs)  # a run stopped early by max_virtual_s shortens its combination
        for axis, column in zip(axes, ("loss", "consensus_distance"), strict=True):
            index = _COLUMNS.index(column)
            per_round = [[rows[r][index] for rows in runs] for r in range(rounds)]
            mean = [sum(v) / len(v) for v in per_round]
            (line,) = axis.semilogy(range(rounds), mean, label=_label(combination))
            axis.fill_between(
                range(rounds), [min(v) for v in per_round], [max(v) for v in per_round], color=line.get_color(),
                alpha=0.2,
            )  # fmt: skip
    axes[0].set(xlabel="round", ylabel="loss")
    axes[1].set(xlabel="round", ylabel="consensus distance")
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata={"Software": None})
    pyplot.close(figure)
