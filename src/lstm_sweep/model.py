"""The LSTM (TF1 BasicLSTMCell semantics) for a population of members that share one data layout.

Every parameter carries a leading member axis, so one graph trains one trial or many at once. Members may have
different state sizes: each is initialised at its own size and zero-padded to the largest; padded units stay at
exactly zero because their weights and gradients are zero (noise is masked), so a member computes the same numbers
alone or inside a population. No I/O and no tracking here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

GATES = 4  # TF1 order: input i, candidate j, forget f, output o
MAX_COORD_UNITS = 4096  # coordinate stride used to give each weight a size-independent identity


@dataclass(frozen=True)
class Architecture:
    """Shapes shared by every member of a population."""

    num_features: int
    num_outputs: int
    num_layers: int
    max_units: int

    def param_names(self) -> list[str]:
        names = []
        for layer in range(self.num_layers):
            names += [f"l{layer}_input_kernel", f"l{layer}_recurrent_kernel", f"l{layer}_bias"]
        return [*names, "readout_kernel", "readout_bias"]

    def rows_in(self, layer: int) -> int:
        return self.num_features if layer == 0 else self.max_units

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        n = self.max_units
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(self.num_layers):
            shapes[f"l{layer}_input_kernel"] = (self.rows_in(layer), GATES, n)
            shapes[f"l{layer}_recurrent_kernel"] = (n, GATES, n)
            shapes[f"l{layer}_bias"] = (GATES, n)
        shapes["readout_kernel"] = (n, self.num_outputs)
        shapes["readout_bias"] = (self.num_outputs,)
        return shapes


def weight_group(name: str) -> str:
    """The diagnostic group a parameter belongs to."""
    if name.startswith("readout"):
        return "readout"
    if name.endswith("input_kernel"):
        return "input_kernel"
    if name.endswith("recurrent_kernel"):
        return "recurrent_kernel"
    return "bias"


def init_member(arch: Architecture, units: int, seed: int) -> dict[str, np.ndarray]:
    """One member's initial weights at its own size, zero-padded to the architecture.

    LSTM kernels follow TF1's default (Glorot-uniform over the concatenated [input; state] x 4*units kernel),
    biases start at zero (the forget bias is added in the cell), the readout is U(-1, 1) as in the seed.
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for layer in range(arch.num_layers):
        rows = arch.num_features if layer == 0 else units
        limit = np.sqrt(6.0 / (rows + units + GATES * units))
        kernel = rng.uniform(-limit, limit, size=(rows + units, GATES * units)).reshape(rows + units, GATES, units)
        inp = np.zeros((arch.rows_in(layer), GATES, arch.max_units))
        inp[:rows, :, :units] = kernel[:rows]
        rec = np.zeros((arch.max_units, GATES, arch.max_units))
        rec[:units, :, :units] = kernel[rows:]
        params[f"l{layer}_input_kernel"] = inp
        params[f"l{layer}_recurrent_kernel"] = rec
        params[f"l{layer}_bias"] = np.zeros((GATES, arch.max_units))
    readout = np.zeros((arch.max_units, arch.num_outputs))
    readout[:units] = rng.uniform(-1.0, 1.0, size=(units, arch.num_outputs))
    params["readout_kernel"] = readout
    params["readout_bias"] = rng.uniform(-1.0, 1.0, size=(arch.num_outputs,))
    return {k: v.astype(np.float32) for k, v in params.items()}


def param_masks(arch: Architecture, units: int) -> dict[str, np.ndarray]:
    """1 where a member really has a weight, 0 in the padding."""
    masks: dict[str, np.ndarray] = {}
    for layer in range(arch.num_layers):
        rows = arch.num_features if layer == 0 else units
        inp = np.zeros((arch.rows_in(layer), GATES, arch.max_units), np.float32)
        inp[:rows, :, :units] = 1
        rec = np.zeros((arch.max_units, GATES, arch.max_units), np.float32)
        rec[:units, :, :units] = 1
        bias = np.zeros((GATES, arch.max_units), np.float32)
        bias[:, :units] = 1
        masks |= {f"l{layer}_input_kernel": inp, f"l{layer}_recurrent_kernel": rec, f"l{layer}_bias": bias}
    readout = np.zeros((arch.max_units, arch.num_outputs), np.float32)
    readout[:units] = 1
    masks["readout_kernel"] = readout
    masks["readout_bias"] = np.ones((arch.num_outputs,), np.float32)
    return masks


