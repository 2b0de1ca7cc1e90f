"""`lstm-sweep diagnose`: each finding's trigger on hand-made histories, the neighbourhood plumbing, and the command
end to end on the seed (plateau), an escaping and a diverging configuration."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from lstm_sweep import diagnose as dg
from lstm_sweep.cli import main
from lstm_sweep.config import SEED_CONFIG, TrialConfig
from lstm_sweep.tasks import build_data
from lstm_sweep.train import TrialResult

SEED_DATA = build_data(SEED_CONFIG)
ONEHOT_DATA = build_data(SEED_CONFIG.replace(input_encoding="onehot", output_framing="classification"))
PLATEAU_RECORD: dict[str, float] = {
    "train_loss": 12.19,
    "val_loss": 11.9253,
    "baseline_loss": 11.9167,
    "skill": -0.0007,
    "symbol_accuracy": 1 / 12,
    "majority_rate": 1 / 12,
    "accuracy_lift": 0.0,
    "distinct_symbols": 1.0,
    "pred_std_ratio": 3e-5,
    "gate_saturation": 0.91,
    "hidden_spread": 0.0,
    "noise_to_grad": 0.04,
    "grad_norm_input_kernel": 0.1,
    "grad_norm_recurrent_kernel": 0.0,
    "grad_norm_bias": 0.001,
    "grad_norm_readout": 9.0,
}


def result(
    epochs: int = 5,
    verdict: str = "plateau",
    pred: str = "g" * 40,
    escape_epoch: int | None = None,
    diverged_step: int | None = None,
    config: TrialConfig = SEED_CONFIG,
    per_epoch: dict[str, list[float]] | None = None,
    **final: float,
) -> TrialResult:
    """A TrialResult built by hand: plateau-like records, `final` overriding every epoch, `per_epoch` lists."""
    history = []
    for e in range(epochs):
        record = {**PLATEAU_RECORD, **final, "epoch": float(e + 1)}
        for key, values in (per_epoch or {}).items():
            record[key] = values[e]
        history.append(record)
    return TrialResult(
        config=config,
        history=history,
        verdict=verdict,  # type: ignore[arg-type]
        escape_epoch=escape_epoch,
        diverged_step=diverged_step,
        actual="bcdefghijkla" * 3 + "bcde",
        pred=pred,
        seconds=0.1,
    )


def keys(results: list[TrialResult], data: Any = SEED_DATA) -> dict[str, dg.Finding]:
    return {f.key: f for f in dg.findings(results, data)}


# --- each finding's trigger, positive and negative


def test_collapse_names_the_symbol_and_the_mean():
    found = keys([result()])["collapse"]
    assert found.value == 1 and "'g' (code 103)" in found.detail
    assert "102.50" in found.detail and "predicts the mean" in found.detail
    spread = result(distinct_symbols=12.0, pred="bcdefghijkla" * 3 + "bcde", pred_std_ratio=0.9)
    assert "collapse" not in keys([spread])


def test_collapse_in_classification_names_the_class_prior():
    cls = result(pred_std_ratio=math.nan, val_loss=2.4849, baseline_loss=2.4849)
    assert "class prior" in keys([cls], ONEHOT_DATA)["collapse"].detail


def test_baseline_equal_loss_prints_both_numbers():
    found = keys([result()])["baseline_loss"]
    assert found.shown == "11.9253 vs 11.9167"
    assert "baseline_loss" not in keys([result(val_loss=13.0)])


def test_saturation_reports_the_measured_input_magnitude():
    found = keys([result()])["gate_saturation"]
    assert found.value == pytest.approx(0.91) and "|x| = 108" in found.detail
    assert "gate_saturation" not in keys([result(gate_saturation=0.3)])
    small = keys([result(gate_saturation=0.8)], ONEHOT_DATA)["gate_saturation"]
    assert "inputs are small" in small.detail


def test_zero_recurrent_gradient_needs_exact_zero_while_other_groups_learn():
    found = keys([result()])["zero_recurrent_gradient"]
    assert found.value == 0.0 and "1 step long" in found.detail and "never used" in found.detail
    assert "zero_recurrent_gradient" not in keys([result(grad_norm_recurrent_kernel=1e-9)])
    frozen = keys([result(grad_norm_input_kernel=0.0, grad_norm_bias=0.0)])
    assert "zero_recurrent_gradient" not in frozen and "frozen_lstm" in frozen


def test_frozen_lstm_only_when_every_lstm_group_is_zero():
    assert "frozen_lstm" not in keys([result()])
    assert "frozen_lstm" not in keys([result(grad_norm_input_kernel=0.0, grad_norm_bias=0.0, grad_norm_readout=0.0)])


def test_noise_dominates_is_measured_before_any_escape():
    found = keys([result(noise_to_grad=3.0)])["noise_dominates"]
    assert found.value == pytest.approx(3.0)
    assert "noise_dominates" not in keys([result()])
    # after an escape at epoch 1 the gradient vanishes and the noise ratio grows: not counted
    escaped = result(verdict="escaped", escape_epoch=1, noise_to_grad=20.0, distinct_symbols=12.0)
    assert "noise_dominates" not in keys([escaped])


def test_still_falling_needs_a_steady_descent_at_the_end():
    falling = result(per_epoch={"val_loss": [6634.0, 2253.0, 770.0, 268.0, 45.8]})
    found = keys([falling])["still_falling"]
    assert found.value is not None and found.value > 0.5 and "still falling" in found.detail
    flat = result(per_epoch={"val_loss": [12.3, 11.93, 11.92, 11.921, 11.92]})
    assert "still_falling" not in keys([flat])
    escaped = result(verdict="escaped", escape_epoch=2, per_epoch={"val_loss": [2.0, 1.0, 0.5, 0.2, 0.1]})
    assert "still_falling" not in keys([escaped])


def test_unstable_when_the_loss_climbs_far_above_its_best():
    found = keys([result(per_epoch={"val_loss": [18.0, 14.4, 990.0, 148.0, 3650.0]})])["unstable"]
    assert found.value == pytest.approx(3650 / 14.4) and "epoch 2" in found.detail
    assert "unstable" not in keys([result(per_epoch={"val_loss": [18.0, 14.4, 20.0, 16.0, 15.0]})])


def test_diverged_gives_the_step_and_silences_the_other_findings():
    blown = result(epochs=1, verdict="diverged", diverged_step=6, val_loss=math.inf, train_loss=math.inf)
    found = keys([blown])
    assert set(found) == {"diverged"}
    diverged = found["diverged"]
    assert diverged.value == 6 and diverged.shown == "step 6" and "epoch 1" in diverged.detail
    assert "diverged" not in keys([result()])


def test_diverged_by_loss_ratio_without_a_non_finite_step():
    huge = result(verdict="diverged", per_epoch={"val_loss": [20.0, 30.0, 2e5, 3e5, 4e5]})
    found = keys([huge])["diverged"]
    assert "epoch 3" in found.detail and found.value == 3 * SEED_DATA.train.x.shape[0]


def test_escaped_reports_epoch_and_accuracy():
    ok = result(verdict="escaped", escape_epoch=2, symbol_accuracy=1.0, distinct_symbols=12.0, skill=0.99)
    found = keys([ok])
    assert found["escaped"].value == 2 and "accuracy 1.000" in found["escaped"].detail
    assert "escaped" not in keys([result()])


def test_findings_aggregate_over_replicates():
    found = keys([result(), result(gate_saturation=0.2), result(gate_saturation=0.95)])["gate_saturation"]
    assert (found.runs, found.of) == (2, 3)
    counts = dg.verdict_counts([result(), result(verdict="escaped"), result()])
    assert counts == {"escaped": 1, "plateau": 2} and dg.aggregate_verdict(counts) == "plateau"
    assert dg.aggregate_verdict({"escaped": 1, "plateau": 1}) == "escaped"


# --- the neighbourhood


def test_default_alternatives_of_the_seed():
    alt = dg.default_alternatives(SEED_CONFIG)
    assert alt["learning_rate"] == [0.0001, 0.01, 0.1]
    assert alt["input_encoding"] == ["scaled", "onehot"] and alt["momentum"] == [0.0]
    assert alt["seq_len"] == [8] and alt["state_size"] == [8, 64] and alt["stateful"] == [True]
    adam_cls = dg.default_alternatives(SEED_CONFIG.replace(optimizer="adam", output_framing="classification"))
    assert "momentum" not in adam_cls and "target_scale" not in adam_cls


def test_changes_that_cannot_run_are_skipped_with_the_reason():
    base = SEED_CONFIG.replace(batch_size=150)  # 960 training symbols: 150 lanes of 6, so seq_len 8 cannot fit
    changes, skipped = dg.single_changes(base, {"seq_len": [8], "momentum": [0.0]}, [0])
    assert [c.label for c in changes] == ["momentum=0.0"]
    assert len(skipped) == 1 and skipped[0].startswith("seq_len=8: batch_size")


def test_file_alternatives_come_from_the_domains(tmp_path):
    from lstm_sweep.spec import load_sweep

    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "name: s\nsampler: random\ntrials: 4\nfixed: {epochs: 3}\nfactors:\n  learning_rate: {values: [0.001, 0.1]}\n"
        "  grad_noise: {low: 0.0, high: 0.1}\n"
    )
    alt = dg.file_alternatives(load_sweep(sweep), SEED_CONFIG)
    assert alt == {"learning_rate": [0.1], "grad_noise": [0.0, 0.05, 0.1]}


def test_neighbourhood_spec_has_the_driver_interface():
    plan = dg.plan_diagnosis({"epochs": 2}, replicates=2)
    spec = plan.spec
    assert spec.grid_cells()[0] == {"change": "original"} and spec.n_runs() == 2 * spec.n_configs()
    assert spec.name.startswith("diagnose-") and spec.storage == f"sqlite:///results/{spec.name}/optuna.db"
    assert spec.tracking_uri == "sqlite:///results/mlflow.db"
    config = spec.config_for({"change": "input_encoding=onehot"}, 1)
    assert config.input_encoding == "onehot" and config.seed == 1 and config.epochs == 2
    assert spec.config_for({"change": "original"}, 0) == SEED_CONFIG.replace(epochs=2)
    json.dumps(spec.to_dict())
    assert dg.plan_diagnosis({"epochs": 2}, replicates=2).spec.name == spec.name  # same experiment, same name
    assert dg.plan_diagnosis({"epochs": 3}, replicates=2).spec.name != spec.name


# (name, accepted in a sweep file, accepted by diagnose): one rule, limit 128; diagnose keeps 6 characters for
# the "-pairs" study it may add, so its names stop at 122
NAMES = [
    ("plateau", True, True),
    ("a.b_c-1", True, True),
    ("", False, False),
    ("..", False, False),
    ("no spaces", False, False),
    ("a/b", False, False),
    ("x" * 122, True, True),
    ("x" * 123, True, False),
    ("x" * 128, True, False),
    ("x" * 129, False, False),
]


@pytest.mark.parametrize(
    ("name", "in_sweep_file", "in_diagnose"), NAMES, ids=[n if len(n) < 20 else f"{len(n)} chars" for n, *_ in NAMES]
)
def test_one_name_rule_for_sweep_files_and_diagnose(name: str, in_sweep_file: bool, in_diagnose: bool) -> None:
    from lstm_sweep.errors import ConfigError, SweepFileError
    from lstm_sweep.spec import NAME_MAX_LENGTH, is_valid_name, name_allowed, parse_sweep

    doc = {"name": name, "factors": {"learning_rate": {"values": [0.01, 0.1]}}}
    if in_sweep_file:
        assert parse_sweep(doc, "s.yaml").name == name
    else:
        with pytest.raises(SweepFileError) as sweep_err:
            parse_sweep(doc, "s.yaml")
        assert f"at most {NAME_MAX_LENGTH} characters" in name_allowed()
        assert any(  # long values are shortened in the line, so match its two ends
            line.startswith("s.yaml: name: got '") and line.endswith(f", expected {name_allowed()}")
            for line in sweep_err.value.problems
        ), sweep_err.value.problems
    if in_diagnose:
        assert dg.plan_diagnosis({"epochs": 2}, replicates=1, name=name).spec.name == name
        assert is_valid_name(name + dg.PAIRS_SUFFIX)  # the pairs stage's study name is valid too
    else:
        with pytest.raises(ConfigError) as diag_err:
            dg.plan_diagnosis({"epochs": 2}, replicates=1, name=name)
        assert diag_err.value.key == "name" and diag_err.value.value == name
        assert diag_err.value.allowed == name_allowed(NAME_MAX_LENGTH - len(dg.PAIRS_SUFFIX))
        assert "at most 122 characters" in diag_err.value.allowed


def row(label: str, factors: dict[str, Any], skill: float, escaped: int = 0) -> dg.NeighbourRow:
    return dg.NeighbourRow(label, factors, 2, escaped, skill, None, {"plateau": 2 - escaped, "escaped": escaped})


def test_pairs_combine_the_best_single_changes_on_distinct_factors():
    rows = [
        row("original", {}, 0.0),
        row("input_encoding=scaled", {"input_encoding": "scaled"}, 0.45),
        row("input_encoding=onehot", {"input_encoding": "onehot"}, 0.4),
        row("learning_rate=0.01", {"learning_rate": 0.01}, 0.1),
        row("optimizer=adam", {"optimizer": "adam"}, 0.05),
        row("momentum=0.0", {"momentum": 0.0}, 0.01),
        row("seq_len=8", {"seq_len": 8}, -2.0),
    ]
    labels = [c.label for c in dg.pair_changes(rows, SEED_CONFIG, pool=4)]
    assert "input_encoding=scaled + learning_rate=0.01" in labels
    assert not any("onehot" in label for label in labels)  # same factor as a better change
    assert "optimizer=adam + momentum=0.0" not in labels  # adam ignores momentum
    assert len(labels) == 5 and not any("seq_len" in label for label in labels)
    assert dg.best_row(rows) is None
    rows.append(row("output_framing=classification", {"output_framing": "classification"}, 0.9, escaped=2))
    best = dg.best_row(rows)
    assert best is not None and best.change == "output_framing=classification"


def test_rows_from_replicate_records_and_curves_png():
    records = [
        {"verdict": "escaped", "skill": 0.9, "escape_epoch": 3, "baseline_loss": 2.48, "curve": {"val_loss": [2, 1]}},
        {"verdict": "plateau", "skill": -math.inf, "escape_epoch": None, "baseline_loss": 2.48, "curve": {}},
    ]
    r = dg.row_from_records(dg.Change.of({"learning_rate": 0.1}), records)
    assert (r.change, r.escaped, r.escape_rate, r.median_escape_epoch) == ("learning_rate=0.1", 1, 0.5, 3.0)
    assert r.escapes and json.loads(json.dumps(r.to_json()))["median_skill"] == "-inf"
    png = dg.curves_png(dg.curves_of([result()]), r.curves, ["original", "neighbour"])
    assert png.startswith(b"\x89PNG")


def test_diagnosis_files_are_written_like_the_report(tmp_path, monkeypatch):
    """diagnosis.md and curves.png go through the report's atomic writer: fsynced before the rename, and an
    existing file keeps its mode (a private diagnosis stays private)."""
    md = tmp_path / "diagnosis.md"
    md.write_text("old")
    md.chmod(0o600)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    found = dg.Diagnosis(
        name="d",
        config=SEED_CONFIG,
        replicates=1,
        verdicts={"plateau": 1},
        findings=[],
        original_curves=dg.curves_of([result()]),
    )
    assert dg.write_files(found, tmp_path) == [md, tmp_path / "curves.png"]
    assert md.read_text() != "old" and md.stat().st_mode & 0o777 == 0o600
    assert len(synced) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- the command end to end (one MLflow store for the module: creating one takes seconds). Its URI is absolute:
# MLflow caches a store per URI string, so a relative one would follow this module's cwd into other tests.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("diagnose")


def tracking(workdir: Path) -> list[str]:
    return ["--tracking-uri", f"sqlite:///{workdir}/results/mlflow.db"]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["diagnose", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_seed_diagnosis_names_collapse_baseline_saturation_and_zero_recurrence(capsys, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["diagnose", "--no-neighbourhood", "--quiet", *tracking(workdir)]) == 0
    out = capsys.readouterr().out
    assert "Verdict: plateau in 3/3 replicates" in out
    for fragment in ("predictions collapsed: 1 symbol", "'g' (code 103)", "vs 11.9167", "|x| = 108", "0 exactly"):
        assert fragment in out, fragment
    name = out.split(":", 1)[0]
    md = (workdir / "results" / name / "diagnosis.md").read_text()
    assert "predicts the mean" in md and (workdir / "results" / name / "curves.png").stat().st_size > 0


def test_escaping_configuration_says_so(capsys, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    options = ["--input-encoding", "onehot", "--output-framing", "classification", "--learning-rate", "0.1"]
    out = run_json(capsys, "--no-neighbourhood", "--replicates", "2", "--epochs", "5", *options, *tracking(workdir))
    found = {f["key"]: f for f in out["findings"]}
    assert out["verdict"] == "escaped" and out["verdicts"] == {"escaped": 2}
    assert "escaped" in found and found["escaped"]["value"] >= 1
    assert not {"collapse", "baseline_loss", "gate_saturation", "diverged"} & found.keys()


def test_diverging_configuration_gives_the_step(capsys, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    args = ["--no-neighbourhood", "--replicates", "2", "--epochs", "3", "--learning-rate", "1000", *tracking(workdir)]
    out = run_json(capsys, *args)
    found = {f["key"]: f for f in out["findings"]}
    assert out["verdict"] == "diverged" and set(found) == {"diverged"}
    assert isinstance(found["diverged"]["value"], float) and 1 <= found["diverged"]["value"] <= 60
    assert found["diverged"]["shown"].startswith("step ")


def test_seed_neighbourhood_finds_a_single_change_that_escapes(capsys, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    args = ["--epochs", "10", "--replicates", "2", "--name", "diag-seed", *tracking(workdir)]
    out = run_json(capsys, *args)
    rows = {r["change"]: r for r in out["neighbourhood"]}
    assert rows["original"]["verdicts"] == {"plateau": 2}
    assert {"learning_rate=0.01", "input_encoding=onehot", "output_framing=classification"} <= rows.keys()
    assert all(r["runs"] == 2 for r in rows.values())
    assert out["best_change"] is not None and out["best_change"]["escapes"]
    assert out["pairs"] == []
    files = [Path(p) for p in out["files"]]
    assert {p.name for p in files} == {"diagnosis.md", "curves.png"} and all(p.stat().st_size for p in files)
    assert out["best_change"]["change"] in (workdir / "results" / "diag-seed" / "diagnosis.md").read_text()
    client = MlflowClient(tracking_uri=tracking(workdir)[1])
    exp = client.get_experiment_by_name("diag-seed")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("lstm_sweep.role") == "parent"]
    assert len(parent) == 1 and len(runs) == 1 + 2 * len(rows)
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id, "diagnosis")}
    assert artifacts == {"diagnosis/diagnosis.md", "diagnosis/curves.png"}
    # a second call resumes the finished study: nothing new is tracked, the same table comes back
    again = run_json(capsys, *args)
    assert again["neighbourhood"] == out["neighbourhood"]
    assert len(client.search_runs([exp.experiment_id])) == len(runs)


def test_sweep_file_domains_give_the_neighbourhood(capsys, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    sweep = workdir / "tiny.yaml"
    sweep.write_text(
        "name: tiny\nreplicates: 1\nfixed: {epochs: 2, stream_length: 240, batch_size: 8, state_size: 8}\n"
        "factors:\n  input_encoding: {values: [raw, onehot]}\n  learning_rate: {values: [0.001, 0.1]}\n"
    )
    out = run_json(capsys, str(sweep), "--learning-rate", "0.1", *tracking(workdir))
    assert out["config"]["state_size"] == 8 and out["config"]["learning_rate"] == 0.1 and out["replicates"] == 1
    assert [r["change"] for r in out["neighbourhood"]] == ["original", "learning_rate=0.001", "input_encoding=onehot"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--learning-rate", "-1"], "learning_rate: got -1.0, expected a number > 0"),
        (["--replicates", "0"], "--replicates"),
        (["--input-encoding", "binary"], "'binary' is not one of"),
        (["--name", "no spaces"], "name: got 'no spaces'"),
        (["--batch-size", "4096"], "batch_size"),
        (["missing.yaml"], "missing.yaml"),
        (["--no-such-option"], "No such option"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(["diagnose", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert fragment in lines[0] and captured.out == ""
    assert not (tmp_path / "results").exists()


NO_TENSORFLOW = """
import sys
import lstm_sweep.cli, lstm_sweep.diagnose
assert "tensorflow" not in sys.modules, "importing the command line loaded TensorFlow"
code = lstm_sweep.cli.main(sys.argv[1:])
assert "tensorflow" not in sys.modules, "checking the options loaded TensorFlow"
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--learning-rate", "-1"], "learning_rate: got -1.0"),
        (["--name", "no spaces"], "name: got 'no spaces'"),
        (["--batch-size", "4096"], "batch_size"),
    ],
)
def test_bad_options_are_rejected_before_tensorflow_loads(tmp_path, args, fragment):
    """A usage error is answered at once: nothing on the way to checking the options imports TensorFlow
    (a fresh interpreter, since this one has long loaded it)."""
    done = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, "diagnose", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert fragment in lines[0] and done.stdout == ""
    assert not (tmp_path / "results").exists()


def test_the_tracking_module_loads_without_tensorflow():
    """`ui` and `server` only need tracking's store helpers: starting them must not wait for TensorFlow."""
    code = "import sys, lstm_sweep.tracking; assert 'tensorflow' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
