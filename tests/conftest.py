"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

PG_HOST, PG_PORT = "127.0.0.1", 5432

# Compiled XLA executables go to a folder of this test session (inherited by every command a test runs), not the
# user's cache: every test run starts cold, as CI does, and leaves nothing behind.
_XLA_CACHE = tempfile.mkdtemp(prefix="lstm-sweep-test-xla-")
os.environ["LSTM_SWEEP_XLA_CACHE"] = _XLA_CACHE
atexit.register(shutil.rmtree, _XLA_CACHE, True)

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


def postgres_admin_connection() -> tuple[Any, str]:
    """An autocommit connection to the local PostgreSQL (trust auth) and its user; skips the test without one."""
    psycopg2 = pytest.importorskip("psycopg2")
    errors = []
    for user in ("postgres", "root", os.environ.get("USER", "")):
        if not user:
            continue
        for dbname in ("postgres", "root", "test"):
            try:
                conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=dbname, connect_timeout=3)
            except psycopg2.OperationalError as err:
                errors.append(str(err).strip().splitlines()[0])
                continue
            conn.autocommit = True
            return conn, user
    pytest.skip(f"no PostgreSQL server reachable on {PG_HOST}:{PG_PORT} ({'; '.join(sorted(set(errors)))})")
