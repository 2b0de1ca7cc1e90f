"""MLflow tracking on against off: the same sweep run through the `lstm-sweep` command with and without tracking,
side by side in one run, start-up included. Prints the median wall seconds of `--repeats` runs each (alternating
which goes first) and the ratio, and writes them to results/benchmarks/tracking.json (tracking_all.json with
`--epoch-metrics all`).

    .venv/bin/python benchmarks/bench_tracking.py [--sweep sweeps/plateau.yaml] [--workers 2] [--repeats 3]
        [--epoch-metrics default|all] [--xla-cache warm|cold]

Every run gets new Optuna and MLflow stores. With `--xla-cache warm` (the default) a first, untimed run fills one
XLA cache that every timed run loads from, so compiles (the same with or without tracking) do not blur the ratio;
`cold` gives every timed run an empty one, as on a new machine. `--epoch-metrics all` times the sweep with every
per-epoch key charted in MLflow instead of the sweep file's choice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml
from sweep_timing import alternating, timed_run


def sweep_copy(source: Path, folder: Path, epoch_metrics: str) -> Path:
    """The sweep file as given, or a copy of it that charts every per-epoch key."""
    if epoch_metrics == "default":
        return source
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    data["epoch_metrics"] = "all"
    path = folder / source.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def timed_sweep(path: Path, workers: int, folder: Path, xla_cache: Path, tag: str, tracking: bool) -> float:
    """Wall seconds of one run of the sweep with new stores under `folder`, tracked or not."""
    options = ["--workers", str(workers), "--storage", f"sqlite:///{folder / f'optuna_{tag}.db'}"]
    options += ["--tracking-uri", f"sqlite:///{folder / f'mlflow_{tag}.db'}"] if tracking else ["--no-tracking"]
    return timed_run(path, options, xla_cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default="sweeps/plateau.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs, order alternating; medians reported")
    parser.add_argument("--epoch-metrics", choices=("default", "all"), default="default")
    parser.add_argument("--xla-cache", choices=("warm", "cold"), default="warm")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    if args.repeats < 1 or args.workers < 1:
        parser.error("--repeats and --workers must be at least 1")
    source = Path(args.sweep)
    if not source.is_file():
        parser.error(f"--sweep: {source} is not a file")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="lstm-sweep-bench-") as tmp:
        folder = Path(tmp)
        path = sweep_copy(source, folder, args.epoch_metrics)

        def cache(tag: str) -> Path:
            return folder / ("xla" if args.xla_cache == "warm" else f"xla-{tag}")

        if args.xla_cache == "warm":
            timed_sweep(path, args.workers, folder, cache("warm-up"), "warm-up", tracking=False)
        for repeat, tracking in alternating(args.repeats, False, True):
            tag = f"{'on' if tracking else 'off'}-r{repeat}"
            seconds[tracking].append(timed_sweep(path, args.workers, folder, cache(tag), tag, tracking))
            print(f"{tag}: {seconds[tracking][-1]:.1f} s", flush=True)
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    row = {
        "sweep": str(source),
        "epoch_metrics": args.epoch_metrics,
        "workers": args.workers,
        "xla_cache": args.xla_cache,
        "tracking_off_s": round(off, 1),
        "tracking_on_s": round(on, 1),
        "ratio": round(on / off, 2),
        "ratios_per_repeat": [round(a / b, 2) for a, b in zip(seconds[True], seconds[False], strict=True)],
        "off_s_per_repeat": [round(s, 1) for s in seconds[False]],
        "on_s_per_repeat": [round(s, 1) for s in seconds[True]],
    }
    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, **row}
    name = "tracking.json" if args.epoch_metrics == "default" else "tracking_all.json"
    (out / name).write_text(json.dumps(report, indent=2))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
