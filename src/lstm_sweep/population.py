"""The compiled population: TF variables and per-epoch functions for members that share one data layout.

All of a member's weights live in one flat row of a (members, weights) matrix, and so do its optimizer slots and
masks. The forward pass reads views of that row; everything after the gradient (masking, noise, clipping, the
optimizer, the diagnostics) is then a handful of passes over one matrix instead of a dozen passes over each
parameter. On these tiny models that per-weight work, not the matmuls, used to dominate a step.

With seq_len 1 and no carried state the recurrent kernels never reach the output (they only ever multiply the
zero state), so they sit outside that matrix, untouched: no update, no noise. The noise/gradient diagnostic is
therefore over the weights that can affect the loss.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from lstm_sweep.config import TrialConfig
from lstm_sweep.metrics import WEIGHT_GROUPS
from lstm_sweep.model import (
    Architecture,
    LayerState,
    forward,
    init_member,
    param_coords,
    param_masks,
    weight_group,
    zero_state,
)
from lstm_sweep.noise import gaussian, symmetric, weight_ids
from lstm_sweep.step_parts import StepParts
from lstm_sweep.tasks import SequenceData
from lstm_sweep.train import graph_shape

ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.9, 0.999, 1e-7
ANNEAL_GAMMA = 0.55
XLA_MIN_RUNS = 4  # runs of one layout (members, or a sweep's planned runs) from which XLA repays its compile
Window = tuple[tf.Tensor, tf.Tensor, tf.Tensor]  # a training window's inputs, targets and labels
HYPER_KEYS = ("learning_rate", "momentum", "adam", "grad_noise", "annealed", "grad_clip", "forget_bias")


def uses_xla(layout: TrialConfig, runs: int) -> bool:
    """Whether a layout's epoch is compiled with XLA: `LSTM_SWEEP_XLA` = 1 or 0 forces it.

    `runs` is how many trials of this layout the graph will train: a population's members, or in a sweep the
    runs its file plans (the same in every batch, so the choice does not depend on how batches fall).

    XLA fuses the many small per-step ops into a few kernels. Measured here, one lone trial of 20 epochs (plain
    graph vs XLA, 1 thread): at seq_len 1 it runs 0.29-0.34 s vs 0.03-0.04 s and XLA's first call costs at most
    0.15 s more than tracing, so seq_len 1 always compiles; at seq_len 8 and 12 XLA saves 0.43-0.63 s a trial but
    its compile costs 1.0-1.9 s more, repaid after 2 to 5 trials, so XLA waits for XLA_MIN_RUNS of them (a
    notebook's single `train` stays quick to start).
    """
    forced = os.environ.get("LSTM_SWEEP_XLA", "")
    if forced in ("0", "1"):
        return forced == "1"
    return layout.seq_len == 1 or runs >= XLA_MIN_RUNS


def _one_hot_columns(labels: np.ndarray, classes: int) -> np.ndarray:
    """(weights, classes) float32 matrix: a matmul with it sums a row's weights per class."""
    out = np.zeros((labels.size, classes), np.float32)
    out[np.arange(labels.size), labels] = 1.0
    return out


class Population:
    """Members sharing one data layout, trained as one graph; reusable across trials via `load`."""

    def __init__(self, data: SequenceData, layout: TrialConfig, members: int, max_units: int, *, xla: bool) -> None:
        self.data = data
        self.members = members
        self.regression = layout.output_framing == "regression"
        self.stateful = layout.stateful
        self.arch = Architecture(
            num_features=data.num_features,
            num_outputs=1 if self.regression else data.num_classes,
            num_layers=layout.num_layers,
            max_units=max_units,
        )
        self.names = self.arch.param_names()
        self.shapes = self.arch.param_shapes()
        # seq_len 1 from a zero state: h is 0 whenever a recurrent kernel is applied, so it can never touch the
        # output. Such kernels are left out of the trained matrix (at 64 units they are 80% of the weights).
        stateless_one_step = layout.seq_len == 1 and not layout.stateful
        self.idle_names = [n for n in self.names if stateless_one_step and n.endswith("recurrent_kernel")]
        self.trained_names = [n for n in self.names if n not in self.idle_names]
        sizes = {n: int(np.prod(self.shapes[n])) for n in self.names}
        self.sizes = [sizes[n] for n in self.trained_names]
        self.idle_sizes = [sizes[n] for n in self.idle_names]
        width = sum(self.sizes)
        param_index = np.repeat([self.names.index(n) for n in self.trained_names], self.sizes)
        trained_param = np.repeat(np.arange(len(self.trained_names)), self.sizes)
        groups = np.asarray([WEIGHT_GROUPS.index(weight_group(n)) for n in self.trained_names])
        coords = param_coords(self.arch)
        self.param_of = tf.constant(_one_hot_columns(trained_param, len(self.trained_names)))
        self.group_of = tf.constant(_one_hot_columns(groups[trained_param], len(WEIGHT_GROUPS)))
        ids = weight_ids(param_index, np.concatenate([coords[n].ravel() for n in self.trained_names]))
        self.ids = tf.constant(ids)

        def var(shape: tuple[int, ...], dtype: tf.DType = tf.float32) -> tf.Variable:
            return tf.Variable(tf.zeros((members, *shape), dtype), trainable=False)

        self.theta = var((width,))  # every trained weight of a member, in one row
        self.idle = var((sum(self.idle_sizes),))  # weights that cannot affect the output: kept at their init
        self.real_mask = var((width,))  # 1 where a member really has a weight
        self.idle_mask = var((sum(self.idle_sizes),))
        self.train_mask = var((width,))  # real and trained (readout_only freezes the LSTM)
        self.real_counts = var((len(self.trained_names),))
        self.velocity, self.adam_m, self.adam_v = var((width,)), var((width,)), var((width,))
        self.hyper = {k: var(()) for k in HYPER_KEYS}
        self.seeds = var((), tf.uint32)
        self.unit_mask = var((max_units,))
        self.alive = tf.Variable(tf.ones((members,), tf.bool), trainable=False)
        self.diverged_step = tf.Variable(tf.fill((members,), tf.constant(-1, tf.int64)), trainable=False)
        self.step = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        # Data live in variables, so layouts of equal shapes (raw and scaled inputs, say) share one compiled graph.
        self.train_x = tf.Variable(data.train.x, trainable=False)
        self.train_y = tf.Variable(data.train.y, trainable=False)
        self.train_labels = tf.Variable(data.train.labels, trainable=False)
        self.val_x = tf.Variable(data.val.x, trainable=False)
        self.xla = xla
        self.parts = StepParts()
        self._train_epochs: dict[StepParts, Callable[[], dict[str, tf.Tensor]]] = {}
        self.evaluate = tf.function(self._evaluate_graph, autograph=False)

    @staticmethod
    def shape_key(
        data: SequenceData, layout: TrialConfig, members: int, max_units: int, xla: bool
    ) -> tuple[object, ...]:
        """Populations with equal keys have identical graphs and can take each other's data (`use_data`)."""
        return (*graph_shape(data, layout), members, max_units, xla)

    def use_data(self, data: SequenceData) -> None:
        """Train on other data of the same shapes (see `shape_key`)."""
        if data is not self.data:
            self.data = data
            for var, value in (
                (self.train_x, data.train.x),
                (self.train_y, data.train.y),
                (self.train_labels, data.train.labels),
                (self.val_x, data.val.x),
            ):
                var.assign(value)

    # --- views -------------------------------------------------------------------------------------------

    def views(self, flat: tf.Tensor, idle: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        """Each parameter's (members, *shape) view of a flat (members, weights) matrix (and of the idle one)."""
        out = self._split(flat, self.trained_names, self.sizes)
        if idle is None:
            idle = tf.convert_to_tensor(self.idle)
        return out | self._split(idle, self.idle_names, self.idle_sizes)

    def _split(self, flat: tf.Tensor, names: Sequence[str], sizes: Sequence[int]) -> dict[str, tf.Tensor]:
        if not names:
            return {}
        parts = tf.split(flat, sizes, axis=1) if len(names) > 1 else [flat]
        return {n: tf.reshape(part, (-1, *self.shapes[n])) for n, part in zip(names, parts, strict=True)}

    @property
    def params(self) -> dict[str, tf.Tensor]:
        """Every parameter, trained or idle, as (members, *shape) tensors."""
        views = self.views(tf.convert_to_tensor(self.theta))
        return {n: views[n] for n in self.names}

    @property
    def masks(self) -> dict[str, tf.Tensor]:
        """1 where a member really has a weight, per parameter."""
        views = self.views(tf.convert_to_tensor(self.real_mask), tf.convert_to_tensor(self.idle_mask))
        return {n: views[n] for n in self.names}

    def _flat(self, per_member: Sequence[dict[str, np.ndarray]], names: Sequence[str]) -> np.ndarray:
        rows = [np.concatenate([m[n].ravel() for n in names] or [np.zeros(0, np.float32)]) for m in per_member]
        return np.stack(rows)

    # --- loading -----------------------------------------------------------------------------------------

    def load(self, configs: Sequence[TrialConfig], parts: StepParts | None = None) -> None:
        """Reset every variable to the given members' initial state; the epoch compiles `parts` (default: the ones
        the members need; asking for fewer is an error)."""
        if len(configs) != self.members:
            raise ValueError(f"population of {self.members} loaded with {len(configs)} configurations")
        masks = [param_masks(self.arch, c.state_size) for c in configs]
        inits = [init_member(self.arch, c.state_size, c.seed) for c in configs]
        real = self._flat(masks, self.trained_names)
        lstm = np.asarray([weight_group(n) != "readout" for n in self.trained_names]).repeat(self.sizes)
        frozen = np.asarray([c.recurrent_training == "readout_only" for c in configs])
        self.theta.assign(self._flat(inits, self.trained_names))
        self.idle.assign(self._flat(inits, self.idle_names))
        self.real_mask.assign(real)
        self.idle_mask.assign(self._flat(masks, self.idle_names))
        self.train_mask.assign(real * ~(frozen[:, None] & lstm[None, :]))
        self.real_counts.assign(real @ self.param_of.numpy())
        for slot in (self.velocity, self.adam_m, self.adam_v):
            slot.assign(tf.zeros_like(slot))
        values = {
            "learning_rate": [c.learning_rate for c in configs],
            "momentum": [c.momentum for c in configs],
            "adam": [c.optimizer == "adam" for c in configs],
            "grad_noise": [c.grad_noise for c in configs],
            "annealed": [c.grad_noise_schedule == "annealed" for c in configs],
            "grad_clip": [c.grad_clip for c in configs],
            "forget_bias": [c.forget_bias for c in configs],
        }
        for key, vals in values.items():
            self.hyper[key].assign(np.asarray(vals, np.float32))
        needed = StepParts.of(configs)
        if parts is not None and parts.union(needed) != parts:
            raise ValueError(f"step parts {parts} lack some the members need ({needed})")
        self.parts = needed if parts is None else parts
        self.seeds.assign(np.asarray([c.seed for c in configs], np.uint32))
        units = np.arange(self.arch.max_units)
        self.unit_mask.assign(np.stack([units < c.state_size for c in configs]).astype(np.float32))
        self.alive.assign(tf.ones((self.members,), tf.bool))
        self.diverged_step.assign(tf.fill((self.members,), tf.constant(-1, tf.int64)))
        self.step.assign(0)

    # --- one step's pieces ---------------------------------------------------------------------------------

    def _loss(self, outputs: tf.Tensor, y: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        if self.regression:
            return tf.reduce_mean(tf.square(outputs[..., 0] - y[None]), axis=[1, 2])
        labels = tf.broadcast_to(labels[None], tf.shape(outputs)[:-1])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=outputs)
        return tf.reduce_mean(ce, axis=[1, 2])

    def _noise(self, live: tf.Tensor, step: tf.Tensor, parts: StepParts) -> tf.Tensor:
        """Per-weight gradient noise, exactly zero for members without noise and for dead members.

        seed schedule: U(-1, 1) * mean|w| of the weight's parameter * grad_noise (the seed's recipe);
        annealed: N(0, grad_noise / step^0.55) (Neelakantan et al. 2015).
        """
        h = self.hyper
        noisy = h["grad_noise"] * live
        step_u32 = tf.cast(step, tf.uint32)
        noise: tf.Tensor | None = None
        if parts.seeded_noise:
            seeded = noisy * (1.0 - h["annealed"])
            mean_abs = tf.matmul(tf.abs(self.theta) * self.real_mask, self.param_of) / tf.maximum(self.real_counts, 1)
            # where, not a product: a dead member's weights may be inf, and inf * 0 would be NaN
            scale = tf.where(seeded[:, None] > 0, mean_abs * seeded[:, None], 0.0)
            noise = symmetric(self.seeds, step_u32, self.ids) * tf.matmul(scale, self.param_of, transpose_b=True)
        if parts.annealed_noise:
            std = tf.sqrt(noisy * h["annealed"] / tf.pow(tf.cast(step, tf.float32), ANNEAL_GAMMA))
            annealed = gaussian(self.seeds, step_u32, self.ids) * std[:, None]
            noise = annealed if noise is None else noise + annealed
        assert noise is not None, "asked for noise with no noise schedule in the step parts"
        return noise * self.train_mask

    def _clip(self, g: tf.Tensor) -> tf.Tensor:
        clip = self.hyper["grad_clip"]
        norm = tf.sqrt(tf.reduce_sum(tf.square(g), axis=1))
        return g * tf.where(clip > 0, tf.minimum(1.0, clip / tf.maximum(norm, 1e-12)), 1.0)[:, None]

    def _momentum_update(self, g: tf.Tensor) -> tf.Tensor:
        """TF1 MomentumOptimizer: accumulator = momentum * accumulator + g; the update is the accumulator."""
        velocity = self.hyper["momentum"][:, None] * self.velocity + g
        self.velocity.assign(velocity)
        return velocity

    def _adam_update(self, g: tf.Tensor) -> tf.Tensor:
        t = tf.cast(self.step, tf.float32)
        m = ADAM_BETA1 * self.adam_m + (1 - ADAM_BETA1) * g
        v = ADAM_BETA2 * self.adam_v + (1 - ADAM_BETA2) * tf.square(g)
        self.adam_m.assign(m)
        self.adam_v.assign(v)
        return (m / (1 - ADAM_BETA1**t)) / (tf.sqrt(v / (1 - ADAM_BETA2**t)) + ADAM_EPSILON)

    def _update(self, g: tf.Tensor, parts: StepParts) -> tf.Tensor:
        """Each optimizer's slot arithmetic is several passes over every weight: only the ones in use are traced."""
        if parts.adam == "all":
            return self._adam_update(g)
        if parts.adam == "some":
            return tf.where(self.hyper["adam"][:, None] > 0.5, self._adam_update(g), self._momentum_update(g))
        return self._momentum_update(g)

    # --- compiled epochs -----------------------------------------------------------------------------------

    def train_epoch(self) -> dict[str, tf.Tensor]:
        """One pass over the training stream, compiled (with XLA when `uses_xla` says so) with the step parts `load`
        set (what the members need, or a sweep's larger set): one compiled epoch per combination."""
        parts = self.parts
        if parts not in self._train_epochs:
            graph = functools.partial(self._train_epoch_graph, parts)
            self._train_epochs[parts] = tf.function(graph, jit_compile=self.xla, autograph=False)
        return self._train_epochs[parts]()

    def _train_epoch_graph(self, parts: StepParts) -> dict[str, tf.Tensor]:
        """One pass over the training stream; returns per-member means for the epoch's diagnostics.

        A member whose loss or gradient turns non-finite is marked dead at that step and never updated again;
        the others go on untouched (every operation below is per member).
        """
        p = self.members
        steps, lanes = self.train_x.shape[0], self.train_x.shape[1]
        train_x, train_y, labels = (tf.convert_to_tensor(v) for v in (self.train_x, self.train_y, self.train_labels))
        h = self.hyper
        state: list[LayerState] = zero_state(self.arch, p, lanes)  # carried only when stateful
        idle = tf.convert_to_tensor(self.idle)  # never trained: read once per epoch

        # The window's inputs and targets come in as loop-carried values, read one iteration ahead: a window
        # sliced inside the step lets XLA fuse the slice into the time steps' kernels and recompute it there
        # (measured, 64 members at seq_len 12 with 16 units: 34 ms a step with inputs and targets sliced in the
        # step, 25 ms with the inputs only, 10 ms carried). The loop is written out, not left to autograph:
        # autograph's conversion of every function the step calls was most of a trace.
        def step(
            s: tf.Tensor, window: Window, sums: tuple[tf.Tensor, tf.Tensor, tf.Tensor], state: list[LayerState]
        ) -> tuple[tf.Tensor, Window, tuple[tf.Tensor, tf.Tensor, tf.Tensor], list[LayerState]]:
            x, y, window_labels = window
            ahead = tf.minimum(s + 1, steps - 1)
            theta = tf.convert_to_tensor(self.theta)
            with tf.GradientTape() as tape:
                tape.watch(theta)
                out, carried, _, _, _ = forward(
                    self.arch,
                    self.views(theta, idle),
                    x,
                    state if self.stateful else None,
                    h["forget_bias"],
                    None,
                )
                loss = self._loss(out, y, window_labels)
                total = tf.reduce_sum(tf.where(tf.math.is_finite(loss), loss, 0.0))
            if self.stateful:
                state = [(tf.stop_gradient(a), tf.stop_gradient(b)) for a, b in carried]
            finite, group_sq, grad_sq, noise_sq = self._apply(tape.gradient(total, theta), loss, parts)
            loss_sum, group_sums, ratio_sum = sums
            sums = (
                loss_sum + tf.where(finite, loss, 0.0),
                group_sums + tf.where(finite[:, None], tf.sqrt(group_sq), 0.0),
                ratio_sum + tf.where(finite, tf.sqrt(noise_sq) / tf.maximum(tf.sqrt(grad_sq), 1e-12), 0.0),
            )
            return s + 1, (train_x[ahead], train_y[ahead], labels[ahead]), sums, state

        first = (train_x[0], train_y[0], labels[0])
        sums = (tf.zeros((p,)), tf.zeros((p, len(WEIGHT_GROUPS))), tf.zeros((p,)))
        _, _, (loss_sum, group_sums, ratio_sum), _ = tf.while_loop(
            lambda s, *_: s < steps, step, (tf.constant(0), first, sums, state)
        )
        n = float(steps)
        return {"train_loss": loss_sum / n, "grad_norms": group_sums / n, "noise_to_grad": ratio_sum / n}

    def _apply(
        self, grad: tf.Tensor, loss: tf.Tensor, parts: StepParts
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """Everything after the gradient: divergence check, noise, clipping, the optimizer, the diagnostics."""
        p = self.members
        h = self.hyper
        g = grad * self.train_mask
        self.step.assign_add(1)
        group_sq = tf.matmul(tf.square(g), self.group_of)
        grad_sq = tf.reduce_sum(group_sq, axis=1)
        finite = tf.math.is_finite(loss) & tf.math.is_finite(grad_sq)
        self.diverged_step.assign(tf.where(self.alive & ~finite, self.step, self.diverged_step))
        self.alive.assign(self.alive & finite)
        live = tf.cast(self.alive, tf.float32)
        g = tf.where(self.alive[:, None], g, 0.0)
        noise_sq = tf.zeros((p,))
        if parts.noise:
            noise = self._noise(live, self.step, parts)
            g, noise_sq = g + noise, tf.reduce_sum(tf.square(noise), axis=1)
        if parts.clip:
            g = self._clip(g)
        self.theta.assign_sub((h["learning_rate"] * live)[:, None] * self._update(g, parts))
        return finite, group_sq, grad_sq, noise_sq

    def _evaluate_graph(self) -> dict[str, tf.Tensor]:
        """Run the validation windows; returns outputs, top hidden states and the gate-saturation fraction."""
        p = self.members
        steps, lanes = self.val_x.shape[0], self.val_x.shape[1]
        val_x = tf.convert_to_tensor(self.val_x)
        params = self.views(tf.convert_to_tensor(self.theta))
        state: list[LayerState] = zero_state(self.arch, p, lanes)  # carried only when stateful

        def step(
            s: tf.Tensor,
            outs: tf.TensorArray,
            hidden: tf.TensorArray,
            counts: tuple[tf.Tensor, tf.Tensor],
            state: list[LayerState],
        ) -> tuple[tf.Tensor, tf.TensorArray, tf.TensorArray, tuple[tf.Tensor, tf.Tensor], list[LayerState]]:
            out, carried, top, sat, count = forward(
                self.arch,
                params,
                val_x[s],
                state if self.stateful else None,
                self.hyper["forget_bias"],
                self.unit_mask,
            )
            if self.stateful:
                state = carried
            saturated, real = counts
            return s + 1, outs.write(s, out), hidden.write(s, top), (saturated + sat, real + count), state

        loop_vars = (
            tf.constant(0),
            tf.TensorArray(tf.float32, size=steps),
            tf.TensorArray(tf.float32, size=steps),
            (tf.zeros((p,)), tf.zeros((p,))),
            state,
        )
        _, outs, hidden, (saturated, real), _ = tf.while_loop(lambda s, *_: s < steps, step, loop_vars)
        return {"outputs": outs.stack(), "hidden": hidden.stack(), "saturation": saturated / tf.maximum(real, 1.0)}
