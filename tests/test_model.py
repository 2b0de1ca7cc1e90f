"""The LSTM against references: the forward pass against a NumPy BasicLSTMCell, and the written-out backward pass
(backpropagation through time) against TensorFlow's automatic differentiation of the same forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from lstm_sweep.model import GATES, Architecture, forward, masked_recurrence, trained_recurrence

MEMBERS, LANES, UNITS = 3, 4, 5


def numpy_lstm(z_in: np.ndarray, w_rec: np.ndarray, h: np.ndarray, c: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """TF1 BasicLSTMCell over pre-computed input projections, gate order i, j, f, o; returns every h."""

    def sigmoid(v: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-v))

    hs = []
    for t in range(z_in.shape[2]):
        z = z_in[:, :, t] + np.einsum("mlu,mug->mlg", h, w_rec)
        i, j, f, o = np.split(z, GATES, axis=-1)
        c = c * sigmoid(f + fb) + sigmoid(i) * np.tanh(j)
        h = np.tanh(c) * sigmoid(o)
        hs.append(h)
    return np.stack(hs, axis=2)


def inputs(steps: int, seed: int = 0) -> tuple[tf.Tensor, tf.Tensor, tuple[tf.Tensor, tf.Tensor], tf.Tensor]:
    rng = np.random.default_rng(seed)
    z_in = rng.normal(0, 1.5, (MEMBERS, LANES, steps, GATES * UNITS)).astype(np.float32)
    w_rec = rng.normal(0, 0.5, (MEMBERS, UNITS, GATES * UNITS)).astype(np.float32)
    h0 = rng.normal(0, 0.5, (MEMBERS, LANES, UNITS)).astype(np.float32)
    c0 = rng.normal(0, 0.5, (MEMBERS, LANES, UNITS)).astype(np.float32)
    fb = rng.uniform(0, 2, (MEMBERS, 1, 1)).astype(np.float32)
    return tf.constant(z_in), tf.constant(w_rec), (tf.constant(h0), tf.constant(c0)), tf.constant(fb)


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("from_state", [False, True])
def test_forward_matches_a_numpy_cell(steps: int, from_state: bool) -> None:
    z_in, w_rec, state, fb = inputs(steps)
    zeros = np.zeros((MEMBERS, LANES, UNITS), np.float32)
    h0, c0 = (state[0].numpy(), state[1].numpy()) if from_state else (zeros, zeros)
    expected = numpy_lstm(z_in.numpy(), w_rec.numpy(), h0, c0, fb.numpy())
    trained, _ = trained_recurrence(z_in, w_rec, state if from_state else None, fb)
    ones = tf.ones((MEMBERS, 1, UNITS))
    evaluated, _, _ = masked_recurrence(z_in, w_rec, state if from_state else None, fb, ones)
    np.testing.assert_allclose(trained.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(evaluated.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("from_state", [False, True])
@pytest.mark.parametrize("uses_final_cell", [False, True])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_written_out_backward_matches_autodiff(steps: int, from_state: bool, uses_final_cell: bool, mode: str) -> None:
    """The gradients reaching the input projections and the recurrent kernel, for a loss on every hidden state
    and (uses_final_cell) on the final cell state too, as a stacked layer or a carried state would use them; run
    eagerly, as a graph and compiled by XLA (the written-out pass against eager automatic differentiation)."""
    z_in, w_rec, state, fb = inputs(steps, seed=steps)
    weights = tf.constant(np.random.default_rng(7).normal(size=(MEMBERS, LANES, steps, UNITS)).astype(np.float32))
    ones = tf.ones((MEMBERS, 1, UNITS))

    def gradients(trained: bool) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch([z_in, w_rec])
            if trained:
                hidden, (_, c) = trained_recurrence(z_in, w_rec, state if from_state else None, fb)
            else:
                hidden, (_, c), _ = masked_recurrence(z_in, w_rec, state if from_state else None, fb, ones)
            loss = tf.reduce_sum(hidden * weights)
            if uses_final_cell:
                loss += tf.reduce_sum(tf.sin(c))
        return tape.gradient(loss, [z_in, w_rec], unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def written_out() -> list[tf.Tensor]:
        return gradients(trained=True)

    run = written_out if mode == "eager" else tf.function(written_out, jit_compile=mode == "xla")
    written = [g.numpy() for g in run()]
    automatic = [g.numpy() for g in gradients(trained=False)]
    assert np.abs(automatic[0]).max() > 0.1
    if steps > 1 or from_state:
        assert np.abs(automatic[1]).max() > 0.1  # the recurrent kernel really gets a gradient here
    for mine, reference in zip(written, automatic, strict=True):
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("layers", [1, 2])
def test_whole_stack_matches_numpy_and_its_gradients_match_autodiff(steps: int, layers: int) -> None:
    """`forward` end to end: input kernels and biases (folded into one matmul from seq_len 2), stacked layers,
    readout; the training path (written-out backward) against the evaluation path (automatic differentiation)."""
    arch = Architecture(num_features=2, num_outputs=3, num_layers=layers, max_units=UNITS)
    rng = np.random.default_rng(steps + 10 * layers)
    params = {
        name: tf.constant(rng.normal(0, 0.6, (MEMBERS, *shape)).astype(np.float32))
        for name, shape in arch.param_shapes().items()
    }
    x = tf.constant(rng.normal(0, 1, (LANES, steps, 2)).astype(np.float32))
    fb = tf.constant([0.0, 1.0, 2.0])
    ones = tf.ones((MEMBERS, UNITS))

    layer_in = np.broadcast_to(x.numpy(), (MEMBERS, *x.shape))
    zeros = np.zeros((MEMBERS, LANES, UNITS), np.float32)
    for layer in range(layers):
        w_in = params[f"l{layer}_input_kernel"].numpy().reshape(MEMBERS, -1, GATES * UNITS)
        bias = params[f"l{layer}_bias"].numpy().reshape(MEMBERS, 1, 1, GATES * UNITS)
        z_in = np.einsum("mltf,mfg->mltg", layer_in, w_in) + bias
        w_rec = params[f"l{layer}_recurrent_kernel"].numpy().reshape(MEMBERS, UNITS, GATES * UNITS)
        layer_in = numpy_lstm(z_in, w_rec, zeros, zeros, fb.numpy()[:, None, None])
    expected = np.einsum("mltu,muo->mlto", layer_in, params["readout_kernel"].numpy())
    expected += params["readout_bias"].numpy()[:, None, None, :]

    def run(unit_mask: tf.Tensor | None) -> tuple[np.ndarray, list[np.ndarray]]:
        with tf.GradientTape() as tape:
            tape.watch(list(params.values()))
            out = forward(arch, params, x, None, fb, unit_mask)[0]
            loss = tf.reduce_sum(tf.sin(out))
        found = tape.gradient(loss, list(params.values()), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return out.numpy(), [g.numpy() for g in found]

    (trained, written), (evaluated, automatic) = run(None), run(ones)
    np.testing.assert_allclose(trained, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(evaluated, expected, rtol=1e-5, atol=1e-5)
    for name, mine, reference in zip(params, written, automatic, strict=True):
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-5, err_msg=name)
        assert np.abs(reference).max() > 0 or (steps == 1 and name.endswith("recurrent_kernel")), name
