"""`lstm-sweep diagnose`: what one configuration's recorded diagnostics say, and which single change gets it out.

Two parts, kept apart so the first can be tested without training:

- `findings(results, data)` is a pure function from finished runs (their per-epoch records, final predictions and
  divergence step) and measured properties of the data to a list of `Finding`s. Every finding is triggered by a
  measurement crossing a named threshold below, never by recognising the configuration: a run that collapses is
  reported as collapsed whatever its settings were.
- the neighbourhood: every factor changed alone (built-in alternatives, or a sweep file's domains), run as a small
  tracked sweep through the ordinary driver (`NeighbourhoodSpec` exposes what `driver.run_sweep` uses of a
  `SweepSpec`), so it is batched into populations, resumable, and lands in Optuna and MLflow like any sweep. When
  no single change escapes, pairs of the most promising ones run as a second sweep (`<name>-pairs`).

`run_diagnosis` ties them together and writes `results/<name>/diagnosis.md` and `curves.png`, which are also
attached to the sweep's MLflow parent run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from lstm_sweep.config import FACTORS, SEED_CONFIG, TrialConfig
from lstm_sweep.errors import ConfigError
from lstm_sweep.files import write_atomic
from lstm_sweep.metrics import SKILL_FLOOR, VERDICTS, Thresholds
from lstm_sweep.step_parts import StepParts
from lstm_sweep.tasks import SequenceData, build_data
from lstm_sweep.train import TrialResult, layout_key, train_population

if TYPE_CHECKING:
    import optuna

    from lstm_sweep.spec import SweepSpec

# --- thresholds of the findings (each finding names the measurement it compares with one of these)

BASELINE_TOLERANCE = 0.01  # |val_loss / baseline - 1| below this: the loss is the trivial predictor's
SATURATION_FRACTION = 0.5  # more than this fraction of gate pre-activations beyond |z| > 4 (the model's count)
SATURATION_Z = 4.0  # the |z| the model counts as saturated (for the explanation only)
NOISE_DOMINANCE = 1.0  # median ratio ||noise|| / ||gradient|| above this: the update is mostly noise
STILL_FALLING_EPOCHS = 3  # the validation loss fell in each of the last this many epochs ...
STILL_FALLING_MIN_DROP = 0.001  # ... by at least this fraction each time: training stopped while still descending
UNSTABLE_RATIO = 10.0  # final validation loss this many times its best (and above the baseline): unstable steps
ESCAPING_RATE = 0.5  # a change "escapes" when at least this fraction of its replicates escaped
PAIR_POOL = 4  # when no single change escapes, pairs are formed from this many best single changes
DEFAULT_REPLICATES = 3
ORIGINAL = "original"
PAIRS_SUFFIX = "-pairs"  # the two-factor stage runs as its own study, <name>-pairs

# --- measured properties of the data


@dataclass(frozen=True)
class DataFacts:
    """What the findings need to know about the data, measured from the encoded arrays (not the settings)."""

    max_abs_input: float  # largest |encoded input| the network sees
    mean_abs_input: float
    window_length: int  # time steps per training window
    steps_per_epoch: int  # optimizer steps per epoch
    target_mean_code: float  # mean ord() code of the training targets
    val_target_var: float  # variance of the validation targets, in loss units (target scale)
    target_std: float  # one loss unit in codes (1 for raw targets)
    alphabet: str
    codes: tuple[float, ...]
    class_prior: tuple[float, ...]

    @classmethod
    def from_data(cls, data: SequenceData) -> DataFacts:
        x = np.abs(np.asarray(data.train.x, dtype=np.float64))
        return cls(
            max_abs_input=float(x.max()),
            mean_abs_input=float(x.mean()),
            window_length=int(data.train.x.shape[2]),
            steps_per_epoch=int(data.train.x.shape[0]),
            target_mean_code=float(data.codes[data.train.labels].mean()),
            val_target_var=float(np.var(np.asarray(data.val.y, dtype=np.float64))),
            target_std=float(data.target_std),
            alphabet=data.alphabet,
            codes=tuple(float(c) for c in data.codes),
            class_prior=tuple(float(p) for p in data.class_prior),
        )


# --- findings


@dataclass(frozen=True)
class Finding:
    """One measured fact about the runs: its number, in how many replicates it held, and what it means."""

    key: str
    title: str
    value: float | None  # the number (of the median replicate among those where it held)
    shown: str  # the number as printed
    detail: str
    runs: int  # replicates where it held
    of: int  # replicates looked at

    def line(self) -> str:
        return f"- {self.title}: {self.shown} (in {self.runs}/{self.of} runs) — {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))


@dataclass(frozen=True)
class _Hit:
    value: float
    shown: str
    detail: str


def _finite_records(result: TrialResult) -> list[dict[str, float]]:
    return [r for r in result.history if math.isfinite(r["val_loss"]) and math.isfinite(r["train_loss"])]


def _diverged(result: TrialResult) -> bool:
    return (
        result.diverged_step is not None
        or result.verdict == "diverged"
        or any(not math.isfinite(r["val_loss"]) for r in result.history)
    )


def _fmt(x: float, digits: int = 4) -> str:
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{max(digits - 2, 1)}e}"
    return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}f}".rstrip("0").rstrip(".") or "0"


def _skill_text(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if math.isfinite(x) and abs(x) < 100 else f"{x:.4g}"


def _symbol(ch: str) -> str:
    return f"'{ch}' (code {ord(ch)})"


def _hit_diverged(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """The loss became non-finite (the trainer records the optimizer step) or exceeded diverge_ratio baselines."""
    if not _diverged(result):
        return None
    spe = facts.steps_per_epoch
    if result.diverged_step is not None:
        step = result.diverged_step
        epoch = (step - 1) // spe + 1
        return _Hit(
            float(step),
            f"step {step}",
            f"the loss or a gradient became non-finite at optimizer step {step} (epoch {epoch}, {spe} steps an "
            "epoch): the updates overshoot, the learning rate is too large for this loss scale",
        )
    ratio = result.thresholds.diverge_ratio
    for r in result.history:
        if not math.isfinite(r["val_loss"]) or r["val_loss"] > ratio * r["baseline_loss"]:
            epoch = int(r["epoch"])
            return _Hit(
                float(epoch * spe),
                f"by step {epoch * spe}",
                f"the validation loss {_fmt(r['val_loss'])} exceeded {_fmt(ratio)} times the trivial baseline "
                f"{_fmt(r['baseline_loss'])} in epoch {epoch} (steps {(epoch - 1) * spe + 1}-{epoch * spe})",
            )
    return _Hit(math.nan, "-", "the run was judged diverged")


def _hit_escaped(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """The verdict's escape: skill or accuracy lift beyond the thresholds, with the first epoch that was."""
    if result.verdict != "escaped":
        return None
    final = result.final
    epoch = result.escape_epoch
    return _Hit(
        float(epoch) if epoch is not None else math.nan,
        f"epoch {epoch}",
        f"off the plateau from epoch {epoch}: final symbol accuracy {final['symbol_accuracy']:.3f} (majority "
        f"rate {final['majority_rate']:.3f}), skill {final['skill']:.4f} against the trivial predictor",
    )


