"""The on-disk XLA cache: where it goes, when it stays off, and that a second process loads what the first
compiled and trains to the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lstm_sweep import xla_cache


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LSTM_SWEEP_XLA_CACHE": "off"}, None),
        ({"LSTM_SWEEP_XLA_CACHE": "0"}, None),
        ({"LSTM_SWEEP_XLA_CACHE": "/srv/cache"}, Path("/srv/cache")),
        ({"LSTM_SWEEP_XLA_CACHE": "", "XDG_CACHE_HOME": "/x"}, Path("/x/lstm-sweep/xla")),
        ({"LSTM_SWEEP_XLA_CACHE": "", "XDG_CACHE_HOME": "", "HOME": "/home/u"}, Path("/home/u/.cache/lstm-sweep/xla")),
    ],
)
def test_the_cache_folder_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: Path | None
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert xla_cache.cache_root() == expected


def test_enabling_adds_the_flag_in_a_folder_per_tensorflow_and_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LSTM_SWEEP_XLA_CACHE", str(tmp_path))
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")
    folder = xla_cache.enable_xla_cache()
    assert folder == tmp_path / xla_cache.machine_tag() and folder.is_dir()
    import tensorflow as tf

    assert xla_cache.machine_tag().startswith(f"tf{tf.__version__}-")
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=0 {xla_cache.FLAG}={folder}"


def test_a_users_own_cache_flag_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mine = f"{xla_cache.FLAG}=/mine"
    monkeypatch.setenv("LSTM_SWEEP_XLA_CACHE", str(tmp_path))
    monkeypatch.setenv("TF_XLA_FLAGS", mine)
    assert xla_cache.enable_xla_cache() is None
    assert os.environ["TF_XLA_FLAGS"] == mine


def test_off_or_unwritable_leaves_the_flags_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TF_XLA_FLAGS", raising=False)
    monkeypatch.setenv("LSTM_SWEEP_XLA_CACHE", "off")
    assert xla_cache.enable_xla_cache() is None
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LSTM_SWEEP_XLA_CACHE", str(blocker / "xla"))
    assert xla_cache.enable_xla_cache() is None
    assert "TF_XLA_FLAGS" not in os.environ


TRAIN_ONCE = """
import json, sys
from lstm_sweep.executor import prepare_tensorflow
prepare_tensorflow(inter_op=1)
from lstm_sweep.config import TrialConfig
from lstm_sweep.train import train
config = TrialConfig(task="cycle", epochs=3, stream_length=240, batch_size=8, state_size=4, seq_len=1,
                     output_framing="classification", input_encoding="onehot", learning_rate=0.1)
result = train(config)
print(json.dumps([r["train_loss"] for r in result.history]))
"""


def test_a_second_process_loads_the_compiled_epoch_and_trains_the_same(tmp_path: Path) -> None:
    env = os.environ | {"LSTM_SWEEP_XLA_CACHE": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_XLA_FLAGS", None)
    env.pop("LSTM_SWEEP_XLA", None)  # seq_len 1 compiles with XLA

    def run() -> list[float]:
        done = subprocess.run([sys.executable, "-c", TRAIN_ONCE], env=env, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    entries = sorted(tmp_path.rglob("*.pb"))
    assert entries, "the first process wrote no compiled executable"
    stamps = [p.stat().st_mtime_ns for p in entries]
    second = run()
    assert second == first
    assert sorted(tmp_path.rglob("*.pb")) == entries  # loaded, not compiled and written again
    assert [p.stat().st_mtime_ns for p in entries] == stamps
