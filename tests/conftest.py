"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import subprocess
import time

import optuna
from optuna.trial import TrialState

TINY_SWEEP = """
name: {name}
sampler: grid
replicates: 2
fixed:
  task: cycle
  epochs: {epochs}
  stream_length: 240
  batch_size: 8
  state_size: 4
  output_framing: classification
factors:
  learning_rate:
    role: nuisance
    values: [0.01, 0.1]
  input_encoding:
    values: [raw, onehot]
"""


def tiny_sweep(name: str, epochs: int = 2, momenta: str | None = None) -> str:
    """A grid of 4 cells (x momenta) x 2 replicates that trains in about a second a cell."""
    text = TINY_SWEEP.format(name=name, epochs=epochs)
    if momenta is not None:
        text += f"  momentum:\n    values: {momenta}\n"
    return text


def wait_for_completed(proc: subprocess.Popen, study: str, storage: str, count: int, seconds: float = 240) -> int:
    """Poll the study until `count` trials are COMPLETE, the process ends or time runs out; the count reached."""
    deadline = time.time() + seconds
    completed = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            completed = len(
                optuna.load_study(study_name=study, storage=storage).get_trials(states=(TrialState.COMPLETE,))
            )
        except Exception:  # the database may not exist yet
            continue
        if completed >= count:
            break
    return completed
