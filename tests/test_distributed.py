"""Distributed mode against the real PostgreSQL on 127.0.0.1:5432: three `worker` processes on one study, one of
them SIGKILLed mid-trial, a last worker after the grace period; every grid cell must be COMPLETE exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import PG_HOST, PG_PORT, postgres_admin_connection, tiny_sweep
from lstm_sweep.locks import StudyLock, advisory_key, engine_url

HEARTBEAT, GRACE = 1, 4

SWEEP = tiny_sweep("distributed", epochs=3, momenta="[0.0, 0.5, 0.9]")


@pytest.fixture
def scratch_dbs() -> Iterator[tuple[str, str]]:
    """Two scratch databases (Optuna, MLflow), dropped at the end."""
    conn, user = postgres_admin_connection()
    names = [f"lstm_sweep_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f'CREATE DATABASE "{name}"')
    try:
        # Optuna storage as users write it; MLflow with the driver named (psycopg2 is what the dev extras install).
        yield (
            f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{names[0]}",
            f"postgresql+psycopg2://{user}@{PG_HOST}:{PG_PORT}/{names[1]}",
        )
    finally:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def test_advisory_key_is_stable_and_int64():
    key = advisory_key("plateau")
    assert key == advisory_key("plateau") != advisory_key("plateau2")
    assert -(2**63) <= key < 2**63


def test_sqlite_lock_serializes(tmp_path):
    lock = StudyLock(f"sqlite:///{tmp_path}/optuna.db", "x")
    with lock():
        assert (tmp_path / "optuna.db.lock").exists()
    with lock():
        pass


def test_workers_share_a_grid_exactly_once_and_survive_a_killed_worker(tmp_path, scratch_dbs):
    storage, tracking = scratch_dbs
    db = engine_url(storage)  # this process reads the study directly
    sweep = tmp_path / "distributed.yaml"
    sweep.write_text(SWEEP)
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "LSTM_SWEEP_HEARTBEAT_SECONDS": str(HEARTBEAT),
        "LSTM_SWEEP_GRACE_SECONDS": str(GRACE),
    }
    cmd = [
        sys.executable,
        "-m",
        "lstm_sweep.cli",
        "worker",
        str(sweep),
        "--storage",
        storage,
        "--tracking-uri",
        tracking,
        "--batch",
        "2",
        "--quiet",
    ]
    started = time.time()
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = []
    for log in logs:
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT))
    by_pid = {p.pid: p for p in procs}
    victim = None
    try:
        deadline = time.time() + 60
        while victim is None and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.3)
            try:
                study = optuna.load_study(study_name="distributed", storage=db)
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            except Exception:  # the study may not exist yet
                continue
            for t in running:
                pid = str(t.user_attrs.get("worker", "")).rpartition(":")[2]
                if pid.isdigit() and int(pid) in by_pid:
                    victim = by_pid[int(pid)]
                    break
        assert victim is not None, "no worker was seen holding a RUNNING trial"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        for p in procs:
            if p is not victim:
                assert p.wait(timeout=90) == 0, [log.read_text()[-2000:] for log in logs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    study = optuna.load_study(study_name="distributed", storage=db)
    assert victim.pid in {int(str(t.user_attrs.get("worker", "0:0")).rpartition(":")[2]) for t in study.trials}, (
        "the killed worker never held a trial"
    )
    time.sleep(GRACE + HEARTBEAT)  # the dead worker's trials are now stale for any host
    final = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stdout + final.stderr

    study = optuna.load_study(study_name="distributed", storage=db)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    cells = Counter((t.params["learning_rate"], t.params["input_encoding"], t.params["momentum"]) for t in complete)
    assert len(cells) == 12 and set(cells.values()) == {1}, cells
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) >= 2, "the grid should have been shared between workers"

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("distributed")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("lstm_sweep.role") == "trial"]
    finished = [r for r in children if r.info.status == "FINISHED"]
    complete_numbers = {str(t.number) for t in complete}
    per_trial = Counter(r.data.tags["trial_number"] for r in finished)
    assert set(per_trial) == complete_numbers and set(per_trial.values()) == {2}, per_trial
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert len([r for r in runs if r.data.tags.get("lstm_sweep.role") == "parent"]) == 1
    assert time.time() - started < 150
