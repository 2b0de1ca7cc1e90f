"""TrialConfig validation: every bad value is a ConfigError naming the key and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from lstm_sweep.config import FACTORS, SEED_CONFIG, SETTINGS, TrialConfig
from lstm_sweep.errors import ConfigError

BAD_VALUES: list[tuple[dict[str, Any], str, str]] = [
    ({"learning_rate": -0.1}, "learning_rate", "a number > 0"),
    ({"learning_rate": 0}, "learning_rate", "a number > 0"),
    ({"learning_rate": float("nan")}, "learning_rate", "a number > 0"),
    ({"input_encoding": "binary"}, "input_encoding", "one of raw, scaled, onehot"),
    ({"optimizer": "rmsprop"}, "optimizer", "one of momentum, adam"),
    ({"seq_len": 0}, "seq_len", "an integer >= 1"),
    ({"seq_len": 2.5}, "seq_len", "an integer >= 1"),
    ({"momentum": 1.0}, "momentum", "< 1"),
    ({"momentum": -0.5}, "momentum", ">= 0"),
    ({"state_size": 0}, "state_size", "an integer >= 1"),
    ({"state_size": True}, "state_size", "an integer"),
    ({"epochs": False}, "epochs", "an integer"),
    ({"stateful": 1}, "stateful", "true or false"),
    ({"grad_noise": -1e-3}, "grad_noise", "a number >= 0"),
    ({"val_fraction": 0.0}, "val_fraction", "> 0"),
    ({"stream_length": 10}, "stream_length", ">= 24"),
    ({"task": "reber"}, "task", "one of cycle, mirror, delay, text"),
    ({"task": "text"}, "text_path", "a path to a text file when task is text"),
    ({"task": "text", "text_path": ""}, "text_path", "a path to a text file"),
]


@pytest.mark.parametrize(("kwargs", "key", "allowed"), BAD_VALUES, ids=[str(k) for k, _, _ in BAD_VALUES])
def test_bad_value_names_key_and_allowed(kwargs: dict[str, Any], key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrialConfig(**kwargs)
    err = info.value
    assert err.key == key
    message = str(err)
    assert message.startswith(f"{key}:")
    assert allowed in message
    assert allowed in err.allowed


@pytest.mark.parametrize(("kwargs", "key", "allowed"), BAD_VALUES[:6], ids=[str(k) for k, _, _ in BAD_VALUES[:6]])
def test_from_mapping_reports_the_same_error_with_its_source(kwargs: dict[str, Any], key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_mapping(kwargs, source="sweeps/x.yaml")
    assert info.value.key == key
    assert str(info.value).startswith(f"sweeps/x.yaml: {key}:")
    assert allowed in str(info.value)


def test_unknown_key_is_named_and_known_keys_listed() -> None:
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_mapping({"learning_rat": 0.1})
    err = info.value
    assert err.key == "learning_rat"
    assert "learning_rat:" in str(err)
    assert "a known setting" in str(err)
    assert "learning_rate" in str(err)
    # "extra" is internal, not a setting a user can give
    assert "extra" not in err.allowed


def test_replace_revalidates() -> None:
    with pytest.raises(ConfigError) as info:
        SEED_CONFIG.replace(momentum=1.0)
    assert info.value.key == "momentum"


def test_seed_config_is_the_design_seed() -> None:
    c = TrialConfig()
    assert (c.learning_rate, c.momentum, c.optimizer) == (1e-3, 0.9, "momentum")
    assert (c.seq_len, c.input_encoding, c.output_framing, c.target_scale) == (1, "raw", "regression", "raw")
    assert c.forget_bias == 1.0
    assert c.task == "cycle"


def test_good_values_are_coerced() -> None:
    c = TrialConfig.from_mapping({"seq_len": 4.0, "learning_rate": 1, "stateful": True})
    assert c.seq_len == 4 and isinstance(c.seq_len, int)
    assert c.learning_rate == 1.0 and isinstance(c.learning_rate, float)
    assert c.stateful is True


def test_factor_values_hide_momentum_under_adam() -> None:
    assert TrialConfig(optimizer="adam").factor_values()["momentum"] is None
    assert TrialConfig(optimizer="momentum").factor_values()["momentum"] == 0.9
    assert list(TrialConfig().factor_values()) == list(FACTORS)


def test_as_dict_round_trips() -> None:
    c = TrialConfig(seq_len=3, stateful=True, task="mirror")
    d = c.as_dict()
    assert set(d) == set(FACTORS) | set(SETTINGS) | {"text_path"}
    assert TrialConfig.from_mapping(d) == c
