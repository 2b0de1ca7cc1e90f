"""Gradient noise drawn from a counter-based hash, so each weight's noise depends only on
(member seed, step, parameter, weight coordinate): the same numbers whether a trial trains alone or in a population.
"""

from __future__ import annotations

import math

import tensorflow as tf

_GOLDEN = 0x9E3779B9


def _u32(value: int) -> tf.Tensor:
    return tf.constant(value & 0xFFFFFFFF, tf.uint32)


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit avalanche hash (lowbias32): every input bit flips about half the output bits."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))
    x = x * _u32(0x7FEB352D)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(15)))
    x = x * _u32(0x846CA68B)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))


def uniform01(seeds: tf.Tensor, step: tf.Tensor, stream: int, coords: tf.Tensor) -> tf.Tensor:
    """U[0, 1) of shape (members, *coords.shape); seeds (members,) uint32, step scalar uint32."""
    key = _mix(seeds ^ _mix(step * _u32(_GOLDEN) + _u32(stream * 0x85EBCA6B + 1)))
    key = tf.reshape(key, [-1] + [1] * len(coords.shape))
    bits = _mix(_mix(coords[None] ^ key) + key)
    return tf.cast(tf.bitwise.right_shift(bits, _u32(8)), tf.float32) * (1.0 / (1 << 24))


def seed_noise(seeds: tf.Tensor, step: tf.Tensor, stream: int, coords: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """The seed's noise shape, U(-1, 1) * scale; scale broadcasts over the member axis."""
    return (2.0 * uniform01(seeds, step, stream, coords) - 1.0) * scale


def gaussian(seeds: tf.Tensor, step: tf.Tensor, stream: int, coords: tf.Tensor) -> tf.Tensor:
    """Standard normal by Box-Muller from two independent hash streams."""
    u1 = uniform01(seeds, step, 2 * stream + 1000, coords)
    u2 = uniform01(seeds, step, 2 * stream + 1001, coords)
    return tf.sqrt(-2.0 * tf.math.log(1.0 - u1)) * tf.cos(2.0 * math.pi * u2)
