"""The training loop: a plain function from configuration to result.

It knows nothing of Optuna or MLflow; whoever wants per-epoch records passes a callback. Whole epochs run inside
one compiled TF function, and several configurations that share a data layout can train as one population.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from lstm_sweep import metrics
from lstm_sweep.config import TrialConfig
from lstm_sweep.errors import ConfigError
from lstm_sweep.metrics import Measures, Thresholds
from lstm_sweep.model import (
    WEIGHT_GROUPS,
    Architecture,
    LayerState,
    forward,
    init_member,
    param_coords,
    param_masks,
    weight_group,
    zero_state,
)
from lstm_sweep.noise import gaussian, seed_noise
from lstm_sweep.tasks import SequenceData, build_data

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
    "train_loss",
    "val_loss",
    "baseline_loss",
    "skill",
    "symbol_accuracy",
    "majority_rate",
    "accuracy_lift",
    "distinct_symbols",
    "pred_std_ratio",
    "gate_saturation",
    "hidden_spread",
    "noise_to_grad",
    *(f"grad_norm_{group}" for group in WEIGHT_GROUPS),
)  # what every per-epoch record holds (callbacks, MLflow metrics, stored curves)
ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.9, 0.999, 1e-7
ANNEAL_GAMMA = 0.55


def layout_key(config: TrialConfig) -> tuple[Any, ...]:
    """Configurations with equal keys share data and graph shape and can train as one population."""
    return tuple(getattr(config, name) for name in LAYOUT_FIELDS)


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


class Population:
    """TF variables and compiled functions for members sharing one data layout; reusable via `load`."""

    def __init__(self, data: SequenceData, layout: TrialConfig, members: int, max_units: int) -> None:
        self.data = data
        self.layout = layout
        self.members = members
        self.regression = layout.output_framing == "regression"
        self.stateful = layout.stateful
        self.arch = Architecture(
            num_features=data.num_features,
            num_outputs=1 if self.regression else data.num_classes,
            num_layers=layout.num_layers,
            max_units=max_units,
        )
        shapes = self.arch.param_shapes()
        self.names = self.arch.param_names()

        def var(shape: tuple[int, ...], dtype: tf.DType = tf.float32) -> tf.Variable:
            return tf.Variable(tf.zeros((members, *shape), dtype), trainable=False)

        self.params = {n: var(shapes[n]) for n in self.names}
        self.masks = {n: var(shapes[n]) for n in self.names}
        self.slots = {kind: {n: var(shapes[n]) for n in self.names} for kind in ("velocity", "adam_m", "adam_v")}
        self.coords = {n: tf.constant(c) for n, c in param_coords(self.arch).items()}
        self.hyper = {
            k: var(())
            for k in (
                "learning_rate",
                "momentum",
                "adam",
                "grad_noise",
                "annealed",
                "grad_clip",
                "frozen",
                "forget_bias",
            )
        }
        self.seeds = var((), tf.uint32)
        self.unit_mask = var((max_units,))
        self.alive = tf.Variable(tf.ones((members,), tf.bool), trainable=False)
        self.diverged_step = tf.Variable(tf.fill((members,), tf.constant(-1, tf.int64)), trainable=False)
        self.step = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        self.train_x = tf.constant(data.train.x)
        self.train_y = tf.constant(data.train.y)
        self.train_labels = tf.constant(data.train.labels)
        self.val_x = tf.constant(data.val.x)

    def load(self, configs: Sequence[TrialConfig]) -> None:
        """Reset every variable to the given members' initial state."""
        if len(configs) != self.members:
            raise ValueError(f"population of {self.members} loaded with {len(configs)} configurations")
        inits = [init_member(self.arch, c.state_size, c.seed) for c in configs]
        masks = [param_masks(self.arch, c.state_size) for c in configs]
        for name in self.names:
            self.params[name].assign(np.stack([i[name] for i in inits]))
            self.masks[name].assign(np.stack([m[name] for m in masks]))
            for slot in self.slots.values():
                slot[name].assign(tf.zeros_like(slot[name]))
        values = {
            "learning_rate": [c.learning_rate for c in configs],
            "momentum": [c.momentum for c in configs],
            "adam": [c.optimizer == "adam" for c in configs],
            "grad_noise": [c.grad_noise for c in configs],
            "annealed": [c.grad_noise_schedule == "annealed" for c in configs],
            "grad_clip": [c.grad_clip for c in configs],
            "frozen": [c.recurrent_training == "readout_only" for c in configs],
            "forget_bias": [c.forget_bias for c in configs],
        }
        for key, vals in values.items():
            self.hyper[key].assign(np.asarray(vals, np.float32))
        self.seeds.assign(np.asarray([c.seed for c in configs], np.uint32))
        units = np.arange(self.arch.max_units)
        self.unit_mask.assign(np.stack([units < c.state_size for c in configs]).astype(np.float32))
        self.alive.assign(tf.ones((self.members,), tf.bool))
        self.diverged_step.assign(tf.fill((self.members,), tf.constant(-1, tf.int64)))
        self.step.assign(0)

    def _loss(self, outputs: tf.Tensor, y: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        if self.regression:
            return tf.reduce_mean(tf.square(outputs[..., 0] - y[None]), axis=[1, 2])
        labels = tf.broadcast_to(labels[None], tf.shape(outputs)[:-1])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=outputs)
        return tf.reduce_mean(ce, axis=[1, 2])

    def _per_member(self, t: tf.Tensor, reduce: Any = tf.reduce_sum) -> tf.Tensor:
        return reduce(tf.reshape(t, (self.members, -1)), axis=1)

    def _expand(self, v: tf.Tensor, like: tf.Variable) -> tf.Tensor:
        return tf.reshape(v, [-1] + [1] * (len(like.shape) - 1))

    def _momentum_step(self, name: str, g: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
        """TF1 MomentumOptimizer: accumulator = momentum * accumulator + g; the update is the accumulator."""
        vel = self.slots["velocity"][name]
        new_vel = self._expand(self.hyper["momentum"], vel) * vel + g
        vel.assign(tf.where(keep, new_vel, vel))
        return new_vel

    def _adam_step(self, name: str, g: tf.Tensor, keep: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        m = self.slots["adam_m"][name]
        sv = self.slots["adam_v"][name]
        new_m = ADAM_BETA1 * m + (1 - ADAM_BETA1) * g
        new_sv = ADAM_BETA2 * sv + (1 - ADAM_BETA2) * tf.square(g)
        m.assign(tf.where(keep, new_m, m))
        sv.assign(tf.where(keep, new_sv, sv))
        return (new_m / (1 - ADAM_BETA1**t)) / (tf.sqrt(new_sv / (1 - ADAM_BETA2**t)) + ADAM_EPSILON)

    @tf.function
    def train_epoch(self) -> dict[str, tf.Tensor]:
        """One pass over the training stream; returns per-member sums for the epoch's diagnostics."""
        p = self.members
        steps = self.train_x.shape[0]
        lanes = self.train_x.shape[1]
        params = [self.params[n] for n in self.names]
        loss_sum = tf.zeros((p,))
        group_sums = tf.zeros((p, len(WEIGHT_GROUPS)))
        ratio_sum = tf.zeros((p,))
        state: list[LayerState] = zero_state(self.arch, p, lanes)
        h = self.hyper
        for s in tf.range(steps):
            if not self.stateful:
                state = zero_state(self.arch, p, lanes)
            with tf.GradientTape() as tape:
                tape.watch(params)
                param_map = dict(zip(self.names, params, strict=True))
                out, state, _, _, _ = forward(
                    self.arch, param_map, self.train_x[s], state, h["forget_bias"], self.unit_mask, with_stats=False
                )
                loss = self._loss(out, self.train_y[s], self.train_labels[s])
                total = tf.reduce_sum(tf.where(tf.math.is_finite(loss), loss, 0.0))
            state = [(tf.stop_gradient(a), tf.stop_gradient(b)) for a, b in state]
            grads = tape.gradient(total, params)
            self.step.assign_add(1)
            step_u32 = tf.cast(self.step, tf.uint32)
            finite = tf.math.is_finite(loss)
            for g in grads:
                finite &= tf.reduce_all(tf.reshape(tf.math.is_finite(g), (p, -1)), axis=1)
            newly_dead = self.alive & ~finite
            self.diverged_step.assign(tf.where(newly_dead, self.step, self.diverged_step))
            self.alive.assign(self.alive & finite)
            alive = self.alive

            sq_groups = {g: tf.zeros((p,)) for g in WEIGHT_GROUPS}
            noisy = []
            noise_sq = tf.zeros((p,))
            grad_sq = tf.zeros((p,))
            anneal_std = tf.sqrt(h["grad_noise"] / tf.pow(1.0 + tf.cast(self.step - 1, tf.float32), ANNEAL_GAMMA))
            # Hashing noise for every weight is the costliest part of a step: skip a schedule no member uses.
            noisy_member = alive & (h["grad_noise"] > 0)
            any_seed = tf.reduce_any(noisy_member & (h["annealed"] < 0.5))
            any_annealed = tf.reduce_any(noisy_member & (h["annealed"] > 0.5))
            for i, (name, g) in enumerate(zip(self.names, grads, strict=True)):
                v = self.params[name]
                mask = self.masks[name]
                g = tf.where(tf.math.is_finite(g), g, 0.0)
                if weight_group(name) != "readout":
                    mask = mask * self._expand(1.0 - h["frozen"], v)
                g = g * mask
                sq = self._per_member(tf.square(g))
                sq_groups[weight_group(name)] += sq
                grad_sq += sq
                mean_abs = self._per_member(tf.abs(v) * self.masks[name]) / tf.maximum(
                    self._per_member(self.masks[name]), 1.0
                )
                noise_scale = self._expand(mean_abs * h["grad_noise"], v)
                coords = self.coords[name]
                uniform = tf.cond(
                    any_seed,
                    lambda i=i, coords=coords, noise_scale=noise_scale, step=step_u32: seed_noise(
                        self.seeds, step, i, coords, noise_scale
                    ),
                    lambda v=v: tf.zeros_like(v),
                )
                annealed_scale = self._expand(anneal_std, v)
                normal = tf.cond(
                    any_annealed,
                    lambda i=i, coords=coords, s=annealed_scale, step=step_u32: (
                        gaussian(self.seeds, step, i, coords) * s
                    ),
                    lambda v=v: tf.zeros_like(v),
                )
                noise = tf.where(self._expand(h["annealed"] > 0.5, v), normal, uniform) * mask
                noise_sq += self._per_member(tf.square(noise))
                noisy.append(g + noise)
            total_sq = tf.add_n([self._per_member(tf.square(g)) for g in noisy])
            norm = tf.sqrt(total_sq)
            clip = h["grad_clip"]
            scale = tf.where(clip > 0, tf.minimum(1.0, clip / tf.maximum(norm, 1e-12)), 1.0)
            t = tf.cast(self.step, tf.float32)
            # Each optimizer's slot arithmetic is a few passes over every weight: run only the ones in use.
            any_adam = tf.reduce_any(h["adam"] > 0.5)
            any_momentum = tf.reduce_any(h["adam"] < 0.5)
            for name, g in zip(self.names, noisy, strict=True):
                v = self.params[name]
                g = g * self._expand(scale, v)
                keep = self._expand(alive, v)
                momentum_update = tf.cond(
                    any_momentum,
                    lambda name=name, g=g, keep=keep: self._momentum_step(name, g, keep),
                    lambda v=v: tf.zeros_like(v),
                )
                adam_update = tf.cond(
                    any_adam,
                    lambda name=name, g=g, keep=keep, t=t: self._adam_step(name, g, keep, t),
                    lambda v=v: tf.zeros_like(v),
                )
                update = tf.where(self._expand(h["adam"] > 0.5, v), adam_update, momentum_update)
                v.assign(tf.where(keep, v - self._expand(h["learning_rate"], v) * update, v))
            loss_sum += tf.where(finite, loss, 0.0)
            group_sums += tf.sqrt(tf.stack([sq_groups[g] for g in WEIGHT_GROUPS], axis=1))
            ratio_sum += tf.sqrt(noise_sq) / tf.maximum(tf.sqrt(grad_sq), 1e-12)
        n = float(steps)
        return {"train_loss": loss_sum / n, "grad_norms": group_sums / n, "noise_to_grad": ratio_sum / n}

    @tf.function
    def evaluate(self) -> dict[str, tf.Tensor]:
        """Run the validation windows; returns outputs, top hidden states and the gate-saturation fraction."""
        p = self.members
        steps, lanes = self.val_x.shape[0], self.val_x.shape[1]
        state = zero_state(self.arch, p, lanes)
        outs = tf.TensorArray(tf.float32, size=steps)
        hidden = tf.TensorArray(tf.float32, size=steps)
        saturated = tf.zeros((p,))
        real = tf.zeros((p,))
        for s in tf.range(steps):
            out, state, top, sat, count = forward(
                self.arch, dict(self.params), self.val_x[s], state, self.hyper["forget_bias"], self.unit_mask
            )
            outs = outs.write(s, out)
            hidden = hidden.write(s, top)
            saturated += sat
            real += count
        return {"outputs": outs.stack(), "hidden": hidden.stack(), "saturation": saturated / tf.maximum(real, 1.0)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def measure(data: SequenceData, outputs: np.ndarray, regression: bool) -> tuple[Measures, np.ndarray]:
    """Validation measures for one member; outputs (steps, lanes, time, outputs). Also returns decoded symbols."""
    val = data.val
    with np.errstate(all="ignore"):
        out64 = outputs.astype(np.float64)
        if regression:
            pred_values = out64[..., 0]
            loss = float(np.mean((pred_values - val.y) ** 2))
            baseline = metrics.regression_baseline(data.train.y, val.y)
            predicted = data.decode_regression(np.nan_to_num(pred_values, nan=0.0, posinf=1e30, neginf=-1e30))
            ratio: float | None = metrics.std_ratio(np.nan_to_num(pred_values), val.y)
        else:
            logp = _log_softmax(out64)
            loss = float(-np.mean(np.take_along_axis(logp, val.labels[..., None], axis=-1)))
            baseline = metrics.classification_baseline(data.class_prior, val.labels)
            predicted = np.nan_to_num(out64, nan=0.0).argmax(axis=-1)
            ratio = None
    if not math.isfinite(loss):
        loss = math.inf
    accuracy = metrics.symbol_accuracy(predicted, val.labels)
    m = Measures(
        loss=loss,
        baseline_loss=baseline,
        skill=metrics.skill(loss, baseline),
        symbol_accuracy=accuracy,
        majority_rate=metrics.majority_rate(val.labels),
        distinct_symbols=metrics.distinct_symbols(predicted),
        pred_std_ratio=ratio,
    )
    return m, predicted


def _hidden_spread(hidden: np.ndarray, units: int) -> float:
    """Std of each real unit's hidden state across validation inputs, averaged over units."""
    flat = hidden[..., :units].reshape(-1, units)
    return float(np.mean(np.std(flat, axis=0)))


_POPULATIONS: dict[tuple[Any, ...], Population] = {}


def _population_for(configs: Sequence[TrialConfig]) -> Population:
    layout = configs[0]
    max_units = max(c.state_size for c in configs)
    key = (*layout_key(layout), len(configs), max_units)
    pop = _POPULATIONS.get(key)
    if pop is None:
        if len(_POPULATIONS) > 32:
            _POPULATIONS.clear()
        pop = Population(build_data(layout), layout, len(configs), max_units)
        _POPULATIONS[key] = pop
    return pop


def train_population(
    configs: Sequence[TrialConfig],
    callbacks: Sequence[TrainerCallback] = (),
    thresholds: Thresholds | None = None,
) -> list[TrialResult]:
    """Train configurations that share one data layout together; one result per configuration, in order."""
    if not configs:
        return []
    thresholds = thresholds or Thresholds()
    key = layout_key(configs[0])
    for c in configs[1:]:
        if layout_key(c) != key:
            diff = [n for n, a, b in zip(LAYOUT_FIELDS, key, layout_key(c), strict=True) if a != b]
            raise ConfigError("population", diff, "members that share " + ", ".join(LAYOUT_FIELDS))
    started = time.perf_counter()
    pop = _population_for(configs)
    pop.load(configs)
    data = pop.data
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
            m, predicted = measure(data, outputs[i], pop.regression)
            if not alive[i]:
                m = Measures(
                    math.inf,
                    m.baseline_loss,
                    -math.inf,
                    m.symbol_accuracy,
                    m.majority_rate,
                    m.distinct_symbols,
                    m.pred_std_ratio,
                )
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
) -> TrialResult:
    """Train one configuration; the plain entry point for notebooks and tests."""
    return train_population([config], callbacks, thresholds)[0]
