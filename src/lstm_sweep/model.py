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
# What a step's backward pass needs: sigma(i), tanh(j), sigma(f) (None from the zero state), sigma(o), tanh(c)
CellSaved = tuple[tf.Tensor, tf.Tensor, tf.Tensor | None, tf.Tensor, tf.Tensor]


def zero_state(arch: Architecture, members: int, lanes: int) -> list[LayerState]:
    z = tf.zeros((members, lanes, arch.max_units))
    return [(z, z) for _ in range(arch.num_layers)]


def cell(z: tf.Tensor, c_prev: tf.Tensor | None, fb: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, CellSaved]:
    """One BasicLSTMCell step from its gate pre-activations z; returns h, c and the activations backward needs.

    c_prev None is the zero state: the forget term is exactly zero and is not computed.
    """
    zi, zj, zf, zo = tf.split(z, GATES, axis=-1)
    si, tj, so = tf.sigmoid(zi), tf.tanh(zj), tf.sigmoid(zo)
    written = si * tj
    if c_prev is None:
        sf, c = None, written
    else:
        sf = tf.sigmoid(zf + fb)
        c = c_prev * sf + written
    tc = tf.tanh(c)
    return tc * so, c, (si, tj, sf, so, tc)


def trained_recurrence(
    z_in: tf.Tensor, w_rec: tf.Tensor, state: LayerState | None, fb: tf.Tensor
) -> tuple[tf.Tensor, LayerState]:
    """One layer over a window, for training: hidden states (members, lanes, time, units) and the final state.

    The backward pass is written out (backpropagation through time) so that the recurrent kernel's gradient is
    one matmul over every time step and lane, instead of one per time step with only `lanes` rows, and so that the
    carried gradients are computed once per step (see `backward`). Measured per step under XLA, automatic vs this:
    one member at seq_len 12 with 64 units 0.75 vs 0.43 ms; 64 members with 16 units 14.4 vs 5.1 ms.
    The incoming state carries no gradient (stateful training stops it between windows).
    """
    steps = z_in.shape[2]
    h0, c0 = state if state is not None else (None, None)

    @tf.custom_gradient
    def run(z_in: tf.Tensor, w_rec: tf.Tensor) -> tuple[tuple[tf.Tensor, tf.Tensor], object]:
        h, c = h0, c0
        hs: list[tf.Tensor] = []
        cs: list[tf.Tensor | None] = [c0]
        saved: list[CellSaved] = []
        for t in range(steps):
            z = z_in[:, :, t] if h is None else z_in[:, :, t] + tf.matmul(h, w_rec)
            h, c, kept = cell(z, c, fb)
            hs.append(h)
            cs.append(c)
            saved.append(kept)
        hidden = tf.stack(hs, axis=2)

        def backward(d_hidden: tf.Tensor, d_c_last: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
            zeros = tf.zeros_like(hs[0])
            # Per step, stacked on a leading time axis: from the zero state the forget gate and the previous cell
            # are taken as 0, which makes that step's forget gradient and carried cell gradient exactly 0.
            si, tj, so, tc = (tf.stack([kept[k] for kept in saved]) for k in (0, 1, 3, 4))
            sf = tf.stack([zeros if kept[2] is None else kept[2] for kept in saved])
            c_prev = tf.stack([zeros if c is None else c for c in cs[:-1]])
            d_out = tf.transpose(d_hidden, [2, 0, 1, 3])

            def gate_grads(t: tf.Tensor | int, d_h: tf.Tensor, d_c_carried: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                """Step t's gate pre-activation gradients and its cell gradient, from what reaches its output."""
                d_c = d_h * so[t] * (1.0 - tc[t] * tc[t]) + d_c_carried
                d_zt = tf.concat(
                    [
                        d_c * tj[t] * si[t] * (1.0 - si[t]),
                        d_c * si[t] * (1.0 - tj[t] * tj[t]),
                        d_c * c_prev[t] * sf[t] * (1.0 - sf[t]),
                        d_h * tc[t] * so[t] * (1.0 - so[t]),
                    ],
                    axis=-1,
                )
                return d_zt, d_c

            # The kernel transposed once per window: as a transposed operand inside the loop, XLA's matmul ran at
            # half speed (measured, 64 members with 64 units, one step's product: 733 us transposed, 396 us not).
            w_rec_t = tf.transpose(w_rec, [0, 2, 1])

            def step(
                t: tf.Tensor, d_h_carried: tf.Tensor, d_c_carried: tf.Tensor, d_zs: tf.TensorArray
            ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.TensorArray]:
                d_zt, d_c = gate_grads(t, d_out[t] + d_h_carried, d_c_carried)
                return t - 1, tf.matmul(d_zt, w_rec_t), d_c * sf[t], d_zs.write(t, d_zt)

            # A loop, not unrolled steps: each step's carried gradients are then computed once and kept, where
            # unrolled, XLA fused the whole chain of cell gradients into every step's kernel and recomputed it.
            # It stops before step 0, whose carried gradients would flow into the incoming state, which takes none.
            _, d_h_first, d_c_first, d_zs = tf.while_loop(
                lambda t, *_: t >= 1,
                step,
                (
                    tf.constant(steps - 1),
                    zeros,
                    zeros if d_c_last is None else d_c_last,
                    tf.TensorArray(z_in.dtype, size=steps),
                ),
            )
            d_zs = d_zs.write(0, gate_grads(0, d_out[0] + d_h_first, d_c_first)[0])
            d_z_in = tf.transpose(d_zs.stack(), [1, 2, 0, 3])  # (members, lanes, time, gates x units)
            previous = hs[:-1] if h0 is None else [h0, *hs[:-1]]
            if not previous:  # one step from the zero state: the recurrent kernel never acts
                return d_z_in, tf.zeros_like(w_rec)
            # d w_rec = sum over steps and lanes of h_{t-1}^T dz_t: one matmul over (lanes x steps) rows
            rows = (-1, z_in.shape[1] * len(previous))
            h_rows = tf.reshape(tf.stack(previous, axis=2), (*rows, previous[0].shape[-1]))
            d_z_rows = tf.reshape(d_z_in[:, :, steps - len(previous) :], (*rows, z_in.shape[-1]))
            return d_z_in, tf.matmul(h_rows, d_z_rows, transpose_a=True)

        return (hidden, c), backward

    hidden, c_last = run(z_in, w_rec)
    return hidden, (hidden[:, :, -1], c_last)


def masked_recurrence(
    z_in: tf.Tensor, w_rec: tf.Tensor, state: LayerState | None, fb: tf.Tensor, mask: tf.Tensor
) -> tuple[tf.Tensor, LayerState, tf.Tensor]:
    """One layer over a window for evaluation: padded units forced to zero, and per member the count of gate
    pre-activations with |z| > 4 (the saturation diagnostic). No gradient is taken through it."""
    h, c = state if state is not None else (None, None)
    saturated = tf.zeros((tf.shape(z_in)[0],))
    hs = []
    for t in range(z_in.shape[2]):
        z = z_in[:, :, t] if h is None else z_in[:, :, t] + tf.matmul(h, w_rec)
        zi, zj, zf, zo = tf.split(z, GATES, axis=-1)
        saturated += sum(
            tf.reduce_sum(tf.cast(tf.abs(g) > 4.0, tf.float32) * mask, axis=[1, 2]) for g in (zi, zj, zf + fb, zo)
        )
        h, c, _ = cell(z, c, fb)
        c, h = c * mask, h * mask
        hs.append(h)
    assert h is not None and c is not None
    return tf.stack(hs, axis=2), (h, c), saturated


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
    fb = forget_bias[:, None, None]
    saturated = tf.zeros((members,))
    layer_in = tf.tile(tf.reshape(x, (1, -1, arch.num_features)), [members, 1, 1])
    new_state: list[LayerState] = []
    hidden = layer_in
    for layer in range(arch.num_layers):
        w_in = tf.reshape(params[f"l{layer}_input_kernel"], (-1, arch.rows_in(layer), GATES * n))
        w_rec = tf.reshape(params[f"l{layer}_recurrent_kernel"], (-1, n, GATES * n))
        bias = tf.reshape(params[f"l{layer}_bias"], (-1, 1, GATES * n))
        if steps > 1:
            # The bias rides in the matmul as a row against a column of ones, so its gradient comes out of the
            # kernel's gradient matmul. As a sum over lanes and steps instead, XLA fuses the whole backward chain
            # of cell-state gradients into that sum and recomputes it for every step (measured, 64 members at
            # seq_len 12 with 16 units: 25.7 ms a step as a sum, 8.0 ms in the matmul). At seq_len 1 there is
            # no chain, and the plain sum is the faster (64 members, 64 units: 0.32 vs 0.40 ms).
            with_ones = tf.concat([layer_in, tf.ones_like(layer_in[:, :, :1])], axis=2)
            z_in = tf.matmul(with_ones, tf.concat([w_in, bias], axis=1))
        else:
            z_in = tf.matmul(layer_in, w_in) + bias
        z_in = tf.reshape(z_in, (-1, lanes, steps, GATES * n))
        layer_state = state[layer] if state is not None else None
        if unit_mask is None:
            hidden, final = trained_recurrence(z_in, w_rec, layer_state, fb)
        else:
            hidden, final, sat = masked_recurrence(z_in, w_rec, layer_state, fb, unit_mask[:, None, :])
            saturated += sat
        new_state.append(final)
        layer_in = tf.reshape(hidden, (-1, lanes * steps, n))
    outputs = tf.matmul(layer_in, params["readout_kernel"]) + params["readout_bias"][:, None, :]
    outputs = tf.reshape(outputs, (-1, lanes, steps, arch.num_outputs))
    real = tf.zeros((members,)) if unit_mask is None else tf.reduce_sum(unit_mask, axis=1)
    real *= float(GATES * lanes * steps * arch.num_layers)
    return outputs, new_state, hidden, saturated, real
