"""Hostile input: random and malformed sweep files, leaked passwords, diverging and interrupted sweeps.

Every bad sweep file must give exit 2, only `lstm-sweep: <file>: ...` lines on stderr, no traceback, and write
nothing (no Optuna or MLflow store, no results/ folder). Valid files are only validated, never run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import wait_for_completed
from lstm_sweep.cli import main
from lstm_sweep.config import FACTORS
from lstm_sweep.spec import DEFINITION_KEYS, FIXED_KEYS, THRESHOLD_KEYS, TOP_KEYS, mask_url

HOSTILE = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- strategies

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
keys = st.one_of(st.sampled_from([*TOP_KEYS, *DEFINITION_KEYS, *FACTORS]), st.text(max_size=12), st.integers())
nested = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


def wrong_value(kind: str) -> st.SearchStrategy[object]:
    """Values of the wrong type for a key of `kind`."""
    others = {
        "str": st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), min_size=1, max_size=3)),
        "int": st.one_of(st.text(min_size=1, max_size=8), st.booleans(), st.lists(st.integers(), max_size=2)),
        "map": st.one_of(st.integers(), st.text(min_size=1, max_size=8), st.lists(st.integers(), max_size=3)),
    }
    return others[kind]


TOP_KIND = {
    "name": "str",
    "description": "str",
    "seed": "int",
    "sampler": "str",
    "trials": "int",
    "replicates": "int",
    "fixed": "map",
    "factors": "map",
    "thresholds": "map",
    "storage": "str",
    "tracking_uri": "str",
}
VALID = {
    "name": "hostile",
    "replicates": 1,
    "fixed": {"epochs": 1},
    "factors": {"learning_rate": {"values": [0.01, 0.1]}},
}


# --- the checks


@contextlib.contextmanager
def sweep_dir(text: str):
    """A fresh tmp dir (also the cwd, so a stray results/ would land in it) holding sweep.yaml."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        path = Path(tmp) / "sweep.yaml"
        path.write_text(text, encoding="utf-8")
        yield Path(tmp), path


def assert_refused(err: str, path: Path) -> None:
    lines = err.splitlines()
    assert lines, "a refused file must say why"
    assert "Traceback" not in err
    for line in lines:
        assert line.startswith("lstm-sweep: "), line
        assert str(path) in line, line


def assert_nothing_written(tmp: Path) -> None:
    assert sorted(p.name for p in tmp.iterdir()) == ["sweep.yaml"]


def check_file(text: str, capsys, *, must_fail: bool = False) -> tuple[int, str]:
    """validate the file; if it is refused, `run` must refuse it the same way and write nothing."""
    capsys.readouterr()
    with sweep_dir(text) as (tmp, path):
        code = main(["validate", str(path)])
        out, err = capsys.readouterr()
        assert_nothing_written(tmp)
        if code == 0:
            assert not must_fail, f"accepted:\n{text}\n{out}"
            assert err == "" and out.startswith("sweep ")
            return code, out
        assert code == 2, (code, err)
        assert_refused(err, path)
        run = ["run", str(path), "--storage", f"sqlite:///{tmp}/o.db", "--tracking-uri", f"sqlite:///{tmp}/m.db"]
        assert main([*run, "--quiet"]) == 2
        run_out, run_err = capsys.readouterr()
        assert_refused(run_err, path)
        assert run_err == err and run_out == ""
        assert_nothing_written(tmp)
        return code, err


@HOSTILE
@given(doc=nested)
def test_random_yaml_documents(doc, capsys):
    check_file(yaml.safe_dump(doc), capsys)


@HOSTILE
@given(text=st.text(max_size=200))
def test_random_text(text, capsys):
    check_file(text, capsys)


@HOSTILE
@given(data=st.data())
def test_wrong_type_for_every_top_level_key(data, capsys):
    key = data.draw(st.sampled_from(sorted(TOP_KIND)))
    value = data.draw(wrong_value(TOP_KIND[key]))
    _, err = check_file(yaml.safe_dump({**VALID, key: value}), capsys, must_fail=True)
    assert f": {key}" in err


