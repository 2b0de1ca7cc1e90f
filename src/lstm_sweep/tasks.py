"""Sequence tasks, their encodings, and the window layout the trainer consumes.

Layout: the training stream is cut into `batch_size` contiguous lanes; optimizer step s takes window s of every
lane. A stateful model gets consecutive, non-overlapping windows and carries its state from one to the next; a
stateless one restarts from zero at every window, and its windows start at every position (stride 1), so each
seq_len sees about the same number of updates per epoch. Arrays are (steps, lanes, time, ...). For the validation
split (always non-overlapping), flattening (lanes, steps, time) gives stream order again, which is how predictions
are turned back into the seed-style `Pred:` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_sweep.config import TrialConfig
from lstm_sweep.errors import ConfigError

CYCLE_ALPHABET = "abcdefghijkl"
MIRROR_PATTERN = "abcdefghijklkjihgfedcb"


@dataclass(frozen=True)
class Stream:
    """A task's symbols as indices into its alphabet: inputs[i] is followed by targets[i]."""

    alphabet: str
    inputs: np.ndarray
    targets: np.ndarray


@dataclass(frozen=True)
class Split:
    """One part of the data in window layout."""

    x: np.ndarray  # (steps, lanes, time, features) float32, encoded inputs
    y: np.ndarray  # (steps, lanes, time) float32, regression targets in target scale
    labels: np.ndarray  # (steps, lanes, time) int32, target symbol indices

    def stream_order(self, values: np.ndarray) -> np.ndarray:
        """Reorder an array shaped like `labels` (plus trailing dims) into stream order."""
        moved = np.swapaxes(values, 0, 1)
        return moved.reshape((-1, *values.shape[3:]))


@dataclass(frozen=True)
class SequenceData:
    """Encoded train/validation windows plus what is needed to decode predictions."""

    alphabet: str
    codes: np.ndarray  # (K,) ord() of each symbol
    train: Split
    val: Split
    target_mean: float  # regression target = (code - target_mean) / target_std
    target_std: float
    class_prior: np.ndarray  # (K,) symbol frequencies among training targets

    @property
    def num_classes(self) -> int:
        return len(self.alphabet)

    @property
    def num_features(self) -> int:
        return int(self.train.x.shape[-1])

    def decode_regression(self, outputs: np.ndarray) -> np.ndarray:
        """Nearest alphabet symbol (index) to each regression output."""
        codes = outputs * self.target_std + self.target_mean
        return np.abs(codes[..., None] - self.codes).argmin(axis=-1)

    def text(self, indices: np.ndarray) -> str:
        return "".join(self.alphabet[i] for i in np.asarray(indices).ravel())


def make_stream(config: TrialConfig) -> Stream:
    """The task's symbol stream, stream_length + 1 symbols long, deterministic from data_seed."""
    n = config.stream_length
    if config.task in ("cycle", "mirror"):
        pattern = CYCLE_ALPHABET if config.task == "cycle" else MIRROR_PATTERN
        alphabet = CYCLE_ALPHABET
        lookup = {ch: i for i, ch in enumerate(alphabet)}
        period = np.array([lookup[ch] for ch in pattern], dtype=np.int32)
        symbols = np.resize(period, n + 1)
        return Stream(alphabet, symbols[:-1], symbols[1:])
    if config.task == "delay":
        rng = np.random.default_rng(config.data_seed)
        symbols = rng.integers(0, len(CYCLE_ALPHABET), size=n + config.delay).astype(np.int32)
        return Stream(CYCLE_ALPHABET, symbols[config.delay :], symbols[:n])
    return _text_stream(config)


