"""The training loop: a plain function from configuration to result.

It knows nothing of Optuna or MLflow; whoever wants per-epoch records passes a callback. Whole epochs run inside
one compiled TF function, and several configurations that share a data layout can train as one population.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_sweep import metrics
from lstm_sweep.config import TrialConfig
from lstm_sweep.errors import ConfigError
from lstm_sweep.metrics import WEIGHT_GROUPS, Measures, Thresholds
from lstm_sweep.step_parts import StepParts
from lstm_sweep.tasks import SequenceData, build_data

if TYPE_CHECKING:
    from lstm_sweep.population import Population  # builds TF graphs: imported when something trains

LAYOUT_FIELDS = (
    "task",
    "delay",
    "text_path",
    "stream_length",
    "val_fraction",
    "data_seed",
    "input_encoding",
    "output_framing",
    "target_scale",
    "seq_len",
    "num_layers",
    "batch_size",
    "epochs",
    "stateful",
)
SAMPLE_LENGTH = 40
RECORD_KEYS = (
    "epoch",
    *metrics.EPOCH_METRICS,
    "baseline_loss",
    "majority_rate",
)  # what every per-epoch record holds (callbacks, MLflow metrics, stored curves)


def layout_key(config: TrialConfig) -> tuple[Any, ...]:
    """Configurations with equal keys share data and graph shape and can train as one population."""
    return tuple(getattr(config, name) for name in LAYOUT_FIELDS)


def graph_shape(data: SequenceData, layout: TrialConfig) -> tuple[Any, ...]:
    """What of a layout shapes its compiled graph: layouts that agree share one (raw and scaled inputs, say)."""
    return (
        data.train.x.shape,
        data.train.y.shape,
        data.val.x.shape,
        data.num_classes,
        layout.output_framing,
        layout.stateful,
        layout.num_layers,
    )


def lone_graph_key(config: TrialConfig) -> tuple[Any, ...]:
    """The compiled epoch a run trains on alone: runs with equal keys reuse one, so a worker that trains them all
    compiles it once (`Population.shape_key` for one member; a sweep gives all its jobs the same step parts)."""
    return (*graph_shape(build_data(config), config), config.state_size)


class TrainerCallback:
    """Hooks called by the trainer; subclass and override what you need (all no-ops by default)."""

    def on_epoch_end(self, member: int, record: dict[str, float]) -> None:
        """After each epoch, once per member, with that epoch's measures and diagnostics."""

    def on_train_end(self, member: int, result: TrialResult) -> None:
        """Once per member when its training is over."""


@dataclass
class TrialResult:
    """One training run: its curves, final measures, verdict and a seed-style sample."""

    config: TrialConfig
    history: list[dict[str, float]]
    verdict: metrics.Verdict
    escape_epoch: int | None
    diverged_step: int | None
    actual: str
    pred: str
    seconds: float
    thresholds: Thresholds = field(default_factory=Thresholds)
    artifacts: dict[str, bytes] = field(default_factory=dict)  # files drawn ahead for tracking (curves.png)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1]

    def summary(self) -> dict[str, Any]:
        """Flat JSON-ready dict of the final state (what the `seed --json` command prints)."""
        final = self.final
        return {
            "loss": final["val_loss"],
            "train_loss": final["train_loss"],
            "baseline_loss": final["baseline_loss"],
            "skill": final["skill"],
            "symbol_accuracy": final["symbol_accuracy"],
            "majority_rate": final["majority_rate"],
            "distinct_symbols": int(final["distinct_symbols"]),
            "pred_std_ratio": None if math.isnan(final["pred_std_ratio"]) else final["pred_std_ratio"],
            "verdict": self.verdict,
            "escape_epoch": self.escape_epoch,
            "diverged_step": self.diverged_step,
            "epochs": len(self.history),
            "actual": self.actual,
            "pred": self.pred,
            "seconds": round(self.seconds, 3),
        }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Reference:
    """What every member of a population is measured against: fixed by the data, so computed once."""

    baseline_loss: float
    majority_rate: float

    @classmethod
    def of(cls, data: SequenceData, regression: bool) -> Reference:
        val = data.val
        if regression:
            baseline = metrics.regression_baseline(data.train.y, val.y)
        else:
            baseline = metrics.classification_baseline(data.class_prior, val.labels)
        return cls(baseline, metrics.majority_rate(val.labels))


