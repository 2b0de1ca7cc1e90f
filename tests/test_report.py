"""The report on synthetic sweeps: every file written, self-contained HTML, a verdict from the numbers."""

from __future__ import annotations

import os
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest

from lstm_sweep import analysis, report
from test_analysis import (
    INTERACTION_FACTORS,
    MAIN_FACTORS,
    a_decides,
    c_and_d,
    make_study,
)

EXPECTED = {
    "report.md",
    "report.html",
    "runs.csv",
    "factors.csv",
    "interactions.csv",
    "escape_rate.png",
    "skill_vs_lr.png",
    "interaction.png",
    "curves.png",
}


@pytest.fixture(scope="module")
def main_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[report.ReportFiles, pd.DataFrame]:
    study = make_study(MAIN_FACTORS, a_decides, failed=1, name="main")
    runs = analysis.load_runs(study)
    return report.write_report(runs, tmp_path_factory.mktemp("main"), study=study), runs


def _verdict(markdown: str) -> str:
    return markdown.split("## Verdict", 1)[1].split("\n## ", 1)[0]


def _line(verdict: str, start: str) -> str:
    return next(line for line in verdict.splitlines() if line.startswith(f"- {start}"))


def test_every_file_is_written(main_report: tuple[report.ReportFiles, pd.DataFrame]) -> None:
    files, _ = main_report
    assert {p.name for p in files} == EXPECTED
    for path in files:
        assert path.exists() and path.stat().st_size > 0
    for png in files.plots:
        assert png.read_bytes().startswith(b"\x89PNG")
    assert not list(files.out_dir.glob("*.tmp")) and not list(files.out_dir.glob(".*"))


def test_html_is_self_contained(main_report: tuple[report.ReportFiles, pd.DataFrame]) -> None:
    page = main_report[0].html.read_text()
    assert page.count("data:image/png;base64,") == 4
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "http://" not in page and "https://" not in page
    assert "<table" in page and "<style>" in page


def test_verdict_names_the_decider_and_the_irrelevant(
    main_report: tuple[report.ReportFiles, pd.DataFrame],
) -> None:
    verdict = _verdict(main_report[0].markdown.read_text())
    escapes = _line(verdict, "Escapes the plateau")
    assert "**output_framing** = classification" in escapes and "grad_noise_schedule" not in escapes
    quiet = _line(verdict, "Does not matter")
    assert "**grad_noise_schedule**" in quiet and "output_framing" not in quiet
    assert "16 of 32 runs" in verdict
    seed = _line(verdict, "The seed configuration")
    assert "output_framing=regression" in seed and "sits on the plateau" in seed
    assert "none matters beyond the single factors" in _line(verdict, "Combinations")


def test_report_sections_and_csvs(main_report: tuple[report.ReportFiles, pd.DataFrame]) -> None:
    files, runs = main_report
    text = files.markdown.read_text()
    for title in (
        "Headline numbers",
        "Factors",
        "Interactions",
        "Importances",
        "Playbook checks",
        "Caveats: fixed factors",
        "Failed trials",
    ):
        assert f"## {title}" in text
    assert "FanovaImportanceEvaluator" in text and "PedAnovaImportanceEvaluator" in text
    assert "synthetic failure 0" in text and "state_size = 16" in text
    assert len(pd.read_csv(files.runs_csv)) == len(runs)
    assert "curve" not in pd.read_csv(files.runs_csv).columns
    factors = pd.read_csv(files.factors_csv)
    assert set(factors["factor"]) == {"output_framing", "grad_noise_schedule", "learning_rate"}
    assert len(pd.read_csv(files.interactions_csv)) == 3


def test_verdict_names_the_needed_combination(tmp_path: Path) -> None:
    runs = analysis.load_runs(make_study(INTERACTION_FACTORS, c_and_d, replicates=3, name="inter"))
    files = report.write_report(runs, tmp_path)  # no study: importances from a study rebuilt from the runs
    verdict = _verdict(files.markdown.read_text())
    together = _line(verdict, "Needed together")
    assert "**seq_len** × **stateful**" in together
    assert "33%" in together  # what main effects leave to interactions
    assert files.plots[1].exists()  # skill_vs_lr.png: a placeholder, learning_rate not varied


def test_seed_not_run_uses_nearest(tmp_path: Path) -> None:
    cells = [
        {"output_framing": f, "grad_noise_schedule": "seed", "learning_rate": 0.01}
        for f in ("regression", "classification")
    ]
    runs = analysis.load_runs(make_study(MAIN_FACTORS, a_decides, replicates=2, cells=cells))
    files = report.write_report(runs, tmp_path)
    seed = _line(_verdict(files.markdown.read_text()), "The seed configuration")
    assert "was not run" in seed and "learning_rate 0.01 instead of 0.001" in seed


def test_nothing_escaped_says_so(tmp_path: Path) -> None:
    runs = analysis.load_runs(make_study(MAIN_FACTORS, lambda p, r: "plateau", replicates=1))
    verdict = _verdict(report.write_report(runs, tmp_path).markdown.read_text())
    assert "0 of 8 runs" in verdict
    assert "no configuration escaped" in _line(verdict, "Escapes the plateau")
    assert "fANOVA shares" in _line(verdict, "Final skill")


def test_empty_study_still_reports(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    files = report.write_report(analysis.load_runs(study), tmp_path, study=study)
    assert {p.name for p in files} == EXPECTED
    assert "No completed runs yet" in files.markdown.read_text()


def test_failed_write_leaves_no_partial_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = analysis.load_runs(make_study(MAIN_FACTORS, a_decides, replicates=1))
    files = report.write_report(runs, tmp_path)
    calls = {"n": 0}
    real_replace = os.replace

    def flaky_replace(src: str, dst: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        report.write_report(runs, tmp_path, seed_config={"learning_rate": 0.01})
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert {p.name for p in tmp_path.iterdir()} == EXPECTED
    # every file is complete, old or new: the new report.md (written first) and the old runs.csv
    assert "learning_rate 0.01" not in files.markdown.read_text() or files.markdown.read_text().endswith("\n")
    assert len(pd.read_csv(files.runs_csv)) == len(runs)
