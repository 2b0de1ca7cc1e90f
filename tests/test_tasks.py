"""Sequence tasks, encodings and the (steps, lanes, time, features) window layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lstm_sweep.config import TrialConfig
from lstm_sweep.errors import ConfigError
from lstm_sweep.tasks import CYCLE_ALPHABET, MIRROR_PATTERN, SequenceData, build_data

CODES = np.arange(97, 109)


def stream_symbols(data: SequenceData, which: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(input indices, target indices) in stream order, from an onehot or raw split."""
    split = getattr(data, which)
    x = split.stream_order(split.x)
    if x.shape[-1] == data.num_classes and data.num_classes > 1 and set(np.unique(x)) <= {0.0, 1.0}:
        inputs = x.argmax(axis=-1)
    else:
        inputs = np.searchsorted(data.codes, x[..., 0])
    return inputs, split.stream_order(split.labels)


@pytest.mark.parametrize("task", ["cycle", "mirror", "delay"])
@pytest.mark.parametrize(("encoding", "features"), [("raw", 1), ("scaled", 1), ("onehot", len(CYCLE_ALPHABET))])
def test_shapes(task: str, encoding: str, features: int) -> None:
    cfg = TrialConfig(task=task, input_encoding=encoding, batch_size=8, seq_len=5, stream_length=400)
    data = build_data(cfg)
    n_train = 320  # 400 * (1 - 0.2)
    steps = n_train // 8 - 5 + 1  # stateless training windows start at every position of a lane
    assert data.train.x.shape == (steps, 8, 5, features)
    assert data.train.y.shape == (steps, 8, 5)
    assert data.train.labels.shape == (steps, 8, 5)
    assert data.train.x.dtype == np.float32
    assert data.train.labels.dtype == np.int32
    # stateless validation: every window is its own lane, one step
    assert data.val.x.shape == (1, 80 // 5, 5, features)
    assert data.num_features == features
    assert data.num_classes == 12


def test_raw_inputs_are_ord_codes() -> None:
    data = build_data(TrialConfig())
    assert data.train.x.shape[-1] == 1
    assert sorted(np.unique(data.train.x)) == list(CODES)
    assert sorted(np.unique(data.val.x)) == list(CODES)
    np.testing.assert_array_equal(data.codes, CODES)
    # raw target scale: y is the code itself
    np.testing.assert_array_equal(data.train.y, CODES[data.train.labels])


def test_scaled_inputs_are_standardised() -> None:
    data = build_data(TrialConfig(input_encoding="scaled"))
    x = data.train.x[..., 0].astype(np.float64)
    assert abs(x.mean()) < 1e-3
    assert abs(x.std() - 1.0) < 1e-3
    assert len(np.unique(x)) == 12


def test_scaled_targets_are_standardised_and_decode_back() -> None:
    data = build_data(TrialConfig(target_scale="scaled"))
    y = data.train.y.astype(np.float64)
    assert abs(y.mean()) < 1e-3
    assert abs(y.std() - 1.0) < 1e-3
    assert data.target_mean == pytest.approx(102.5)
    np.testing.assert_array_equal(data.decode_regression(data.val.y), data.val.labels)


def test_onehot_rows_pick_the_symbol() -> None:
    data = build_data(TrialConfig(input_encoding="onehot"))
    x = data.train.x
    np.testing.assert_array_equal(x.sum(axis=-1), 1.0)
    inputs, labels = stream_symbols(data)
    np.testing.assert_array_equal((inputs + 1) % 12, labels)


def test_stateless_training_windows_slide_by_one_within_each_lane() -> None:
    cfg = TrialConfig(seq_len=4, batch_size=3, stream_length=300)
    data = build_data(cfg)
    lane_len = round(300 * 0.8) // 3
    stream = np.resize(np.arange(12), 300)
    steps = data.train.labels.shape[0]
    assert steps == lane_len - 4 + 1
    for s in (0, 1, steps - 1):
        for lane in range(3):
            start = lane * lane_len + s
            np.testing.assert_array_equal(data.train.x[s, lane, :, 0], CODES[stream[start : start + 4]])
            np.testing.assert_array_equal(data.train.labels[s, lane], stream[start + 1 : start + 5])
    # same number of updates per epoch as seq_len 1, give or take the window length
    assert steps >= build_data(cfg.replace(seq_len=1)).train.labels.shape[0] - 3


@pytest.mark.parametrize(("seq_len", "batch_size", "stateful"), [(1, 16, False), (1, 3, True), (3, 5, True)])
def test_stream_order_reconstructs_cycle(seq_len: int, batch_size: int, stateful: bool) -> None:
    cfg = TrialConfig(seq_len=seq_len, batch_size=batch_size, stateful=stateful, stream_length=300)
    data = build_data(cfg)
    inputs, labels = stream_symbols(data)
    n = data.train.labels.size
    period = np.arange(12)
    np.testing.assert_array_equal(inputs, np.resize(period, n))
    # the target is the input shifted by one
    np.testing.assert_array_equal(labels, (inputs + 1) % 12)
    np.testing.assert_array_equal(labels[:-1], inputs[1:])
    assert data.text(labels[:13]) == "bcdefghijkla" + "b"
    # validation continues the stream right after the training part
    val_in, val_labels = stream_symbols(data, "val")
    n_train = round(300 * 0.8)
    np.testing.assert_array_equal(val_in, np.resize(period, 300)[n_train : n_train + val_in.size])
    np.testing.assert_array_equal(val_labels, (val_in + 1) % 12)


def test_stateful_validation_is_one_lane_in_order() -> None:
    cfg = TrialConfig(stateful=True, seq_len=4, batch_size=4, stream_length=400)
    data = build_data(cfg)
    assert data.val.x.shape == (80 // 4, 1, 4, 1)
    stateless = build_data(cfg.replace(stateful=False))
    assert stateless.val.x.shape == (1, 80 // 4, 4, 1)
    # same symbols, same stream order, different layout
    np.testing.assert_array_equal(
        data.val.stream_order(data.val.labels), stateless.val.stream_order(stateless.val.labels)
    )


def test_delay_targets_are_inputs_delay_steps_earlier() -> None:
    cfg = TrialConfig(
        task="delay", delay=3, input_encoding="onehot", batch_size=4, seq_len=5, stream_length=400, stateful=True
    )
    data = build_data(cfg)
    inputs, labels = stream_symbols(data)
    np.testing.assert_array_equal(labels[3:], inputs[:-3])
    assert not np.array_equal(labels, inputs)  # random stream: a delay of 3 is not the identity
    assert len(np.unique(inputs)) == 12
    # validation as well
    val_in, val_labels = stream_symbols(data, "val")
    np.testing.assert_array_equal(val_labels[3:], val_in[:-3])


def test_delay_is_deterministic_from_data_seed() -> None:
    cfg = TrialConfig(task="delay", stream_length=300)
    a, b = build_data(cfg), build_data(cfg)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.val.labels, b.val.labels)
    c = build_data(cfg.replace(data_seed=1))
    assert not np.array_equal(a.train.x, c.train.x)
    # the replicate seed is weights and noise only: the data do not change
    d = build_data(cfg.replace(seed=7))
    np.testing.assert_array_equal(a.train.x, d.train.x)


def test_mirror_successor_depends_on_direction() -> None:
    data = build_data(TrialConfig(task="mirror", input_encoding="onehot", stream_length=440))
    inputs, labels = stream_symbols(data)
    np.testing.assert_array_equal(inputs[: len(MIRROR_PATTERN)], [ord(ch) - 97 for ch in MIRROR_PATTERN])
    after_c = {data.alphabet[i] for i in labels[inputs == data.alphabet.index("c")]}
    assert after_c == {"b", "d"}
    # the ends have one successor only
    assert {data.alphabet[i] for i in labels[inputs == 0]} == {"b"}
    assert {data.alphabet[i] for i in labels[inputs == 11]} == {"k"}


def test_text_task_from_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("hello world\n", encoding="utf-8")
    cfg = TrialConfig(task="text", text_path=str(path), input_encoding="onehot", batch_size=4, stream_length=120)
    data = build_data(cfg)
    assert data.alphabet == "".join(sorted(set("hello world\n")))
    assert data.num_features == len(data.alphabet) == data.num_classes
    inputs, labels = stream_symbols(data)
    assert data.text(inputs[:12]) == "hello world\n"
    assert data.text(labels[:11]) == "ello world\n"
    assert data.class_prior.shape == (len(data.alphabet),)
    assert data.class_prior.sum() == pytest.approx(1.0)
    assert data.class_prior[data.alphabet.index("l")] > data.class_prior[data.alphabet.index("h")]


@pytest.mark.parametrize("content", ["", "aaaa"], ids=["empty", "single-character"])
def test_text_with_empty_alphabet_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "t.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        build_data(TrialConfig(task="text", text_path=str(path)))
    assert info.value.key == "text_path"
    assert str(path) in str(info.value)
    assert "at least 2 distinct" in str(info.value)


def test_missing_text_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_data(TrialConfig(task="text", text_path=str(tmp_path / "nope.txt")))
    assert info.value.key == "text_path"
    assert "readable" in str(info.value)


@pytest.mark.parametrize(("batch_size", "seq_len"), [(200, 1), (16, 7), (97, 1)])
def test_windows_larger_than_training_stream(batch_size: int, seq_len: int) -> None:
    # 120 symbols, 96 of them for training
    cfg = TrialConfig(stream_length=120, batch_size=batch_size, seq_len=seq_len)
    with pytest.raises(ConfigError) as info:
        build_data(cfg)
    assert info.value.key == "batch_size"
    assert "96 training symbols" in str(info.value)


def test_exactly_fitting_windows_are_fine() -> None:
    data = build_data(TrialConfig(stream_length=120, batch_size=16, seq_len=6))
    assert data.train.x.shape[:3] == (1, 16, 6)


def test_class_prior_of_cycle_is_uniform() -> None:
    data = build_data(TrialConfig())
    np.testing.assert_allclose(data.class_prior, np.full(12, 1 / 12))
