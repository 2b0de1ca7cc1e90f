"""Population mode against plain Keras `model.fit` one trial at a time over a whole sweep file's grid (default: the
default sweep, sweeps/plateau.yaml), in one process and one run: the issue's trials/s target as it is worded ("on
the default grid"), where bench_trials.py measures one configuration at a time. Writes results/benchmarks/grid.json.

    .venv/bin/python benchmarks/bench_grid.py [--sweep sweeps/plateau.yaml] [--keras-runs 1|all] [--seed 0]
        [--sweep-workers 2]

Both sides run under lstm-sweep's thread settings, as bench_trials.py's do (one thread per op, two ops side by side).

Population side: every run of the grid (configurations x replicates), grouped as the sweep groups them (a data
layout and a state size, `driver.population_key`), each group trained by `train_population` with the sweep's XLA
choice and step parts. The first call of each compiled epoch includes its XLA compile (this process does not turn on the
persistent XLA cache), as a first sweep on one worker pays it; that group is then trained a second time, to report
the figure without compiles too.

Keras side: a new `keras_trial` (bench_trials.py: LSTM + Dense, SGD with momentum, compiled `model.fit`) per run.
Keras has no gradient noise: its runs of noisy configurations train without it. Its time per run depends on the
shapes a group shares and on its optimizer's slots (SGD keeps none without momentum), not on the learning rate, so
by default `--keras-runs 1` times one run drawn at random (seeded) for each optimizer setting of each group and
counts that setting's Keras time as the timed mean times its runs: an estimate, reported as such, from 48 runs of
the default grid's 576; `--keras-runs all` times every run (about 25 minutes for the default grid).

Whole command: with `--sweep-workers N` (default 2; 0 skips it) the sweep file also runs through `lstm-sweep run
--workers N --no-tracking` in a new process, with a new study and an empty XLA cache: the grid's trials/s as a user
gets them on this machine, start-up, Optuna and every compile included, against the same Keras total.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf
from bench_trials import keras_trial, matmul_gflops, once, useful_flops
from sweep_timing import timed_run

from lstm_sweep.config import TrialConfig
from lstm_sweep.driver import population_key
from lstm_sweep.executor import configure_threads
from lstm_sweep.spec import SweepSpec, load_sweep
from lstm_sweep.tasks import build_data
from lstm_sweep.train import population_graph_key, train_population

Setting = tuple[str, float | None]  # what Keras's optimizer builds: (optimizer, momentum)


def optimizer_setting(config: TrialConfig) -> Setting:
    values = config.factor_values()  # momentum None where the optimizer ignores it
    return (values["optimizer"], values["momentum"])


@dataclass
class Group:
    """The runs of one population, as the sweep would train them together."""

    configs: list[TrialConfig]
    population_s: float = 0.0  # first call, compile included when its graph is new
    population_again_s: float | None = None  # a second call, when the first compiled
    keras_timed: dict[Setting, list[float]] = field(default_factory=dict)
    useful_gflop: float = 0.0

    @property
    def name(self) -> str:
        c = self.configs[0]
        return f"{c.output_framing}/{c.input_encoding} seq_len={c.seq_len} units={c.state_size}"

    @property
    def settings(self) -> dict[Setting, list[TrialConfig]]:
        out: dict[Setting, list[TrialConfig]] = {}
        for c in self.configs:
            out.setdefault(optimizer_setting(c), []).append(c)
        return out

    @property
    def trained_s(self) -> float:
        """Seconds to train the group without its graph's compile."""
        return self.population_s if self.population_again_s is None else self.population_again_s

    @property
    def keras_s(self) -> float:
        """Keras seconds for every run of the group: per optimizer setting, the timed runs' mean times its runs."""
        return sum(statistics.fmean(self.keras_timed[s]) * len(runs) for s, runs in self.settings.items())

    @property
    def keras_runs_timed(self) -> int:
        return sum(len(times) for times in self.keras_timed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.name,
            "runs": len(self.configs),
            "keras_runs_timed": self.keras_runs_timed,
            "keras_s_estimated": round(self.keras_s, 2),
            "population_s": round(self.population_s, 3),
            "population_without_compile_s": round(self.trained_s, 3),
            "compiled": self.population_again_s is not None,
            "population_vs_keras": round(self.keras_s / self.population_s, 1),
            "population_vs_keras_without_compile": round(self.keras_s / self.trained_s, 1),
            "population_useful_gflop_per_s": round(self.useful_gflop / self.trained_s, 2),
        }


