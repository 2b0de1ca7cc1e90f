"""From a finished sweep to the user's answer: which factors (and combinations) escape the mean plateau.

Everything starts from one tidy table, `load_runs`: one row per trial replicate, one column per factor, the
verdict and the final measures. The rest are small pure functions over that table (pandas
groupby/pivot_table), plus Optuna's own importance evaluators over the study. Nothing here imports TensorFlow
or MLflow, so a notebook can `load_runs(...)` and explore without the training stack.

Unit of evidence: a *run* is one replicate (seed) of one configuration. Escape rates and their Wilson
intervals count runs, treating replicates as independent draws; replicates of one configuration share every
factor value, so the intervals are optimistic when configurations differ a lot from each other (say so when
reading them).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from lstm_sweep.config import FACTORS, SEED_CONFIG
from lstm_sweep.locks import engine_url, sqlite_path
from lstm_sweep.metrics import SKILL_FLOOR
from lstm_sweep.spec import default_storage

VARIED_ROLES = ("scientific", "nuisance")
NA_LEVEL = "n/a"  # the level of a factor that does not apply (momentum under adam)
MAX_LEVELS = 8  # a numeric factor with more distinct values than this is binned into quantiles
N_BINS = 4
FANOVA_SEED = 0
FANOVA_TREES = 64

MEASURE_COLUMNS = (
    "skill",
    "symbol_accuracy",
    "accuracy_lift",
    "val_loss",
    "baseline_loss",
    "distinct_symbols",
    "pred_std_ratio",
    "escape_epoch",
    "diverged_step",
)
_INT_COLUMNS = ("replicate", "seed", "distinct_symbols", "escape_epoch", "diverged_step")


# ----------------------------------------------------------------------------------------------------
# Loading


def open_study(study_or_name: optuna.Study | str, storage: str | None = None) -> optuna.Study:
    """The study itself, or load it by name: the one way every reader (notebooks, `lstm-sweep report`) opens a
    stored study. Without a storage URL the DESIGN default path is used; a missing SQLite file is an error
    rather than a silently created empty database; the URL goes through `locks.engine_url`, so a plain
    `postgresql://` works with the installed driver. A study that is not there raises Optuna's KeyError."""
    if isinstance(study_or_name, optuna.Study):
        return study_or_name
    if storage is None:
        storage = default_storage(study_or_name)
        path = sqlite_path(storage)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"no Optuna storage for sweep {study_or_name!r} at {path}; pass storage=URL")
    else:
        db = sqlite_path(storage)
        if db is not None and not db.exists():
            raise FileNotFoundError(f"no Optuna storage at {db}")
    return optuna.load_study(study_name=study_or_name, storage=engine_url(storage))


def _factor_names(sweep: Mapping[str, Any]) -> list[str]:
    """DESIGN's factor table first (stable column order), then any extra factor the sweep file names."""
    extra = [f for f in (sweep.get("factors") or {}) if f not in FACTORS]
    return [*FACTORS, *extra]


def _roles(sweep: Mapping[str, Any], factor_names: Sequence[str]) -> dict[str, str]:
    """Role per factor column: as declared; settings listed under `fixed`, and every factor the sweep does not
    mention (held at its default), are `fixed`. Empty when the study carries no sweep spec."""
    if not sweep:
        return {}
    declared = {name: str(spec.get("role", "fixed")) for name, spec in (sweep.get("factors") or {}).items()}
    return {name: declared.get(name, "fixed") for name in factor_names}


def _factor_value(name: str, trial: FrozenTrial, config: Mapping[str, Any]) -> Any:
    if name == "momentum" and (trial.params.get("optimizer", config.get("optimizer")) == "adam"):
        return None  # adam ignores momentum: a level of its own ("n/a"), not a spurious 0.9
    if name in trial.params:
        return trial.params[name]
    return config.get(name)


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _trial_rows(trial: FrozenTrial, factor_names: Sequence[str]) -> list[dict[str, Any]]:
    config = trial.user_attrs.get("config") or {}
    base: dict[str, Any] = {
        "trial_number": trial.number,
        "config_id": str(trial.user_attrs.get("config_id", trial.number)),
    }
    base.update({name: _factor_value(name, trial, config) for name in factor_names})
    base["task"] = config.get("task")
    rows = []
    for rep in trial.user_attrs.get("replicates") or []:
        verdict = str(rep.get("verdict", "unknown"))
        row = dict(base)
        row.update(
            replicate=rep.get("replicate"),
            seed=rep.get("seed"),
            verdict=verdict,
            escaped=verdict == "escaped",
            **{m: _num(rep.get(m)) for m in MEASURE_COLUMNS},
            mlflow_run_id=rep.get("mlflow_run_id"),
            curve=rep.get("curve") or {},
        )
        rows.append(row)
    return rows


def run_columns(factor_names: Sequence[str]) -> list[str]:
    """Column order of the runs table."""
    return [
        "trial_number",
        "config_id",
        "replicate",
        "seed",
        *factor_names,
        "task",
        "verdict",
        "escaped",
        *MEASURE_COLUMNS,
        "mlflow_run_id",
        "curve",
    ]


def load_runs(study_or_name: optuna.Study | str, storage: str | None = None) -> pd.DataFrame:
    """One tidy row per replicate of every COMPLETE trial: the public entry point for reports and notebooks.

    Factor columns come from the trial's `config` user attr (sampled params win), named as in DESIGN's factor
    table; momentum is missing (NaN) where the optimizer is adam. The per-epoch `curve` dict is kept in a
    column so plots need no second trip to the store (`load_curves` unrolls it). `df.attrs` carries `roles`
    ({factor: role}), `sweep` (the spec dict), `study_name` and `failed` (records of FAIL trials)."""
    study = open_study(study_or_name, storage)
    sweep = dict(study.user_attrs.get("sweep") or {})
    names = _factor_names(sweep)
    rows: list[dict[str, Any]] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rows.extend(_trial_rows(trial, names))
    runs = pd.DataFrame(rows, columns=run_columns(names))
    for col in _INT_COLUMNS:
        runs[col] = pd.to_numeric(runs[col], errors="coerce").astype("Int64")
    runs["escaped"] = runs["escaped"].astype(bool)
    for col in MEASURE_COLUMNS:
        if col not in _INT_COLUMNS:
            runs[col] = runs[col].astype(float)
    runs = runs.sort_values(["trial_number", "replicate"], kind="stable").reset_index(drop=True)
    runs.attrs["roles"] = _roles(sweep, names)
    runs.attrs["sweep"] = sweep
    runs.attrs["study_name"] = study.study_name
    runs.attrs["failed"] = load_failed(study).to_dict("records")
    return runs


