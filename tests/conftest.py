"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

TINY_SWEEP = """
name: {name}
sampler: grid
replicates: 2
fixed:
  task: cycle
  epochs: {epochs}
  stream_length: 240
  batch_size: 8
  state_size: 4
  output_framing: classification
factors:
  learning_rate:
    role: nuisance
    values: [0.01, 0.1]
  input_encoding:
    values: [raw, onehot]
"""


def tiny_sweep(name: str, epochs: int = 2, momenta: str | None = None) -> str:
    """A grid of 4 cells (x momenta) x 2 replicates that trains in about a second a cell."""
    text = TINY_SWEEP.format(name=name, epochs=epochs)
    if momenta is not None:
        text += f"  momentum:\n    values: {momenta}\n"
    return text
