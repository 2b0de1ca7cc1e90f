"""The `lstm-sweep` command as a user meets it: the seed story, escapes, validate, report, and usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lstm_sweep.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["seed", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_seed_json_reproduces_the_plateau(capsys):
    out = run_json(capsys)
    assert {"loss", "baseline_loss", "skill", "verdict", "actual", "pred", "symbol_accuracy"} <= out.keys()
    assert out["loss"] == pytest.approx(143 / 12, rel=0.01)
    assert out["baseline_loss"] == pytest.approx(143 / 12, abs=1e-9)
    assert out["verdict"] == "plateau"
    assert len(set(out["pred"])) == 1 and out["pred"][0] in "fg" and len(out["pred"]) == 40
    assert out["actual"] == "bcdefghijkla" * 3 + "bcde"


def test_seed_lines(capsys):
    assert main(["seed", "--epochs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Loss", "Actual", "Pred", "Verdict"]


def test_seed_options_show_an_escape(capsys):
    out = run_json(capsys, "--input-encoding", "onehot", "--output-framing", "classification", "--learning-rate", "0.1")
    assert out["verdict"] == "escaped"
    assert out["symbol_accuracy"] >= 0.95
    assert out["pred"] == out["actual"]


def test_every_factor_has_an_option(capsys):
    from lstm_sweep.config import FACTORS

    assert main(["seed", "--help"]) == 0
    text = capsys.readouterr().out
    for name in FACTORS:
        assert "--" + name.replace("_", "-") in text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["seed", "--learning-rate", "-1"], "learning_rate: got -1.0, expected a number > 0"),
        (["seed", "--seq-len", "0"], "seq_len: got 0, expected an integer >= 1"),
        (["seed", "--input-encoding", "binary"], "'binary' is not one of"),
        (["seed", "--momentum", "1"], "momentum: got 1.0, expected a number >= 0 and < 1"),
        (["seed", "--task", "text"], "text_path"),
        (["seed", "--no-such-option"], "No such option"),
        (["validate", "missing.yaml"], "missing.yaml"),
        (["report", "never-run-sweep"], "never-run-sweep"),
        (["run", "any.yaml", "--storage", "notaurl"], "'--storage': got 'notaurl', expected a URL"),
        (["report", "plateau", "--tracking-uri", "mlflow.db"], "'--tracking-uri': got 'mlflow.db', expected a URL"),
        (["diagnose", "--storage", "optuna.db"], "'--storage': got 'optuna.db', expected a URL"),
        (["ui", "--port", "-3"], "'--port': -3 is not in the range 1<=x<=65535"),
        (["server", "--backend-store-uri", "runs.db"], "'--backend-store-uri': got 'runs.db', expected a URL"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert fragment in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "results").exists()


def test_a_server_that_fails_to_start_fails_the_command(tmp_path, monkeypatch):
    """MLflow's exit code comes through (a taken port used to end `ui` with exit 0)."""
    monkeypatch.chdir(tmp_path)
    taken = subprocess.CompletedProcess([], returncode=1)
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: taken)
    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 1


@pytest.mark.parametrize("name", ["plateau", "seed", "memory", "tune"])
def test_shipped_sweeps_validate(capsys, name):
    assert main(["validate", str(REPO / "sweeps" / f"{name}.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sweep {name}:")
    assert "training runs" in out


def test_plateau_sweep_is_a_factorial_over_the_issue_factors(capsys):
    from lstm_sweep.spec import load_sweep

    spec = load_sweep(REPO / "sweeps" / "plateau.yaml")
    varied = {f.name for f in spec.varied()}
    assert {"learning_rate", "momentum", "grad_noise", "seq_len", "state_size", "output_framing"} <= varied
    assert "input_encoding" in varied and spec.sampler == "grid" and spec.replicates >= 2


def test_validate_reports_every_problem(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfactors:\n  learning_rat: {values: [0.1]}\n  seq_len: {values: [0]}\n")
    assert main(["validate", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert any("did you mean learning_rate" in line for line in lines)
    assert any("factors.seq_len" in line and "expected an integer >= 1" in line for line in lines)
    assert all(str(bad) in line for line in lines)


def test_run_then_report_writes_the_files_and_attaches_them(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "small.yaml"
    sweep.write_text(
        "name: small\nreplicates: 2\nfixed: {epochs: 3, stream_length: 240, batch_size: 8, state_size: 8}\n"
        "factors:\n  input_encoding: {values: [raw, onehot]}\n"
        "  output_framing: {values: [regression, classification]}\n"
        "  learning_rate: {role: nuisance, values: [0.01, 0.1]}\n"
    )
    assert main(["run", str(sweep), "--quiet"]) == 0
    assert main(["report", str(sweep)]) == 0
    out_dir = tmp_path / "results" / "small"
    for name in ("report.md", "report.html", "runs.csv", "factors.csv", "interactions.csv", "escape_rate.png"):
        assert (out_dir / name).stat().st_size > 0, name
    report = (out_dir / "report.md").read_text()
    assert "input_encoding" in report and "seed configuration" in report
    client = MlflowClient(tracking_uri="sqlite:///results/mlflow.db")
    exp = client.get_experiment_by_name("small")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`lstm_sweep.role` = 'parent'")[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/report.md",
        "report/report.html",
    }


def test_the_command_line_prints_no_tensorflow_chatter():
    """The seed's report lines and nothing else: TensorFlow's start-up log is silenced before it loads."""
    done = subprocess.run(
        [sys.executable, "-m", "lstm_sweep.cli", "seed", "--epochs", "2"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["Loss", "Actual", "Pred", "Verdict"]
