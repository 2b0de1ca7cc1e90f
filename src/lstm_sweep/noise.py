"""Gradient noise drawn from a counter-based hash, so each weight's noise depends only on
(member seed, step, weight identity): the same numbers whether a trial trains alone or in a population.

The weight identity (parameter and size-independent coordinate) is hashed once, in numpy, when a population is
built; a training step then costs one more hash round per weight, keyed by the member's seed and the step. Hashing
every weight every step is the costliest elementwise work of a step, hence the split.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

_GOLDEN = 0x9E3779B9
_STREAM = 0x85EBCA6B
UNIFORM_STREAM, NORMAL_STREAM_A, NORMAL_STREAM_B = 1, 2, 3


def _mix_np(x: np.ndarray) -> np.ndarray:
    """lowbias32 in numpy uint32 arithmetic (wraps like the TF version below)."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def weight_ids(param_index: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """A hashed identity per weight from its parameter index and coordinate (both uint32 arrays)."""
    with np.errstate(over="ignore"):
        salted = coords.astype(np.uint32) ^ _mix_np(param_index.astype(np.uint32) * np.uint32(_GOLDEN) + np.uint32(1))
        return _mix_np(_mix_np(salted))


def _u32(value: int) -> tf.Tensor:
    return tf.constant(value & 0xFFFFFFFF, tf.uint32)


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit avalanche hash (lowbias32): every input bit flips about half the output bits."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))
    x = x * _u32(0x7FEB352D)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(15)))
    x = x * _u32(0x846CA68B)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))


def uniform01(seeds: tf.Tensor, step: tf.Tensor, stream: int, ids: tf.Tensor) -> tf.Tensor:
    """U[0, 1) of shape (members, weights); seeds (members,) uint32, step scalar uint32, ids (weights,) uint32."""
    key = _mix(seeds ^ _mix(step * _u32(_GOLDEN) + _u32(stream * _STREAM + 1)))
    bits = _mix(ids[None, :] ^ key[:, None])
    return tf.cast(tf.bitwise.right_shift(bits, _u32(8)), tf.float32) * (1.0 / (1 << 24))


def symmetric(seeds: tf.Tensor, step: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    """U(-1, 1): the seed's noise shape, before its per-weight scale."""
    return 2.0 * uniform01(seeds, step, UNIFORM_STREAM, ids) - 1.0


def gaussian(seeds: tf.Tensor, step: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    """Standard normal by Box-Muller from two independent hash streams."""
    u1 = uniform01(seeds, step, NORMAL_STREAM_A, ids)
    u2 = uniform01(seeds, step, NORMAL_STREAM_B, ids)
    return tf.sqrt(-2.0 * tf.math.log(1.0 - u1)) * tf.cos(2.0 * math.pi * u2)
