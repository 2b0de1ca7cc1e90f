"""MLflow layout: one experiment per sweep, one parent run per sweep, one child run per trial replicate.

Child runs are written in one go after the replicate has trained (metrics in batches, tags, three small artifacts),
so a killed worker leaves at most one unfinished run, which `close_orphans` marks KILLED on the next start.
MLflow charts the chosen `epoch_metrics` per epoch; `history.csv` holds every per-epoch key, whatever was charted.
Nothing here knows how training works; the driver hands over finished results.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lstm_sweep.curves import curve_png
from lstm_sweep.locks import ensure_local_store, sqlite_path
from lstm_sweep.metrics import EPOCH_METRICS
from lstm_sweep.spec import mask_url
from lstm_sweep.train import RECORD_KEYS, TrialResult

ROLE_TAG = "lstm_sweep.role"
SWEEP_TAG = "lstm_sweep.sweep"


def artifact_root_for(tracking_uri: str) -> str | None:
    """Keep artifacts beside a local SQLite store (under results/), not in ./mlruns of whatever cwd."""
    db = sqlite_path(tracking_uri)
    return None if db is None else (db.parent / "mlartifacts").resolve().as_uri()


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class SweepTracker:
    """Writes a sweep's runs to MLflow. One instance per worker process."""

    draws_curves = True  # worker processes may draw each run's curves.png ahead (TrialResult.artifacts)

    def __init__(self, tracking_uri: str, sweep_name: str, epoch_metrics: Iterable[str]) -> None:
        ensure_local_store(tracking_uri)
        self.epoch_metrics = tuple(epoch_metrics)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.sweep_name = sweep_name
        experiment = self.client.get_experiment_by_name(sweep_name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                sweep_name, artifact_location=artifact_root_for(tracking_uri)
            )
        else:
            self.experiment_id = experiment.experiment_id
        self.parent_run_id: str | None = None

    def start_sweep(self, spec_dict: Mapping[str, Any], sweep_file_text: str | None) -> str:
        """Open (or reopen, on resume) the sweep's parent run and record the resolved sweep on it."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", max_results=1
        )
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"sweep {self.sweep_name}",
                tags={ROLE_TAG: "parent", SWEEP_TAG: self.sweep_name},
            )
            run_id = run.info.run_id
            params = [Param(k, mask_url(str(v))[:6000]) for k, v in _flatten(spec_dict).items()]
            self.client.log_batch(run_id, params=params)
            self.client.log_text(run_id, mask_url(json.dumps(spec_dict, indent=2, default=str)), "sweep.json")
            if sweep_file_text is not None:
                self.client.log_text(run_id, mask_url(sweep_file_text), "sweep.yaml")
        self.parent_run_id = run_id
        return run_id

    def end_sweep(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    def close_orphans(self, trial_numbers: Iterable[int]) -> int:
        """Mark KILLED every run of trials that never completed (their worker died or was interrupted).

        Finished runs of such a trial are killed too: the trial is retried, and its retry's runs are the ones
        that count, so each completed replicate keeps exactly one FINISHED run.
        """
        closed = 0
        for number in trial_numbers:
            runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.trial_number = '{number}'")
            for run in runs:
                if run.info.status != "KILLED":
                    self.client.set_terminated(run.info.run_id, status="KILLED")
                    closed += 1
        return closed

    def log_replicate(
        self,
        result: TrialResult,
        *,
        trial_number: int,
        config_id: str,
        replicate: int,
        params: Mapping[str, Any],
    ) -> str:
        """One finished child run: params, tags, per-epoch metrics in batches, sample text, curve PNG and the
        whole per-epoch history as CSV."""
        tags = {
            ROLE_TAG: "trial",
            SWEEP_TAG: self.sweep_name,
            "trial_number": str(trial_number),
            "config_id": config_id,
            "replicate": str(replicate),
            "verdict": result.verdict,
            "escape_epoch": "" if result.escape_epoch is None else str(result.escape_epoch),
        }
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=f"trial {trial_number} rep {replicate}", tags=tags)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics: list[Metric] = []
        for record in result.history:
            step = int(record["epoch"])
            for key in self.epoch_metrics:
                value = _finite(record.get(key))
                if value is not None:
                    metrics.append(Metric(key, value, now, step))
        # Last values of every measure, charted per epoch or not: the runs table compares them across runs.
        finals = {key: result.final.get(key) for key in EPOCH_METRICS} | result.summary()
        del finals["loss"]  # the summary's name for val_loss, already there
        for key, value in finals.items():
            v = _finite(value) if not isinstance(value, bool) else None
            if v is not None and key not in ("epochs",):
                metrics.append(Metric(f"final_{key}", v, now, 0))
        run_params = [Param(k, mask_url(str(v))) for k, v in params.items()]
        for start in range(0, max(len(metrics), 1), 900):
            self.client.log_batch(
                run_id,
                metrics=metrics[start : start + 900],
                params=run_params if start == 0 else [],
                tags=[RunTag("diverged_step", str(result.diverged_step))] if result.diverged_step else [],
            )
        with tempfile.TemporaryDirectory(prefix="lstm-sweep-") as tmp:
            folder = Path(tmp)
            (folder / "sample.txt").write_text(sample_text(result))
            (folder / "curves.png").write_bytes(result.artifacts.get("curves.png") or curve_png(result))
            (folder / "history.csv").write_text(history_csv(result))
            self.client.log_artifacts(run_id, str(folder))  # one call for the three files
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= _flatten(v, key + ".")
        else:
            out[key] = v
    return out


def history_csv(result: TrialResult) -> str:
    """Every per-epoch record of the run, one row per epoch (`pandas.read_csv` reads it back)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RECORD_KEYS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.history)
    return out.getvalue()


def sample_text(result: TrialResult) -> str:
    """The seed's report lines for this run."""
    final = result.final
    return (
        f"Loss: {final['val_loss']:.4f}\nActual: {result.actual}\nPred: {result.pred}\n"
        f"Verdict: {result.verdict} (baseline {final['baseline_loss']:.4f}, skill {final['skill']:.4f})\n"
    )