def grid_groups(spec: SweepSpec) -> list[Group]:
    """Every run the sweep file plans, grouped by population key, in the grid's order."""
    groups: dict[tuple[Any, ...], Group] = {}
    for cell in spec.grid_cells():
        for replicate in range(spec.replicates):
            config = spec.config_for(cell, replicate)
            groups.setdefault(population_key(config), Group([])).configs.append(config)
    return list(groups.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, default=Path("sweeps/plateau.yaml"))
    parser.add_argument(
        "--keras-runs", default="1", help="runs timed in Keras per optimizer setting of each population, or 'all'"
    )
    parser.add_argument("--seed", type=int, default=0, help="chooses the Keras runs timed")
    parser.add_argument("--sweep-workers", type=int, default=2, help="workers for the whole-command run; 0 skips it")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    per_setting = None if args.keras_runs == "all" else int(args.keras_runs)
    if per_setting is not None and per_setting < 1:
        parser.error("--keras-runs: expected a positive integer or 'all'")
    if args.sweep_workers < 0:
        parser.error("--sweep-workers: expected 0 (skip) or a positive integer")

    configure_threads(inter_op=2)  # as `lstm-sweep run` sets them in one process; they hold for Keras too
    peak = matmul_gflops()
    spec = load_sweep(args.sweep)
    groups = grid_groups(spec)
    parts = spec.step_parts()  # as the sweep compiles its epochs
    runs = sum(len(g.configs) for g in groups)
    chooser = random.Random(args.seed)
    compiled: set[tuple[object, ...]] = set()
    started = time.perf_counter()
    for i, group in enumerate(groups, 1):
        group.population_s = once(lambda g=group: train_population(g.configs, layout_runs=runs, parts=parts))
        graph = population_graph_key(group.configs, runs, parts)
        if graph not in compiled:
            compiled.add(graph)
            group.population_again_s = once(lambda g=group: train_population(g.configs, layout_runs=runs, parts=parts))
        for setting, members in group.settings.items():
            timed = members if per_setting is None else chooser.sample(members, min(per_setting, len(members)))
            group.keras_timed[setting] = [keras_trial(c) for c in timed]
        data = build_data(group.configs[0])
        steps = data.train.x.shape[0] * group.configs[0].epochs
        group.useful_gflop = useful_flops(group.configs[0], data, steps, len(group.configs)) / 1e9
        print(f"[{i}/{len(groups)} {time.perf_counter() - started:.0f} s] {json.dumps(group.as_dict())}", flush=True)

    command_s = None
    if args.sweep_workers:
        with tempfile.TemporaryDirectory(prefix="lstm-sweep-bench-grid-") as tmp:
            options = ["--workers", str(args.sweep_workers), "--no-tracking", "--storage", f"sqlite:///{tmp}/grid.db"]
            command_s = timed_run(args.sweep, options, Path(tmp) / "xla")

    keras_total = sum(g.keras_s for g in groups)
    timed_runs = sum(g.keras_runs_timed for g in groups)
    population_total = sum(g.population_s for g in groups)
    without_compile = sum(g.trained_s for g in groups)
    gflop = sum(g.useful_gflop for g in groups)
    by_shape: dict[str, dict[str, float]] = {}
    for g in groups:
        c = g.configs[0]
        entry = by_shape.setdefault(
            f"seq_len={c.seq_len} units={c.state_size}", dict.fromkeys(("runs", "keras", "pop"), 0)
        )
        entry["runs"] += len(g.configs)
        entry["keras"] += g.keras_s
        entry["pop"] += g.trained_s
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__},
        "sweep": str(args.sweep),
        "runs": runs,
        "groups": len(groups),
        "compiled_epochs": len(compiled),
        "keras_runs_timed": timed_runs,
        "keras_estimated": timed_runs < runs,
        "matmul_gflop_per_s": round(peak, 1),
        "keras_s": round(keras_total, 1),
        "keras_trials_per_s": round(runs / keras_total, 3),
        "population_s": round(population_total, 1),
        "population_trials_per_s": round(runs / population_total, 2),
        "population_vs_keras": round(keras_total / population_total, 1),
        "population_without_compile_s": round(without_compile, 1),
        "population_vs_keras_without_compile": round(keras_total / without_compile, 1),
        # counted from the model's shapes (bench_trials.useful_flops), over the measured seconds
        "population_useful_gflop_per_s": round(gflop / without_compile, 2),
        "population_useful_fraction_of_matmul_peak": round(gflop / without_compile / peak, 4),
        "population_vs_keras_if_useful_flops_ran_at_peak": round(keras_total * peak / gflop, 1),
        "command_workers": args.sweep_workers or None,
        "command_s": None if command_s is None else round(command_s, 1),
        "command_trials_per_s": None if command_s is None else round(runs / command_s, 2),
        "command_vs_keras": None if command_s is None else round(keras_total / command_s, 1),
        "by_shape": {
            k: {
                "runs": int(v["runs"]),
                "keras_s": round(v["keras"], 1),
                "population_without_compile_s": round(v["pop"], 1),
                "population_vs_keras_without_compile": round(v["keras"] / v["pop"], 1),
            }
            for k, v in by_shape.items()
        },
        "rows": [g.as_dict() for g in groups],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps(summary, indent=2))
    keras_how = f"estimated from {timed_runs} timed runs" if timed_runs < runs else "every run timed"
    print(
        f"{args.sweep}: {runs} runs in {len(groups)} populations ({len(compiled)} compiled epochs); "
        f"Keras one at a time {keras_total:.1f} s ({keras_how}); "
        f"population {population_total:.1f} s with compiles = {summary['population_vs_keras']}x, "
        f"{without_compile:.1f} s without = {summary['population_vs_keras_without_compile']}x; "
        f"useful {summary['population_useful_gflop_per_s']} GFLOP/s of {peak:.1f} "
        f"({summary['population_vs_keras_if_useful_flops_ran_at_peak']}x if it all ran at the peak)"
    )
    if command_s is not None:
        print(
            f"lstm-sweep run --workers {args.sweep_workers} --no-tracking (new study, empty XLA cache): "
            f"{command_s:.1f} s = {summary['command_trials_per_s']} trials/s, {summary['command_vs_keras']}x Keras"
        )
    for key, v in summary["by_shape"].items():
        print(
            f"  {key}: {v['runs']} runs, Keras {v['keras_s']} s, population {v['population_without_compile_s']} s "
            f"= {v['population_vs_keras_without_compile']}x"
        )


if __name__ == "__main__":
    main()