@HOSTILE
@given(data=st.data())
def test_wrong_type_in_factor_definitions(data, capsys):
    name = data.draw(st.sampled_from(sorted(FACTORS)))
    factor = FACTORS[name]
    key = data.draw(st.sampled_from(["values", "low", "high", "log", "step", "role", "value"]))
    bad = {
        "values": st.one_of(
            st.just([]),
            st.integers(),
            st.text(max_size=5),
            st.lists(st.dictionaries(st.text(), st.integers(), min_size=1), min_size=1),
        ),
        "low": st.one_of(st.text(min_size=1, max_size=5), st.booleans(), st.lists(st.integers(), max_size=2)),
        "high": st.one_of(st.text(min_size=1, max_size=5), st.booleans(), st.lists(st.integers(), max_size=2)),
        "log": st.one_of(st.integers(), st.text(min_size=1, max_size=5)),
        "step": st.one_of(st.text(min_size=1, max_size=5), st.booleans(), st.integers(max_value=0)),
        "role": st.text(max_size=8).filter(lambda r: r not in ("scientific", "nuisance", "fixed")),
        "value": st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(st.text(), st.integers(), max_size=2)),
    }[key]
    definition: dict[str, object] = {"low": 1, "high": 2} if key in ("low", "high", "log", "step") else {}
    if factor.kind in ("choice", "bool") and key in ("low", "high", "log", "step"):
        definition = {}
    if key == "value":
        definition["role"] = "fixed"
    definition[key] = data.draw(bad)
    _, err = check_file(yaml.safe_dump({**VALID, "factors": {name: definition}}), capsys, must_fail=True)
    assert f"factors.{name}" in err


@HOSTILE
@given(data=st.data())
def test_out_of_range_and_contradictory_values(data, capsys):
    case = data.draw(st.sampled_from(["low>=high", "momentum-adam", "fixed-no-value", "range", "seed", "threshold"]))
    doc: dict[str, object] = dict(VALID)
    if case == "low>=high":
        high = data.draw(st.floats(min_value=0.001, max_value=1.0))
        low = data.draw(st.floats(min_value=high, max_value=10.0))
        doc["factors"] = {"learning_rate": {"low": low, "high": high, "step": 0.001}}
        expected = "factors.learning_rate.high"
    elif case == "momentum-adam":
        doc["fixed"] = {"epochs": 1, "optimizer": "adam"}
        doc["factors"] = {"momentum": {"values": [0.0, 0.9]}, "learning_rate": {"values": [0.1]}}
        expected = "factors.momentum"
    elif case == "fixed-no-value":
        doc["factors"] = {data.draw(st.sampled_from(sorted(set(FACTORS) - {"epochs"}))): {"role": "fixed"}}
        expected = ".value: missing"
    elif case == "range":
        name = data.draw(st.sampled_from(["momentum", "seq_len", "state_size", "num_layers", "batch_size"]))
        bad = {"momentum": [1.0, -0.1, 5], "seq_len": [0, 513], "state_size": [0, 1025], "num_layers": [0, 9]}
        doc["factors"] = {name: {"values": [data.draw(st.sampled_from(bad.get(name, [0, 4097])))]}}
        expected = f"factors.{name}.values[0]"
    elif case == "seed":
        doc["seed"] = data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31)))
        expected = "seed"
    else:
        key = data.draw(st.sampled_from(THRESHOLD_KEYS))
        doc["thresholds"] = {key: data.draw(st.sampled_from([-5.0, 1e9, float("nan"), float("inf")]))}
        expected = f"thresholds.{key}"
    code, err = check_file(yaml.safe_dump(doc), capsys, must_fail=case != "threshold")
    if code == 2:
        assert expected in err


@HOSTILE
@given(sizes=st.lists(st.integers(min_value=2, max_value=60), min_size=3, max_size=5), sampler=st.just("grid"))
def test_huge_grids_are_refused(sizes, sampler, capsys):
    names = ["seq_len", "state_size", "batch_size", "grad_noise", "forget_bias"]
    factors: dict[str, object] = {}
    for name, n in zip(names, sizes, strict=False):
        if name in ("grad_noise", "forget_bias"):
            factors[name] = {"low": 0.0, "high": round(0.01 * (n - 1), 2), "step": 0.01}
        else:
            factors[name] = {"low": 1, "high": n}
    cells = 1
    for n in sizes:
        cells *= n
    code, out_or_err = check_file(yaml.safe_dump({**VALID, "sampler": sampler, "factors": factors}), capsys)
    if cells > 100_000:
        assert code == 2 and "grid cells" in out_or_err and "at most 100000" in out_or_err
    else:
        assert code == 0 and f"{cells} grid configurations" in out_or_err


@pytest.mark.parametrize(
    "doc",
    [
        {**VALID, "factors": {"grad_noise": {"low": 0.0, "high": 1e300, "step": 1e-10}}},
        {**VALID, "factors": {"learning_rate": {"low": 1e-300, "high": 1e300, "step": 1e-300}}},
        {
            **VALID,
            "sampler": "random",
            "trials": 2,
            "factors": {"state_size": {"low": 1, "high": 1024}}
            | {n: {"values": list(range(1, 12))} for n in ("seq_len", "num_layers")},
        },
    ],
)
def test_degenerate_ranges(doc, capsys):
    """A float step too small for its range once crashed with OverflowError; a huge random space is fine."""
    check_file(yaml.safe_dump(doc), capsys, must_fail=doc.get("sampler") != "random")


