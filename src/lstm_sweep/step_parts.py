"""Which optional parts of a training step some member of a population needs: Adam, either noise schedule, clipping.

A population's epoch is traced with only the parts its members need. Written as conditions inside the step, XLA
turned the cheap branches into selects and computed both (measured, 64 members at seq_len 8 with 64 units, momentum
only: Adam's arithmetic ran anyway). A sweep trains every job with the parts any of its configurations may need
(`SweepSpec.step_parts`): a worker then compiles one epoch per shape, and a run's arithmetic does not depend on
which runs share its job or batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lstm_sweep.config import TrialConfig

AdamUse = Literal["none", "some", "all"]


@dataclass(frozen=True)
class StepParts:
    """The optional parts some member needs; each combination is its own compiled epoch."""

    adam: AdamUse = "none"  # how many members use Adam
    seeded_noise: bool = False
    annealed_noise: bool = False
    clip: bool = False

    @classmethod
    def of(cls, configs: Sequence[TrialConfig]) -> StepParts:
        adam = sum(c.optimizer == "adam" for c in configs)
        noisy = [c for c in configs if c.grad_noise > 0]
        use: AdamUse = "none" if adam == 0 else "all" if adam == len(configs) else "some"
        return cls(
            adam=use,
            seeded_noise=any(c.grad_noise_schedule != "annealed" for c in noisy),
            annealed_noise=any(c.grad_noise_schedule == "annealed" for c in noisy),
            clip=any(c.grad_clip > 0 for c in configs),
        )

    @property
    def noise(self) -> bool:
        return self.seeded_noise or self.annealed_noise

    def union(self, other: StepParts) -> StepParts:
        """The parts either needs: what a compiled epoch must hold to serve both."""
        return StepParts(
            adam=self.adam if self.adam == other.adam else "some",
            seeded_noise=self.seeded_noise or other.seeded_noise,
            annealed_noise=self.annealed_noise or other.annealed_noise,
            clip=self.clip or other.clip,
        )