def load_failed(study_or_name: optuna.Study | str, storage: str | None = None) -> pd.DataFrame:
    """FAIL trials with their recorded error: counted as failures, never as runs. A FAIL without an error is
    an interrupted trial the driver re-enqueues; `retried` says whether a retry exists."""
    study = open_study(study_or_name, storage)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    rows = [
        {
            "trial_number": t.number,
            "config_id": t.user_attrs.get("config_id"),
            "error": str(t.user_attrs.get("error", "no error recorded (interrupted)")),
            "params": dict(t.params),
            "retried": t.number in retried,
        }
        for t in trials
        if t.state == TrialState.FAIL
    ]
    return pd.DataFrame(rows, columns=["trial_number", "config_id", "error", "params", "retried"])


def load_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """The per-epoch curves of every run, long format (one row per run and epoch)."""
    rows = []
    for rec in runs[["trial_number", "config_id", "replicate", "verdict", "curve"]].itertuples(index=False):
        curve = rec.curve if isinstance(rec.curve, Mapping) else {}
        n = max((len(v or []) for v in curve.values()), default=0)
        for epoch in range(n):
            row = {
                "trial_number": rec.trial_number,
                "config_id": rec.config_id,
                "replicate": rec.replicate,
                "verdict": rec.verdict,
                "epoch": epoch + 1,
            }
            for key in ("train_loss", "val_loss", "skill"):
                values = curve.get(key) or []
                row[key] = _num(values[epoch]) if epoch < len(values) else math.nan
            rows.append(row)
    columns = [
        "trial_number",
        "config_id",
        "replicate",
        "verdict",
        "epoch",
        "train_loss",
        "val_loss",
        "skill",
    ]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------------------
# Factors and their levels


def roles(runs: pd.DataFrame) -> dict[str, str]:
    return dict(runs.attrs.get("roles") or {})


def factor_columns(runs: pd.DataFrame) -> list[str]:
    """Every factor column present (DESIGN's names plus the sweep's extras)."""
    extra = [f for f in roles(runs) if f not in FACTORS]
    return [c for c in [*FACTORS, *extra] if c in runs.columns]


def varied_factors(runs: pd.DataFrame) -> list[str]:
    """Factors the sweep varies (roles scientific/nuisance). Without roles (e.g. a runs table read back from
    CSV) fall back to the factor columns that take more than one value."""
    r = roles(runs)
    if r:
        return [f for f in factor_columns(runs) if r.get(f) in VARIED_ROLES]
    return [f for f in factor_columns(runs) if runs[f].nunique(dropna=False) > 1]


def factors_with_role(runs: pd.DataFrame, role: str) -> list[str]:
    r = roles(runs)
    return [f for f in factor_columns(runs) if r.get(f) == role]


def format_level(value: Any) -> str:
    """One display label per level: missing is 'n/a', numbers in %g, bools lower case (as YAML writes
    them)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return NA_LEVEL
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):g}"
    return str(value)


def _sort_key(value: Any) -> tuple[int, float, str]:
    if isinstance(value, bool | np.bool_):
        return (1, float(value), "")
    if isinstance(value, int | float | np.integer | np.floating):
        return (0, float(value), "")
    return (2, 0.0, str(value))


def _is_numeric(values: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values))


def _log_scale(values: pd.Series) -> bool:
    return bool(len(values) and (values > 0).all() and values.max() / values.min() >= 100)


def factor_levels(values: pd.Series, max_levels: int = MAX_LEVELS) -> pd.Series:
    """The factor as an ordered categorical of display labels. A numeric factor sampled continuously (more
    than `max_levels` distinct values, e.g. a log-uniform learning rate) is cut into quantile bins (on log10
    when it spans two decades or more): one row per sampled value would make every 'level' a single run."""
    present = values.dropna()
    if _is_numeric(present) and present.nunique() > max_levels:
        log = _log_scale(present)
        x = np.log10(present.astype(float)) if log else present.astype(float)
        bins = pd.qcut(x, q=N_BINS, duplicates="drop")

        def edge(v: float) -> str:
            return f"{10**v if log else v:.3g}"

        labels = {iv: f"[{edge(iv.left)}, {edge(iv.right)}]" for iv in bins.cat.categories}
        out = pd.Series(NA_LEVEL, index=values.index, dtype=object)
        out.loc[present.index] = [labels[iv] for iv in bins]
        order = [labels[iv] for iv in bins.cat.categories]
    else:
        out = values.map(format_level).astype(object)
        uniques = sorted(set(present.tolist()), key=_sort_key)
        order = list(dict.fromkeys(format_level(v) for v in uniques))
    if (out == NA_LEVEL).any():
        order.append(NA_LEVEL)
    return pd.Series(pd.Categorical(out, categories=order, ordered=True), index=values.index, name=values.name)


# ----------------------------------------------------------------------------------------------------
# Rates with honest intervals


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials: unlike the normal approximation it stays inside
    [0, 1] and is not zero-width at 0/n or n/n, which is exactly where escape rates tend to sit. Exact 0 and 1
    at the edges; (0, 1) when there is no data."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return (low, high)


def _with_flags(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.assign(
        _plateau=runs["verdict"] == "plateau",
        _diverged=runs["verdict"] == "diverged",
        _escaped=runs["escaped"].astype(bool),
    )


FACTOR_TABLE_COLUMNS = [
    "factor",
    "role",
    "value",
    "runs",
    "configs",
    "escaped",
    "escape_rate",
    "ci_low",
    "ci_high",
    "plateau_rate",
    "diverged_rate",
    "median_skill",
    "median_accuracy",
    "median_escape_epoch",
]


def factor_table(
    runs: pd.DataFrame, factors: Sequence[str] | None = None, max_levels: int = MAX_LEVELS
) -> pd.DataFrame:
    """Per factor and level: how often runs escaped, with a 95% Wilson interval, and how the rest ended.
    A level whose interval lies above the other levels' is a factor value that escapes the plateau."""
    factors = list(varied_factors(runs) if factors is None else factors)
    frames = []
    flagged = _with_flags(runs)
    r = roles(runs)
    for f in factors:
        level = factor_levels(runs[f], max_levels)
        grouped = flagged.assign(_level=level).groupby("_level", observed=True, sort=True)
        t = grouped.agg(
            runs=("_escaped", "size"),
            configs=("config_id", "nunique"),
            escaped=("_escaped", "sum"),
            plateau_rate=("_plateau", "mean"),
            diverged_rate=("_diverged", "mean"),
            median_skill=("skill", "median"),
            median_accuracy=("symbol_accuracy", "median"),
            median_escape_epoch=("escape_epoch", lambda s: s.astype(float).median()),
        ).reset_index(names="value")
        t["escape_rate"] = t["escaped"] / t["runs"]
        ci = [wilson_interval(int(k), int(n)) for k, n in zip(t["escaped"], t["runs"], strict=True)]
        t["ci_low"] = [c[0] for c in ci]
        t["ci_high"] = [c[1] for c in ci]
        t["value"] = t["value"].astype(str)
        t.insert(0, "factor", f)
        t.insert(1, "role", r.get(f, "varied"))
        frames.append(t)
    if not frames:
        return pd.DataFrame(columns=FACTOR_TABLE_COLUMNS)
    table = pd.concat(frames, ignore_index=True)[FACTOR_TABLE_COLUMNS]
    return table.astype({"runs": int, "configs": int, "escaped": int})


