"""`python -m sim run|sweep ...` (also `swarmgrad sim run|sweep ...`): one simulated run, or a sweep of runs.

`run SCENARIO.toml --seed N --out DIR` writes `DIR/rounds.csv` (one row per swarm round: see `sim.swarm`), with
epoch consensus on `DIR/epochs.csv` (one row per epoch: see `sim.consensus.EpochRecord`),
`DIR/summary.json` (the scenario as loaded, the seed, the software version, the run's totals and the command that
replays it) and, where matplotlib is installed (`pip install swarmgrad[plots]`), `DIR/rounds.png`: loss against
rounds, bytes sent and virtual time, and consensus distance against rounds. A progress bar goes to stderr when it
is a terminal (or with `--progress`). The outputs hold no wall-clock figure, so one scenario and seed give
byte-identical files. `sweep` is `sim.sweep`. A bad scenario or option is one line on stderr naming the field,
exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from sim import sweep
from sim.consensus import EPOCH_COLUMNS
from sim.scenario import load_scenario
from sim.swarm import RoundMetrics, SwarmRun
from swarmgrad.core.errors import ConfigError

EXIT_USAGE = 2
BAR_WIDTH = 30


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarmgrad sim", description="Deterministic simulation of a swarm.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run one scenario with one seed")
    run.add_argument("scenario", type=Path, metavar="SCENARIO.toml")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, required=True, metavar="DIR")
    run.add_argument("--progress", action="store_true", help="show the progress bar even if stderr is no terminal")
    sweep.add_parser(commands)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core per run, and reductions in one fixed order
    if args.command == "sweep":
        return sweep.main(args)
    try:
        scenario = load_scenario(args.scenario)
    except (ConfigError, OSError) as exc:
        print(f"swarmgrad sim: error: {args.scenario}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    bar = ProgressBar(sys.stderr, scenario.swarm.rounds) if args.progress or sys.stderr.isatty() else None
    swarm = SwarmRun(scenario, args.seed, on_row=None if bar is None else bar.show)
    rows = swarm.run()
    if bar is not None:
        bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows(args.out / "rounds.csv", rows)
    if swarm.consensus is not None:
        write_table(args.out / "epochs.csv", EPOCH_COLUMNS, swarm.consensus.epoch_rows())
    replay = shlex.join(["swarmgrad", "sim", "run", str(args.scenario), "--seed", str(args.seed), "--out", "DIR"])
    summary = {
        "scenario": dataclasses.asdict(scenario),
        "seed": args.seed,
        "version": importlib.metadata.version("swarmgrad"),
        "replay": replay,
        **swarm.summary(),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if importlib.util.find_spec("matplotlib") is not None:
        plot_rows(args.out / "rounds.png", rows)
    final = rows[-1]
    print(
        f"{len(rows) - 1} rounds, {final.virtual_time_s:.1f} virtual s, loss {final.loss:.4g}, "
        f"consensus distance {final.consensus_distance:.4g}, {final.bytes_sent} bytes -> {args.out}"
    )
    if swarm.consensus is not None:
        figures = swarm.consensus.summary()
        latency = figures["commit_latency_s"]
        print(
            f"consensus: {figures['epochs_committed']} of {figures['epochs_started']} epochs committed, "
            f"commit latency median {latency['median']:.3g} s, max {latency['max']:.3g} s"  # type: ignore[index]
        )
    if len(rows) - 1 < scenario.swarm.rounds:  # a surprising run: say how to replay it
        print(f"stopped at max_virtual_s after {len(rows) - 1} rounds; replay: {replay}", file=sys.stderr)
    return 0


class ProgressBar:
    """`[#####.....] 12/40 rounds, 3.2 virtual s` on one line of `stream`, redrawn per row (never in the outputs)."""

    def __init__(self, stream: TextIO, rounds: int) -> None:
        self.stream = stream
        self.rounds = rounds

    def show(self, row: RoundMetrics) -> None:
        filled = BAR_WIDTH * min(row.round, self.rounds) // self.rounds
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        self.stream.write(f"\r[{bar}] {row.round}/{self.rounds} rounds, {row.virtual_time_s:.1f} virtual s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def write_rows(path: Path, rows: list[RoundMetrics]) -> None:
    table = [row.as_row() for row in rows]
    columns = [field.name for field in dataclasses.fields(RoundMetrics) if field.name in table[0]]
    write_table(path, columns, table)


def write_table(path: Path, columns: Sequence[str], rows: list[dict[str, object]]) -> None:
    """One CSV row per dict, floats as `repr` (exact, so byte-identical per seed)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


Panel = tuple[str, str, list[float], list[float], bool]
"""One plot: x label, y label, x values, y values, and whether y is drawn on a log scale."""


def panels(rows: list[RoundMetrics]) -> list[list[Panel]]:
    """The rows of panels of `rounds.png`: loss against rounds, bytes sent and virtual time, and consensus distance
    against rounds; for a task (rows with accuracy), its held-out accuracy against the same three."""
    rounds = [float(r.round) for r in rows]
    sent = [float(r.bytes_sent) for r in rows]
    times = [r.virtual_time_s for r in rows]
    losses = [r.loss for r in rows]
    grid = [
        [
            ("round", "loss", rounds, losses, True),
            ("bytes sent (all peers)", "loss", sent, losses, True),
            ("virtual time (s)", "loss", times, losses, True),
            ("round", "consensus distance", rounds, [r.consensus_distance for r in rows], True),
        ]
    ]
    if any(r.accuracy is not None for r in rows):
        accuracy = [math.nan if r.accuracy is None else r.accuracy for r in rows]
        grid.append(
            [
                ("round", "held-out accuracy", rounds, accuracy, False),
                ("bytes sent (all peers)", "held-out accuracy", sent, accuracy, False),
                ("virtual time (s)", "held-out accuracy", times, accuracy, False),
            ]
        )
    return grid


def plot_rows(path: Path, rows: list[RoundMetrics]) -> None:
    """The `panels` of `rows`, one row of four per line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    grid = panels(rows)
    figure, axes = pyplot.subplots(len(grid), 4, figsize=(16, 3.6 * len(grid)), squeeze=False)
    for line, row_axes in zip(grid, axes, strict=True):
        for index, ax in enumerate(row_axes):
            if index >= len(line):
                ax.axis("off")
                continue
            xlabel, ylabel, xs, ys, log = line[index]
            (ax.semilogy if log else ax.plot)(xs, ys)
            ax.set(xlabel=xlabel, ylabel=ylabel)
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata={"Software": None})
    pyplot.close(figure)


if __name__ == "__main__":
    sys.exit(main())
