"""Baselines, skill, collapse measures and the verdict, with the seed's exact numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lstm_sweep import metrics
from lstm_sweep.config import TrialConfig
from lstm_sweep.errors import ConfigError
from lstm_sweep.metrics import Measures, Thresholds
from lstm_sweep.tasks import SequenceData, build_data

CODES = np.arange(97, 109, dtype=np.float64)
SEED_VARIANCE = 143 / 12  # 11.91666...


@pytest.fixture(scope="module")
def seed_data() -> SequenceData:
    return build_data(TrialConfig())


def measures_from_predictions(data: SequenceData, pred: np.ndarray) -> Measures:
    """Regression measures for raw-code predictions shaped like data.val.y, via the metrics functions."""
    val = data.val
    loss = float(np.mean((pred.astype(np.float64) - val.y) ** 2))
    baseline = metrics.regression_baseline(data.train.y, val.y)
    predicted = data.decode_regression(pred)
    return Measures(
        loss=loss,
        baseline_loss=baseline,
        skill=metrics.skill(loss, baseline),
        symbol_accuracy=metrics.symbol_accuracy(predicted, val.labels),
        majority_rate=metrics.majority_rate(val.labels),
        distinct_symbols=metrics.distinct_symbols(predicted),
        pred_std_ratio=metrics.std_ratio(pred, val.y),
    )


def make(**kw: float) -> Measures:
    """A hand-made Measures for the verdict's precedence rules (values noted at each use)."""
    base = {
        "loss": SEED_VARIANCE,
        "baseline_loss": SEED_VARIANCE,
        "skill": 0.0,
        "symbol_accuracy": 1 / 12,
        "majority_rate": 1 / 12,
        "distinct_symbols": 1,
        "pred_std_ratio": 0.0,
    }
    base.update(kw)
    return Measures(**base)  # type: ignore[arg-type]


# --- baselines -------------------------------------------------------------------------------------------


def test_regression_baseline_is_the_seed_variance() -> None:
    train_targets = np.resize(CODES, 960)
    eval_targets = np.resize(CODES, 240)
    assert metrics.regression_baseline(train_targets, eval_targets) == pytest.approx(SEED_VARIANCE, abs=1e-9)
    assert metrics.regression_baseline(train_targets, eval_targets) == pytest.approx(11.9167, abs=1e-4)