# ----------------------------------------------------------------------------------------------------
# Interactions


@dataclass(frozen=True)
class PairTable:
    """Escape rate and run count per cell of factor a (rows) x factor b (columns)."""

    a: str
    b: str
    rate: pd.DataFrame
    count: pd.DataFrame


def pair_tables(runs: pd.DataFrame, a: str, b: str, max_levels: int = MAX_LEVELS) -> PairTable:
    """Cell tables of one factor pair (pivot_table over the level labels); unobserved cells are NaN / 0."""
    frame = pd.DataFrame(
        {
            a: factor_levels(runs[a], max_levels),
            b: factor_levels(runs[b], max_levels),
            "escaped": runs["escaped"].astype(float),
        }
    )
    kw: dict[str, Any] = {"index": a, "columns": b, "values": "escaped", "observed": False}
    rate = pd.pivot_table(frame, aggfunc="mean", dropna=False, **kw)
    count = pd.pivot_table(frame, aggfunc="count", fill_value=0, dropna=False, **kw)
    return PairTable(a, b, rate, count.reindex_like(rate).fillna(0).astype(int))


def _additive_residuals(rate: pd.DataFrame) -> tuple[np.ndarray, int] | None:
    """Residuals of cell rates from a row + column (main effects) least-squares fit on the observed cells.
    On a complete grid this is cell - row_mean - col_mean + grand_mean; with missing cells it is the same
    model fitted to what is there. None when the observed cells cannot identify an interaction."""
    cells = [
        (i, j, float(rate.iat[i, j]))
        for i in range(rate.shape[0])
        for j in range(rate.shape[1])
        if not math.isnan(rate.iat[i, j])
    ]
    if not cells:
        return None
    x = np.zeros((len(cells), 1 + rate.shape[0] - 1 + rate.shape[1] - 1))
    y = np.array([c[2] for c in cells])
    for row, (i, j, _) in enumerate(cells):
        x[row, 0] = 1.0
        if i > 0:
            x[row, i] = 1.0
        if j > 0:
            x[row, rate.shape[0] - 1 + j] = 1.0
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    rank = int(np.linalg.matrix_rank(x))
    if len(cells) <= rank:
        return None
    return y - x @ coef, len(cells)


def _flip_example(rate: pd.DataFrame, a: str, b: str) -> str:
    """Name where the effect of a changes most across the levels of b: the pair of a-levels and b-levels whose
    difference-of-differences is largest."""
    best: tuple[float, str] | None = None
    for r1, r2 in itertools.combinations(rate.index, 2):
        d = (rate.loc[r2] - rate.loc[r1]).dropna()
        if len(d) < 2:
            continue
        hi, lo = d.idxmax(), d.idxmin()
        spread = float(d[hi] - d[lo])
        if best is None or spread > best[0]:
            text = (
                f"{a} {r1}→{r2} changes the escape rate by {d[hi]:+.0%} when {b}={hi} but by {d[lo]:+.0%} when {b}={lo}"
            )
            best = (spread, text)
    return best[1] if best else ""


def interaction_score(table: PairTable) -> tuple[float, int, str]:
    """Interaction strength of a pair: mean squared residual of the cell escape rates from the additive (main
    effects) fit, i.e. the part of the cell-to-cell variation no single factor explains (two-way ANOVA
    residual on the cell table, unweighted). 0.0625 is a pure 2x2 'only together' pattern; 0 means purely
    additive. Returns (score, observed cells, example text); NaN with the reason as text when it cannot be
    computed."""
    rate = table.rate
    cells = int(rate.notna().sum().sum())
    if rate.shape[0] < 2 or rate.shape[1] < 2:
        return (math.nan, cells, "a factor has only one level")
    fit = _additive_residuals(rate)
    if fit is None:
        return (math.nan, cells, "too few observed cells to separate interaction from main effects")
    resid, n = fit
    score = float(np.mean(resid**2))
    if score < 1e-12:  # float dust from the least-squares fit of an exactly additive table
        return (0.0, n, f"additive: the effect of {table.a} is the same at every level of {table.b}")
    return (score, n, _flip_example(rate, table.a, table.b))


@dataclass(frozen=True)
class InteractionTest:
    """The adjusted interaction of one pair: strength, F-test p-value, and why it is NaN when it is."""

    score: float
    p_value: float
    reason: str = ""


