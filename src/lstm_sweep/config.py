"""One trial's configuration and the factor vocabulary it is made of.

The factor table below is the single source of truth: the `seed` command's options, the sweep-file parser and
the validation messages are all derived from it, so a factor is added in exactly one place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lstm_sweep.errors import ConfigError

FactorKind = Literal["float", "int", "choice", "bool"]


@dataclass(frozen=True)
class Factor:
    """A named training choice with its type and the values it may take."""

    name: str
    kind: FactorKind
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    @property
    def allowed(self) -> str:
        """Human description of the legal values, used verbatim in error messages."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        noun = "an integer" if self.kind == "int" else "a number"
        parts = []
        if self.low is not None:
            parts.append((">= " if self.low_inclusive else "> ") + _fmt(self.low))
        if self.high is not None:
            parts.append(("<= " if self.high_inclusive else "< ") + _fmt(self.high))
        return noun + (" " + " and ".join(parts) if parts else "")

    def check(self, value: object, source: str | None = None, key: str | None = None) -> Any:
        """Return the value coerced to the factor's type, or raise ConfigError naming the key."""
        key = key or self.name
        bad = ConfigError(key, value, self.allowed, source)
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise bad
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        if self.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise bad
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad
        if self.low is not None and (value < self.low or (not self.low_inclusive and value == self.low)):
            raise bad
        if self.high is not None and (value > self.high or (not self.high_inclusive and value == self.high)):
            raise bad
        return value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


FACTORS: dict[str, Factor] = {
    f.name: f
    for f in (
        Factor("learning_rate", "float", "optimizer step size", low=0.0, low_inclusive=False),
        Factor("momentum", "float", "SGD momentum (ignored by adam)", low=0.0, high=1.0, high_inclusive=False),
        Factor("optimizer", "choice", "update rule", choices=("momentum", "adam")),
        Factor("grad_noise", "float", "gradient-noise scale (0 = off)", low=0.0),
        Factor(
            "grad_noise_schedule",
            "choice",
            "seed: g + U(-1,1)*mean|v|*noise; annealed: Gaussian, variance noise/(1+step)^0.55",
            choices=("seed", "annealed"),
        ),
        Factor("seq_len", "int", "unrolled length of each training window", low=1, high=512),
        Factor("state_size", "int", "LSTM units per layer", low=1, high=1024),
        Factor("num_layers", "int", "stacked LSTM layers", low=1, high=8),
        Factor(
            "output_framing",
            "choice",
            "regression: one output, MSE on the code; classification: softmax over the alphabet",
            choices=("regression", "classification"),
        ),
        Factor(
            "input_encoding",
            "choice",
            "raw ord() code, standardised code, or one-hot",
            choices=("raw", "scaled", "onehot"),
        ),
        Factor("target_scale", "choice", "regression target as raw code or standardised", choices=("raw", "scaled")),
        Factor(
            "recurrent_training",
            "choice",
            "bptt trains the LSTM; readout_only freezes it at init (echo-state style)",
            choices=("bptt", "readout_only"),
        ),
        Factor("forget_bias", "float", "constant added to the forget-gate pre-activation", low=-20.0, high=20.0),
        Factor("grad_clip", "float", "global-norm gradient clipping (0 = off)", low=0.0),
        Factor("stateful", "bool", "carry the LSTM state across consecutive windows"),
        Factor("batch_size", "int", "windows per optimizer step", low=1, high=4096),
        Factor("epochs", "int", "passes over the training stream", low=1, high=100000),
    )
}

TASKS = ("cycle", "mirror", "delay", "text")
SETTINGS: dict[str, Factor] = {
    f.name: f
    for f in (
        Factor("task", "choice", "sequence task", choices=TASKS),
        Factor("delay", "int", "delay task: the target is the input this many steps ago", low=1, high=64),
        Factor("stream_length", "int", "symbols in the generated stream (train + validation)", low=24),
        Factor(
            "val_fraction",
            "float",
            "fraction of the stream held out for validation",
            low=0.0,
            high=0.9,
            low_inclusive=False,
        ),
        Factor("seed", "int", "replicate seed: weight init and gradient noise", low=0, high=2**31 - 1),
        Factor("data_seed", "int", "seed of the generated data (random tasks)", low=0, high=2**31 - 1),
    )
}


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs. Defaults are the seed configuration from DESIGN.md."""

    learning_rate: float = 1e-3
    momentum: float = 0.9
    optimizer: str = "momentum"
    grad_noise: float = 0.01
    grad_noise_schedule: str = "seed"
    seq_len: int = 1
    state_size: int = 16
    num_layers: int = 1
    output_framing: str = "regression"
    input_encoding: str = "raw"
    target_scale: str = "raw"
    recurrent_training: str = "bptt"
    forget_bias: float = 1.0
    grad_clip: float = 0.0
    stateful: bool = False
    batch_size: int = 16
    epochs: int = 20
    task: str = "cycle"
    delay: int = 3
    text_path: str | None = None
    stream_length: int = 1200
    val_fraction: float = 0.2
    seed: int = 0
    data_seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, spec in (*FACTORS.items(), *SETTINGS.items()):
            object.__setattr__(self, name, spec.check(getattr(self, name)))
        if self.task == "text" and not self.text_path:
            raise ConfigError("text_path", self.text_path, "a path to a text file when task is text")

    def replace(self, **changes: Any) -> TrialConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def factor_values(self) -> dict[str, Any]:
        """The factor columns, in table order; momentum is None where the optimizer ignores it."""
        values = {name: getattr(self, name) for name in FACTORS}
        if self.optimizer == "adam":
            values["momentum"] = None
        return values

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str | None = None) -> TrialConfig:
        """Build from a dict (sweep file, CLI); unknown keys are a ConfigError naming them."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key in values:
            if key not in known:
                raise ConfigError(key, values[key], "a known setting: " + ", ".join(sorted(known)), source)
        try:
            return cls(**dict(values))
        except ConfigError as err:
            if source and not err.source:
                raise ConfigError(err.key, err.value, err.allowed, source) from None
            raise


SEED_CONFIG = TrialConfig()
