"""End to end: a tiny sweep through the CLI into Optuna and MLflow, a second run, and a killed run resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import tiny_sweep, wait_for_completed
from lstm_sweep.cli import main
from lstm_sweep.train import RECORD_KEYS


def write_sweep(tmp_path: Path, name: str, epochs: int = 2, momenta: str = "[0.9]") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(tiny_sweep(name, epochs, momenta))
    return path


def stores(tmp_path: Path) -> tuple[str, str]:
    return f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"


def run_args(sweep: Path, tmp_path: Path) -> list[str]:
    storage, tracking = stores(tmp_path)
    return ["run", str(sweep), "--storage", storage, "--tracking-uri", tracking, "--quiet"]


def child_runs(tracking: str, name: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name(name)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lstm_sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("lstm_sweep.role") == "trial"]
    return parents, children


def test_tiny_sweep_end_to_end_and_second_run_trains_nothing(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "tiny")
    storage, tracking = stores(tmp_path)
    assert main(run_args(sweep, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "trained 4 trial(s)" in out

    study = optuna.load_study(study_name="tiny", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == len(study.trials) == 4
    cells = {(t.params["learning_rate"], t.params["input_encoding"]) for t in complete}
    assert cells == {(lr, enc) for lr in (0.01, 0.1) for enc in ("raw", "onehot")}
    for t in complete:
        reps = t.user_attrs["replicates"]
        assert [r["replicate"] for r in reps] == [0, 1]
        assert t.value == pytest.approx(sum(max(-1.0, r["skill"]) for r in reps) / 2)
        assert all(len(r["curve"]["skill"]) == 2 for r in reps)
    assert study.user_attrs["sweep"]["name"] == "tiny"

    parents, children = child_runs(tracking, "tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 8
    client = MlflowClient(tracking_uri=tracking)
    for run in children:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"trial_number", "config_id", "replicate", "verdict", "escape_epoch"} <= tags.keys()
        assert tags["verdict"] in {"escaped", "partial", "plateau", "diverged"}
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == [1, 2]
        assert run.info.status == "FINISHED"
    run_ids = {r["mlflow_run_id"] for t in complete for r in t.user_attrs["replicates"]}
    assert run_ids == {r.info.run_id for r in children}
    artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {"sample.txt", "curves.png", "history.csv"} <= artifacts
    # The default charts four keys per epoch; history.csv keeps every key of every epoch, equal to what was charted.
    first = children[0].info.run_id
    assert client.get_metric_history(first, "grad_norm_recurrent_kernel") == []
    assert "final_grad_norm_recurrent_kernel" in children[0].data.metrics  # not charted, its last value is there
    history = pd.read_csv(client.download_artifacts(first, "history.csv", str(tmp_path)))
    assert list(history.columns) == list(RECORD_KEYS) and list(history["epoch"]) == [1, 2]
    charted = sorted((m.step, m.value) for m in client.get_metric_history(first, "val_loss"))
    assert [step for step, _ in charted] == list(history["epoch"])
    assert [value for _, value in charted] == pytest.approx(list(history["val_loss"]))
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"sweep.yaml", "sweep.json"}

    # A second run of a finished grid trains nothing and adds no runs.
    assert main(run_args(sweep, tmp_path)) == 0
    assert "trained 0 trial(s)" in capsys.readouterr().out
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 4
    assert len(child_runs(tracking, "tiny")[1]) == 8


def test_bad_sweep_file_writes_nothing(tmp_path, capsys):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(tiny_sweep("bad", 2, "[1.5]"))
    code = main(run_args(sweep, tmp_path))
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.yaml" in err and "factors.momentum" in err and "Traceback" not in err
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_changed_sweep_definition_is_refused(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "changing", epochs=1)
    assert main([*run_args(sweep, tmp_path), "--trials", "1", "--no-tracking"]) == 0
    # What MLflow charts is not part of the experiment: changing it continues the same study.
    sweep.write_text(tiny_sweep("changing", 1, "[0.9]") + "epoch_metrics: all\n")
    assert main([*run_args(sweep, tmp_path), "--trials", "1", "--no-tracking"]) == 0
    sweep.write_text(tiny_sweep("changing", 3, "[0.9]"))
    assert main([*run_args(sweep, tmp_path), "--no-tracking"]) == 2
    assert "different sweep definition" in capsys.readouterr().err
    # With tracking, too, the study is refused before MLflow is touched: no store, experiment or parent run.
    assert main(run_args(sweep, tmp_path)) == 2
    assert "different sweep definition" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_killed_sweep_resumes_with_every_cell_done_once(tmp_path):
    """SIGKILL the sweep after its first trial; the next run completes every grid cell exactly once."""
    # 12 cells in two populations; 40 epochs keep the second one training when the signal comes
    sweep = write_sweep(tmp_path, "killed", epochs=40, momenta="[0.0, 0.5, 0.9]")
    storage, tracking = stores(tmp_path)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, "-m", "lstm_sweep.cli", *run_args(sweep, tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        completed = wait_for_completed(proc, "killed", storage, 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 2 <= completed < 12, "the sweep should have been killed part-way"
    killed = optuna.load_study(study_name="killed", storage=storage)
    assert any(t.state == TrialState.RUNNING for t in killed.trials)

    assert main(run_args(sweep, tmp_path)) == 0
    study = optuna.load_study(study_name="killed", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    cells = Counter((t.params["learning_rate"], t.params["input_encoding"], t.params["momentum"]) for t in complete)
    assert len(cells) == 12 and set(cells.values()) == {1}
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))

    _, children = child_runs(tracking, "killed")
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == 12 * 2
    complete_numbers = {str(t.number) for t in complete}
    assert {r.data.tags["trial_number"] for r in finished} == complete_numbers
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    """seq_len 400 does not fit the 192-symbol training stream: those trials fail with their error, the rest run."""
    sweep = tmp_path / "failing.yaml"
    sweep.write_text(
        "name: failing\nfixed: {epochs: 1, stream_length: 240, batch_size: 4, state_size: 4}\n"
        "factors:\n  seq_len: {values: [1, 400]}\n  learning_rate: {role: nuisance, values: [0.01, 0.1]}\n"
    )
    storage, _ = stores(tmp_path)
    assert main([*run_args(sweep, tmp_path), "--no-tracking"]) == 0
    assert "2 failed" in capsys.readouterr().out
    study = optuna.load_study(study_name="failing", storage=storage)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert {t.params["seq_len"] for t in failed} == {400} and len(failed) == 2
    assert all("batch_size" in t.user_attrs["error"] for t in failed)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    # A deterministic failure is a result: the next run does not retry it.
    assert main([*run_args(sweep, tmp_path), "--no-tracking"]) == 0
    assert "trained 0 trial(s)" in capsys.readouterr().out
    assert len(optuna.load_study(study_name="failing", storage=storage).trials) == 4


def test_workers_and_single_runs_give_the_population_results(tmp_path):
    """--workers 2 --no-population trains every run alone in two processes; the outcomes match population mode."""
    sweep = write_sweep(tmp_path, "parallel", epochs=2, momenta="[0.0, 0.9]")
    storage, _ = stores(tmp_path)
    assert main([*run_args(sweep, tmp_path), "--no-tracking"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    args = [*run_args(sweep, other), "--no-tracking", "--workers", "2", "--no-population"]
    assert main(args) == 0

    def values(url: str) -> dict:
        study = optuna.load_study(study_name="parallel", storage=url)
        return {tuple(sorted(t.params.items())): t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}

    together, apart = values(storage), values(stores(other)[0])
    assert len(together) == len(apart) == 8
    for key, value in together.items():
        assert apart[key] == pytest.approx(value, abs=1e-4), key


def test_held_trials_beat_so_another_worker_can_tell_a_dead_one(tmp_path, monkeypatch):
    """A worker beats for the trials it holds; once it stops (dies), they are stale after the grace period."""
    from lstm_sweep.driver import _Heartbeat, fail_stale, make_storage

    monkeypatch.setenv("LSTM_SWEEP_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("LSTM_SWEEP_GRACE_SECONDS", "1")
    study = optuna.create_study(study_name="beat", storage=make_storage(f"sqlite:///{tmp_path}/optuna.db"))
    trial = study.ask()
    assert fail_stale(study) == []  # never beaten: Optuna cannot tell it is dead
    heartbeat = _Heartbeat(study)
    assert heartbeat.enabled
    heartbeat.hold([trial])  # one beat, then this worker "dies" (its beating thread was never started)
    time.sleep(2.5)
    assert fail_stale(study) == [trial.number]


class _RecordingExecutor:
    """Trains in this process like `InProcess`, noting when each batch is handed over and when it is read."""

    def __init__(self, events: list[str]) -> None:
        from lstm_sweep.executor import InProcess

        self.inner = InProcess()
        self.events = events
        self.batches = 0

    def run(self, jobs, thresholds):
        self.batches += 1
        number = self.batches
        self.events.append(f"queued {number}")

        def outcomes():
            self.events.append(f"read {number}")
            yield from self.inner.run(jobs, thresholds)

        return outcomes()

    def close(self) -> None:
        pass


def test_with_workers_the_next_batch_is_queued_while_one_trains(tmp_path, monkeypatch):
    """With worker processes the driver proposes and queues batch n+1 before it reads batch n; the batches, and so
    the trials and their values, are the same as without (each cell trained exactly once)."""
    from lstm_sweep import driver
    from lstm_sweep.spec import load_sweep

    values = {}
    for workers in (1, 2):
        events: list[str] = []
        monkeypatch.setattr(
            driver, "make_executor", lambda workers, render_curves=False, e=events: _RecordingExecutor(e)
        )
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        spec = load_sweep(write_sweep(folder, "ahead", epochs=1, momenta="[0.0, 0.9]"))
        storage, _ = stores(folder)
        outcome = driver.run_sweep(spec, storage_url=storage, batch_trials=3, workers=workers)
        assert outcome.trained == 8 and outcome.failed == 0
        assert events.count("queued 3") == 1
        if workers == 1:
            assert events.index("read 1") < events.index("queued 2")
        else:
            assert events.index("queued 2") < events.index("read 1")
        study = optuna.load_study(study_name="ahead", storage=storage)
        assert len(study.trials) == 8
        complete = study.get_trials(states=(TrialState.COMPLETE,))
        values[workers] = {tuple(sorted(t.params.items())): (t.number, t.value) for t in complete}
        assert len(values[workers]) == 8
    assert values[1] == values[2]