def _rss(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    return float(resid @ resid), int(np.linalg.matrix_rank(x))


def _f_sf(f: float, df1: int, df2: int) -> float:
    """Upper tail of the F distribution (scipy, which scikit-learn and so fANOVA bring along); NaN without."""
    try:
        from scipy import stats
    except ImportError:
        return math.nan
    return float(stats.f.sf(f, df1, df2))


NO_RESIDUAL_DF = "no residual degrees of freedom to judge it against"


def _interaction_fit(levels: pd.DataFrame, y: np.ndarray, a: str, b: str) -> InteractionTest:
    x_main = _design(levels, list(levels.columns), pairwise=False)
    x_pair = np.hstack([x_main, _pair_block(levels, a, b)])
    n = len(y)
    rss_main, rank_main = _rss(x_main, y)
    rss_pair, rank_pair = _rss(x_pair, y)
    df1, df2 = rank_pair - rank_main, n - rank_pair
    if df1 <= 0:
        return InteractionTest(math.nan, math.nan, "the observed cells leave no interaction to estimate")
    if df2 <= 0:
        return InteractionTest(math.nan, math.nan, NO_RESIDUAL_DF)
    delta = max(0.0, rss_main - rss_pair)
    mse = rss_pair / df2
    score = max(0.0, delta - df1 * mse) / n
    # a noise-free fit (mse 0) makes any explained variance exact: p 0, or 1 when nothing is explained
    exact = 0.0 if delta > 1e-12 else 1.0
    p_value = _f_sf((delta / df1) / mse, df1, df2) if mse > 1e-15 else exact
    return InteractionTest(score if score > 1e-12 else 0.0, p_value)


def adjusted_interaction(
    levels: pd.DataFrame, y: np.ndarray, a: str, b: str, configs: np.ndarray | None = None
) -> InteractionTest:
    """Mean squared a x b interaction effect on the escape rate, beyond the main effects of *every* varied
    factor (`levels`: one level-label column per factor, one row per run; `y`: escaped as 0/1):
    (RSS_main - RSS_main+ab - df_ab * MSE) / n, floored at 0, i.e. the pair's extra sum of squares minus what
    noise alone would explain with as many terms; the p-value is the F-test of the pair's terms. Adjusting for
    all main effects keeps an unbalanced (random / TPE) sample from showing a pair as interacting only because
    a third factor is spread unevenly over its cells; on a balanced noise-free grid the score equals the
    cell-table residual, mean squared (cell - row mean - column mean + grand mean).

    With `configs` (the config id per run) the fit is on configurations (escape fraction per configuration),
    so replicates of one configuration are not counted as independent evidence; only when that model is
    saturated (every configuration its own cell, no residual to judge against) is it fitted on runs, where the
    residual is then exactly the replicate-to-replicate noise."""
    if configs is not None:
        frame = levels.assign(_y=y, _config=configs).groupby("_config", sort=False)
        per_config = frame.agg({**{c: "first" for c in levels.columns}, "_y": "mean"})
        test = _interaction_fit(per_config[list(levels.columns)], per_config["_y"].to_numpy(float), a, b)
        if test.reason != NO_RESIDUAL_DF:
            return test
    return _interaction_fit(levels, y, a, b)


INTERACTION_COLUMNS = [
    "factor_a",
    "factor_b",
    "interaction",
    "p_value",
    "cell_interaction",
    "cells",
    "example",
]


def interaction_table(
    runs: pd.DataFrame, factors: Sequence[str] | None = None, max_levels: int = MAX_LEVELS
) -> pd.DataFrame:
    """Every pair of varied factors ranked by interaction strength (descending; uncomputable pairs last): the
    combinations whose effect on escape depends on each other. `interaction` is `adjusted_interaction` (the
    ranking, adjusted for every factor's main effect, with its F-test `p_value`); `cell_interaction` is the
    plain two-way residual of the pair's own cell table (`interaction_score`, what the heatmap shows);
    `example` names where the effect of one factor flips most across the other's levels."""
    factors = list(varied_factors(runs) if factors is None else factors)
    levels = pd.DataFrame({f: factor_levels(runs[f], max_levels).astype(str) for f in factors})
    y = runs["escaped"].astype(float).to_numpy()
    rows = []
    for a, b in itertools.combinations(factors, 2):
        cell_score, cells, example = interaction_score(pair_tables(runs, a, b, max_levels))
        test = adjusted_interaction(levels, y, a, b, configs=runs["config_id"].to_numpy())
        if math.isnan(test.score):
            example = test.reason
        elif test.score == 0.0:
            example = f"additive: no interaction of {a} and {b} beyond their main effects"
        rows.append(
            {
                "factor_a": a,
                "factor_b": b,
                "interaction": test.score,
                "p_value": test.p_value,
                "cell_interaction": cell_score,
                "cells": cells,
                "example": example,
            }
        )
    table = pd.DataFrame(rows, columns=INTERACTION_COLUMNS)
    return table.sort_values("interaction", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# Configurations (trial level) and the playbook checks


def floored_skill(skills: pd.Series) -> pd.Series:
    """Skill floored at -1, non-finite (diverged) counted as -1: the scale the driver's objective uses."""
    s = skills.astype(float)
    return s.where(np.isfinite(s), SKILL_FLOOR).clip(lower=SKILL_FLOOR)


def configs(runs: pd.DataFrame, factors: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per configuration: its factor values and replicate outcomes. `mean_skill` floors each replicate
    at -1 (like the driver's objective) so one diverged seed does not make the mean -inf."""
    factors = list(factor_columns(runs) if factors is None else factors)
    flagged = _with_flags(runs).assign(
        _skill=floored_skill(runs["skill"]),
        _partial=runs["verdict"] == "partial",
    )
    grouped = flagged.groupby("config_id", sort=False)
    out = grouped.agg(
        trial_number=("trial_number", "min"),
        replicates=("_escaped", "size"),
        escaped=("_escaped", "sum"),
        plateau=("_plateau", "sum"),
        partial=("_partial", "sum"),
        diverged=("_diverged", "sum"),
        mean_skill=("_skill", "mean"),
        verdicts=("verdict", lambda v: ", ".join(v)),
    )
    out["escape_rate"] = out["escaped"] / out["replicates"]
    values = grouped[factors].first() if factors else pd.DataFrame(index=out.index)
    return out.join(values).reset_index().sort_values("trial_number", kind="stable").reset_index(drop=True)


def isolation(
    runs: pd.DataFrame, scientific: Sequence[str] | None = None, nuisance: Sequence[str] | None = None
) -> pd.DataFrame:
    """Tuning playbook: compare scientific factor values each at its *best* nuisance setting (max mean skill
    over replicates), so a value is not judged by an unlucky learning rate. One row per scientific factor
    value."""
    scientific = list(factors_with_role(runs, "scientific") if scientific is None else scientific)
    nuisance = list(factors_with_role(runs, "nuisance") if nuisance is None else nuisance)
    columns = [
        "factor",
        "value",
        "configs",
        "best_config_id",
        "best_mean_skill",
        "best_escape_rate",
        "best_verdicts",
        *nuisance,
    ]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    table = configs(runs, [*scientific, *nuisance])
    rows = []
    for f in scientific:
        table["_level"] = factor_levels(table[f])
        for level, group in table.groupby("_level", observed=True, sort=True):
            best = group.loc[group["mean_skill"].idxmax()]
            row = {
                "factor": f,
                "value": str(level),
                "configs": len(group),
                "best_config_id": best["config_id"],
                "best_mean_skill": best["mean_skill"],
                "best_escape_rate": best["escape_rate"],
                "best_verdicts": best["verdicts"],
            }
            row.update({n: best[n] for n in nuisance})
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def _domain(name: str, spec: Mapping[str, Any] | None, observed: pd.Series) -> tuple[float, float, bool, str]:
    """(low, high, log, source) of a numeric factor: the sweep file's range or value list, else what was
    run."""
    spec = spec or {}
    if "low" in spec and "high" in spec:
        return float(spec["low"]), float(spec["high"]), bool(spec.get("log", False)), "sweep range"
    numeric = [v for v in spec.get("values") or [] if isinstance(v, int | float) and not isinstance(v, bool)]
    if numeric:
        lo, hi = float(min(numeric)), float(max(numeric))
        return lo, hi, lo > 0 and hi / lo >= 100, "sweep values"
    present = observed.dropna().astype(float)
    return float(present.min()), float(present.max()), _log_scale(present), "observed range"


def _best_configs(runs: pd.DataFrame, table: pd.DataFrame) -> list[tuple[str, str, str | None]]:
    """(config_id, why, factor held by construction) of the configurations the playbook checks: the best
    overall, and the best per scientific factor value (whose own factor sits where it was put, so it is not
    checked). `table` is configs(runs)."""
    if table.empty:
        return []
    best: list[tuple[str, str, str | None]] = [
        (str(table.loc[table["mean_skill"].idxmax(), "config_id"]), "best overall", None)
    ]
    iso = isolation(runs)
    best += [
        (str(r.best_config_id), f"best for {r.factor}={r.value}", str(r.factor)) for r in iso.itertuples(index=False)
    ]
    return best


def boundary_flags(
    runs: pd.DataFrame, spec_factors: Mapping[str, Mapping[str, Any]] | None = None, tol: float = 0.02
) -> pd.DataFrame:
    """Tuning playbook: a best configuration whose numeric factor sits at the edge of the searched domain
    (within `tol` of its width, on log scale where the factor is log-scaled) may have its real optimum
    outside the range: widen the range before trusting the comparison. Domains come from the sweep spec
    (`spec_factors`, default the runs' `attrs['sweep']['factors']`), else from the values run."""
    if spec_factors is None:
        spec_factors = (runs.attrs.get("sweep") or {}).get("factors") or {}
    columns = ["config_id", "why", "factor", "value", "low", "high", "edge", "domain"]
    if runs.empty:  # no configuration to check
        return pd.DataFrame(columns=columns)
    numeric = [f for f in varied_factors(runs) if _is_numeric(runs[f].dropna()) and runs[f].notna().any()]
    per_config = configs(runs)
    table = per_config.set_index("config_id")
    flags: dict[tuple[str, str], dict[str, Any]] = {}
    for cid, why, held in _best_configs(runs, per_config):
        for f in numeric:
            if f == held:
                continue
            value = table.loc[cid, f]
            if value is None or pd.isna(value):
                continue
            low, high, log, source = _domain(f, spec_factors.get(f), runs[f])
            if not high > low:
                continue
            to = math.log10 if log and low > 0 else float
            width = to(high) - to(low)
            pos = (to(float(value)) - to(low)) / width
            edge = "min" if pos <= tol else "max" if pos >= 1 - tol else None
            if edge is None:
                continue
            key = (cid, f)
            if key in flags:
                flags[key]["why"] += "; " + why
            else:
                flags[key] = {
                    "config_id": cid,
                    "why": why,
                    "factor": f,
                    "value": float(value),
                    "low": low,
                    "high": high,
                    "edge": edge,
                    "domain": source,
                }
    return pd.DataFrame(list(flags.values()), columns=columns)


def divergence_rate(runs: pd.DataFrame) -> float:
    """Fraction of runs that diverged (NaN without runs). Many divergences mean the search space reaches into
    unstable settings, which also biases escape rates of the factors that go there."""
    return float((runs["verdict"] == "diverged").mean()) if len(runs) else math.nan


def replicate_disagreement(runs: pd.DataFrame) -> pd.DataFrame:
    """Configurations whose seeds split between escaped and plateau: escape there is luck of the
    initialisation, so a single-seed comparison would mislead."""
    table = configs(runs, varied_factors(runs))
    split = table[(table["escaped"] > 0) & (table["plateau"] > 0)]
    return split.drop(columns=["mean_skill"]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# Importances (Optuna's evaluators, named explicitly)


def _replicates(trial: FrozenTrial) -> list[Mapping[str, Any]]:
    return list(trial.user_attrs.get("replicates") or [])


def skill_target(trial: FrozenTrial) -> float:
    """Mean final skill over replicates, each floored at -1 (non-finite = -1), as the driver's objective:
    keeps diverged trials in the analysis (Optuna drops non-finite targets) without letting one blow-up
    dominate."""
    reps = _replicates(trial)
    skills = [_num(r.get("skill")) for r in reps] if reps else [_num(trial.value)]
    return float(floored_skill(pd.Series(skills, dtype=float)).mean())


def escape_target(trial: FrozenTrial) -> float:
    """Fraction of the trial's replicates that escaped the plateau (NaN without replicate records)."""
    reps = _replicates(trial)
    return float(np.mean([r.get("verdict") == "escaped" for r in reps])) if reps else math.nan


def _distribution(values: pd.Series, max_levels: int) -> BaseDistribution:
    present = values.dropna()
    if _is_numeric(present) and present.nunique() > max_levels:
        return FloatDistribution(float(present.min()), float(present.max()), log=_log_scale(present))
    choices = sorted({_py(v) for v in present.tolist()}, key=_sort_key)
    return CategoricalDistribution(choices)


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def study_from_runs(runs: pd.DataFrame, factors: Sequence[str] | None = None) -> optuna.Study:
    """An in-memory Optuna study with one trial per configuration, rebuilt from a runs table (e.g. read from
    CSV), so Optuna's importance evaluators can run without the original storage. Numeric factors with many
    values become float distributions over the observed range; the rest categorical. Missing values (momentum
    under adam) are left out of the trial's params, as the driver does."""
    factors = list(varied_factors(runs) if factors is None else factors)
    dists = {f: _distribution(runs[f], MAX_LEVELS) for f in factors if runs[f].notna().any()}
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize", study_name=str(runs.attrs.get("study_name", "runs")))
    finally:
        optuna.logging.set_verbosity(previous)
    for cid, group in runs.groupby("config_id", sort=False):
        first = group.iloc[0]
        params = {f: _py(first[f]) for f in dists if not pd.isna(first[f])}
        reps = [{"verdict": v, "skill": float(s)} for v, s in zip(group["verdict"], group["skill"], strict=True)]
        trial = optuna.trial.create_trial(
            params=params,
            distributions={f: dists[f] for f in params},
            value=float(floored_skill(group["skill"]).mean()),
            user_attrs={"config_id": str(cid), "replicates": reps},
        )
        study.add_trial(trial)
    return study


@dataclass
class _Column:
    values: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


_HANDLED_WARNINGS = ("computes the importances of params to achieve low",)  # we negate the target ourselves


def _evaluate(
    study: optuna.Study,
    make_evaluator: Callable[[], optuna.importance.BaseImportanceEvaluator],
    target: Callable[[FrozenTrial], float],
    factors: Sequence[str],
    level_counts: Mapping[str, int],
    name: str,
) -> _Column:
    """One importance column; every NaN carries its reason. Degenerate inputs are caught before Optuna sees
    them (it would return equal shares); Optuna's own warnings are kept as notes, except PED-ANOVA's
    'lower is better' reminder, which the negated target already answers. A missing scikit-learn (fANOVA's
    forest) is a reason, not a crash."""
    col = _Column()
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    y = np.array([target(t) for t in trials], dtype=float)
    y = y[np.isfinite(y)]
    blanket = None
    if len(y) < 2:
        blanket = f"{name}: needs at least 2 completed configurations (have {len(y)})"
    elif np.ptp(y) == 0:
        blanket = f"{name}: target is the same in every configuration ({y[0]:.3g})"
    result: dict[str, float] = {}
    if blanket is None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = optuna.importance.get_param_importances(study, evaluator=make_evaluator(), target=target)
        except (RuntimeError, ValueError, ImportError) as err:
            blanket = f"{name}: {err}"
        else:
            messages = dict.fromkeys(str(w.message) for w in caught)
            col.notes += [f"{name}: {m}" for m in messages if not any(h in m for h in _HANDLED_WARNINGS)]
    for f in factors:
        if blanket is not None:
            col.reasons[f] = blanket
        elif level_counts.get(f, 0) < 2:
            col.reasons[f] = f"{name}: only one level observed"
        elif f not in result:
            col.reasons[f] = f"{name}: absent from some trials (conditional); this evaluator needs it in all"
        else:
            col.values[f] = float(result[f])
    return col


def _dummies(frame: pd.DataFrame, factor: str) -> np.ndarray:
    """Treatment-coded one-hot columns of one factor (first level dropped)."""
    return np.asarray(pd.get_dummies(frame[factor], prefix=factor, drop_first=True, dtype=float).to_numpy())


def _pair_block(frame: pd.DataFrame, a: str, b: str) -> np.ndarray:
    """Every product of a's and b's dummy columns: the pair's interaction terms."""
    da, db = _dummies(frame, a), _dummies(frame, b)
    return np.einsum("ni,nj->nij", da, db).reshape(len(frame), -1)


def _design(frame: pd.DataFrame, factors: Sequence[str], pairwise: bool) -> np.ndarray:
    """One-hot (treatment-coded) design matrix with intercept; optionally with every pairwise interaction."""
    cols = [np.ones((len(frame), 1)), *(_dummies(frame, f) for f in factors)]
    if pairwise:
        cols += [_pair_block(frame, a, b) for a, b in itertools.combinations(factors, 2)]
    return np.hstack(cols)


def _r2(x: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0:
        return math.nan, "escape fraction is the same in every configuration"
    rank = int(np.linalg.matrix_rank(x))
    if rank >= len(y):
        return (
            math.nan,
            f"{rank} model terms for {len(y)} configurations: the fit would be exact by construction",
        )
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return 1.0 - float(np.sum((y - x @ coef) ** 2)) / total, ""


def variance_shares(runs: pd.DataFrame, factors: Sequence[str] | None = None) -> dict[str, Any]:
    """How much of the configuration-to-configuration variance of the escape fraction single factors explain,
    and how much needs pairs: R² of a least-squares additive model on one-hot factor levels (main effects) and
    of the same model with all pairwise interaction terms. Also each factor's own share (eta², one-way).
    fANOVA normalises its importances to sum 1, so it cannot show what is left to interactions; these fits
    can."""
    factors = list(varied_factors(runs) if factors is None else factors)
    out: dict[str, Any] = {"main_effects_r2": math.nan, "pairwise_r2": math.nan, "eta2": {}, "reasons": []}
    if runs.empty or not factors:
        out["reasons"].append("no runs or no varied factors")
        return out
    levels = pd.DataFrame({f: factor_levels(runs[f]).astype(str) for f in factors})
    frame = levels.assign(config_id=runs["config_id"].to_numpy(), escaped=runs["escaped"].astype(float).to_numpy())
    per_config = frame.groupby("config_id", sort=False).agg({**{f: "first" for f in factors}, "escaped": "mean"})
    y = per_config["escaped"].to_numpy(dtype=float)
    total = float(np.sum((y - y.mean()) ** 2))
    for f in factors:
        means = per_config.groupby(f)["escaped"].transform("mean").to_numpy(dtype=float)
        out["eta2"][f] = float(np.sum((means - y.mean()) ** 2)) / total if total > 0 else math.nan
    main, why_main = _r2(_design(per_config, factors, pairwise=False), y)
    pair, why_pair = _r2(_design(per_config, factors, pairwise=True), y)
    out["main_effects_r2"], out["pairwise_r2"] = main, pair
    if why_main:
        out["reasons"].append(f"main-effects fit: {why_main}")
    if why_pair:
        out["reasons"].append(f"pairwise fit: {why_pair}")
    return out


IMPORTANCE_COLUMNS = ["factor", "fanova_skill", "ped_anova_skill", "fanova_escape", "eta2_escape", "reason"]


def ped_anova_quantile(n_trials: int) -> float:
    """Top fraction PED-ANOVA contrasts with the rest: 10% as Optuna's default, but at least 5 trials
    (Optuna's own advice) and at most half the study, so small sweeps are not judged on a single best
    trial."""
    return min(0.5, max(0.1, 5 / max(n_trials, 1)))


def importances(
    source: optuna.Study | pd.DataFrame,
    factors: Sequence[str] | None = None,
    *,
    runs: pd.DataFrame | None = None,
    seed: int = FANOVA_SEED,
    n_trees: int = FANOVA_TREES,
) -> pd.DataFrame:
    """Factor importances from Optuna's evaluators, named explicitly:

    - `fanova_skill`: optuna.importance.FanovaImportanceEvaluator(seed=seed) on the mean skill per trial
      (replicates floored at -1, see `skill_target`);
    - `ped_anova_skill`: optuna.importance.PedAnovaImportanceEvaluator(target_quantile=ped_anova_quantile(n))
      on the negated mean skill (PED-ANOVA treats lower as better);
    - `fanova_escape`: FanovaImportanceEvaluator on the fraction of a trial's replicates that escaped;
    - `eta2_escape`: each factor's one-way share of escape-fraction variance across configurations.

    fANOVA and PED-ANOVA shares are normalised by Optuna to sum to 1. What main effects leave to interactions
    is therefore computed separately (`variance_shares`) and returned in `attrs`: `main_effects_r2` (R² of the
    additive one-hot model of escape fraction), `pairwise_r2` (with pairwise terms), `interaction_share`
    (pairwise_r2 - main_effects_r2) and `left_to_interactions` (1 - main_effects_r2: interactions of any order
    plus replicate noise). Degenerate inputs (one trial, a constant target, a one-level factor, a conditional
    factor fANOVA cannot use) give NaN with the reason in `reason` / `attrs['reasons']`.

    `source` is the study (preferred: its real distributions) or a runs table (an in-memory study is rebuilt
    with `study_from_runs`)."""
    if isinstance(source, pd.DataFrame):
        runs = source
        study = study_from_runs(runs, factors)
    else:
        study = source
        runs = load_runs(study) if runs is None else runs
    factors = list(varied_factors(runs) if factors is None else factors)
    level_counts = {f: int(runs[f].nunique(dropna=True)) for f in factors}
    n_trials = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    quantile = ped_anova_quantile(n_trials)

    def fanova() -> optuna.importance.BaseImportanceEvaluator:
        return optuna.importance.FanovaImportanceEvaluator(n_trees=n_trees, seed=seed)

    def ped_anova() -> optuna.importance.BaseImportanceEvaluator:
        return optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)

    columns = {
        "fanova_skill": _evaluate(study, fanova, skill_target, factors, level_counts, "fANOVA skill"),
        "ped_anova_skill": _evaluate(
            study, ped_anova, lambda t: -skill_target(t), factors, level_counts, "PED-ANOVA skill"
        ),
        "fanova_escape": _evaluate(study, fanova, escape_target, factors, level_counts, "fANOVA escape"),
    }
    shares = variance_shares(runs, factors)
    rows = []
    for f in factors:
        row: dict[str, Any] = {"factor": f}
        reasons = []
        for name, col in columns.items():
            row[name] = col.values.get(f, math.nan)
            if f in col.reasons:
                reasons.append(col.reasons[f])
        row["eta2_escape"] = shares["eta2"].get(f, math.nan)
        row["reason"] = "; ".join(dict.fromkeys(reasons))
        rows.append(row)
    table = pd.DataFrame(rows, columns=IMPORTANCE_COLUMNS)
    table = table.sort_values(
        ["fanova_escape", "fanova_skill"], ascending=False, na_position="last", kind="stable"
    ).reset_index(drop=True)
    main, pair = shares["main_effects_r2"], shares["pairwise_r2"]
    ped_name = "optuna.importance.PedAnovaImportanceEvaluator"
    table.attrs.update(
        main_effects_r2=main,
        pairwise_r2=pair,
        interaction_share=pair - main if not (math.isnan(main) or math.isnan(pair)) else math.nan,
        left_to_interactions=1.0 - main if not math.isnan(main) else math.nan,
        reasons=list(shares["reasons"]) + [n for col in columns.values() for n in col.notes],
        trials=n_trials,
        evaluators={
            "fanova_skill": f"optuna.importance.FanovaImportanceEvaluator(n_trees={n_trees}, seed={seed})",
            "ped_anova_skill": f"{ped_name}(target_quantile={quantile:.3g})",
            "fanova_escape": f"optuna.importance.FanovaImportanceEvaluator(n_trees={n_trees}, seed={seed})",
        },
    )
    return table


# ----------------------------------------------------------------------------------------------------
# Judgements the report states in words


SMALL_IMPORTANCE = 0.5  # "small" = below half an equal share of the importance
INTERACTION_NOTEWORTHY = 0.01  # residual RMS of 0.1 escape rate: a combination visibly matters


@dataclass(frozen=True)
class FactorEffect:
    """What the numbers say about one factor, in the terms of the verdict."""

    factor: str
    effect: str  # "escapes", "keeps on plateau", "no detectable effect", "unclear", "one level"
    levels: tuple[str, ...]  # the levels the effect is about (escaping / plateau-keeping)
    detail: str


def _importance_of(imp: pd.DataFrame | None, factor: str) -> float:
    if imp is None or imp.empty or factor not in set(imp["factor"]):
        return math.nan
    row = imp.set_index("factor").loc[factor]
    for col in ("fanova_escape", "fanova_skill"):
        if not math.isnan(row[col]):
            return float(row[col])
    return math.nan


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _rate_text(rows: Sequence[pd.Series]) -> str:
    """'100% of 16 runs (95% CI 81%–100%)', prefixed by the level when several levels are described."""
    return "; ".join(
        ("" if len(rows) == 1 else f"{r['value']}: ")
        + f"{_pct(r['escape_rate'])} of {r['runs']} runs (95% CI {_pct(r['ci_low'])}–{_pct(r['ci_high'])})"
        for r in rows
    )


def is_balanced(runs: pd.DataFrame, factors: Sequence[str] | None = None) -> bool:
    """True for a full factorial with equal replication: every combination of the varied factors' levels was
    run equally often, so each factor's marginal escape rates compare like with like."""
    factors = list(varied_factors(runs) if factors is None else factors)
    if not factors or runs.empty:
        return False
    levels = runs[factors].astype(str)
    counts = levels.value_counts()
    full = math.prod(levels[f].nunique() for f in factors)
    return len(counts) == full and counts.nunique() == 1


def factor_effects(table: pd.DataFrame, imp: pd.DataFrame | None = None, balanced: bool = False) -> list[FactorEffect]:
    """Classify each factor from its level intervals (and importance when given):
    `escapes` when some level's Wilson interval lies entirely above every other level's; `keeps on plateau`
    when, without that, a level's interval lies entirely below the others'; `no detectable effect` when all
    intervals overlap and the importance (fANOVA on escape, else on skill) is below half an equal share;
    `unclear` otherwise, including separated intervals that fANOVA (which sees all factors at once) gives
    little weight: in an unbalanced random sample that is the signature of confounding. In a `balanced` design
    (see `is_balanced`) no factor can be confounded with another, so separated intervals are taken as they are."""
    effects = []
    small = SMALL_IMPORTANCE / max(1, table["factor"].nunique()) if not table.empty else SMALL_IMPORTANCE
    for name, group in table.groupby("factor", sort=False):
        f, t = str(name), group.reset_index(drop=True)
        if len(t) < 2:
            effects.append(FactorEffect(f, "one level", tuple(t["value"]), "only one level was run"))
            continue
        above = [row for i, row in t.iterrows() if row["ci_low"] > t.drop(index=i)["ci_high"].max()]
        below = [row for i, row in t.iterrows() if row["ci_high"] < t.drop(index=i)["ci_low"].min()]
        importance = _importance_of(imp, f)
        imp_text = "" if math.isnan(importance) else f", fANOVA share {importance:.2f}"
        weak = not math.isnan(importance) and importance < small
        if (above or below) and weak and not balanced:
            detail = (
                f"escape {_pct(t['escape_rate'].min())}–{_pct(t['escape_rate'].max())} across {len(t)} levels"
                f"{imp_text}: the intervals separate but fANOVA attributes little to it, so another factor "
                "spread unevenly over its levels probably explains the difference"
            )
            effects.append(FactorEffect(f, "unclear", (), detail))
        elif above:
            rest = t[~t["value"].isin([r["value"] for r in above])]
            detail = (
                f"{_rate_text(above)} vs at most {_pct(rest['escape_rate'].max())} "
                f"(CI up to {_pct(rest['ci_high'].max())}) for {', '.join(rest['value'])}"
            )
            effects.append(FactorEffect(f, "escapes", tuple(r["value"] for r in above), detail + imp_text))
        elif below:
            levels = tuple(r["value"] for r in below)
            effects.append(FactorEffect(f, "keeps on plateau", levels, _rate_text(below) + imp_text))
        else:
            overlap = t["ci_low"].max() <= t["ci_high"].min()
            negligible = overlap and (math.isnan(importance) or importance < small)
            detail = (
                f"escape {_pct(t['escape_rate'].min())}–{_pct(t['escape_rate'].max())} across {len(t)} levels"
                + imp_text
            )
            effects.append(FactorEffect(f, "no detectable effect" if negligible else "unclear", (), detail))
    return effects


def nearest_runs(
    runs: pd.DataFrame, target: Mapping[str, Any], factors: Sequence[str] | None = None
) -> tuple[pd.DataFrame, dict[str, tuple[str, str]]]:
    """The runs of the configuration matching `target` on the varied factors, or, if none was run, of the
    nearest one (fewest differing factors, then smallest numeric distance, log10 for positive values). Returns
    the runs and {factor: (target level, run level)} for the factors that differ (empty on an exact match)."""
    factors = [f for f in (varied_factors(runs) if factors is None else factors) if f in target]
    table = configs(runs, factors)
    if table.empty:
        return runs.iloc[0:0], {}

    def differs(want: Any, have: Any) -> tuple[int, float]:
        if want is None or (isinstance(want, float) and math.isnan(want)):
            return (0, 0.0) if have is None or pd.isna(have) else (1, 1.0)
        if have is None or pd.isna(have):
            return (1, 1.0)
        if isinstance(want, int | float) and not isinstance(want, bool) and _is_numeric(pd.Series([have])):
            w, h = float(want), float(have)
            if math.isclose(w, h, rel_tol=1e-6, abs_tol=1e-12):
                return (0, 0.0)
            gap = abs(math.log10(w) - math.log10(h)) if w > 0 and h > 0 else abs(w - h)
            return (1, gap)
        return (0, 0.0) if format_level(want) == format_level(have) else (1, 1.0)

    scores = []
    for _, row in table.iterrows():
        parts = [differs(target[f], row[f]) for f in factors]
        scores.append((sum(p[0] for p in parts), sum(p[1] for p in parts)))
    best = min(scores)
    chosen = table[[s == best for s in scores]]
    first = chosen.iloc[0]
    diff = {f: (format_level(target[f]), format_level(first[f])) for f in factors if differs(target[f], first[f])[0]}
    return runs[runs["config_id"].isin(chosen["config_id"])], diff


def seed_configuration() -> dict[str, Any]:
    """The seed's factor values (DESIGN: lr 0.001, momentum 0.9, small seed-style gradient noise, seq_len 1,
    raw input, regression readout), from the package's single definition of the seed configuration."""
    return SEED_CONFIG.factor_values()


# ----------------------------------------------------------------------------------------------------
# Headline numbers


def summarize(
    runs: pd.DataFrame, table: pd.DataFrame | None = None, pairs: pd.DataFrame | None = None
) -> dict[str, Any]:
    """The headline numbers the report opens with. `table` / `pairs` (factor and interaction tables) are
    computed when not given. The top factor is the one with the widest spread of escape rate between
    levels."""
    table = factor_table(runs) if table is None else table
    pairs = interaction_table(runs) if pairs is None else pairs
    n = len(runs)
    k = int(runs["escaped"].sum()) if n else 0
    conf = configs(runs) if n else pd.DataFrame()
    out: dict[str, Any] = {
        "runs": n,
        "configs": int(runs["config_id"].nunique()) if n else 0,
        "trials": int(runs["trial_number"].nunique()) if n else 0,
        "failed_trials": len(runs.attrs.get("failed") or []),
        "escaped": k,
        "escape_rate": k / n if n else math.nan,
        "escape_ci": wilson_interval(k, n),
        "verdicts": {v: int(c) for v, c in runs["verdict"].value_counts().items()} if n else {},
        "plateau_rate": float((runs["verdict"] == "plateau").mean()) if n else math.nan,
        "divergence_rate": divergence_rate(runs),
        "median_escape_epoch": float(runs["escape_epoch"].astype(float).median()) if n else math.nan,
        "varied_factors": varied_factors(runs),
        "disagreeing_configs": int(((conf["escaped"] > 0) & (conf["plateau"] > 0)).sum()) if n else 0,
        "best_config_id": None,
        "best_mean_skill": math.nan,
        "top_factor": None,
        "top_factor_spread": math.nan,
        "top_factor_best_level": None,
        "top_interaction": None,
        "top_interaction_score": math.nan,
    }
    if not conf.empty:
        best = conf.loc[conf["mean_skill"].idxmax()]
        out["best_config_id"] = best["config_id"]
        out["best_mean_skill"] = float(best["mean_skill"])
        out["best_config"] = {f: _py(best[f]) for f in varied_factors(runs)}
    if not table.empty:
        spread = table.groupby("factor", sort=False)["escape_rate"].agg(lambda s: s.max() - s.min())
        top = str(spread.idxmax())
        levels = table[table["factor"] == top]
        out["top_factor"] = top
        out["top_factor_spread"] = float(spread[top])
        out["top_factor_best_level"] = str(levels.loc[levels["escape_rate"].idxmax(), "value"])
    if not pairs.empty and (pairs["interaction"] > 0).any():  # ranked: the first row is the strongest
        first = pairs.iloc[0]
        out["top_interaction"] = (first["factor_a"], first["factor_b"])
        out["top_interaction_score"] = float(first["interaction"])
    return out