def param_coords(arch: Architecture) -> dict[str, np.ndarray]:
    """A per-weight identity that does not depend on the padded size, for reproducible per-weight noise."""
    coords: dict[str, np.ndarray] = {}
    stride = MAX_COORD_UNITS
    for name, shape in arch.param_shapes().items():
        if len(shape) == 3:
            r, g, u = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
            coords[name] = (r * GATES + g) * stride + u
        elif len(shape) == 2:  # (rows, outputs) or a bias's (gates, units)
            r, o = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
            coords[name] = r * stride + o
        else:
            coords[name] = np.arange(shape[0])
    return {k: v.astype(np.uint32) for k, v in coords.items()}


LayerState = tuple[tf.Tensor, tf.Tensor]


def zero_state(arch: Architecture, members: int, lanes: int) -> list[LayerState]:
    z = tf.zeros((members, lanes, arch.max_units))
    return [(z, z) for _ in range(arch.num_layers)]


def forward(
    arch: Architecture,
    params: dict[str, tf.Tensor],
    x: tf.Tensor,
    state: list[LayerState] | None,
    forget_bias: tf.Tensor,
    unit_mask: tf.Tensor | None,
) -> tuple[tf.Tensor, list[LayerState], tf.Tensor, tf.Tensor, tf.Tensor]:
    """Run the stack over one window, from the given state or (state None) from the zero state.

    x: (lanes, time, features), shared by all members. Returns outputs (members, lanes, time, outputs), the final
    state, the top layer's hidden states (members, lanes, time, units), and per member the count of gate
    pre-activations with |z| > 4 and the count of real gate pre-activations (for the saturation fraction).

    Training passes unit_mask=None: padded units then stay exactly zero without masking, because their weights
    are zero (tanh(0) = 0 keeps c and h at zero), and the saturation count, a diagnostic, is skipped.
    From the zero state the first step's recurrent matmul and forget term are exactly zero and are not computed:
    with seq_len 1 (the seed's layout) that is most of the arithmetic.
    """
    members = tf.shape(params["readout_bias"])[0]
    lanes, steps = x.shape[0], x.shape[1]
    n = arch.max_units
    mask = unit_mask[:, None, :] if unit_mask is not None else None
    fb = forget_bias[:, None, None]
    saturated = tf.zeros((members,))
    layer_in = tf.tile(tf.reshape(x, (1, -1, arch.num_features)), [members, 1, 1])
    new_state: list[LayerState] = []
    hs: list[tf.Tensor] = []
    for layer in range(arch.num_layers):
        w_in = tf.reshape(params[f"l{layer}_input_kernel"], (-1, arch.rows_in(layer), GATES * n))
        w_rec = tf.reshape(params[f"l{layer}_recurrent_kernel"], (-1, n, GATES * n))
        bias = tf.reshape(params[f"l{layer}_bias"], (-1, 1, GATES * n))
        z_in = tf.reshape(tf.matmul(layer_in, w_in) + bias, (-1, lanes, steps, GATES * n))
        h, c = state[layer] if state is not None else (None, None)
        hs = []
        for t in range(steps):
            z = z_in[:, :, t] if h is None else z_in[:, :, t] + tf.matmul(h, w_rec)
            zi, zj, zf, zo = tf.split(z, GATES, axis=-1)
            if mask is not None:
                saturated += sum(
                    tf.reduce_sum(tf.cast(tf.abs(g) > 4.0, tf.float32) * mask, axis=[1, 2])
                    for g in (zi, zj, zf + fb, zo)
                )
            written = tf.sigmoid(zi) * tf.tanh(zj)
            c = written if c is None else c * tf.sigmoid(zf + fb) + written
            h = tf.tanh(c) * tf.sigmoid(zo)
            if mask is not None:
                c, h = c * mask, h * mask
            hs.append(h)
        new_state.append((h, c))
        layer_in = tf.reshape(tf.stack(hs, axis=2), (-1, lanes * steps, n))
    top = tf.stack(hs, axis=2)
    outputs = tf.matmul(layer_in, params["readout_kernel"]) + params["readout_bias"][:, None, :]
    outputs = tf.reshape(outputs, (-1, lanes, steps, arch.num_outputs))
    real = tf.zeros((members,)) if unit_mask is None else tf.reduce_sum(unit_mask, axis=1)
    real *= float(GATES * lanes * steps * arch.num_layers)
    return outputs, new_state, top, saturated, real
