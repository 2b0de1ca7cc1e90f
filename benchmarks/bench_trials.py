"""Side by side, in one process and one run: plain Keras `model.fit`, lstm-sweep one trial at a time, and
lstm-sweep's population mode, on the same data and configurations. Prints steps/s, trials/s and the ratios,
and writes them to results/benchmarks/.

    .venv/bin/python benchmarks/bench_trials.py [--epochs 20] [--members 64] [--repeats 2] [--seq-lens 1,12]
        [--threads lstm-sweep|tf-default]

Every timing is a whole trial as a sweep pays for it: Keras builds and compiles a new model per trial (its
trace included); lstm-sweep reuses its compiled graph for a layout it has seen (the first call, which traces or
compiles it, is reported separately as `single_trace_s` / `population_trace_s`, and the one-at-a-time ratio is
also given with that first call spread over the `--members` runs of the layout a sweep would train in one worker).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

from lstm_sweep.config import TrialConfig
from lstm_sweep.executor import configure_threads
from lstm_sweep.tasks import SequenceData, build_data
from lstm_sweep.train import train, train_population


@dataclass
class Row:
    name: str
    steps_per_trial: int
    keras_s: float = 0.0
    single_s: float = 0.0
    single_trace_s: float = 0.0
    population_s: float = 0.0
    population_trace_s: float = 0.0
    members: int = 0
    useful_gflop: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        keras_steps = self.steps_per_trial / self.keras_s
        single_steps = self.steps_per_trial / self.single_s
        # one-at-a-time steps/s with the first call's trace or compile spread over `members` runs of the layout
        single_amortised = self.single_s + (self.single_trace_s - self.single_s) / self.members
        keras_trials = 1.0 / self.keras_s
        pop_trials = self.members / self.population_s
        return {
            "config": self.name,
            "steps_per_trial": self.steps_per_trial,
            "keras_trial_s": round(self.keras_s, 3),
            "keras_steps_per_s": round(keras_steps, 1),
            "single_trial_s": round(self.single_s, 3),
            "single_trace_s": round(self.single_trace_s, 3),
            "single_steps_per_s": round(single_steps, 1),
            "single_vs_keras": round(single_steps / keras_steps, 2),
            "single_vs_keras_compile_included": round(self.keras_s / single_amortised, 2),
            "population_members": self.members,
            "population_s": round(self.population_s, 3),
            "population_trace_s": round(self.population_trace_s, 3),
            "keras_trials_per_s": round(keras_trials, 3),
            "population_trials_per_s": round(pop_trials, 2),
            "population_vs_keras": round(pop_trials / keras_trials, 1),
            "population_gflop_per_s": round(self.useful_gflop / self.population_s, 2),
        }


def keras_trial(config: TrialConfig) -> float:
    """A new Keras model (LSTM + Dense, SGD with momentum) fit on the same windows; returns seconds."""
    started = time.perf_counter()
    data = build_data(config)
    x = data.train.x.reshape(-1, *data.train.x.shape[2:])
    regression = config.output_framing == "regression"
    y = data.train.y.reshape(-1, config.seq_len) if regression else data.train.labels.reshape(-1, config.seq_len)
    inputs = tf.keras.Input((config.seq_len, data.num_features))
    hidden = tf.keras.layers.LSTM(config.state_size, return_sequences=True, unit_forget_bias=True)(inputs)
    outputs = tf.keras.layers.Dense(1 if regression else data.num_classes)(hidden)
    model = tf.keras.Model(inputs, outputs)
    model.compile(
        optimizer=tf.keras.optimizers.SGD(config.learning_rate, momentum=config.momentum),
        loss="mse" if regression else tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    y_fit = y[..., None] if regression else y
    model.fit(x, y_fit, batch_size=config.batch_size, epochs=config.epochs, shuffle=False, verbose=0)
    return time.perf_counter() - started


def timed(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(once(fn) for _ in range(repeats))


def once(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def useful_flops(config: TrialConfig, data: SequenceData, steps: int, members: int) -> float:
    """Multiply-adds of the LSTM and readout, forward and backward (3x forward), for every member and step.

    A window starts from the zero state, so its first step has no recurrent product: with seq_len 1 the
    recurrent kernel does no useful work at all (lstm-sweep skips it, so counting it would flatter the rate).
    """
    n, f, t = config.state_size, data.num_features, config.seq_len
    outputs = 1 if config.output_framing == "regression" else data.num_classes
    per_window = 2 * (f * 4 * n * t + n * 4 * n * (t - 1) + n * outputs * t)
    return 3.0 * per_window * config.batch_size * steps * members


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """The machine's fp32 matmul rate under these thread settings: one chain of dependent 1024^2 matmuls per
    core, the chains independent, so the inter-op pool runs them side by side (one chain reaches one core)."""
    chains = os.cpu_count() or 1
    pairs = [(tf.random.normal((size, size)), tf.random.normal((size, size)) / size**0.5) for _ in range(chains)]

    @tf.function
    def run() -> list[tf.Tensor]:
        ends = []
        for a, b in pairs:
            for _ in range(repeats):
                a = tf.matmul(a, b)
            ends.append(a)
        return ends

    [end.numpy() for end in run()]
    started = time.perf_counter()
    [end.numpy() for end in run()]
    return 2.0 * size**3 * repeats * chains / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--members", type=int, default=64, help="population size (configurations at once)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-lens", default="1,12", help="comma-separated (the default sweep uses 1 and 8)")
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument(
        "--threads",
        choices=("lstm-sweep", "tf-default"),
        default="lstm-sweep",
        help="TensorFlow thread settings for all three sides",
    )
    args = parser.parse_args()

    if args.threads == "lstm-sweep":
        # As `lstm-sweep run` sets them (one thread per op, two ops side by side). Set before the first op, they
        # hold for Keras too: compare with `--threads tf-default` (README quotes both).
        configure_threads(inter_op=2)
    peak = matmul_gflops()
    rows: list[Row] = []
    for framing, encoding in (("regression", "raw"), ("classification", "onehot")):
        for seq_len in (int(v) for v in args.seq_lens.split(",")):
            for units in (16, 64):
                config = TrialConfig(
                    output_framing=framing,
                    input_encoding=encoding,
                    seq_len=seq_len,
                    state_size=units,
                    epochs=args.epochs,
                    grad_noise=0.0,
                    learning_rate=0.01,
                )
                data = build_data(config)
                steps = data.train.x.shape[0] * args.epochs
                row = Row(f"{framing}/{encoding} seq_len={seq_len} units={units}", steps)
                row.keras_s = timed(lambda c=config: keras_trial(c), args.repeats)
                # One trial at a time as a `--no-population` sweep trains them: a worker gets `members` lone runs of
                # this layout together, so one compiled graph (XLA from XLA_MIN_RUNS planned runs on) serves them all.
                row.single_trace_s = once(lambda c=config: train(c, layout_runs=args.members))
                row.single_s = timed(lambda c=config: train(c, layout_runs=args.members), args.repeats)
                members = [
                    config.replace(seed=i, learning_rate=10 ** np.linspace(-3, -1, args.members)[i])
                    for i in range(args.members)
                ]
                row.population_trace_s = once(lambda m=members: train_population(m))
                row.population_s = timed(lambda m=members: train_population(m), args.repeats)
                row.members = args.members
                row.useful_gflop = useful_flops(config, data, steps, args.members) / 1e9
                rows.append(row)
                print(json.dumps(row.as_dict()), flush=True)

    table = [r.as_dict() for r in rows]
    for r, row in zip(table, rows, strict=True):
        r["population_fraction_of_matmul_peak"] = round(r["population_gflop_per_s"] / peak, 4)
        # The most population mode could reach if every useful FLOP ran at the large-matmul peak.
        r["population_vs_keras_at_peak"] = round(row.keras_s * peak * row.members / row.useful_gflop, 1)
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__},
        "threads": {  # 0: TensorFlow's own choice
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
        "matmul_gflop_per_s": round(peak, 1),
        "epochs": args.epochs,
        "rows": table,
        "median_single_vs_keras": round(statistics.median(r["single_vs_keras"] for r in table), 2),
        "median_population_vs_keras": round(statistics.median(r["population_vs_keras"] for r in table), 2),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_trials.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"fp32 matmul: {peak:.1f} GFLOP/s; epochs {args.epochs}; population of {args.members}",
        "",
        "| config | Keras steps/s | single steps/s | single/Keras | single/Keras, compile over "
        f"{args.members} runs | Keras trials/s | population trials/s "
        "| population/Keras | population GFLOP/s (% of matmul) | population/Keras at matmul peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['config']} | {r['keras_steps_per_s']} | {r['single_steps_per_s']} | {r['single_vs_keras']}x "
            f"| {r['single_vs_keras_compile_included']}x "
            f"| {r['keras_trials_per_s']} | {r['population_trials_per_s']} | {r['population_vs_keras']}x "
            f"| {r['population_gflop_per_s']} ({100 * r['population_fraction_of_matmul_peak']:.1f}%) "
            f"| {r['population_vs_keras_at_peak']}x |"
        )
    lines.append("")
    lines.append(
        f"median single/Keras {summary['median_single_vs_keras']}x, "
        f"median population/Keras {summary['median_population_vs_keras']}x"
    )
    (out / "bench_trials.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