def one_char_typos(word: str) -> st.SearchStrategy[str]:
    """`word` with one character replaced, dropped or inserted (not equal to any real key)."""
    letters = "abcdefghijklmnopqrstuvwxyz_"
    return st.one_of(
        st.tuples(st.integers(0, len(word) - 1), st.sampled_from(letters)).map(
            lambda t: word[: t[0]] + t[1] + word[t[0] + 1 :]
        ),
        st.integers(0, len(word) - 1).map(lambda i: word[:i] + word[i + 1 :]),
        st.tuples(st.integers(0, len(word)), st.sampled_from(letters)).map(
            lambda t: word[: t[0]] + t[1] + word[t[0] :]
        ),
    )


@HOSTILE
@given(data=st.data())
def test_unknown_keys_suggest_the_real_one(data, capsys):
    section = data.draw(st.sampled_from(["top", "fixed", "factors", "definition", "thresholds"]))
    real_keys = {
        "top": TOP_KEYS,
        "fixed": FIXED_KEYS,
        "factors": tuple(FACTORS),
        "definition": DEFINITION_KEYS,
        "thresholds": THRESHOLD_KEYS,
    }[section]
    real = data.draw(st.sampled_from([k for k in real_keys if len(k) >= 4]))
    typo = data.draw(one_char_typos(real))
    assume(typo not in real_keys and typo)
    doc = json.loads(json.dumps(VALID))
    if section == "top":
        doc[typo] = 1
    elif section == "fixed":
        doc["fixed"][typo] = 1
    elif section == "factors":
        doc["factors"][typo] = {"values": [1]}
    elif section == "definition":
        doc["factors"]["learning_rate"][typo] = 1
    else:
        doc["thresholds"] = {typo: 0.5}
    _, err = check_file(yaml.safe_dump(doc), capsys, must_fail=True)
    assert "did you mean" in err, err
    # difflib may prefer another real key at the same distance; it must be one a character away in kind.
    suggested = err.split("did you mean ")[1].split("?")[0]
    assert suggested in real_keys


def test_misspelt_top_key_names_the_intended_one(capsys):
    _, err = check_file(yaml.safe_dump({**VALID, "replicatse": 2}), capsys, must_fail=True)
    assert "replicatse: unknown key" in err and "did you mean replicates?" in err


# --- secrets

SECRET_URL = "postgresql://bob:hunter2@db.example/x"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (SECRET_URL, "postgresql://bob:***@db.example/x"),
        ("postgresql+psycopg2://bob:p%40ss:w@rd@db:5432/x?a=b", "postgresql+psycopg2://bob:***@db:5432/x?a=b"),
        ("mysql://:onlypw@host/db", "mysql://:***@host/db"),
        ("sqlite:///results/optuna.db", "sqlite:///results/optuna.db"),
        ("postgresql://bob@db/x", "postgresql://bob@db/x"),
        ("https://mlflow.example:5000/api", "https://mlflow.example:5000/api"),
        (
            f"could not connect to {SECRET_URL}: timeout; retry redis://u:s3cret@r:6379/0 later",
            "could not connect to postgresql://bob:***@db.example/x: timeout; retry redis://u:***@r:6379/0 later",
        ),
        (f"'{SECRET_URL}'", "'postgresql://bob:***@db.example/x'"),
        ("", ""),
        ("no url here: bob:hunter2@db", "no url here: bob:hunter2@db"),
    ],
)
def test_mask_url(text, masked):
    assert mask_url(text) == masked
    assert mask_url(mask_url(text)) == masked


PASSWORD_CHARS = st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), blacklist_characters="@")


@settings(max_examples=60, deadline=None)
@given(
    user=st.text("abcdefghij_.-", max_size=8),
    password=st.text(PASSWORD_CHARS, min_size=6),
    prefix=st.text(max_size=20),
)
def test_mask_url_hides_any_password(user, password, prefix):
    assume(password not in f"{prefix} postgresql://{user}:***@db.example:5432/x")
    text = f"{prefix} postgresql://{user}:{password}@db.example:5432/x and more"
    assert password not in mask_url(text)


