"""Readers open a stored study the way users write its URL: a plain `postgresql://` (read through the installed
driver, psycopg2) and a SQLite URL with query parameters, for `analysis.load_runs` and `lstm-sweep report` alike."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from conftest import PG_HOST, PG_PORT, postgres_admin_connection
from lstm_sweep import analysis
from lstm_sweep.cli import main
from lstm_sweep.locks import engine_url
from test_analysis import MAIN_FACTORS, a_decides, make_study


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A plain `postgresql://` URL to a scratch database, dropped at the end."""
    conn, user = postgres_admin_connection()
    name = f"lstm_sweep_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def _store(name: str, url: str) -> None:
    """A small finished sweep (8 runs) stored under `name` at `url`."""
    src = make_study(MAIN_FACTORS, a_decides, replicates=1, name=name)
    stored = optuna.create_study(study_name=name, storage=engine_url(url), direction="maximize")
    stored.set_user_attr("sweep", src.user_attrs["sweep"])
    for trial in src.get_trials():
        stored.add_trial(trial)


def _report(name: str, url: str, tmp_path: Path) -> int:
    untracked = f"sqlite:///{tmp_path / 'no-mlflow.db'}"  # absent: the report is not attached anywhere
    return main(["report", name, "--storage", url, "--out", str(tmp_path / "out"), "--tracking-uri", untracked])


def test_report_and_load_runs_read_a_plain_postgresql_url(postgres_url, tmp_path, capsys):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    _store(name, postgres_url)
    assert len(analysis.load_runs(name, storage=postgres_url)) == 8
    assert _report(name, postgres_url, tmp_path) == 0, capsys.readouterr().err
    assert "report written" in capsys.readouterr().out
    assert "output_framing" in (tmp_path / "out" / "report.md").read_text()


def test_report_of_a_study_missing_from_postgresql_is_one_line(postgres_url, tmp_path, capsys):
    _store("present", postgres_url)
    assert _report("absent", postgres_url, tmp_path) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "a study in postgresql://" in lines[0] and "run the sweep first" in lines[0], lines


def test_sqlite_urls_with_query_parameters_are_read(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}?timeout=30"
    _store("queried", url)
    assert len(analysis.load_runs("queried", storage=url)) == 8
    assert _report("queried", url, tmp_path) == 0, capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"missing\.db$"):
        analysis.load_runs("queried", storage=f"sqlite:///{tmp_path / 'missing.db'}?timeout=30")


def test_sqlite_storage_logs_ahead_and_syncs_at_checkpoints(tmp_path):
    """Optuna commits each parameter on its own; WAL with synchronous=NORMAL keeps those commits from syncing."""
    import sqlite3

    from lstm_sweep.driver import make_storage

    storage = make_storage(f"sqlite:///{tmp_path}/optuna.db")
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    assert sqlite3.connect(tmp_path / "optuna.db").execute("PRAGMA journal_mode").fetchone() == ("wal",)