def _hit_collapse(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """At most collapse_symbols distinct predicted symbols in the final epoch."""
    final = result.final
    distinct = int(final["distinct_symbols"])
    if distinct > result.thresholds.collapse_symbols:
        return None
    counts = Counter(result.pred)
    top, _ = counts.most_common(1)[0] if counts else ("?", 0)
    noun = "symbol" if distinct == 1 else "symbols"
    mean = facts.target_mean_code
    if distinct == 1:
        which = f"every prediction is {_symbol(top)}"
    else:
        shares = ", ".join(f"'{s}' {n / len(result.pred):.0%}" for s, n in counts.most_common(distinct))
        which = f"predictions are {shares} of the {len(result.pred)}-symbol sample"
    ratio = final["pred_std_ratio"]
    if math.isfinite(ratio):  # regression: compare the constant output with the target mean
        nearest = min(facts.codes, key=lambda c: abs(c - mean))
        where = f"; the mean target code is {mean:.2f}, {abs(ord(top) - mean):.2f} from {ord(top)}" + (
            " (no symbol is closer)" if abs(ord(top) - mean) <= abs(nearest - mean) + 1e-9 else ""
        )
        if ratio < result.thresholds.collapse_std_ratio:
            offset = math.sqrt(max(0.0, final["val_loss"] - facts.val_target_var)) * facts.target_std
            where += (
                f"; std(pred)/std(target) = {ratio:.2g} and loss − target variance puts the constant output "
                f"{offset:.2f} from that mean" + (": the network predicts the mean" if offset < 0.5 else "")
            )
        return _Hit(float(distinct), f"{distinct} {noun}", which + where)
    prior = dict(zip(facts.alphabet, facts.class_prior, strict=True))
    at_baseline = abs(final["val_loss"] / final["baseline_loss"] - 1.0) < BASELINE_TOLERANCE
    where = f"; its training frequency is {prior.get(top, 0.0):.1%} (largest {max(facts.class_prior):.1%})" + (
        ": the network predicts the class prior" if at_baseline else ""
    )
    return _Hit(float(distinct), f"{distinct} {noun}", which + where)


def _hit_baseline(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """Final validation loss within BASELINE_TOLERANCE of the trivial predictor's."""
    final = result.final
    loss, base = final["val_loss"], final["baseline_loss"]
    if base <= 0 or abs(loss / base - 1.0) >= BASELINE_TOLERANCE:
        return None
    return _Hit(
        loss,
        f"{loss:.4f} vs {base:.4f}",
        f"the validation loss is within {abs(loss / base - 1):.2%} of what always predicting the training "
        f"{'mean' if math.isfinite(final['pred_std_ratio']) else 'class prior'} scores (skill {final['skill']:.4f})",
    )


def _hit_saturation(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """More than SATURATION_FRACTION of gate pre-activations beyond |z| > 4 in the last finite epoch."""
    records = _finite_records(result)
    if not records:
        return None
    fraction = records[-1]["gate_saturation"]
    if not fraction > SATURATION_FRACTION:
        return None
    x = facts.max_abs_input
    if x > SATURATION_Z:
        why = (
            f"the encoded inputs reach |x| = {x:.4g} (mean {facts.mean_abs_input:.4g}), so any input weight above "
            f"{SATURATION_Z:g}/{x:.4g} = {SATURATION_Z / x:.3f} drives a gate past |z| = {SATURATION_Z:g}, where "
            "its derivative is under 2%: the gates are stuck open or shut and pass almost no gradient"
        )
    else:
        why = (
            f"the inputs are small (|x| <= {x:.3g}), so the saturation comes from large weights or biases; "
            "saturated gates pass almost no gradient"
        )
    return _Hit(fraction, f"{fraction:.0%}", why)


def _group_max(result: TrialResult, group: str) -> float:
    return max((r[f"grad_norm_{group}"] for r in _finite_records(result)), default=math.nan)


def _hit_zero_recurrent(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """Recurrent-kernel gradient exactly 0 in every epoch while the input kernel or biases got gradient."""
    if not _finite_records(result):
        return None
    rec = _group_max(result, "recurrent_kernel")
    other = max(_group_max(result, "input_kernel"), _group_max(result, "bias"))
    if rec != 0.0 or not other > 0.0:
        return None
    if facts.window_length == 1:
        why = (
            "every training window is 1 step long (measured) and starts from a zero state, so the state that "
            "multiplies the recurrent kernel is always 0 and its gradient δ·h_prevᵀ vanishes: the recurrence is "
            "never used, the network is a feed-forward map from the current symbol"
        )
    else:
        why = "no step ever passed a non-zero state through the recurrent kernel: the recurrence is never used"
    return _Hit(0.0, f"0 exactly over {len(_finite_records(result))} epochs", why)


def _hit_frozen(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """No LSTM weight group received gradient while the readout did: only the readout learns."""
    if not _finite_records(result):
        return None
    lstm = max(_group_max(result, g) for g in ("input_kernel", "recurrent_kernel", "bias"))
    readout = _group_max(result, "readout")
    if lstm != 0.0 or not readout > 0.0:
        return None
    return _Hit(
        0.0,
        "0 exactly",
        f"the LSTM's own weights got no gradient in any epoch while the readout's reached {_fmt(readout)}: only the "
        "readout learns, on whatever features the random initialisation gives",
    )


def _pre_escape(result: TrialResult) -> list[dict[str, float]]:
    records = _finite_records(result)
    if result.escape_epoch is not None:
        records = [r for r in records if r["epoch"] < result.escape_epoch]
    return records


def _hit_noise(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """Median ||noise|| / ||gradient|| above NOISE_DOMINANCE over the epochs before any escape."""
    records = _pre_escape(result)  # after an escape the gradient vanishes and any noise dominates harmlessly
    if not records:
        return None
    ratio = statistics.median(r["noise_to_grad"] for r in records)
    if not ratio > NOISE_DOMINANCE:
        return None
    return _Hit(
        ratio,
        f"{ratio:.3g}x",
        f"in the median epoch (of {len(records)} before any escape) the added gradient noise has {ratio:.3g} times "
        "the norm of the gradient itself: the updates are mostly noise",
    )


def _hit_still_falling(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """Not escaped, and the validation loss fell in each of the last STILL_FALLING_EPOCHS epochs."""
    if result.verdict == "escaped":
        return None
    losses = [r["val_loss"] for r in _finite_records(result)]
    if len(losses) < STILL_FALLING_EPOCHS + 1:
        return None
    tail = losses[-(STILL_FALLING_EPOCHS + 1) :]
    drops = [(a - b) / a for a, b in itertools.pairwise(tail) if a > 0]
    if len(drops) < STILL_FALLING_EPOCHS or min(drops) < STILL_FALLING_MIN_DROP:
        return None
    rate = 1.0 - math.prod(1.0 - d for d in drops) ** (1.0 / len(drops))
    base = result.final["baseline_loss"]
    first = losses[0]
    return _Hit(
        rate,
        f"{rate:.1%} per epoch",
        f"the validation loss was still falling when training stopped ({_fmt(tail[0])} → {_fmt(tail[-1])} over "
        f"the last {STILL_FALLING_EPOCHS} epochs); it started at {_fmt(first / base)} and ended at "
        f"{_fmt(tail[-1] / base)} times the trivial baseline: the steps are small for this loss scale (a larger "
        "learning rate, or more epochs)",
    )


def _hit_unstable(result: TrialResult, facts: DataFacts) -> _Hit | None:
    """Final validation loss UNSTABLE_RATIO times its best and above the baseline, without diverging."""
    records = _finite_records(result)
    if not records:
        return None
    best = min(records, key=lambda r: r["val_loss"])
    final = records[-1]
    if best["val_loss"] <= 0 or final["val_loss"] <= final["baseline_loss"]:
        return None
    ratio = final["val_loss"] / best["val_loss"]
    if ratio < UNSTABLE_RATIO:
        return None
    return _Hit(
        ratio,
        f"{ratio:.3g}x its best",
        f"the validation loss rose from {_fmt(best['val_loss'])} (epoch {int(best['epoch'])}) to "
        f"{_fmt(final['val_loss'])} at the end without becoming non-finite: the steps are too large for this "
        "loss scale",
    )


Detector = Callable[[TrialResult, DataFacts], "_Hit | None"]
# key, title, detector, applies to diverged runs (their records stop meaning anything after the blow-up)
DETECTORS: tuple[tuple[str, str, Detector, bool], ...] = (
    ("diverged", "diverged", _hit_diverged, True),
    ("escaped", "escaped the plateau", _hit_escaped, False),
    ("collapse", "predictions collapsed", _hit_collapse, False),
    ("baseline_loss", "loss equals the trivial baseline", _hit_baseline, False),
    ("gate_saturation", f"gate pre-activations saturated (|z| > {SATURATION_Z:g})", _hit_saturation, False),
    ("zero_recurrent_gradient", "recurrent-kernel gradient norm", _hit_zero_recurrent, False),
    ("frozen_lstm", "LSTM weights get no gradient", _hit_frozen, False),
    ("noise_dominates", "gradient noise dominates the update", _hit_noise, False),
    (
        "still_falling",
        "loss still falling at the end (learning rate small for the loss scale)",
        _hit_still_falling,
        False,
    ),
    ("unstable", "loss unstable (learning rate large for the loss scale)", _hit_unstable, False),
)


def findings(results: Sequence[TrialResult], data: SequenceData) -> list[Finding]:
    """Every finding that holds in at least one replicate, with the median replicate's number and sentence."""
    facts = DataFacts.from_data(data)
    out: list[Finding] = []
    for key, title, detect, on_diverged in DETECTORS:
        hits = [h for r in results if (on_diverged or not _diverged(r)) and (h := detect(r, facts)) is not None]
        if not hits:
            continue
        ordered = sorted(hits, key=lambda h: (math.isnan(h.value), h.value))
        mid = ordered[(len(ordered) - 1) // 2]
        value = None if math.isnan(mid.value) else mid.value
        out.append(Finding(key, title, value, mid.shown, mid.detail, len(hits), len(results)))
    return out


def verdict_counts(results: Sequence[TrialResult]) -> dict[str, int]:
    """How many replicates got each verdict, in VERDICTS order."""
    counts = Counter(r.verdict for r in results)
    return {v: counts[v] for v in VERDICTS if counts[v]}


def aggregate_verdict(counts: Mapping[str, int]) -> str:
    """The most common verdict over replicates; ties go to the first in VERDICTS order (escaped before plateau)."""
    return max(VERDICTS, key=lambda v: (counts.get(v, 0), -VERDICTS.index(v)))


# --- the neighbourhood: alternatives per factor


@dataclass(frozen=True)
class Change:
    """Factor values that replace the base configuration's, labelled like `learning_rate=0.01`."""

    label: str
    values: tuple[tuple[str, Any], ...]

    @property
    def factors(self) -> dict[str, Any]:
        return dict(self.values)

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Change:
        items = tuple(values.items())
        label = " + ".join(f"{k}={_value_text(v)}" for k, v in items) if items else ORIGINAL
        return cls(label, items)


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(float(f"{value:.12g}"))
    return str(value)


def _round(value: float) -> float:
    return float(f"{value:.12g}")


def default_alternatives(base: TrialConfig) -> dict[str, list[Any]]:
    """Built-in alternative values per factor: a step in each direction that a person would try first."""
    alt: dict[str, list[Any]] = {}
    lr = base.learning_rate
    alt["learning_rate"] = [_round(lr * k) for k in (0.1, 10.0, 100.0)]
    if base.optimizer != "adam":  # adam ignores momentum
        alt["momentum"] = [m for m in (0.0, 0.9) if m != base.momentum]
    alt["optimizer"] = [o for o in FACTORS["optimizer"].choices if o != base.optimizer]
    alt["grad_noise"] = [g for g in (0.0, 0.01) if g != base.grad_noise]
    if base.grad_noise > 0:  # the schedule only matters with noise
        alt["grad_noise_schedule"] = [
            s for s in FACTORS["grad_noise_schedule"].choices if s != base.grad_noise_schedule
        ]
    alt["seq_len"] = [8 if base.seq_len == 1 else 1]
    alt["state_size"] = sorted({max(1, min(1024, round(base.state_size * k))) for k in (0.5, 4)} - {base.state_size})
    alt["num_layers"] = [2 if base.num_layers == 1 else 1]
    alt["output_framing"] = [f for f in FACTORS["output_framing"].choices if f != base.output_framing]
    alt["input_encoding"] = [e for e in FACTORS["input_encoding"].choices if e != base.input_encoding]
    if base.output_framing == "regression":  # classification ignores the target scale
        alt["target_scale"] = [s for s in FACTORS["target_scale"].choices if s != base.target_scale]
    alt["recurrent_training"] = [r for r in FACTORS["recurrent_training"].choices if r != base.recurrent_training]
    alt["forget_bias"] = [b for b in (0.0, 1.0) if b != base.forget_bias]
    alt["grad_clip"] = [1.0 if base.grad_clip == 0 else 0.0]
    alt["stateful"] = [not base.stateful]
    return {k: v for k, v in alt.items() if v}


def file_alternatives(spec: SweepSpec, base: TrialConfig) -> dict[str, list[Any]]:
    """Alternatives from a sweep file: each varied factor's domain values other than the base value.

    A float range without a step contributes its low end, its (geometric, for log ranges) middle and its high end.
    """
    alt: dict[str, list[Any]] = {}
    for fs in spec.varied():
        assert fs.domain is not None
        if fs.name == "momentum" and base.optimizer == "adam":
            continue
        d = fs.domain
        if d.is_enumerable:
            values = d.enumerate()
        else:
            assert d.low is not None and d.high is not None
            mid = math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2
            values = [d.low, _round(mid), d.high]
        current = getattr(base, fs.name)
        alt[fs.name] = [v for v in values if v != current]
    return {k: v for k, v in alt.items() if v}


def _is_noop(base: TrialConfig, values: Mapping[str, Any]) -> bool:
    """A combination whose one part the other makes irrelevant (momentum under adam, target scale under
    classification, the noise schedule without noise) changes nothing that part names."""
    cfg = {**base.as_dict(), **values}
    return (
        ("momentum" in values and cfg["optimizer"] == "adam")
        or ("target_scale" in values and cfg["output_framing"] == "classification")
        or ("grad_noise_schedule" in values and cfg["grad_noise"] == 0)
    )


def _check_change(base: TrialConfig, values: Mapping[str, Any], seed: int) -> str | None:
    """Why the changed configuration cannot run (None if it can): a bad value or a data layout that does not fit.

    One seed is enough: `plan_diagnosis` checks every replicate seed against the base, no rule ties the seed to
    another field, and the data use data_seed, not seed, so every replicate of the change fails or runs alike.
    """
    try:
        build_data(base.replace(**values, seed=seed))
    except ConfigError as err:
        return str(err)
    return None


def single_changes(
    base: TrialConfig, alternatives: Mapping[str, Sequence[Any]], seeds: Sequence[int]
) -> tuple[list[Change], list[str]]:
    """One Change per factor value, in factor-table order; also the ones that cannot run, with the reason."""

    changes: list[Change] = []
    skipped: list[str] = []
    checked: dict[Any, str | None] = {}
    for name in FACTORS:
        for value in alternatives.get(name, ()):
            change = Change.of({name: value})
            try:
                key: Any = layout_key(base.replace(**{name: value}))
            except ConfigError as err:
                skipped.append(f"{change.label}: {err}")
                continue
            if key not in checked:
                checked[key] = _check_change(base, {name: value}, seeds[0])
            problem = checked[key]  # data depend on the layout alone; the value itself was checked above
            if problem:
                skipped.append(f"{change.label}: {problem}")
            else:
                changes.append(change)
    return changes, skipped


# --- the neighbourhood as a sweep the driver can run


@dataclass(frozen=True)
class NeighbourhoodSpec:
    """A grid over one categorical parameter, `change`, with SweepSpec's interface as `driver.run_sweep` uses it.

    Cell {"change": "original"} is the base configuration itself, so its runs are tracked like every other.
    """

    name: str
    base: TrialConfig
    changes: tuple[Change, ...]
    replicates: int
    seed: int
    thresholds: Thresholds
    storage: str
    tracking_uri: str
    source: str = "diagnose"
    description: str = ""
    sampler: str = "grid"

    @property
    def trials(self) -> int:
        return len(self.changes)

    @property
    def cells(self) -> int:
        return len(self.changes)

    def change(self, label: str) -> Change:
        for c in self.changes:
            if c.label == label:
                return c
        raise ConfigError("change", label, "one of the neighbourhood's changes", self.source)

    def labels(self) -> list[str]:
        return [c.label for c in self.changes]

    def grid_cells(self) -> list[dict[str, Any]]:
        return [{"change": label} for label in self.labels()]

    def n_configs(self) -> int:
        return len(self.changes)

    def n_runs(self) -> int:
        return self.n_configs() * self.replicates

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        return {"change": trial.suggest_categorical("change", self.labels())}

    def config_for(self, params: Mapping[str, Any], replicate: int) -> TrialConfig:
        if isinstance(replicate, bool) or not isinstance(replicate, int) or not 0 <= replicate < self.replicates:
            raise ConfigError("replicate", replicate, f"an integer in 0..{self.replicates - 1}", self.source)
        change = self.change(str(params["change"]))
        return self.base.replace(**change.factors, seed=self.seed + replicate)

    def step_parts(self) -> StepParts:
        """The optional step parts any of the neighbourhood's configurations needs (`SweepSpec.step_parts`)."""
        return StepParts.of([self.config_for(cell, 0) for cell in self.grid_cells()])

    def sampler_for(self) -> optuna.samplers.BaseSampler:
        """Never asked to sample: the driver enqueues every grid cell itself."""
        import optuna

        return optuna.samplers.RandomSampler(seed=self.seed)

    def fixed_values(self) -> dict[str, Any]:
        values = self.base.as_dict()
        values.pop("seed")
        return values

    def varied(self) -> tuple[Any, ...]:
        return ()

    def scientific(self) -> tuple[Any, ...]:
        return ()

    def nuisance(self) -> tuple[Any, ...]:
        return ()

    def identity(self) -> dict[str, Any]:
        """What defines the experiment (and its default name): base, changes, replicates, seed, thresholds."""
        return {
            "base": self.fixed_values(),
            "changes": {c.label: dict(c.values) for c in self.changes},
            "replicates": self.replicates,
            "seed": self.seed,
            "thresholds": self.thresholds.as_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        from lstm_sweep.spec import mask_url

        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "sampler": self.sampler,
            "trials": self.trials,
            "cells": self.cells,
            "n_configs": self.n_configs(),
            "n_runs": self.n_runs(),
            "fixed": self.fixed_values(),
            "factors": {},
            "changes": self.labels(),  # a list: MLflow param keys may not contain '=' (labels fully define changes)
            "replicates": self.replicates,
            "seed": self.seed,
            "thresholds": self.thresholds.as_dict(),
            "storage": mask_url(self.storage),
            "tracking_uri": mask_url(self.tracking_uri),
        }


def as_sweep_spec(spec: NeighbourhoodSpec) -> SweepSpec:
    """The driver is typed for SweepSpec but only uses the interface NeighbourhoodSpec provides (duck typing)."""
    return cast("SweepSpec", spec)


def default_name(identity: Mapping[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str)
    return "diagnose-" + hashlib.sha1(blob.encode()).hexdigest()[:8]


# --- reading the neighbourhood back from the study


@dataclass
class NeighbourRow:
    """One change's outcome over its replicates."""

    change: str
    factors: dict[str, Any]
    runs: int
    escaped: int
    median_skill: float | None
    median_escape_epoch: float | None
    verdicts: dict[str, int]
    error: str | None = None
    curves: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def escape_rate(self) -> float:
        return self.escaped / self.runs if self.runs else 0.0

    @property
    def escapes(self) -> bool:
        return self.runs > 0 and self.escape_rate >= ESCAPING_RATE

    def rank(self) -> tuple[float, float, float]:
        """Higher is better: escape rate, then median skill, then an earlier escape."""
        skill = self.median_skill if self.median_skill is not None else -math.inf
        epoch = self.median_escape_epoch if self.median_escape_epoch is not None else math.inf
        return (self.escape_rate, skill, -epoch)

    def to_json(self) -> dict[str, Any]:
        return json_safe(
            {
                "change": self.change,
                "factors": self.factors,
                "runs": self.runs,
                "escaped": self.escaped,
                "escape_rate": self.escape_rate,
                "escapes": self.escapes,
                "median_skill": self.median_skill,
                "median_escape_epoch": self.median_escape_epoch,
                "verdicts": self.verdicts,
                "error": self.error,
            }
        )


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(present)) if present else None


def row_from_records(change: Change, records: Sequence[Mapping[str, Any]]) -> NeighbourRow:
    """Aggregate the per-replicate records the driver keeps on a trial (user attr `replicates`)."""
    verdicts = Counter(str(r["verdict"]) for r in records)
    curves = [
        {
            "val_loss": list((r.get("curve") or {}).get("val_loss") or []),
            "skill": list((r.get("curve") or {}).get("skill") or []),
            "baseline_loss": r.get("baseline_loss"),
        }
        for r in records
    ]
    return NeighbourRow(
        change=change.label,
        factors=change.factors,
        runs=len(records),
        escaped=verdicts["escaped"],
        median_skill=_median([r.get("skill") for r in records]),
        median_escape_epoch=_median([r.get("escape_epoch") for r in records if r.get("verdict") == "escaped"]),
        verdicts={v: verdicts[v] for v in VERDICTS if verdicts[v]},
        curves=curves,
    )


def read_rows(study: optuna.Study, spec: NeighbourhoodSpec) -> list[NeighbourRow]:
    """One row per change, in the spec's order; a change whose trial failed carries the error."""
    from optuna.trial import TrialState

    done: dict[str, NeighbourRow] = {}
    for t in study.get_trials(deepcopy=False):
        label = t.params.get("change")
        if label not in spec.labels():
            continue
        change = spec.change(str(label))
        if t.state == TrialState.COMPLETE:
            done[change.label] = row_from_records(change, t.user_attrs.get("replicates") or [])
        elif t.state == TrialState.FAIL and "error" in t.user_attrs and change.label not in done:
            done[change.label] = NeighbourRow(
                change.label, change.factors, 0, 0, None, None, {}, error=str(t.user_attrs["error"])
            )
    return [done[label] for label in spec.labels() if label in done]


def best_row(rows: Sequence[NeighbourRow], escaping_only: bool = True) -> NeighbourRow | None:
    """The best change (not the original): highest escape rate, then median skill, then earliest escape."""
    candidates = [r for r in rows if r.change != ORIGINAL and r.runs and (r.escapes or not escaping_only)]
    return max(candidates, key=NeighbourRow.rank) if candidates else None


def pair_changes(rows: Sequence[NeighbourRow], base: TrialConfig, pool: int = PAIR_POOL) -> list[Change]:
    """Two-factor changes from the `pool` best single changes (each factor at most once in the pool)."""
    ranked = sorted((r for r in rows if r.change != ORIGINAL and r.runs and len(r.factors) == 1), key=NeighbourRow.rank)
    chosen: list[NeighbourRow] = []
    for row in reversed(ranked):
        if not any(set(row.factors) & set(c.factors) for c in chosen):
            chosen.append(row)
        if len(chosen) == pool:
            break
    pairs = []
    for a, b in itertools.combinations(chosen, 2):
        values = {**a.factors, **b.factors}
        if not _is_noop(base, values):
            pairs.append(Change.of(values))
    return pairs


# --- the diagnosis


@dataclass
class Diagnosis:
    """Everything `diagnose` found: the findings on the configuration and the neighbourhood's table."""

    name: str
    config: TrialConfig
    replicates: int
    verdicts: dict[str, int]
    findings: list[Finding]
    original_curves: list[dict[str, Any]] = field(default_factory=list, repr=False)
    neighbourhood: list[NeighbourRow] = field(default_factory=list)
    pairs: list[NeighbourRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    storage: str = ""
    tracking_uri: str = ""
    interrupted: bool = False

    @property
    def verdict(self) -> str:
        return aggregate_verdict(self.verdicts)

    @property
    def best(self) -> NeighbourRow | None:
        """The best escaping change: a single one if any escapes, else the best escaping pair."""
        return best_row(self.neighbourhood) or best_row(self.pairs)

    def describe_config(self) -> str:
        return describe_config(self.config)

    def header_lines(self) -> list[str]:
        counts = ", ".join(f"{k} {v}" for k, v in self.verdicts.items()) if len(self.verdicts) > 1 else ""
        return [
            f"{self.name}: {self.describe_config()}; {self.replicates} replicates (seeds {self.config.seed}-"
            f"{self.config.seed + self.replicates - 1}) x {self.config.epochs} epochs",
            f"Verdict: {self.verdict} in {self.verdicts.get(self.verdict, 0)}/{self.replicates} replicates"
            + (f" ({counts})" if counts else ""),
            "Findings:" if self.findings else "Findings: none crossed a threshold",
            *(f.line() for f in self.findings),
        ]

    def table_lines(self, rows: Sequence[NeighbourRow], what: str) -> list[str]:
        if not rows:
            return []
        width = max(len("change"), *(len(r.change) for r in rows))
        lines = [
            what,
            f"  {'change':<{width}}  {'escaped':>7}  {'median skill':>12}  {'escape epoch':>12}  verdicts",
        ]
        for r in sorted(rows, key=lambda r: (r.change != ORIGINAL, tuple(-x for x in r.rank()))):
            skill = _skill_text(r.median_skill)
            epoch = "-" if r.median_escape_epoch is None else f"{r.median_escape_epoch:g}"
            verdicts = r.error or ", ".join(f"{k} {v}" for k, v in r.verdicts.items())
            lines.append(f"  {r.change:<{width}}  {f'{r.escaped}/{r.runs}':>7}  {skill:>12}  {epoch:>12}  {verdicts}")
        return lines

    def best_line(self) -> str:
        if not self.neighbourhood:
            return ""
        best = self.best
        if best is None:
            near = best_row([*self.neighbourhood, *self.pairs], escaping_only=False)
            tail = f" (closest: {near.change}, median skill {_skill_text(near.median_skill)})" if near else ""
            return "No single or two-factor change escapes" + tail
        kind = "single" if best in self.neighbourhood else "two-factor"
        epoch = "-" if best.median_escape_epoch is None else f"{best.median_escape_epoch:g}"
        return (
            f"Best {kind} change: {best.change}: escaped {best.escaped}/{best.runs}, median skill "
            f"{_skill_text(best.median_skill)}, median escape epoch {epoch}"
        )

    def neighbourhood_lines(self) -> list[str]:
        lines = self.table_lines(
            self.neighbourhood,
            f"Neighbourhood: one change at a time ({len(self.neighbourhood) - 1} changes x {self.replicates} "
            f"replicates, {self.config.epochs} epochs; escapes = at least {ESCAPING_RATE:.0%} of replicates):",
        )
        if self.pairs:
            lines += self.table_lines(self.pairs, "No single change escapes; pairs of the best single changes:")
        if self.skipped:
            lines.append("Not run: " + "; ".join(self.skipped))
        if line := self.best_line():
            lines.append(line)
        return lines

    def markdown(self) -> str:
        from lstm_sweep.spec import mask_url

        lines = [f"# lstm-sweep diagnosis: {self.name}", ""]
        header = self.header_lines()
        lines += [header[0], "", header[1], "", "## Findings", ""]
        lines += [f.line() for f in self.findings] or ["No finding crossed its threshold."]
        lines += ["", "Thresholds: " + _threshold_text(), ""]
        if self.neighbourhood:
            lines += ["## Neighbourhood", ""]
            lines += _markdown_table(self.neighbourhood, "One change at a time")
            if self.pairs:
                lines += _markdown_table(self.pairs, "No single change escapes: pairs of the best single changes")
            if self.skipped:
                lines += ["Not run: " + "; ".join(self.skipped), ""]
            lines += [self.best_line(), ""]
        lines += ["## Curves", "", "![validation loss and skill per epoch](curves.png)", ""]
        lines += [
            f"Stores: Optuna `{mask_url(self.storage)}` (study `{self.name}`), MLflow `{mask_url(self.tracking_uri)}` "
            f"(experiment `{self.name}`).",
            "",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        from lstm_sweep.spec import mask_url

        best = self.best
        return json_safe(
            {
                "name": self.name,
                "config": self.config.as_dict(),
                "replicates": self.replicates,
                "verdict": self.verdict,
                "verdicts": self.verdicts,
                "findings": [f.to_json() for f in self.findings],
                "neighbourhood": [r.to_json() for r in self.neighbourhood],
                "pairs": [r.to_json() for r in self.pairs],
                "best_change": best.to_json() if best else None,
                "skipped": self.skipped,
                "files": self.files,
                "storage": mask_url(self.storage),
                "tracking_uri": mask_url(self.tracking_uri),
                "interrupted": self.interrupted,
            }
        )


def describe_config(config: TrialConfig) -> str:
    """The configuration as the seed's plus what differs from it."""
    seed = SEED_CONFIG.as_dict()
    diff = [f"{k}={_value_text(v)}" for k, v in config.as_dict().items() if k != "seed" and v != seed.get(k)]
    return "the seed configuration" + (" with " + ", ".join(diff) if diff else "")


def _threshold_text() -> str:
    return (
        f"loss within {BASELINE_TOLERANCE:.0%} of the baseline; saturation above {SATURATION_FRACTION:.0%}; "
        f"noise/gradient above {NOISE_DOMINANCE:g}; still falling = each of the last {STILL_FALLING_EPOCHS} epochs "
        f"down by at least {STILL_FALLING_MIN_DROP:.1%}; unstable = final loss {UNSTABLE_RATIO:g}x its best; a "
        f"change escapes when at least {ESCAPING_RATE:.0%} of its replicates do."
    )


def _markdown_table(rows: Sequence[NeighbourRow], title: str) -> list[str]:
    lines = [f"{title}:", "", "| change | escaped | escape rate | median skill | median escape epoch | verdicts |"]
    lines.append("|---|---:|---:|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (r.change != ORIGINAL, tuple(-x for x in r.rank()))):
        skill = _skill_text(r.median_skill)
        epoch = "-" if r.median_escape_epoch is None else f"{r.median_escape_epoch:g}"
        verdicts = r.error or ", ".join(f"{k} {v}" for k, v in r.verdicts.items())
        lines.append(f"| `{r.change}` | {r.escaped}/{r.runs} | {r.escape_rate:.0%} | {skill} | {epoch} | {verdicts} |")
    return [*lines, ""]


def json_safe(value: Any) -> Any:
    """JSON has no inf/nan: those become strings (as the `seed --json` output does)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# --- curves


def curves_of(results: Sequence[TrialResult]) -> list[dict[str, Any]]:
    return [
        {
            "val_loss": [r["val_loss"] for r in result.history],
            "skill": [r["skill"] for r in result.history],
            "baseline_loss": result.final["baseline_loss"],
        }
        for result in results
    ]


def curves_png(left: Sequence[Mapping[str, Any]], right: Sequence[Mapping[str, Any]], titles: Sequence[str]) -> bytes:
    """Validation loss (top) and skill (bottom) per epoch, original (left) beside a neighbour (right), one line
    per replicate. Figure API only (no pyplot: safe off the main thread, no display needed)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = [c for c in (left, right) if c]
    fig = Figure(figsize=(5 * max(len(columns), 1), 5.2), dpi=90)
    axes = fig.subplots(2, max(len(columns), 1), squeeze=False)
    for col, (curves, title) in enumerate(zip(columns, titles, strict=False)):
        ax_loss, ax_skill = axes[0][col], axes[1][col]
        for i, curve in enumerate(curves):
            loss = np.array([math.nan if v is None else float(v) for v in curve["val_loss"]], dtype=float)
            skill = np.array([math.nan if v is None else float(v) for v in curve["skill"]], dtype=float)
            loss[~np.isfinite(loss)] = math.nan
            skill = np.where(
                np.isfinite(skill), np.maximum(skill, SKILL_FLOOR), np.where(np.isnan(skill), math.nan, SKILL_FLOOR)
            )
            ax_loss.plot(np.arange(1, len(loss) + 1), loss, lw=1.2, color=f"C{i % 10}", label=f"replicate {i}")
            ax_skill.plot(np.arange(1, len(skill) + 1), skill, lw=1.2, color=f"C{i % 10}")
        baseline = curves[0].get("baseline_loss") if curves else None
        if baseline is not None and math.isfinite(float(baseline)):
            ax_loss.axhline(float(baseline), color="grey", ls="--", lw=1, label="trivial baseline")
        if ax_loss.has_data() and all(
            (v is None or not math.isfinite(float(v)) or float(v) > 0) for c in curves for v in c["val_loss"]
        ):
            ax_loss.set_yscale("log")
        ax_loss.set_title(title, fontsize=9)
        ax_loss.set_ylabel("validation loss")
        ax_loss.legend(fontsize=7)
        ax_skill.axhline(0.0, color="grey", ls="--", lw=1)
        ax_skill.set_ylim(-1.05, 1.05)
        ax_skill.set_xlabel("epoch")
        for ax in (ax_loss, ax_skill):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_skill.set_ylabel("skill (floored at -1)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# --- planning and running


@dataclass(frozen=True)
class Plan:
    """A validated diagnosis: the neighbourhood spec (whose first cell is the original) and what was left out."""

    spec: NeighbourhoodSpec
    neighbourhood: bool
    skipped: tuple[str, ...]
    sweep_file_text: str | None = None


def plan_diagnosis(
    overrides: Mapping[str, Any],
    *,
    sweep_file: str | None = None,
    replicates: int | None = None,
    name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    neighbourhood: bool = True,
) -> Plan:
    """Resolve the base configuration (seed's, or a sweep file's fixed values, plus options) and its changes.

    Everything that can be wrong with the input is raised here as a ConfigError, before anything trains.
    """
    from lstm_sweep.spec import (
        DEFAULT_TRACKING_URI,
        NAME_MAX_LENGTH,
        default_storage,
        is_valid_name,
        load_sweep,
        name_allowed,
    )

    # the pairs stage's study is <name>-pairs: leave room for the suffix so that name is within the limit too
    max_length = NAME_MAX_LENGTH - len(PAIRS_SUFFIX)
    if name is not None and not is_valid_name(name, max_length):
        raise ConfigError("name", name, name_allowed(max_length))
    thresholds = Thresholds()
    text = None
    if sweep_file is not None:
        sweep = load_sweep(sweep_file)
        text = Path(sweep_file).read_text(encoding="utf-8")
        values = {**sweep.fixed_values(), "seed": sweep.seed, **overrides}
        base = TrialConfig.from_mapping(values, source=sweep_file)
        thresholds = sweep.thresholds
        n = replicates or sweep.replicates
        storage = storage or (None if sweep.storage == default_storage(sweep.name) else sweep.storage)
        tracking_uri = tracking_uri or sweep.tracking_uri
        alternatives = file_alternatives(sweep, base)
    else:
        base = TrialConfig.from_mapping({**SEED_CONFIG.as_dict(), **overrides})
        n = replicates or DEFAULT_REPLICATES
        alternatives = default_alternatives(base)
    if not 1 <= n <= 100:
        raise ConfigError("replicates", n, "an integer from 1 to 100")
    seeds = [base.seed + r for r in range(n)]
    base.replace(seed=seeds[-1])  # the last replicate's seed must be valid too
    build_data(base)  # a data layout that does not fit (e.g. batch_size * seq_len) is a usage error here
    changes, skipped = single_changes(base, alternatives, seeds)
    spec = NeighbourhoodSpec(
        name="pending",
        base=base.replace(seed=seeds[0]),
        changes=(Change(ORIGINAL, ()), *changes),
        replicates=n,
        seed=seeds[0],
        thresholds=thresholds,
        storage="",
        tracking_uri="",
        source=sweep_file or "diagnose",
    )
    name = name or default_name(spec.identity())
    spec = dataclasses.replace(
        spec,
        name=name,
        storage=storage or default_storage(name),
        tracking_uri=tracking_uri or DEFAULT_TRACKING_URI,
        description=f"diagnose: one-factor-at-a-time neighbourhood of {describe_config(base)}",
    )
    return Plan(spec=spec, neighbourhood=neighbourhood, skipped=tuple(skipped), sweep_file_text=text)


class _Capture:
    """A driver sink that keeps every finished TrialResult (full per-epoch records) in memory."""

    def __init__(self) -> None:
        self.results: list[TrialResult] = []

    def log_replicate(
        self, result: TrialResult, *, trial_number: int, config_id: str, replicate: int, params: Mapping[str, Any]
    ) -> str | None:
        self.results.append(result)
        return None


def _run_stage(
    spec: NeighbourhoodSpec,
    tracker: Any,
    *,
    trials: int | None,
    progress: bool,
    capture: _Capture | None = None,
) -> bool:
    """Run (or resume) part of a neighbourhood sweep; True when it was interrupted."""
    from lstm_sweep.driver import planned_trials, run_sweep
    from lstm_sweep.progress import SweepProgress

    sweep = as_sweep_spec(spec)
    sinks: list[Any] = [s for s in (tracker, capture) if s is not None]
    total = planned_trials(sweep, trials)
    with SweepProgress(total, enabled=progress) as bar:
        outcome = run_sweep(sweep, storage_url=spec.storage, trials=trials, sinks=sinks, on_trial=bar.update)
    return outcome.interrupted


def _open_tracker(spec: NeighbourhoodSpec, text: str | None) -> Any:
    from lstm_sweep.driver import open_study
    from lstm_sweep.metrics import EPOCH_METRICS
    from lstm_sweep.tracking import SweepTracker

    open_study(as_sweep_spec(spec), spec.storage)  # refuses a name taken by a different experiment, before MLflow
    tracker = SweepTracker(spec.tracking_uri, spec.name, EPOCH_METRICS)  # diagnostics are the point: chart them all
    tracker.start_sweep(spec.to_dict(), text)
    return tracker


def run_diagnosis(
    plan: Plan,
    *,
    on_findings: Callable[[Diagnosis], None] | None = None,
    progress: bool = False,
    out_root: Path = Path("results"),
) -> Diagnosis:
    """Train the original (tracked, as the sweep's first cell), find what its diagnostics show, then run the
    neighbourhood (and pairs when no single change escapes), write the files and attach them to MLflow."""
    from lstm_sweep.driver import open_study

    spec = plan.spec
    tracker = _open_tracker(spec, plan.sweep_file_text)
    trackers = [tracker]
    status = "FAILED"
    try:
        capture = _Capture()
        interrupted = _run_stage(spec, tracker, trials=1, progress=False, capture=capture)
        wanted = [spec.config_for({"change": ORIGINAL}, r) for r in range(spec.replicates)]
        found = {i: r for r in capture.results for i, c in enumerate(wanted) if r.config == c}
        if len(found) == len(wanted):
            original = [found[i] for i in range(len(wanted))]
        elif interrupted:
            raise KeyboardInterrupt  # Ctrl-C before the original finished: nothing to diagnose yet
        else:  # its runs were tracked by an earlier call: train them again, untracked, as the sweep trained them
            original = train_population(
                wanted, thresholds=spec.thresholds, layout_runs=spec.n_runs(), parts=spec.step_parts()
            )
        data = build_data(wanted[0])
        diagnosis = Diagnosis(
            name=spec.name,
            config=wanted[0],
            replicates=spec.replicates,
            verdicts=verdict_counts(original),
            findings=findings(original, data),
            original_curves=curves_of(original),
            skipped=list(plan.skipped),
            storage=spec.storage,
            tracking_uri=spec.tracking_uri,
            interrupted=interrupted,
        )
        if on_findings is not None:
            on_findings(diagnosis)
        if plan.neighbourhood and not interrupted:
            diagnosis.interrupted = _run_stage(spec, tracker, trials=None, progress=progress)
            diagnosis.neighbourhood = read_rows(open_study(as_sweep_spec(spec), spec.storage), spec)
            if not diagnosis.interrupted and best_row(diagnosis.neighbourhood) is None:
                pairs = pair_changes(diagnosis.neighbourhood, spec.base)
                if pairs:
                    pair_spec = dataclasses.replace(
                        spec,
                        name=spec.name + PAIRS_SUFFIX,
                        changes=tuple(pairs),
                        description=f"diagnose: two-factor changes for {spec.name}",
                    )
                    pair_tracker = _open_tracker(pair_spec, plan.sweep_file_text)
                    trackers.append(pair_tracker)
                    diagnosis.interrupted = _run_stage(pair_spec, pair_tracker, trials=None, progress=progress)
                    diagnosis.pairs = read_rows(open_study(as_sweep_spec(pair_spec), pair_spec.storage), pair_spec)
        diagnosis.files = [str(p) for p in write_files(diagnosis, out_root / spec.name)]
        parent = tracker.parent_run_id
        if parent:
            for path in diagnosis.files:
                tracker.client.log_artifact(parent, path, artifact_path="diagnosis")
        status = "KILLED" if diagnosis.interrupted else "FINISHED"
        return diagnosis
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for t in trackers:
            t.end_sweep(status)


def write_files(diagnosis: Diagnosis, out_dir: Path) -> list[Path]:
    """diagnosis.md and curves.png (original beside the best escaping neighbour, else the closest one)."""
    best = diagnosis.best
    label = "best escaping neighbour"
    if best is None:
        best = best_row([*diagnosis.neighbourhood, *diagnosis.pairs], escaping_only=False)
        label = "closest neighbour (did not escape)"
    titles = [f"original: {diagnosis.verdict} ({diagnosis.replicates} replicates)"]
    right: list[dict[str, Any]] = []
    if best is not None:
        right = best.curves
        titles.append(f"{label}: {best.change}")
    png = curves_png(diagnosis.original_curves, right, titles)
    md = out_dir / "diagnosis.md"
    png_path = out_dir / "curves.png"
    write_atomic(png_path, png)
    write_atomic(md, diagnosis.markdown().encode())
    return [md, png_path]
