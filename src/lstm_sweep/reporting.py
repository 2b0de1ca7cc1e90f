"""`lstm-sweep report`: find the sweep's stores, run the analysis, write the report, attach it to MLflow."""

from __future__ import annotations

from pathlib import Path

from lstm_sweep.config import SEED_CONFIG
from lstm_sweep.errors import ConfigError
from lstm_sweep.locks import sqlite_path
from lstm_sweep.spec import DEFAULT_TRACKING_URI, default_storage, load_sweep, mask_url


def resolve(sweep: str, storage: str | None) -> tuple[str, str, str]:
    """(name, storage URL, tracking URI) from a sweep file path or a study name."""
    if sweep.endswith((".yaml", ".yml")) or Path(sweep).is_file():
        spec = load_sweep(sweep)
        return spec.name, storage or spec.storage, spec.tracking_uri
    return sweep, storage or default_storage(sweep), DEFAULT_TRACKING_URI


def make_report(
    sweep: str, *, storage: str | None = None, out_dir: str | None = None, tracking_uri: str | None = None
) -> list[Path]:
    """Write the report files to results/<name>/ (or out_dir) and log them on the sweep's MLflow parent run."""
    from lstm_sweep import analysis, report

    name, storage_url, default_uri = resolve(sweep, storage)
    try:
        study = analysis.open_study(name, storage_url)
    except FileNotFoundError:
        raise ConfigError(
            "sweep", sweep, f"a sweep that has been run (no store at {storage_url}; run it first)"
        ) from None
    except KeyError:
        raise ConfigError("sweep", name, f"a study in {mask_url(storage_url)} (run the sweep first)") from None
    runs = analysis.load_runs(study)
    if runs.empty:
        raise ConfigError("sweep", name, "a sweep with at least one completed trial (run it first)")
    target = Path(out_dir) if out_dir else Path("results") / name
    files = list(report.write_report(runs, target, study=study, seed_config=SEED_CONFIG.factor_values()))
    _attach(tracking_uri or default_uri, name, files)
    return files


def _attach(tracking_uri: str, name: str, files: list[Path]) -> None:
    """Log the report as artifacts of the sweep's parent run, if the sweep was tracked."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        return
    from mlflow.tracking import MlflowClient

    from lstm_sweep.tracking import ROLE_TAG

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return
    parents = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", max_results=1
    )
    if parents:
        for path in files:
            client.log_artifact(parents[0].info.run_id, str(path), artifact_path="report")
