"""`--workers 2` against one worker, population mode off: the same sweep run through the `lstm-sweep` command with
each, side by side in one run, start-up included. Prints the median wall seconds of `--repeats` runs each (alternating
which goes first), runs/s and the ratio, and writes them to results/benchmarks/workers_{cold,warm}.json.

    .venv/bin/python benchmarks/bench_workers.py [--seq-lens 1,8] [--workers 2] [--state-size 16] [--replicates 3]
        [--xla-cache cold|warm] [--repeats 3]

The sweep: 72 configurations of the seed task (learning rate x momentum x gradient noise x framing x encoding) at
one seq_len and state size, each with `--replicates` runs, no MLflow tracking (tracking has its own figure), in a
fresh SQLite study per run. Each configuration is timed as a new process: a user's whole command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml
from sweep_timing import alternating, timed_run

FACTORS = {
    "learning_rate": [0.001, 0.01, 0.1],
    "momentum": [0.0, 0.9],
    "grad_noise": [0.0, 0.01],
    "output_framing": ["regression", "classification"],
    "input_encoding": ["raw", "scaled", "onehot"],
}


CONFIGS = math.prod(len(values) for values in FACTORS.values())


def sweep_file(folder: Path, seq_len: int, state_size: int, replicates: int) -> Path:
    spec = {
        "name": f"bench-workers-s{seq_len}-u{state_size}",
        "sampler": "grid",
        "seed": 0,
        "replicates": replicates,
        "fixed": {
            "task": "cycle",
            "epochs": 20,
            "batch_size": 16,
            "optimizer": "momentum",
            "target_scale": "raw",
            "num_layers": 1,
            "seq_len": seq_len,
            "state_size": state_size,
        },
        "factors": {name: {"values": values} for name, values in FACTORS.items()},
    }
    path = folder / f"workers_s{seq_len}_u{state_size}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cache_folder(folder: Path, seq_len: int, tag: str, mode: str) -> Path:
    """A fresh folder per timed run when cold; one shared folder per sweep when warm."""
    return folder / f"xla-s{seq_len}-{tag}" if mode == "cold" else folder / f"xla-s{seq_len}"


def timed_sweep(path: Path, workers: int, folder: Path, xla_cache: Path, tag: str) -> float:
    """Wall seconds of one run of the sweep, population off and no tracking, in a new study."""
    storage = f"sqlite:///{folder / f'{path.stem}_{tag}.db'}"
    options = ["--workers", str(workers), "--no-population", "--no-tracking", "--storage", storage]
    return timed_run(path, options, xla_cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", default="1,8", help="comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--state-size", type=int, default=16)
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed pairs per seq_len, order alternating; medians are reported"
    )
    parser.add_argument(
        "--xla-cache",
        choices=("cold", "warm"),
        default="cold",
        help="cold: every timed run starts with an empty XLA cache (a new machine); warm: a first, untimed run of "
        "the sweep fills one cache that both timed runs load from (a sweep run before)",
    )
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    if args.repeats < 1 or args.workers < 2:
        parser.error("--repeats must be at least 1 and --workers at least 2")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lstm-sweep-bench-") as tmp:
        folder = Path(tmp)
        for seq_len in (int(s) for s in args.seq_lens.split(",")):
            path = sweep_file(folder, seq_len, args.state_size, args.replicates)
            runs = CONFIGS * args.replicates

            if args.xla_cache == "warm":
                timed_sweep(path, 1, folder, cache_folder(folder, seq_len, "warm-up", args.xla_cache), "warm-up")
            seconds: dict[int, list[float]] = {1: [], args.workers: []}
            for repeat, workers in alternating(args.repeats, 1, args.workers):
                tag = f"w{workers}-r{repeat}"
                cache = cache_folder(folder, seq_len, tag, args.xla_cache)
                seconds[workers].append(timed_sweep(path, workers, folder, cache, tag))
            one, many = statistics.median(seconds[1]), statistics.median(seconds[args.workers])
            row = {
                "config": f"s{seq_len} u{args.state_size}",
                "runs": runs,
                "one_worker_s": round(one, 1),
                f"workers_{args.workers}_s": round(many, 1),
                "one_worker_runs_per_s": round(runs / one, 2),
                f"workers_{args.workers}_runs_per_s": round(runs / many, 2),
                "speedup": round(one / many, 2),
                "speedups_per_repeat": [
                    round(a / b, 2) for a, b in zip(seconds[1], seconds[args.workers], strict=True)
                ],
            }
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "workers": args.workers,
        "xla_cache": args.xla_cache,
        "rows": rows,
    }
    (out / f"workers_{args.xla_cache}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / f'workers_{args.xla_cache}.json'}")


if __name__ == "__main__":
    main()