def _text_stream(config: TrialConfig) -> Stream:
    path = Path(str(config.text_path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("text_path", str(path), f"a readable UTF-8 text file ({err.__class__.__name__})") from None
    alphabet = "".join(sorted(set(text)))
    if len(alphabet) < 2:
        raise ConfigError("text_path", str(path), "a text with an alphabet of at least 2 distinct characters")
    lookup = {ch: i for i, ch in enumerate(alphabet)}
    indices = np.array([lookup[ch] for ch in text], dtype=np.int32)
    symbols = np.resize(indices, config.stream_length + 1)
    return Stream(alphabet, symbols[:-1], symbols[1:])


def build_data(config: TrialConfig) -> SequenceData:
    """Generate, encode and window the task's data for one layout."""
    stream = make_stream(config)
    alphabet = stream.alphabet
    codes = np.array([ord(ch) for ch in alphabet], dtype=np.float64)
    n_train = round(config.stream_length * (1.0 - config.val_fraction))
    train_in, train_out = stream.inputs[:n_train], stream.targets[:n_train]
    val_in, val_out = stream.inputs[n_train:], stream.targets[n_train:]

    in_codes = codes[train_in]
    in_mean, in_std = float(in_codes.mean()), float(in_codes.std()) or 1.0
    out_codes = codes[train_out]
    if config.target_scale == "scaled":
        target_mean, target_std = float(out_codes.mean()), float(out_codes.std()) or 1.0
    else:
        target_mean, target_std = 0.0, 1.0

    def encode(idx: np.ndarray) -> np.ndarray:
        if config.input_encoding == "onehot":
            return np.eye(len(alphabet), dtype=np.float32)[idx]
        values = codes[idx]
        if config.input_encoding == "scaled":
            values = (values - in_mean) / in_std
        return values[..., None].astype(np.float32)

    t = config.seq_len
    lane_len = n_train // config.batch_size
    if lane_len < t:
        raise ConfigError(
            "batch_size",
            config.batch_size,
            f"batch_size * seq_len <= the {n_train} training symbols (stream_length {config.stream_length})",
        )

    def windows(idx: np.ndarray, lanes: int, steps: int) -> np.ndarray:
        return idx[: lanes * steps * t].reshape(lanes, steps, t).swapaxes(0, 1)

    def sliding(idx: np.ndarray, lanes: int) -> np.ndarray:
        lane = idx[: lanes * lane_len].reshape(lanes, lane_len)
        return np.lib.stride_tricks.sliding_window_view(lane, t, axis=1).swapaxes(0, 1).copy()

    def encoded(x_idx: np.ndarray, y_idx: np.ndarray) -> Split:
        y = ((codes[y_idx] - target_mean) / target_std).astype(np.float32)
        return Split(encode(x_idx), y, y_idx.astype(np.int32))

    def split(inputs: np.ndarray, targets: np.ndarray, lanes: int, steps: int) -> Split:
        return encoded(windows(inputs, lanes, steps), windows(targets, lanes, steps))

    if config.stateful:
        # Consecutive windows of each lane, so the carried state continues the lane's stream.
        train = split(train_in, train_out, config.batch_size, lane_len // t)
    else:
        # Every window start (stride 1): each seq_len gets about the same number of updates per epoch, so a
        # longer window is not confounded with fewer optimizer steps.
        train = encoded(sliding(train_in, config.batch_size), sliding(train_out, config.batch_size))
    n_val_windows = len(val_in) // t
    if n_val_windows == 0:
        raise ConfigError("val_fraction", config.val_fraction, f"a validation slice of at least seq_len={t} symbols")
    # Stateful: one lane carries its state through the whole slice; otherwise every window starts from zero.
    lanes, steps = (1, n_val_windows) if config.stateful else (n_val_windows, 1)
    val = split(val_in, val_out, lanes, steps)
    prior = np.bincount(train.labels.ravel(), minlength=len(alphabet)).astype(np.float64)
    return SequenceData(
        alphabet=alphabet,
        codes=codes,
        train=train,
        val=val,
        target_mean=target_mean,
        target_std=target_std,
        class_prior=prior / prior.sum(),
    )
