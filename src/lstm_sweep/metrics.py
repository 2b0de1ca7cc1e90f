"""Measures against the trivial predictor, and the per-run verdict.

Every loss is compared with what predicting the mean (regression) or the class prior (classification) would
score on the same data, so regression and classification runs can be ranked on one axis: skill.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from lstm_sweep.errors import ConfigError

SKILL_FLOOR = -1.0  # a diverged replicate counts as skill -1 in objectives and summaries, not -inf


def floor_skill(skill: float) -> float:
    """Skill floored at SKILL_FLOOR, non-finite (diverged) counted as SKILL_FLOOR."""
    return max(SKILL_FLOOR, skill) if math.isfinite(skill) else SKILL_FLOOR


# The weight groups whose gradient norms are logged per epoch (defined here, not in `model`, so reading records
# and tracking do not import TensorFlow).
WEIGHT_GROUPS = ("input_kernel", "recurrent_kernel", "bias", "readout")

# What a run's per-epoch record holds beyond its epoch number and the fixed reference values (baseline loss and
# majority rate), in record order: the names a sweep file's `epoch_metrics` may ask MLflow to chart per epoch.
EPOCH_METRICS = (
    "train_loss",
    "val_loss",
    "skill",
    "symbol_accuracy",
    "accuracy_lift",
    "distinct_symbols",
    "pred_std_ratio",
    "gate_saturation",
    "hidden_spread",
    "noise_to_grad",
    *(f"grad_norm_{group}" for group in WEIGHT_GROUPS),
)
# Charted per epoch unless a sweep file says otherwise. Each per-epoch key is 20-odd rows per run in MLflow's
# store, written by the one tracking thread (about 1.4 ms of its CPU per key and run, measured): the curves people read
# first, while every run's `history.csv` artifact keeps every key of every epoch.
DEFAULT_EPOCH_METRICS = ("train_loss", "val_loss", "skill", "symbol_accuracy")

Verdict = Literal["escaped", "partial", "plateau", "diverged"]
VERDICTS: tuple[Verdict, ...] = ("escaped", "partial", "plateau", "diverged")


@dataclass(frozen=True)
class Thresholds:
    """Where the verdict's lines are drawn; a sweep file may override any of them."""

    plateau_skill: float = 0.05  # skill below this, with collapsed predictions, is the plateau
    collapse_std_ratio: float = 0.1  # regression: std(pred)/std(target) below this is collapsed
    collapse_symbols: int = 2  # at most this many distinct predicted symbols is collapsed
    escape_skill: float = 0.5  # skill at or above this is an escape
    escape_accuracy_lift: float = 0.8  # or (accuracy - majority) / (1 - majority) at or above this
    diverge_ratio: float = 1000.0  # loss above this many baselines (or non-finite) is divergence

    def __post_init__(self) -> None:
        checks = {
            "plateau_skill": 0.0 <= self.plateau_skill < 1.0,
            "collapse_std_ratio": 0.0 <= self.collapse_std_ratio <= 1.0,
            "collapse_symbols": isinstance(self.collapse_symbols, int) and self.collapse_symbols >= 1,
            "escape_skill": 0.0 < self.escape_skill <= 1.0,
            "escape_accuracy_lift": 0.0 < self.escape_accuracy_lift <= 1.0,
            "diverge_ratio": self.diverge_ratio > 1.0,
        }
        allowed = {
            "plateau_skill": "a number in [0, 1)",
            "collapse_std_ratio": "a number in [0, 1]",
            "collapse_symbols": "an integer >= 1",
            "escape_skill": "a number in (0, 1]",
            "escape_accuracy_lift": "a number in (0, 1]",
            "diverge_ratio": "a number > 1",
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"thresholds.{key}", getattr(self, key), allowed[key])
        if self.plateau_skill >= self.escape_skill:
            raise ConfigError("thresholds.plateau_skill", self.plateau_skill, "less than thresholds.escape_skill")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def regression_baseline(train_targets: np.ndarray, eval_targets: np.ndarray) -> float:
    """MSE of always predicting the training-target mean (the variance, 143/12 for the seed)."""
    mean = float(np.mean(train_targets))
    return float(np.mean((np.asarray(eval_targets, dtype=np.float64) - mean) ** 2))


def classification_baseline(prior: np.ndarray, eval_labels: np.ndarray) -> float:
    """Cross-entropy of always predicting the training class prior (ln 12 for the seed)."""
    p = np.clip(np.asarray(prior, dtype=np.float64), 1e-12, None)
    return float(-np.mean(np.log(p[np.asarray(eval_labels)])))


def skill(loss: float, baseline: float) -> float:
    """1 - loss/baseline: 0 at the trivial predictor, 1 perfect, negative worse than it."""
    if not math.isfinite(loss):
        return -math.inf
    return 1.0 - loss / baseline if baseline > 0 else (1.0 if loss <= 0 else -math.inf)


def majority_rate(labels: np.ndarray) -> float:
    counts = np.bincount(np.asarray(labels).ravel())
    return float(counts.max() / counts.sum())


def symbol_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predicted).ravel() == np.asarray(labels).ravel()))


def accuracy_lift(accuracy: float, majority: float) -> float:
    """Accuracy rescaled so the majority-class predictor is 0 and perfect is 1."""
    return (accuracy - majority) / (1.0 - majority) if majority < 1.0 else 0.0


def std_ratio(outputs: np.ndarray, targets: np.ndarray) -> float:
    """std(pred)/std(target): near 0 means every prediction is the same value."""
    target_std = float(np.std(targets))
    return float(np.std(outputs)) / target_std if target_std > 0 else 0.0


def distinct_symbols(predicted: np.ndarray) -> int:
    return int(np.unique(np.asarray(predicted)).size)


@dataclass(frozen=True)
class Measures:
    """What one evaluation says about a model; the inputs of the verdict."""

    loss: float
    baseline_loss: float
    skill: float
    symbol_accuracy: float
    majority_rate: float
    distinct_symbols: int
    pred_std_ratio: float | None  # regression only

    @property
    def accuracy_lift(self) -> float:
        return accuracy_lift(self.symbol_accuracy, self.majority_rate)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy_lift"] = self.accuracy_lift
        return d


def is_diverged(m: Measures, t: Thresholds) -> bool:
    return not math.isfinite(m.loss) or m.loss > t.diverge_ratio * m.baseline_loss


def is_escaped(m: Measures, t: Thresholds) -> bool:
    return not is_diverged(m, t) and (m.skill >= t.escape_skill or m.accuracy_lift >= t.escape_accuracy_lift)


def is_collapsed(m: Measures, t: Thresholds) -> bool:
    if m.distinct_symbols <= t.collapse_symbols:
        return True
    return m.pred_std_ratio is not None and m.pred_std_ratio < t.collapse_std_ratio


def verdict(m: Measures, t: Thresholds, ever_non_finite: bool = False) -> Verdict:
    """diverged > escaped > plateau > partial, in that order of precedence."""
    if ever_non_finite or is_diverged(m, t):
        return "diverged"
    if is_escaped(m, t):
        return "escaped"
    if m.skill < t.plateau_skill and is_collapsed(m, t):
        return "plateau"
    return "partial"


def escape_epoch(per_epoch: list[Measures], t: Thresholds) -> int | None:
    """First epoch (1-based) whose measures count as escaped, or None."""
    for i, m in enumerate(per_epoch, start=1):
        if is_escaped(m, t):
            return i
    return None