def test_bad_values_quoting_a_password_are_masked(capsys):
    for doc in (
        {**VALID, "storage": [SECRET_URL]},
        {**VALID, "description": [SECRET_URL]},
        {**VALID, "name": SECRET_URL},
        {**VALID, "fixed": {"text_path": 3, "task": SECRET_URL}},
    ):
        _, err = check_file(yaml.safe_dump(doc), capsys, must_fail=True)
        assert "hunter2" not in err and "bob:***@" in err


TINY_SECRET = f"""
name: secret
description: "tuned against {SECRET_URL} (prod)"
sampler: grid
replicates: 2
fixed: {{task: cycle, epochs: 1, stream_length: 240, batch_size: 8, state_size: 4}}
factors:
  learning_rate: {{values: [0.01, 0.1]}}
"""


def test_passwords_never_reach_outputs_or_stores(tmp_path, capsys):
    sweep = tmp_path / "secret.yaml"
    sweep.write_text(TINY_SECRET)
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["validate", str(sweep)]) == 0
    assert main(["run", str(sweep), "--storage", storage, "--tracking-uri", tracking, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "hunter2" not in out + err
    assert "bob:***@db.example" in out  # validate shows the masked description

    study = optuna.load_study(study_name="secret", storage=storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert "hunter2" not in json.dumps(study.user_attrs, default=str)
    assert "bob:***@db.example" in json.dumps(study.user_attrs)
    for t in study.trials:
        assert "hunter2" not in json.dumps([t.user_attrs, t.params, t.system_attrs], default=str)

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("secret")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == 1 + 2 * 2
    for run in runs:
        assert "hunter2" not in json.dumps([run.data.params, run.data.tags, run.info.run_name])
        for artifact in client.list_artifacts(run.info.run_id):
            if artifact.path.endswith((".yaml", ".json", ".txt")):
                local = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path / "dl"))
                assert "hunter2" not in Path(local).read_text()
    parent = next(r for r in runs if r.data.tags.get("lstm_sweep.role") == "parent")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "sweep.json"} <= names
    yaml_text = Path(client.download_artifacts(parent.info.run_id, "sweep.yaml", str(tmp_path / "dl2"))).read_text()
    assert "bob:***@db.example" in yaml_text


# --- numerical faults and interruption


def test_a_diverging_learning_rate_is_a_result(tmp_path, capsys):
    sweep = tmp_path / "diverge.yaml"
    sweep.write_text(
        "name: diverge\nreplicates: 1\n"
        "fixed: {task: cycle, epochs: 2, stream_length: 240, batch_size: 8, state_size: 4}\n"
        "factors:\n  learning_rate: {values: [0.01, 1000]}\n  seq_len: {values: [1, 2]}\n"
    )
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert main(["run", str(sweep), "--storage", storage, "--no-tracking", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trained 4 trial(s)" in out and "0 failed" in out
    study = optuna.load_study(study_name="diverge", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    for t in study.trials:
        verdicts = [r["verdict"] for r in t.user_attrs["replicates"]]
        if t.params["learning_rate"] == 1000:
            assert verdicts == ["diverged"], t.user_attrs["replicates"]
            assert t.value == -1.0
        else:
            assert "diverged" not in verdicts


CTRL_C = """
name: ctrlc
sampler: grid
replicates: 2
fixed: {task: cycle, epochs: 200, stream_length: 240, batch_size: 8, state_size: 4, output_framing: classification}
factors:
  learning_rate: {role: nuisance, values: [0.01, 0.1]}
  input_encoding: {values: [raw, onehot]}
  momentum: {values: [0.0, 0.5, 0.9]}
"""


def test_ctrl_c_stops_cleanly_and_the_next_run_finishes(tmp_path, capsys):
    """SIGINT part-way: exit 130 without a traceback; the next run completes every cell exactly once."""
    sweep = tmp_path / "ctrlc.yaml"
    sweep.write_text(CTRL_C)
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    args = ["run", str(sweep), "--storage", storage, "--tracking-uri", tracking, "--quiet"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstm_sweep.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        completed = wait_for_completed(proc, "ctrlc", storage, 2)
        assert proc.poll() is None, "the sweep finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        sent = time.time()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.time() - sent < 30
    assert "Traceback" not in out + err, err
    assert "interrupted: run the same command again to continue" in out
    assert 2 <= completed < 12

    assert main(args) == 0
    capsys.readouterr()
    study = optuna.load_study(study_name="ctrlc", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    cells = Counter((t.params["learning_rate"], t.params["input_encoding"], t.params["momentum"]) for t in complete)
    assert len(cells) == 12 and set(cells.values()) == {1}
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert proc.returncode == 130, f"exit {proc.returncode} after Ctrl-C\n{out}"