def measure(
    data: SequenceData, outputs: np.ndarray, regression: bool, reference: Reference
) -> tuple[Measures, np.ndarray]:
    """Validation measures for one member; outputs (steps, lanes, time, outputs). Also returns decoded symbols."""
    val = data.val
    with np.errstate(all="ignore"):
        out64 = outputs.astype(np.float64)
        if regression:
            pred_values = out64[..., 0]
            loss = float(np.mean((pred_values - val.y) ** 2))
            predicted = data.decode_regression(np.nan_to_num(pred_values, nan=0.0, posinf=1e30, neginf=-1e30))
            ratio: float | None = metrics.std_ratio(np.nan_to_num(pred_values), val.y)
        else:
            logp = _log_softmax(out64)
            loss = float(-np.mean(np.take_along_axis(logp, val.labels[..., None], axis=-1)))
            predicted = np.nan_to_num(out64, nan=0.0).argmax(axis=-1)
            ratio = None
    if not math.isfinite(loss):
        loss = math.inf
    accuracy = metrics.symbol_accuracy(predicted, val.labels)
    m = Measures(
        loss=loss,
        baseline_loss=reference.baseline_loss,
        skill=metrics.skill(loss, reference.baseline_loss),
        symbol_accuracy=accuracy,
        majority_rate=reference.majority_rate,
        distinct_symbols=metrics.distinct_symbols(predicted),
        pred_std_ratio=ratio,
    )
    return m, predicted


def _hidden_spread(hidden: np.ndarray, units: int) -> float:
    """Std of each real unit's hidden state across validation inputs, averaged over units."""
    flat = hidden[..., :units].reshape(-1, units)
    return float(np.mean(np.std(flat, axis=0)))


_POPULATIONS: dict[tuple[Any, ...], Population] = {}


def _population_shape(
    configs: Sequence[TrialConfig], layout_runs: int
) -> tuple[SequenceData, int, bool, tuple[Any, ...]]:
    """The data, padded size, XLA choice and `Population.shape_key` of the population that trains `configs`."""
    from lstm_sweep.population import Population, uses_xla

    layout = configs[0]
    max_units = max(c.state_size for c in configs)
    data = build_data(layout)
    xla = uses_xla(layout, max(layout_runs, len(configs)))
    return data, max_units, xla, Population.shape_key(data, layout, len(configs), max_units, xla)


def population_graph_key(
    configs: Sequence[TrialConfig], layout_runs: int = 1, parts: StepParts | None = None
) -> tuple[Any, ...]:
    """The compiled epoch `train_population(configs, layout_runs=..., parts=...)` trains on: equal keys share one
    compile (one set of variables per shape, one compiled epoch per shape and step parts)."""
    return (*_population_shape(configs, layout_runs)[3], parts_for(configs, parts))


def parts_for(configs: Sequence[TrialConfig], parts: StepParts | None) -> StepParts:
    """The step parts a population compiles: those asked for, and whatever its members need besides (a sweep's
    parts cover its runs, so there this adds nothing; were one missing, the run would still train correctly, on a
    compiled epoch of its own)."""
    needed = StepParts.of(configs)
    return needed if parts is None else parts.union(needed)


def _population_for(configs: Sequence[TrialConfig], layout_runs: int) -> Population:
    from lstm_sweep.population import Population

    data, max_units, xla, key = _population_shape(configs, layout_runs)
    pop = _POPULATIONS.get(key)
    if pop is None:
        if len(_POPULATIONS) > 32:
            _POPULATIONS.clear()
        pop = Population(data, configs[0], len(configs), max_units, xla=xla)
        _POPULATIONS[key] = pop
    pop.use_data(data)
    return pop


