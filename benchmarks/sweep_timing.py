"""What the sweep benchmarks share: timing an `lstm-sweep run` in a new process, and pairs that alternate order.

A shared machine's speed drifts over minutes, so a ratio comes from several pairs of runs with the order
alternating (a slow spell then hits both sides alike), reported as medians."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

Side = TypeVar("Side")


def timed_run(sweep: Path, options: list[str], xla_cache: Path) -> float:
    """Wall seconds of `lstm-sweep run SWEEP --quiet OPTIONS` in a new process with this XLA cache folder."""
    command = [str(Path(sys.executable).with_name("lstm-sweep")), "run", str(sweep), "--quiet", *options]
    started = time.perf_counter()
    env = os.environ | {"LSTM_SWEEP_XLA_CACHE": str(xla_cache)}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def alternating(repeats: int, first: Side, second: Side) -> Iterator[tuple[int, Side]]:
    """(repeat, side) for `repeats` pairs, the first side first in even repeats and second in odd ones."""
    for repeat in range(repeats):
        for side in (first, second) if repeat % 2 == 0 else (second, first):
            yield repeat, side
