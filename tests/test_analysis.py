"""The analysis layer on synthetic sweeps whose truth is known.

`make_study` writes an in-memory Optuna study exactly as the driver's storage contract says (study user
attr `sweep`, per-trial `config_id`, `config`, `replicates` with curves; FAIL trials with `error`), so every
test goes through `load_runs` like a real report does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from lstm_sweep import analysis
from lstm_sweep.config import TrialConfig

Outcome = Callable[[Mapping[str, Any], int], str]
SKILL = {"escaped": 0.9, "partial": 0.2, "plateau": 0.001, "diverged": -math.inf}
EPOCHS = 6


def _distribution(spec: Mapping[str, Any]) -> BaseDistribution:
    if "values" in spec:
        return CategoricalDistribution(list(spec["values"]))
    return FloatDistribution(spec["low"], spec["high"], log=spec.get("log", False))


def _replicate(verdict: str, replicate: int, trial: int) -> dict[str, Any]:
    """One replicate record as the driver writes it, with a curve that escapes at epoch 3 when escaped."""
    jitter = 0.01 * ((trial * 7 + replicate * 3) % 5)
    skill = SKILL[verdict] + (jitter if verdict != "diverged" else 0.0)
    escaped = verdict == "escaped"
    curve_skill = [min(skill, 0.3 * e) if escaped else min(skill, 0.001) for e in range(1, EPOCHS + 1)]
    return {
        "replicate": replicate,
        "seed": 1000 + replicate,
        "verdict": verdict,
        "skill": skill,
        "symbol_accuracy": 1.0 if escaped else 1 / 12,
        "accuracy_lift": 1.0 if escaped else 0.0,
        "val_loss": (1 - skill) * 11.9167 if math.isfinite(skill) else math.inf,
        "baseline_loss": 11.9167,
        "distinct_symbols": 12 if escaped else 1,
        "pred_std_ratio": 0.95 if escaped else 0.01,
        "escape_epoch": 3 if escaped else None,
        "diverged_step": 17 if verdict == "diverged" else None,
        "mlflow_run_id": f"run-{trial}-{replicate}",
        "curve": {
            "train_loss": [12.0 / e for e in range(1, EPOCHS + 1)],
            "val_loss": [11.9 * (1 - s) for s in curve_skill],
            "skill": curve_skill,
        },
    }


def make_study(
    factors: Mapping[str, Mapping[str, Any]],
    outcome: Outcome,
    *,
    replicates: int = 4,
    cells: Sequence[Mapping[str, Any]] | None = None,
    fixed: Mapping[str, Any] | None = None,
    failed: int = 0,
    name: str = "synthetic",
) -> optuna.Study:
    """An in-memory study following the storage contract: one trial per grid cell (or per given cell)."""
    study = optuna.create_study(study_name=name, direction="maximize")
    fixed = dict(fixed or {"state_size": 16, "epochs": EPOCHS})
    study.set_user_attr(
        "sweep",
        {
            "name": name,
            "description": "synthetic truth",
            "sampler": "grid",
            "replicates": replicates,
            "seed": 0,
            "fixed": fixed,
            "factors": {k: dict(v) for k, v in factors.items()},
            "thresholds": {"escape_skill": 0.5},
        },
    )
    if cells is None:
        names = list(factors)
        cells = [
            dict(zip(names, combo, strict=True)) for combo in itertools.product(*(factors[n]["values"] for n in names))
        ]
    for number, params in enumerate(cells):
        config = TrialConfig().replace(**fixed, **params).as_dict() | {"seed": None}
        reps = [_replicate(outcome(params, r), r, number) for r in range(replicates)]
        skills = [max(-1.0, r["skill"]) if math.isfinite(r["skill"]) else -1.0 for r in reps]
        study.add_trial(
            optuna.trial.create_trial(
                params=dict(params),
                distributions={k: _distribution(factors[k]) for k in params},
                value=float(np.mean(skills)),
                user_attrs={"config_id": f"c{number:03d}", "config": config, "replicates": reps},
            )
        )
    for i in range(failed):
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.FAIL,
                params=dict(cells[0]),
                distributions={k: _distribution(factors[k]) for k in cells[0]},
                user_attrs={"error": f"TrialFailed: synthetic failure {i}"},
            )
        )
    return study


# Factor A (output_framing) decides escape; factor B (grad_noise_schedule) does not matter; learning_rate is a
# nuisance factor that does not matter either.
MAIN_FACTORS = {
    "output_framing": {"role": "scientific", "values": ["regression", "classification"]},
    "grad_noise_schedule": {"role": "scientific", "values": ["seed", "annealed"]},
    "learning_rate": {"role": "nuisance", "values": [0.001, 0.01]},
}
# C (seq_len) x D (stateful) escape only together; B does not matter.
INTERACTION_FACTORS = {
    "seq_len": {"role": "scientific", "values": [1, 8]},
    "stateful": {"role": "scientific", "values": [False, True]},
    "grad_noise_schedule": {"role": "scientific", "values": ["seed", "annealed"]},
}


def a_decides(params: Mapping[str, Any], replicate: int) -> str:
    return "escaped" if params["output_framing"] == "classification" else "plateau"


def c_and_d(params: Mapping[str, Any], replicate: int) -> str:
    return "escaped" if params["seq_len"] == 8 and params["stateful"] else "plateau"


@pytest.fixture(scope="module")
def main_study() -> optuna.Study:
    return make_study(MAIN_FACTORS, a_decides, failed=1, name="main")


@pytest.fixture(scope="module")
def main_runs(main_study: optuna.Study) -> pd.DataFrame:
    return analysis.load_runs(main_study)


@pytest.fixture(scope="module")
def interaction_runs() -> pd.DataFrame:
    return analysis.load_runs(make_study(INTERACTION_FACTORS, c_and_d, replicates=3, name="inter"))


# ---------------------------------------------------------------------------------------------------------
# load_runs


def test_load_runs_is_one_tidy_row_per_replicate(main_runs: pd.DataFrame) -> None:
    assert len(main_runs) == 8 * 4
    for col in ("trial_number", "config_id", "replicate", "seed", "verdict", "escaped", "skill", "curve"):
        assert col in main_runs.columns
    for factor in ("learning_rate", "momentum", "output_framing", "state_size", "seq_len", "stateful"):
        assert factor in main_runs.columns  # every factor of DESIGN's table, from the config dict
    assert main_runs["escaped"].dtype == bool
    assert set(main_runs["verdict"]) == {"escaped", "plateau"}
    assert main_runs.attrs["roles"]["output_framing"] == "scientific"
    assert main_runs.attrs["roles"]["learning_rate"] == "nuisance"
    assert main_runs.attrs["roles"]["state_size"] == "fixed"
    assert main_runs.attrs["sweep"]["name"] == "main"
    assert analysis.varied_factors(main_runs) == ["learning_rate", "grad_noise_schedule", "output_framing"]


def test_failed_trials_are_counted_not_run(main_study: optuna.Study, main_runs: pd.DataFrame) -> None:
    failed = analysis.load_failed(main_study)
    assert len(failed) == 1 and "synthetic failure" in failed.loc[0, "error"]
    assert main_runs["trial_number"].nunique() == 8
    assert len(main_runs.attrs["failed"]) == 1


def test_momentum_is_na_under_adam() -> None:
    factors = {
        "optimizer": {"role": "scientific", "values": ["momentum", "adam"]},
        "learning_rate": {"role": "nuisance", "values": [0.001, 0.01]},
    }
    runs = analysis.load_runs(make_study(factors, lambda p, r: "plateau", replicates=1))
    adam = runs[runs["optimizer"] == "adam"]
    assert adam["momentum"].isna().all()
    table = analysis.factor_table(runs, ["momentum"])
    assert list(table["value"]) == ["0.9", "n/a"]


def test_load_runs_by_name_and_storage(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    src = make_study(MAIN_FACTORS, a_decides, replicates=1, name="stored")
    stored = optuna.create_study(study_name="stored", storage=url, direction="maximize")
    stored.set_user_attr("sweep", src.user_attrs["sweep"])
    for t in src.get_trials():
        stored.add_trial(t)
    runs = analysis.load_runs("stored", storage=url)
    assert len(runs) == 8 and runs["curve"].iloc[0]["skill"]
    with pytest.raises(FileNotFoundError):
        analysis.load_runs("stored", storage=f"sqlite:///{tmp_path / 'missing.db'}")


def test_load_curves_unrolls_epochs(main_runs: pd.DataFrame) -> None:
    curves = analysis.load_curves(main_runs)
    assert len(curves) == len(main_runs) * EPOCHS
    assert curves["epoch"].max() == EPOCHS


# ---------------------------------------------------------------------------------------------------------
# Wilson intervals


def test_wilson_interval_edges_and_known_value() -> None:
    assert analysis.wilson_interval(0, 10)[0] == 0.0
    assert analysis.wilson_interval(10, 10)[1] == 1.0
    assert analysis.wilson_interval(0, 0) == (0.0, 1.0)
    low, high = analysis.wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert 0.0 < analysis.wilson_interval(0, 10)[1] < 0.35
    with pytest.raises(ValueError):
        analysis.wilson_interval(3, 2)


# ---------------------------------------------------------------------------------------------------------
# Factor table


def test_factor_table_separates_deciding_factor(main_runs: pd.DataFrame) -> None:
    table = analysis.factor_table(main_runs).set_index(["factor", "value"])
    reg, cls = table.loc[("output_framing", "regression")], table.loc[("output_framing", "classification")]
    assert reg["escape_rate"] == 0.0 and cls["escape_rate"] == 1.0
    assert reg["ci_high"] < cls["ci_low"]  # non-overlapping intervals
    assert reg["plateau_rate"] == 1.0 and cls["median_escape_epoch"] == 3
    seed, annealed = (
        table.loc[("grad_noise_schedule", "seed")],
        table.loc[("grad_noise_schedule", "annealed")],
    )
    assert seed["escape_rate"] == annealed["escape_rate"] == 0.5
    assert seed["ci_low"] < annealed["ci_high"] and annealed["ci_low"] < seed["ci_high"]
    assert table["runs"].groupby(level="factor").sum().eq(32).all()


def test_factor_table_bins_continuous_factors() -> None:
    lrs = [10 ** (-4 + 3 * i / 19) for i in range(20)]
    factors = {"learning_rate": {"role": "nuisance", "low": 1e-4, "high": 0.1, "log": True}}
    cells = [{"learning_rate": lr} for lr in lrs]
    runs = analysis.load_runs(make_study(factors, lambda p, r: "plateau", replicates=1, cells=cells))
    table = analysis.factor_table(runs)
    assert len(table) == analysis.N_BINS and table["runs"].sum() == 20


def test_factor_effects_name_the_decider(main_runs: pd.DataFrame) -> None:
    effects = {e.factor: e for e in analysis.factor_effects(analysis.factor_table(main_runs))}
    assert effects["output_framing"].effect == "escapes"
    assert effects["output_framing"].levels == ("classification",)
    assert effects["grad_noise_schedule"].effect == "no detectable effect"


def test_balanced_design_takes_separated_intervals_as_they_are() -> None:
    grid = pd.DataFrame([{"a": a, "b": b, "escaped": a == "x"} for a in ("x", "y") for b in (1, 2) for _ in range(20)])
    grid.attrs["roles"] = {"a": "scientific", "b": "scientific"}
    assert analysis.is_balanced(grid, ["a", "b"])
    assert not analysis.is_balanced(grid.iloc[1:], ["a", "b"])
    assert not analysis.is_balanced(grid[~((grid["a"] == "y") & (grid["b"] == 2))], ["a", "b"])
    table = pd.DataFrame(
        [
            {"factor": "a", "value": "x", "runs": 40, "escape_rate": 0.6, "ci_low": 0.5, "ci_high": 0.7},
            {"factor": "a", "value": "y", "runs": 40, "escape_rate": 0.3, "ci_low": 0.2, "ci_high": 0.4},
        ]
    )
    weak = pd.DataFrame({"factor": ["a"], "fanova_escape": [0.01], "fanova_skill": [0.01]})
    assert analysis.factor_effects(table, weak)[0].effect == "unclear"
    balanced = analysis.factor_effects(table, weak, balanced=True)[0]
    assert balanced.effect == "escapes" and balanced.levels == ("x",)


# ---------------------------------------------------------------------------------------------------------
# Interactions


def test_interaction_ranking_puts_the_pair_first(interaction_runs: pd.DataFrame) -> None:
    table = analysis.interaction_table(interaction_runs)
    first = table.iloc[0]
    assert {first["factor_a"], first["factor_b"]} == {"seq_len", "stateful"}
    assert first["interaction"] == pytest.approx(0.0625)
    assert first["cell_interaction"] == pytest.approx(0.0625) and first["p_value"] < 0.001
    assert (table["interaction"].iloc[1:] == 0.0).all()
    assert "+100%" in first["example"] and "+0%" in first["example"]


def test_interaction_is_adjusted_for_an_unevenly_spread_third_factor() -> None:
    """A alone decides, but is spread unevenly over the C x D cells: the raw cell table shows a spurious
    interaction, the adjusted score (all main effects in the model) does not."""
    factors = {
        "output_framing": {"role": "scientific", "values": ["regression", "classification"]},
        "seq_len": {"role": "scientific", "values": [1, 8]},
        "stateful": {"role": "scientific", "values": [False, True]},
    }
    good, bad = "classification", "regression"
    layout = [
        (good, 1, False), (good, 1, False), (bad, 1, False),
        (bad, 1, True), (bad, 1, True), (good, 1, True),
        (bad, 8, False), (bad, 8, False), (good, 8, False),
        (good, 8, True), (good, 8, True), (bad, 8, True),
    ]  # fmt: skip
    cells = [{"output_framing": a, "seq_len": c, "stateful": d} for a, c, d in layout]
    runs = analysis.load_runs(make_study(factors, a_decides, replicates=2, cells=cells))
    row = analysis.interaction_table(runs).set_index(["factor_a", "factor_b"]).loc[("seq_len", "stateful")]
    assert row["cell_interaction"] == pytest.approx(1 / 36)
    assert row["interaction"] == 0.0 and row["p_value"] == 1.0


def test_pair_tables_cells(interaction_runs: pd.DataFrame) -> None:
    pair = analysis.pair_tables(interaction_runs, "seq_len", "stateful")
    assert pair.rate.loc["8", "true"] == 1.0
    assert pair.rate.loc["1", "true"] == 0.0
    assert int(pair.count.to_numpy().sum()) == len(interaction_runs)


def test_main_effects_only_has_no_interaction(main_runs: pd.DataFrame) -> None:
    table = analysis.interaction_table(main_runs)
    assert (table["interaction"] == 0.0).all() and (table["p_value"] == 1.0).all()


# ---------------------------------------------------------------------------------------------------------
# Importances


def test_importances_rank_a_above_b(main_study: optuna.Study, main_runs: pd.DataFrame) -> None:
    imp = analysis.importances(main_study, runs=main_runs).set_index("factor")
    for col in ("fanova_skill", "ped_anova_skill", "fanova_escape"):
        assert imp.loc["output_framing", col] > imp.loc["grad_noise_schedule", col], col
    assert imp.loc["output_framing", "fanova_escape"] > 0.9
    assert imp.attrs["main_effects_r2"] == pytest.approx(1.0)
    assert imp.attrs["left_to_interactions"] == pytest.approx(0.0, abs=1e-9)
    assert "FanovaImportanceEvaluator" in imp.attrs["evaluators"]["fanova_skill"]
    assert "PedAnovaImportanceEvaluator" in imp.attrs["evaluators"]["ped_anova_skill"]


def test_importances_from_runs_table_and_interaction_share(interaction_runs: pd.DataFrame) -> None:
    imp = analysis.importances(interaction_runs).set_index("factor")
    assert imp.loc["seq_len", "fanova_escape"] > imp.loc["grad_noise_schedule", "fanova_escape"]
    assert imp.attrs["main_effects_r2"] == pytest.approx(2 / 3)
    assert imp.attrs["pairwise_r2"] == pytest.approx(1.0)
    assert imp.attrs["interaction_share"] == pytest.approx(1 / 3)


def test_importances_degenerate_cases_give_nan_with_reason() -> None:
    one = analysis.load_runs(make_study(MAIN_FACTORS, a_decides, cells=[MAIN_FACTORS_CELL], replicates=2))
    imp = analysis.importances(one)
    assert imp[["fanova_skill", "ped_anova_skill", "fanova_escape"]].isna().all().all()
    assert imp["reason"].str.contains("at least 2").all()

    flat = analysis.load_runs(make_study(MAIN_FACTORS, lambda p, r: "plateau", replicates=1))
    imp = analysis.importances(flat)
    assert imp["fanova_escape"].isna().all() and imp["reason"].str.contains("same in every").all()
    assert math.isnan(imp.attrs["main_effects_r2"])

    cells = [{"output_framing": "regression", "learning_rate": lr} for lr in (0.001, 0.01)]
    factors = {k: MAIN_FACTORS[k] for k in ("output_framing", "learning_rate")}
    single = analysis.load_runs(make_study(factors, lambda p, r: "escaped" if r else "plateau", cells=cells))
    imp = analysis.importances(single).set_index("factor")
    assert math.isnan(imp.loc["output_framing", "fanova_skill"])
    assert "one level" in imp.loc["output_framing", "reason"]


MAIN_FACTORS_CELL = {"output_framing": "regression", "grad_noise_schedule": "seed", "learning_rate": 0.001}


# ---------------------------------------------------------------------------------------------------------
# Playbook checks


def _crafted() -> pd.DataFrame:
    """classification is best at the top of the learning-rate range; one config splits its seeds."""
    factors = {
        "output_framing": {"role": "scientific", "values": ["regression", "classification"]},
        "learning_rate": {"role": "nuisance", "low": 1e-4, "high": 0.1, "log": True},
    }
    cells = [
        {"output_framing": f, "learning_rate": lr} for f in ("regression", "classification") for lr in (1e-4, 1e-3, 0.1)
    ]

    def outcome(p: Mapping[str, Any], r: int) -> str:
        if p["output_framing"] == "classification" and p["learning_rate"] == 0.1:
            return "escaped"
        if p["output_framing"] == "regression" and p["learning_rate"] == 1e-3:
            return "escaped" if r == 0 else "plateau"  # seeds disagree
        if p["learning_rate"] == 0.1:
            return "diverged"
        return "plateau"

    return analysis.load_runs(make_study(factors, outcome, replicates=2, cells=cells))


def test_isolation_picks_best_nuisance_per_scientific_value() -> None:
    iso = analysis.isolation(_crafted()).set_index("value")
    assert iso.loc["classification", "learning_rate"] == pytest.approx(0.1)
    assert iso.loc["classification", "best_escape_rate"] == 1.0
    assert iso.loc["regression", "learning_rate"] == pytest.approx(1e-3)
    assert iso.loc["regression", "configs"] == 3


def test_boundary_flags_best_at_domain_edge() -> None:
    flags = analysis.boundary_flags(_crafted())
    lr = flags[flags["factor"] == "learning_rate"]
    assert len(lr) == 1
    row = lr.iloc[0]
    assert row["edge"] == "max" and row["value"] == pytest.approx(0.1) and row["domain"] == "sweep range"
    assert "best overall" in row["why"] and "classification" in row["why"]


def test_divergence_rate_and_disagreement() -> None:
    runs = _crafted()
    assert analysis.divergence_rate(runs) == pytest.approx(2 / 12)
    split = analysis.replicate_disagreement(runs)
    assert len(split) == 1
    assert split.loc[0, "output_framing"] == "regression" and split.loc[0, "escaped"] == 1
    assert math.isnan(analysis.divergence_rate(runs.iloc[0:0]))


def test_nearest_runs_exact_and_nearest(main_runs: pd.DataFrame) -> None:
    seed = analysis.seed_configuration()
    matched, diff = analysis.nearest_runs(main_runs, seed)
    assert diff == {} and set(matched["verdict"]) == {"plateau"} and len(matched) == 4
    matched, diff = analysis.nearest_runs(main_runs, {**seed, "learning_rate": 0.002})
    assert set(diff) == {"learning_rate"} and (matched["learning_rate"] == 0.001).all()


def test_summarize_headline(main_runs: pd.DataFrame) -> None:
    s = analysis.summarize(main_runs)
    assert s["runs"] == 32 and s["configs"] == 8 and s["failed_trials"] == 1
    assert s["escape_rate"] == 0.5 and s["top_factor"] == "output_framing"
    assert s["top_factor_best_level"] == "classification"
    assert s["best_config"]["output_framing"] == "classification"


def test_empty_study_does_not_crash() -> None:
    study = optuna.create_study(direction="maximize")
    runs = analysis.load_runs(study)
    assert runs.empty
    assert analysis.factor_table(runs).empty
    assert analysis.interaction_table(runs).empty
    assert analysis.summarize(runs)["runs"] == 0