def train_population(
    configs: Sequence[TrialConfig],
    callbacks: Sequence[TrainerCallback] = (),
    thresholds: Thresholds | None = None,
    layout_runs: int = 1,
    parts: StepParts | None = None,
) -> list[TrialResult]:
    """Train configurations that share one data layout together; one result per configuration, in order.

    layout_runs: how many runs of this layout the caller will train with one graph, these included (a sweep
    passes the runs its file plans); with many, the graph is compiled by XLA, which costs more up front and less
    per run (`population.uses_xla`).
    parts: optional step parts to compile besides those the members need (a sweep passes what any of its runs
    may need, so that its runs of one shape share one compiled epoch).
    """
    if not configs:
        return []
    thresholds = thresholds or Thresholds()
    key = layout_key(configs[0])
    for c in configs[1:]:
        if layout_key(c) != key:
            diff = [n for n, a, b in zip(LAYOUT_FIELDS, key, layout_key(c), strict=True) if a != b]
            raise ConfigError("population", diff, "members that share " + ", ".join(LAYOUT_FIELDS))
    started = time.perf_counter()
    pop = _population_for(configs, layout_runs)
    pop.load(configs, parts_for(configs, parts))
    data = pop.data
    reference = Reference.of(data, pop.regression)
    histories: list[list[dict[str, float]]] = [[] for _ in configs]
    per_epoch: list[list[Measures]] = [[] for _ in configs]
    predicted_last: list[np.ndarray] = [np.zeros(0, np.int64) for _ in configs]
    for epoch in range(1, configs[0].epochs + 1):
        stats = {k: v.numpy() for k, v in pop.train_epoch().items()}
        ev = {k: v.numpy() for k, v in pop.evaluate().items()}
        outputs = np.moveaxis(ev["outputs"], 1, 0)  # (members, steps, lanes, time, outputs)
        hidden = np.moveaxis(ev["hidden"], 1, 0)
        alive = pop.alive.numpy()
        for i, c in enumerate(configs):
            m, predicted = measure(data, outputs[i], pop.regression, reference)
            if not alive[i]:
                m = dataclasses.replace(m, loss=math.inf, skill=-math.inf)
            per_epoch[i].append(m)
            predicted_last[i] = predicted
            record: dict[str, float] = {"epoch": epoch, "train_loss": float(stats["train_loss"][i])}
            if not alive[i]:
                record["train_loss"] = math.inf
            record |= {
                "val_loss": m.loss,
                "baseline_loss": m.baseline_loss,
                "skill": m.skill,
                "symbol_accuracy": m.symbol_accuracy,
                "majority_rate": m.majority_rate,
                "accuracy_lift": m.accuracy_lift,
                "distinct_symbols": float(m.distinct_symbols),
                "pred_std_ratio": m.pred_std_ratio if m.pred_std_ratio is not None else math.nan,
                "gate_saturation": float(ev["saturation"][i]),
                "hidden_spread": _hidden_spread(hidden[i], c.state_size),
                "noise_to_grad": float(stats["noise_to_grad"][i]),
            }
            for g, name in enumerate(WEIGHT_GROUPS):
                record[f"grad_norm_{name}"] = float(stats["grad_norms"][i, g])
            histories[i].append(record)
            for cb in callbacks:
                cb.on_epoch_end(i, record)
        if not alive.any():
            break
    seconds = time.perf_counter() - started
    diverged_steps = pop.diverged_step.numpy()
    results = []
    actual = data.text(data.val.stream_order(data.val.labels)[:SAMPLE_LENGTH])
    for i, c in enumerate(configs):
        last = per_epoch[i][-1]
        step = int(diverged_steps[i])
        result = TrialResult(
            config=c,
            history=histories[i],
            verdict=metrics.verdict(last, thresholds, ever_non_finite=step >= 0),
            escape_epoch=metrics.escape_epoch(per_epoch[i], thresholds),
            diverged_step=step if step >= 0 else None,
            actual=actual,
            pred=data.text(data.val.stream_order(predicted_last[i])[:SAMPLE_LENGTH]),
            seconds=seconds / len(configs),
            thresholds=thresholds,
        )
        results.append(result)
        for cb in callbacks:
            cb.on_train_end(i, result)
    return results


def train(
    config: TrialConfig,
    callbacks: Sequence[TrainerCallback] = (),
    thresholds: Thresholds | None = None,
    layout_runs: int = 1,
) -> TrialResult:
    """Train one configuration; the plain entry point for notebooks and tests (`layout_runs` as for
    `train_population`)."""
    return train_population([config], callbacks, thresholds, layout_runs)[0]