def test_regression_baseline_uses_the_training_mean() -> None:
    # evaluation targets all equal to the training mean: the baseline is 0, not their own variance
    assert metrics.regression_baseline(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 0.0
    # shifted evaluation targets: mean offset squared adds on
    assert metrics.regression_baseline(np.array([0.0, 0.0]), np.array([3.0, 3.0])) == pytest.approx(9.0)


def test_seed_data_baseline(seed_data: SequenceData) -> None:
    baseline = metrics.regression_baseline(seed_data.train.y, seed_data.val.y)
    assert baseline == pytest.approx(SEED_VARIANCE, abs=1e-9)


def test_classification_baseline_is_ln_12(seed_data: SequenceData) -> None:
    uniform = np.full(12, 1 / 12)
    labels = np.resize(np.arange(12), 240)
    assert metrics.classification_baseline(uniform, labels) == pytest.approx(math.log(12), abs=1e-12)
    assert metrics.classification_baseline(uniform, labels) == pytest.approx(2.4849, abs=1e-4)
    assert metrics.classification_baseline(seed_data.class_prior, seed_data.val.labels) == pytest.approx(
        math.log(12), abs=1e-9
    )


def test_classification_baseline_follows_the_prior() -> None:
    prior = np.array([0.75, 0.25])
    labels = np.array([0, 0, 0, 1])
    expected = -(3 * math.log(0.75) + math.log(0.25)) / 4
    assert metrics.classification_baseline(prior, labels) == pytest.approx(expected)
    # a class never seen in training is finite (clipped), not inf
    assert math.isfinite(metrics.classification_baseline(np.array([1.0, 0.0]), np.array([1])))


def test_skill() -> None:
    assert metrics.skill(SEED_VARIANCE, SEED_VARIANCE) == 0.0
    assert metrics.skill(0.0, SEED_VARIANCE) == 1.0
    assert metrics.skill(2 * SEED_VARIANCE, SEED_VARIANCE) == pytest.approx(-1.0)
    assert metrics.skill(math.nan, 1.0) == -math.inf
    assert metrics.skill(math.inf, 1.0) == -math.inf


def test_small_helpers() -> None:
    assert metrics.majority_rate(np.array([0, 0, 1, 2])) == 0.5
    assert metrics.symbol_accuracy(np.array([[1, 2], [3, 4]]), np.array([1, 2, 0, 4])) == 0.75
    assert metrics.accuracy_lift(1.0, 0.25) == 1.0
    assert metrics.accuracy_lift(0.25, 0.25) == 0.0
    assert metrics.accuracy_lift(1.0, 1.0) == 0.0
    assert metrics.std_ratio(np.array([1.0, 1.0]), np.array([0.0, 2.0])) == 0.0
    assert metrics.std_ratio(np.array([0.0, 4.0]), np.array([0.0, 2.0])) == 2.0
    assert metrics.distinct_symbols(np.array([[3, 3], [5, 3]])) == 2


# --- the verdict on real predictions ---------------------------------------------------------------------


def test_x_plus_one_predictor_is_not_a_plateau(seed_data: SequenceData) -> None:
    """DESIGN's trap: 11 of 12 right on raw codes, yet MSE skill slightly below 0."""
    val = seed_data.val
    pred = val.x[..., 0].astype(np.float64) + 1.0  # input code + 1: 'l' (108) -> 109, target 'a' (97)
    m = measures_from_predictions(seed_data, pred)
    assert m.loss == pytest.approx(144 / 12)  # one miss in 12 costing 12^2
    assert m.skill == pytest.approx(1 - 12 / SEED_VARIANCE)
    assert -0.0075 < m.skill < -0.0065
    assert m.symbol_accuracy == pytest.approx(11 / 12)
    assert m.majority_rate == pytest.approx(1 / 12)
    assert m.accuracy_lift == pytest.approx(10 / 11)
    assert m.distinct_symbols == 11  # b..l, 'l' twice
    assert m.pred_std_ratio == pytest.approx(1.0)
    t = Thresholds()
    assert metrics.verdict(m, t) == "escaped"
    assert metrics.is_escaped(m, t)
    assert not metrics.is_collapsed(m, t)
    # even if the accuracy bar is out of reach, the collapse measures keep it off the plateau
    strict = Thresholds(escape_accuracy_lift=0.95)
    assert metrics.verdict(m, strict) == "partial"


def test_constant_mean_predictor_is_plateau(seed_data: SequenceData) -> None:
    pred = np.full_like(seed_data.val.y, 102.5, dtype=np.float64)
    m = measures_from_predictions(seed_data, pred)
    assert m.skill == pytest.approx(0.0, abs=1e-12)
    assert m.distinct_symbols == 1
    assert m.pred_std_ratio == 0.0
    assert m.symbol_accuracy == pytest.approx(1 / 12)
    assert metrics.verdict(m, Thresholds()) == "plateau"


def test_perfect_predictor_is_escaped_on_skill(seed_data: SequenceData) -> None:
    m = measures_from_predictions(seed_data, seed_data.val.y.astype(np.float64))
    assert m.skill == 1.0
    assert metrics.verdict(m, Thresholds()) == "escaped"


def test_shrunk_predictor_is_partial(seed_data: SequenceData) -> None:
    """Predictions pulled 80% of the way to the mean: some skill, several symbols, low accuracy."""
    y = seed_data.val.y.astype(np.float64)
    pred = 102.5 + 0.2 * (y - 102.5)
    m = measures_from_predictions(seed_data, pred)
    assert m.skill == pytest.approx(1 - 0.8**2)
    assert Thresholds().plateau_skill < m.skill < Thresholds().escape_skill
    assert m.distinct_symbols > Thresholds().collapse_symbols
    assert m.accuracy_lift < Thresholds().escape_accuracy_lift
    assert metrics.verdict(m, Thresholds()) == "partial"


def test_two_symbol_flip_flop_is_collapsed_but_not_plateau(seed_data: SequenceData) -> None:
    y = seed_data.val.y.astype(np.float64)
    pred = np.where(y < 102.5, 102.0, 103.0)  # 'f' or 'g', std ratio about 0.29 but only 2 symbols
    m = measures_from_predictions(seed_data, pred)
    assert m.distinct_symbols == 2
    assert m.pred_std_ratio is not None and m.pred_std_ratio > Thresholds().collapse_std_ratio
    assert metrics.is_collapsed(m, Thresholds())
    # collapsed, but with real skill (1 - 110/143): plateau needs both, so this is partial
    assert m.skill == pytest.approx(1 - 110 / 143)
    assert metrics.verdict(m, Thresholds()) == "partial"


def test_nan_loss_is_diverged(seed_data: SequenceData) -> None:
    pred = np.full_like(seed_data.val.y, np.nan, dtype=np.float64)
    loss = float(np.mean((pred - seed_data.val.y) ** 2))
    m = make(loss=loss, skill=metrics.skill(loss, SEED_VARIANCE))
    assert math.isnan(m.loss)
    assert metrics.is_diverged(m, Thresholds())
    assert metrics.verdict(m, Thresholds()) == "diverged"


def test_exploding_loss_is_diverged() -> None:
    t = Thresholds()
    huge = make(loss=1001 * SEED_VARIANCE, skill=-1000.0)
    below = make(loss=999 * SEED_VARIANCE, skill=-998.0)
    assert metrics.verdict(huge, t) == "diverged"
    assert metrics.verdict(below, t) != "diverged"
    assert metrics.verdict(below, Thresholds(diverge_ratio=10.0)) == "diverged"


def test_diverged_takes_precedence_over_accuracy() -> None:
    # accuracy 1.0 but non-finite loss (or a non-finite step): never an escape
    m = make(loss=math.inf, skill=-math.inf, symbol_accuracy=1.0, distinct_symbols=12, pred_std_ratio=1.0)
    assert not metrics.is_escaped(m, Thresholds())
    assert metrics.verdict(m, Thresholds()) == "diverged"
    ok = make(skill=0.9, symbol_accuracy=1.0, distinct_symbols=12, pred_std_ratio=1.0)
    assert metrics.verdict(ok, Thresholds()) == "escaped"
    assert metrics.verdict(ok, Thresholds(), ever_non_finite=True) == "diverged"


def test_classification_plateau_uses_distinct_symbols() -> None:
    collapsed = make(skill=0.01, distinct_symbols=1, pred_std_ratio=None)
    spread = make(skill=0.01, distinct_symbols=6, pred_std_ratio=None)
    assert metrics.verdict(collapsed, Thresholds()) == "plateau"
    assert metrics.verdict(spread, Thresholds()) == "partial"


def test_escape_epoch_is_first_escaped_epoch_one_based(seed_data: SequenceData) -> None:
    y = seed_data.val.y.astype(np.float64)
    plateau = measures_from_predictions(seed_data, np.full_like(y, 102.5))
    partial = measures_from_predictions(seed_data, 102.5 + 0.2 * (y - 102.5))
    escaped = measures_from_predictions(seed_data, y)
    t = Thresholds()
    assert metrics.escape_epoch([plateau, partial, escaped, partial, escaped], t) == 3
    assert metrics.escape_epoch([escaped], t) == 1
    assert metrics.escape_epoch([plateau, partial, partial], t) is None
    assert metrics.escape_epoch([], t) is None
    # a lower bar moves it earlier
    assert metrics.escape_epoch([plateau, partial, escaped], Thresholds(plateau_skill=0.01, escape_skill=0.3)) == 2


def test_measures_as_dict_includes_lift() -> None:
    d = make(symbol_accuracy=0.5, majority_rate=0.25).as_dict()
    assert d["accuracy_lift"] == pytest.approx(1 / 3)
    assert d["loss"] == SEED_VARIANCE


# --- thresholds ------------------------------------------------------------------------------------------

BAD_THRESHOLDS = [
    ({"plateau_skill": 0.6}, "thresholds.plateau_skill", "less than thresholds.escape_skill"),
    (
        {"plateau_skill": 0.5, "escape_skill": 0.5},
        "thresholds.plateau_skill",
        "less than thresholds.escape_skill",
    ),
    ({"plateau_skill": -0.1}, "thresholds.plateau_skill", "[0, 1)"),
    ({"plateau_skill": math.nan}, "thresholds.plateau_skill", "[0, 1)"),
    ({"collapse_std_ratio": 1.5}, "thresholds.collapse_std_ratio", "[0, 1]"),
    ({"collapse_symbols": 0}, "thresholds.collapse_symbols", "an integer >= 1"),
    ({"collapse_symbols": 2.5}, "thresholds.collapse_symbols", "an integer >= 1"),
    ({"escape_skill": 0.0}, "thresholds.escape_skill", "(0, 1]"),
    ({"escape_skill": 1.5}, "thresholds.escape_skill", "(0, 1]"),
    ({"escape_accuracy_lift": 0.0}, "thresholds.escape_accuracy_lift", "(0, 1]"),
    ({"diverge_ratio": 1.0}, "thresholds.diverge_ratio", "> 1"),
]


@pytest.mark.parametrize(("kwargs", "key", "allowed"), BAD_THRESHOLDS, ids=[str(k) for k, _, _ in BAD_THRESHOLDS])
def test_bad_thresholds(kwargs: dict[str, float], key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        Thresholds(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key
    assert allowed in str(info.value)


def test_default_thresholds_are_valid_and_serialisable() -> None:
    d = Thresholds().as_dict()
    assert d["plateau_skill"] < d["escape_skill"]
    assert Thresholds(**d) == Thresholds()
