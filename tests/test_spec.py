"""The sweep file: good files resolve to the expected spec, bad ones name every problem precisely."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest

from lstm_sweep.config import FACTORS, TrialConfig
from lstm_sweep.errors import ConfigError, SweepFileError
from lstm_sweep.metrics import EPOCH_METRICS
from lstm_sweep.spec import Domain, SweepSpec, load_sweep, mask_url, parse_sweep
from lstm_sweep.step_parts import StepParts

DATA = Path(__file__).parent / "data"
SOURCE = "plateau.yaml"

Doc = dict[str, Any]

BASE: Doc = {
    "name": "plateau",
    "factors": {
        "learning_rate": {"role": "nuisance", "values": [0.001, 0.01, 0.1]},
        "grad_noise": {"values": [0.0, 0.01]},
    },
}


def doc(**changes: Any) -> Doc:
    """BASE with top-level keys replaced (None deletes a key)."""
    d = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return d


def with_factors(**factors: Any) -> Doc:
    """BASE with factor definitions added or replaced."""
    d = copy.deepcopy(BASE)
    d["factors"].update(factors)
    return d


def parse(data: object) -> SweepSpec:
    return parse_sweep(data, SOURCE)


# --- good files ---------------------------------------------------------------------------------------------

GOOD: list[tuple[str, Doc, dict[str, Any]]] = [
    (
        "minimal grid, defaults filled in",
        BASE,
        {
            "sampler": "grid",
            "seed": 0,
            "replicates": 1,
            "cells": 6,
            "trials": 6,
            "n_configs": 6,
            "n_runs": 6,
            "roles": {"learning_rate": "nuisance", "grad_noise": "scientific"},
            "storage": "sqlite:///results/plateau/optuna.db",
            "tracking_uri": "sqlite:///results/mlflow.db",
            "epoch_metrics": ("train_loss", "val_loss", "skill", "symbol_accuracy"),
            "description": "",
        },
    ),
    ("epoch_metrics all", doc(epoch_metrics="all"), {"epoch_metrics": EPOCH_METRICS}),
    ("epoch_metrics one name", doc(epoch_metrics="val_loss"), {"epoch_metrics": ("val_loss",)}),
    (
        "epoch_metrics listed, kept in record order",
        doc(epoch_metrics=["grad_norm_recurrent_kernel", "val_loss"]),
        {"epoch_metrics": ("val_loss", "grad_norm_recurrent_kernel")},
    ),
    (
        "replicates multiply runs",
        doc(replicates=3, seed=5, description="three seeds"),
        {"cells": 6, "n_configs": 6, "n_runs": 18, "seed": 5, "description": "three seeds"},
    ),
    (
        "grid trials above the cell count are clamped",
        doc(trials=1000),
        {"cells": 6, "trials": 6, "n_runs": 6},
    ),
    (
        "grid trials below the cell count run that many cells",
        doc(trials=4, replicates=2),
        {"cells": 6, "trials": 4, "n_configs": 4, "n_runs": 8},
    ),
    (
        "int range and stepped float range are enumerable",
        with_factors(seq_len={"low": 1, "high": 8, "step": 2}, grad_clip={"low": 0.0, "high": 1.0, "step": 0.25}),
        {"cells": 3 * 2 * 4 * 5, "roles": {"seq_len": "scientific", "grad_clip": "scientific"}},
    ),
    (
        "momentum collapsed for adam in the cell count",
        with_factors(optimizer={"values": ["momentum", "adam"]}, momentum={"values": [0.0, 0.5, 0.9]}),
        {"cells": 6 * (3 + 1)},
    ),
    (
        "role fixed factors and the fixed section",
        with_factors(momentum={"role": "fixed", "value": 0.5}) | {"fixed": {"task": "mirror", "epochs": 3}},
        {
            "cells": 6,
            "roles": {"momentum": "fixed"},
            "fixed_values": {"task": "mirror", "epochs": 3, "momentum": 0.5},
        },
    ),
    (
        "momentum fixed is fine with optimizer fixed to adam",
        with_factors(momentum={"role": "fixed", "value": 0.5}) | {"fixed": {"optimizer": "adam"}},
        {"cells": 6},
    ),
    (
        "random sampler with a continuous log range",
        doc(sampler="random", trials=50, replicates=2)
        | {
            "factors": {
                "learning_rate": {"low": 1e-4, "high": 1.0, "log": True},
                "stateful": {"values": [True, False]},
            }
        },
        {"sampler": "random", "trials": 50, "n_configs": 50, "n_runs": 100, "cells": None},
    ),
    (
        "tpe with int factors, int-valued floats accepted",
        doc(sampler="tpe", trials=20) | {"factors": {"state_size": {"low": 4.0, "high": 64, "log": True}}},
        {"sampler": "tpe", "trials": 20, "cells": 61},
    ),
    (
        "qmc, explicit storage and tracking",
        doc(
            sampler="qmc",
            trials=8,
            storage="postgresql://u:pw@db/optuna",
            tracking_uri="http://127.0.0.1:5000",
        ),
        {"sampler": "qmc", "storage": "postgresql://u:pw@db/optuna", "tracking_uri": "http://127.0.0.1:5000"},
    ),
    (
        "no factors at all is one cell",
        doc(factors=None, fixed={"learning_rate": 0.01}),
        {"cells": 1, "n_runs": 1, "roles": {}},
    ),
    (
        "thresholds override",
        doc(thresholds={"escape_skill": 0.6, "collapse_symbols": 3}),
        {"thresholds": {"escape_skill": 0.6, "collapse_symbols": 3, "plateau_skill": 0.05}},
    ),
    (
        "text task with its path",
        doc(fixed={"task": "text", "text_path": "corpus.txt"}),
        {"fixed_values": {"task": "text", "text_path": "corpus.txt"}},
    ),
]


@pytest.mark.parametrize(("data", "expected"), [pytest.param(d, e, id=i) for i, d, e in GOOD])
def test_good_sweeps_resolve(data: Doc, expected: dict[str, Any]) -> None:
    spec = parse(data)
    for key, want in expected.items():
        if key == "roles":
            got = {fs.name: fs.role for fs in spec.factors}
            assert {k: got[k] for k in want} == want
            if not want:
                assert got == {}
        elif key == "fixed_values":
            assert spec.fixed_values() == want
        elif key == "thresholds":
            assert {k: getattr(spec.thresholds, k) for k in want} == want
        elif key in ("n_configs", "n_runs"):
            assert getattr(spec, key)() == want, key
        else:
            assert getattr(spec, key) == want, key
    if spec.sampler == "grid":
        assert len(spec.grid_cells()) == spec.cells
    assert spec.source == SOURCE
    json.dumps(spec.to_dict())  # serialisable
    assert spec.fixed_values().get("seed") is None


# --- bad files ----------------------------------------------------------------------------------------------

Mutation = Callable[[], object]

BAD: list[tuple[str, Mutation, str, str]] = [
    ("not a mapping", lambda: ["name", "plateau"], "(top level)", "expected a mapping"),
    ("empty file", lambda: None, "(top level)", "got None"),
    ("missing name", lambda: doc(name=None), "name", "missing, expected a name"),
    (
        "bad name chars",
        lambda: doc(name="my sweep/1"),
        "name",
        "got 'my sweep/1', expected a name of letters",
    ),
    ("name only dots", lambda: doc(name=".."), "name", "not only dots"),
    ("name not a string", lambda: doc(name=12), "name", "got 12"),
    ("unknown top-level key", lambda: doc(replicate=2), "replicate", "unknown key, expected one of name"),
    ("did-you-mean top-level", lambda: doc(factor={}), "factor", "did you mean factors?"),
    (
        "unknown factor with did-you-mean",
        lambda: with_factors(learning_rat={"values": [0.1]}),
        "factors.learning_rat",
        "unknown factor, expected one of learning_rate, momentum, ",
    ),
    (
        "did-you-mean factor",
        lambda: with_factors(learning_rat={"values": [0.1]}),
        "",
        "did you mean learning_rate?",
    ),
    ("factors not a mapping", lambda: doc(factors=["learning_rate"]), "factors", "expected a mapping"),
    ("definition not a mapping", lambda: with_factors(seq_len=[1, 2]), "factors.seq_len", "got [1, 2]"),
    (
        "unknown definition key",
        lambda: with_factors(seq_len={"valus": [1]}),
        "factors.seq_len.valus",
        "values?",
    ),
    (
        "bad role",
        lambda: with_factors(seq_len={"role": "main", "values": [1]}),
        "factors.seq_len.role",
        "scientific",
    ),
    (
        "values empty",
        lambda: with_factors(seq_len={"values": []}),
        "factors.seq_len.values",
        "a non-empty list",
    ),
    ("values not a list", lambda: with_factors(seq_len={"values": 3}), "factors.seq_len.values", "got 3"),
    (
        "value of the wrong type",
        lambda: with_factors(seq_len={"values": [1, "two"]}),
        "factors.seq_len.values[1]",
        "got 'two', expected an integer >= 1 and <= 512",
    ),
    (
        "bool is not a number",
        lambda: with_factors(grad_clip={"values": [True]}),
        "factors.grad_clip.values[0]",
        "got True, expected a number >= 0",
    ),
    (
        "quoted number gets a hint",
        lambda: with_factors(grad_clip={"values": ["0.5"]}),
        "factors.grad_clip.values[0]",
        "not a string",
    ),
    (
        "choice value",
        lambda: with_factors(optimizer={"values": ["sgd"]}),
        "factors.optimizer.values[0]",
        "adam",
    ),
    (
        "out of range learning_rate",
        lambda: with_factors(learning_rate={"values": [-1]}),
        "factors.learning_rate.values[0]",
        "got -1, expected a number > 0",
    ),
    (
        "out of range seq_len",
        lambda: with_factors(seq_len={"values": [0, 1]}),
        "factors.seq_len.values[0]",
        "got 0, expected an integer >= 1",
    ),
    (
        "out of range momentum",
        lambda: with_factors(momentum={"values": [0.9, 1.0]}),
        "factors.momentum.values[1]",
        "got 1.0, expected a number >= 0 and < 1",
    ),
    (
        "duplicate values",
        lambda: with_factors(seq_len={"values": [1, 1.0]}),
        "factors.seq_len.values[1]",
        "duplicate",
    ),
    (
        "low >= high",
        lambda: with_factors(grad_clip={"low": 1.0, "high": 1.0, "step": 0.1}),
        "factors.grad_clip.high",
        "greater than low",
    ),
    ("low missing", lambda: with_factors(seq_len={"high": 4}), "factors.seq_len.low", "missing"),
    (
        "range bound out of range",
        lambda: with_factors(momentum={"low": 0.0, "high": 1.5, "step": 0.5}),
        "factors.momentum.high",
        "got 1.5, expected a number >= 0 and < 1",
    ),
    (
        "log with low <= 0",
        lambda: doc(sampler="random", trials=5) | {"factors": {"grad_noise": {"low": 0.0, "high": 1, "log": True}}},
        "factors.grad_noise.low",
        "> 0 with log: true",
    ),
    (
        "log not a bool",
        lambda: with_factors(seq_len={"low": 1, "high": 4, "log": "yes"}),
        "factors.seq_len.log",
        "true or false",
    ),
    (
        "log with a float step",
        lambda: with_factors(grad_clip={"low": 0.1, "high": 1.0, "log": True, "step": 0.1}),
        "factors.grad_clip.step",
        "no step with log",
    ),
    (
        "non-integer step on int",
        lambda: with_factors(seq_len={"low": 1, "high": 4, "step": 1.5}),
        "",
        "integer >= 1",
    ),
    (
        "step <= 0",
        lambda: with_factors(grad_clip={"low": 0.0, "high": 1.0, "step": 0}),
        "factors.grad_clip.step",
        "a number > 0",
    ),
    (
        "low/high on a choice factor",
        lambda: with_factors(optimizer={"low": 0, "high": 1}),
        "factors.optimizer.low",
        "values: [...] for a choice factor",
    ),
    (
        "low/high on a bool factor",
        lambda: with_factors(stateful={"low": 0, "high": 1}),
        "factors.stateful.low",
        "values: [...] for a bool factor",
    ),
    (
        "both values and range",
        lambda: with_factors(seq_len={"values": [1], "low": 1, "high": 2}),
        "",
        "not both",
    ),
    (
        "no domain",
        lambda: with_factors(seq_len={"role": "scientific"}),
        "factors.seq_len",
        "missing, expected",
    ),
    (
        "float range without step under grid",
        lambda: with_factors(grad_clip={"low": 0.0, "high": 1.0}),
        "factors.grad_clip",
        "values or a step for the grid sampler",
    ),
    (
        "role fixed without value",
        lambda: with_factors(seq_len={"role": "fixed"}),
        "factors.seq_len.value",
        "missing",
    ),
    (
        "role fixed with values",
        lambda: with_factors(seq_len={"role": "fixed", "value": 2, "values": [1]}),
        "factors.seq_len.values",
        "no domain with role fixed",
    ),
    (
        "role fixed bad value",
        lambda: with_factors(seq_len={"role": "fixed", "value": 0}),
        "factors.seq_len.value",
        "got 0",
    ),
    (
        "value without role fixed",
        lambda: with_factors(seq_len={"value": 2}),
        "factors.seq_len.value",
        "role fixed",
    ),
    (
        "factor both fixed and varied",
        lambda: doc(fixed={"learning_rate": 0.01}),
        "factors.learning_rate",
        "either fixed or factors, not both",
    ),
    (
        "momentum varied with optimizer fixed adam",
        lambda: with_factors(momentum={"values": [0.0, 0.9]}) | {"fixed": {"optimizer": "adam"}},
        "factors.momentum",
        "optimizer is fixed to adam",
    ),
    (
        "momentum varied with optimizer role-fixed adam",
        lambda: with_factors(momentum={"values": [0.9]}, optimizer={"role": "fixed", "value": "adam"}),
        "factors.momentum",
        "ignores momentum",
    ),
    ("replicates 0", lambda: doc(replicates=0), "replicates", "got 0, expected an integer from 1 to 100"),
    ("replicates 101", lambda: doc(replicates=101), "replicates", "from 1 to 100"),
    ("trials 0", lambda: doc(trials=0), "trials", "got 0, expected an integer >= 1"),
    ("trials bool", lambda: doc(trials=True), "trials", "got True"),
    (
        "unknown sampler",
        lambda: doc(sampler="bayes"),
        "sampler",
        "got 'bayes', expected one of grid, random, qmc, tpe",
    ),
    ("random sampler without trials", lambda: doc(sampler="random"), "trials", "required for sampler random"),
    ("negative seed", lambda: doc(seed=-1), "seed", "got -1, expected an integer >= 0"),
    (
        "seed + replicates overflow",
        lambda: doc(seed=2**31 - 1, replicates=2),
        "seed",
        "seed + replicates - 1",
    ),
    (
        "bad threshold value",
        lambda: doc(thresholds={"escape_skill": 1.5}),
        "thresholds.escape_skill",
        "(0, 1]",
    ),
    (
        "bad threshold type",
        lambda: doc(thresholds={"escape_skill": "high"}),
        "thresholds.escape_skill",
        "a number",
    ),
    (
        "unknown threshold",
        lambda: doc(thresholds={"escape_skil": 0.5}),
        "thresholds.escape_skil",
        "did you mean escape_skill?",
    ),
    (
        "thresholds inconsistent",
        lambda: doc(thresholds={"plateau_skill": 0.6, "escape_skill": 0.5}),
        "thresholds.plateau_skill",
        "less than thresholds.escape_skill",
    ),
    ("thresholds not a mapping", lambda: doc(thresholds=0.5), "thresholds", "a mapping"),
    (
        "huge grid",
        lambda: with_factors(
            state_size={"low": 1, "high": 1024},
            seq_len={"low": 1, "high": 512},
        ),
        "factors",
        "huge grid",
    ),
    ("seed in fixed", lambda: doc(fixed={"seed": 3}), "fixed.seed", "replicates own it"),
    ("unknown fixed key", lambda: doc(fixed={"epoch": 3}), "fixed.epoch", "did you mean epochs?"),
    (
        "bad fixed value",
        lambda: doc(fixed={"task": "reber"}),
        "fixed.task",
        "got 'reber', expected one of cycle",
    ),
    ("fixed not a mapping", lambda: doc(fixed=["task"]), "fixed", "a mapping"),
    ("text task without path", lambda: doc(fixed={"task": "text"}), "fixed.text_path", "when task is text"),
    ("bad text_path", lambda: doc(fixed={"text_path": 3}), "fixed.text_path", "a path"),
    ("storage not a URL", lambda: doc(storage="results/optuna.db"), "storage", "a URL such as sqlite:///"),
    ("description not text", lambda: doc(description=["a"]), "description", "free text"),
    ("epoch_metrics unknown word", lambda: doc(epoch_metrics="every"), "epoch_metrics", "unknown name 'every'"),
    ("epoch_metrics empty", lambda: doc(epoch_metrics=[]), "epoch_metrics", "'all', one name or a list of names"),
    ("epoch_metrics mapping", lambda: doc(epoch_metrics={"val_loss": 1}), "epoch_metrics", "expected 'all', one"),
    (
        "epoch_metrics misspelt name",
        lambda: doc(epoch_metrics=["val_loss", "skil"]),
        "epoch_metrics[1]",
        "unknown name 'skil', expected one of train_loss, val_loss, skill, symbol_accuracy, accuracy_lift, "
        "distinct_symbols, pred_std_ratio, gate_saturation, hidden_spread, noise_to_grad, grad_norm_input_kernel, "
        "grad_norm_recurrent_kernel, grad_norm_bias, grad_norm_readout; did you mean skill?",
    ),
    ("epoch_metrics all in a list", lambda: doc(epoch_metrics=["all"]), "epoch_metrics[0]", "'all' on its own"),
    ("epoch_metrics number in a list", lambda: doc(epoch_metrics=[3]), "epoch_metrics[0]", "got 3, expected a name"),
    (
        "epoch_metrics mapping in a list",
        lambda: doc(epoch_metrics=["skill", {"val_loss": 1}]),
        "epoch_metrics[1]",
        "expected a name, one of",
    ),
    (
        "epoch_metrics fixed record key",
        lambda: doc(epoch_metrics=["epoch"]),
        "epoch_metrics[0]",
        "unknown name 'epoch'",
    ),
    (
        "epoch_metrics twice",
        lambda: doc(epoch_metrics=["skill", "skill"]),
        "epoch_metrics[1]",
        "got 'skill', expected each name once",
    ),
]


@pytest.mark.parametrize(("mutation", "path", "fragment"), [pytest.param(m, p, f, id=i) for i, m, p, f in BAD])
def test_bad_sweeps_name_the_problem(mutation: Mutation, path: str, fragment: str) -> None:
    with pytest.raises(SweepFileError) as info:
        parse(mutation())
    err = info.value
    assert str(err) == "\n".join(err.problems)
    assert all("\n" not in line and line.startswith(f"{SOURCE}: ") for line in err.problems)
    prefix = f"{SOURCE}: {path}: " if path else f"{SOURCE}: "
    matching = [line for line in err.problems if line.startswith(prefix) and fragment in line]
    assert matching, f"no problem starting {prefix!r} containing {fragment!r} in:\n{err}"


def test_several_problems_are_all_reported() -> None:
    data = {
        "name": "bad name",
        "sampler": "random",
        "replicates": 0,
        "fixed": {"seed": 1},
        "factors": {
            "learning_rat": {"values": [0.1]},
            "momentum": {"values": [1.0]},
            "optimizer": {"low": 0, "high": 1},
            "seq_len": {"values": []},
        },
        "thresholds": {"escape_skill": 2, "plateau_skill": "x"},
    }
    with pytest.raises(SweepFileError) as info:
        parse(data)
    paths = [line.split(": ")[1] for line in info.value.problems]
    assert paths == [
        "name",
        "replicates",
        "trials",
        "fixed.seed",
        "factors.learning_rat",
        "factors.momentum.values[0]",
        "factors.optimizer.low",
        "factors.seq_len.values",
        "thresholds.escape_skill",
        "thresholds.plateau_skill",
    ]


def test_sweep_file_error_is_a_usage_error() -> None:
    with pytest.raises(SweepFileError) as info:
        parse(doc(name=None))
    assert isinstance(info.value, ConfigError)
    assert info.value.source == SOURCE


def test_sweep_file_error_forms_and_pickling() -> None:
    listed = SweepFileError(["a.yaml: x: got 1, expected 2", "a.yaml: y: got 3, expected 4"], "a.yaml")
    single = SweepFileError("name", "x", "a new name", "a.yaml")
    assert str(listed).splitlines() == listed.problems and listed.source == "a.yaml"
    assert single.problems == ["a.yaml: name: got 'x', expected a new name"]
    assert (single.key, single.value, single.allowed) == ("name", "x", "a new name")
    for err in (listed, single, SweepFileError("one line", source="b.yaml")):
        back = pickle.loads(pickle.dumps(err))
        assert (back.problems, back.source, str(back)) == (err.problems, err.source, str(err))


def test_huge_grid_message() -> None:
    with pytest.raises(SweepFileError) as info:
        parse(with_factors(state_size={"low": 1, "high": 1024}, seq_len={"low": 1, "high": 512}))
    assert info.value.problems == [
        f"{SOURCE}: factors: got {6 * 1024 * 512} grid cells, expected at most 100000 cells "
        "(huge grid: use fewer values, or sampler random, qmc or tpe)"
    ]


# --- grid, suggest, configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (BASE, StepParts(seeded_noise=True)),  # noise 0 or 0.01, seed schedule by default
        (doc(factors={"grad_noise": {"values": [0.0]}}), StepParts()),
        (doc(factors={"learning_rate": {"values": [0.1]}}), StepParts(seeded_noise=True)),  # the default noise
        (doc(fixed={"optimizer": "adam"}), StepParts(adam="all", seeded_noise=True)),
        (with_factors(optimizer={"values": ["momentum", "adam"]}), StepParts(adam="some", seeded_noise=True)),
        (
            with_factors(grad_noise_schedule={"values": ["seed", "annealed"]}),
            StepParts(seeded_noise=True, annealed_noise=True),
        ),
        (doc(fixed={"grad_noise_schedule": "annealed"}), StepParts(annealed_noise=True)),
        (  # a range without step, sampled at random: its ends
            {**with_factors(grad_clip={"low": 0.0, "high": 5.0}), "sampler": "random", "trials": 4},
            StepParts(seeded_noise=True, clip=True),
        ),
        (with_factors(grad_noise={"low": 0.0, "high": 0.1, "step": 0.05}), StepParts(seeded_noise=True)),
        (  # fine steps: a million values each, counted by their ends (a product of them would never finish)
            {
                **with_factors(
                    grad_noise={"low": 0.0, "high": 1.0, "step": 1e-6},
                    grad_clip={"low": 0.0, "high": 1.0, "step": 1e-6},
                ),
                "sampler": "random",
                "trials": 4,
            },
            StepParts(seeded_noise=True, clip=True),
        ),
    ],
)
def test_step_parts_cover_every_configuration_the_sweep_may_train(data: Doc, expected: StepParts) -> None:
    spec = parse(data)
    assert spec.step_parts() == expected
    if spec.sampler == "grid" and all(fs.domain is None or fs.domain.is_enumerable for fs in spec.varied()):
        configs = [spec.config_for(cell, 0) for cell in spec.grid_cells()]
        assert StepParts.of(configs) == expected  # exactly what the grid's configurations need


def test_grid_cells_collapse_momentum_for_adam() -> None:
    spec = parse(
        {
            "name": "opt",
            "factors": {"optimizer": {"values": ["momentum", "adam"]}, "momentum": {"values": [0.0, 0.9]}},
        }
    )
    assert spec.grid_cells() == [
        {"optimizer": "momentum", "momentum": 0.0},
        {"optimizer": "momentum", "momentum": 0.9},
        {"optimizer": "adam"},
    ]
    assert spec.cells == spec.n_configs() == 3
    configs = [spec.config_for(cell, 0) for cell in spec.grid_cells()]
    assert [c.momentum for c in configs] == [0.0, 0.9, TrialConfig().momentum]


def test_grid_cells_order_is_deterministic_and_independent_of_file_order() -> None:
    factors = {
        "momentum": {"values": [0.0, 0.5]},
        "seq_len": {"low": 1, "high": 3},
        "optimizer": {"values": ["adam", "momentum"]},
        "learning_rate": {"values": [0.1, 0.01]},
    }
    a = parse({"name": "a", "factors": factors})
    b = parse({"name": "a", "factors": dict(reversed(list(factors.items())))})
    assert a.grid_cells() == a.grid_cells() == b.grid_cells()
    assert [fs.name for fs in a.factors] == ["learning_rate", "optimizer", "momentum", "seq_len"]
    assert a.grid_cells()[0] == {"learning_rate": 0.1, "optimizer": "adam", "seq_len": 1}
    assert len(a.grid_cells()) == a.cells == 2 * (1 + 2) * 3


def test_domain_enumerate_without_float_drift() -> None:
    assert Domain(low=0.0, high=0.3, step=0.1).enumerate() == [0.0, 0.1, 0.2, 0.3]
    assert Domain(low=0.0, high=1.0, step=0.3).enumerate() == [0.0, 0.3, 0.6, 0.9]
    assert Domain(low=0.001, high=0.002, step=0.0005).enumerate() == [0.001, 0.0015, 0.002]
    assert Domain(low=1, high=8, step=3).enumerate() == [1, 4, 7]
    assert Domain(values=("a", "b")).enumerate() == ["a", "b"]
    assert not Domain(low=0.0, high=1.0).is_enumerable
    with pytest.raises(ValueError):
        Domain(low=0.0, high=1.0).enumerate()


@pytest.mark.filterwarnings("error")
def test_to_distribution_follows_the_domain() -> None:
    dist = optuna.distributions
    assert Domain(values=(0.1, 0.2)).to_distribution(FACTORS["learning_rate"]) == dist.CategoricalDistribution(
        [0.1, 0.2]
    )
    assert Domain(low=1e-4, high=1.0, log=True).to_distribution(FACTORS["learning_rate"]) == dist.FloatDistribution(
        1e-4, 1.0, log=True
    )
    stepped = Domain(low=0.0, high=1.0, step=0.3).to_distribution(FACTORS["grad_clip"])
    assert stepped == dist.FloatDistribution(0.0, 0.9, step=0.3)  # high adjusted: no Optuna warning
    assert Domain(low=1, high=8, step=3).to_distribution(FACTORS["seq_len"]) == dist.IntDistribution(1, 7, step=3)
    assert Domain(low=4, high=64, log=True, step=1).to_distribution(FACTORS["state_size"]) == dist.IntDistribution(
        4, 64, log=True
    )


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("sampler", ["random", "qmc", "tpe", "grid"])
def test_suggest_gives_valid_configs_and_no_momentum_for_adam(sampler: str) -> None:
    spec = parse(
        {
            "name": "s",
            "sampler": sampler,
            "trials": 30,
            "replicates": 3,
            "seed": 11,
            "fixed": {"epochs": 2},
            "factors": {
                "momentum": {"low": 0.0, "high": 0.9, "step": 0.1},
                "learning_rate": {"low": 1e-4, "high": 1.0, "log": True, "step": None}
                if sampler != "grid"
                else {"values": [0.01]},
                "optimizer": {"values": ["momentum", "adam"]},
                "seq_len": {"low": 1, "high": 16},
                "stateful": {"values": [True, False]},
                "state_size": {"role": "fixed", "value": 8},
            },
        }
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=spec.sampler_for())
    seen_optimizers = set()
    for _ in range(30):
        trial = study.ask()
        params = spec.suggest(trial)
        assert list(params)[:2] == ["learning_rate", "optimizer"]
        seen_optimizers.add(params["optimizer"])
        assert ("momentum" in params) == (params["optimizer"] == "momentum")
        for r in range(spec.replicates):
            config = spec.config_for(params, r)
            assert isinstance(config, TrialConfig)
            assert config.seed == 11 + r
            assert config.state_size == 8 and config.epochs == 2
            assert config.seq_len == params["seq_len"]
        study.tell(trial, 0.0)
    assert seen_optimizers == {"momentum", "adam"}


def test_suggest_replays_enqueued_grid_cells() -> None:
    spec = parse(
        {
            "name": "g",
            "factors": {
                "optimizer": {"values": ["momentum", "adam"]},
                "momentum": {"values": [0.0, 0.9]},
                "grad_noise": {"low": 0.0, "high": 0.3, "step": 0.1},
            },
        }
    )
    study = optuna.create_study(sampler=spec.sampler_for())
    cells = spec.grid_cells()
    for cell in cells:
        study.enqueue_trial(cell)
    replayed = [spec.suggest(study.ask()) for _ in cells]
    assert replayed == cells


def test_config_for_rejects_a_replicate_out_of_range() -> None:
    spec = parse(doc(replicates=2))
    with pytest.raises(ConfigError, match="replicate"):
        spec.config_for({}, 2)


def test_fixed_role_and_section_reach_the_config() -> None:
    spec = parse(doc(fixed={"task": "delay", "delay": 5}) | {"factors": {"num_layers": {"role": "fixed", "value": 2}}})
    config = spec.config_for({}, 0)
    assert (config.task, config.delay, config.num_layers) == ("delay", 5, 2)
    assert spec.varied() == () and spec.scientific() == () and spec.nuisance() == ()


def test_roles_split_the_factors() -> None:
    spec = parse(with_factors(momentum={"role": "fixed", "value": 0.5}))
    assert [fs.name for fs in spec.scientific()] == ["grad_noise"]
    assert [fs.name for fs in spec.nuisance()] == ["learning_rate"]
    assert [fs.name for fs in spec.varied()] == ["learning_rate", "grad_noise"]
    assert spec.fixed_values() == {"momentum": 0.5}


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    ("sampler", "kind"),
    [("grid", "RandomSampler"), ("random", "RandomSampler"), ("qmc", "QMCSampler"), ("tpe", "TPESampler")],
)
def test_sampler_for(sampler: str, kind: str) -> None:
    spec = parse(doc(sampler=sampler, trials=5))
    assert type(spec.sampler_for()).__name__ == kind


def test_to_dict_is_json_and_masks_passwords() -> None:
    spec = parse(
        with_factors(
            seq_len={"low": 1, "high": 4},
            momentum={"role": "fixed", "value": 0.5},
        )
        | {"storage": "postgresql://u:secret@h/db", "fixed": {"task": "cycle"}}
    )
    d = json.loads(json.dumps(spec.to_dict()))
    assert "secret" not in json.dumps(d)
    assert d["storage"] == "postgresql://u:***@h/db"
    assert d["factors"]["learning_rate"] == {"role": "nuisance", "values": [0.001, 0.01, 0.1]}
    assert d["factors"]["seq_len"] == {"role": "scientific", "low": 1, "high": 4, "log": False, "step": 1}
    assert d["factors"]["momentum"] == {"role": "fixed", "value": 0.5}
    assert d["fixed"] == {"task": "cycle"}
    assert (d["cells"], d["n_configs"], d["n_runs"]) == (24, 24, 24)


# --- files and URLs -----------------------------------------------------------------------------------------


def test_load_sweep_reads_the_example() -> None:
    spec = load_sweep(DATA / "plateau.yaml")
    assert spec.source == str(DATA / "plateau.yaml")
    assert (spec.name, spec.seed, spec.replicates) == ("plateau", 7, 2)
    assert spec.cells == 3 * 3 * (2 + 1)
    assert spec.n_runs() == 54
    lr = next(fs for fs in spec.factors if fs.name == "learning_rate")
    assert lr.domain is not None and lr.domain.values == (0.001, 0.01, 0.1)  # 1e-3 is a float, not a string


def test_load_sweep_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nfactors:\n  learning_rate: {values: [0.1, 0.2}\n")
    with pytest.raises(SweepFileError) as info:
        load_sweep(path)
    assert len(info.value.problems) == 1
    line = info.value.problems[0]
    assert line.startswith(f"{path}: line 3, column ") and "invalid YAML" in line
    assert "\n" not in str(info.value)


def test_load_sweep_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nfactors: {}\nname: b\n")
    with pytest.raises(SweepFileError, match=r"line 3, column 1: invalid YAML: duplicate key 'name'"):
        load_sweep(path)


def test_load_sweep_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SweepFileError) as info:
        load_sweep(missing)
    assert info.value.problems == [f"{missing}: cannot read the sweep file: No such file or directory"]


def test_load_sweep_reports_validation_problems_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("name: typo\nfactors:\n  learning_rat: {values: [0.1]}\n")
    with pytest.raises(SweepFileError) as info:
        load_sweep(path)
    assert info.value.problems[0].startswith(f"{path}: factors.learning_rat: unknown factor")
    assert info.value.problems[0].endswith("did you mean learning_rate?")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql+psycopg2://user:p%40ss@host:5432/optuna",
            "postgresql+psycopg2://user:***@host:5432/optuna",
        ),
        ("sqlite:///results/plateau/optuna.db", "sqlite:///results/plateau/optuna.db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("redis://u:secret@h:notaport/x", "redis://u:***@h:notaport/x"),  # make_url fails: regex fallback
        ("http://u:pw@mlflow:5000/", "http://u:***@mlflow:5000/"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
