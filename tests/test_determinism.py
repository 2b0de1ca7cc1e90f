"""The same sweep file gives the same trials and, on one machine, the same numbers."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lstm_sweep.cli import main

SAMPLED = """
name: {name}
sampler: {sampler}
trials: 6
seed: 7
replicates: 1
fixed: {{task: cycle, epochs: 1, stream_length: 240, batch_size: 8, state_size: 4,
        output_framing: classification, input_encoding: onehot}}
factors:
  learning_rate: {{low: 0.001, high: 0.5, log: true}}
  optimizer: {{values: [momentum, adam]}}
  momentum: {{low: 0.0, high: 0.95}}
  grad_noise: {{low: 0.0, high: 0.1, step: 0.01}}
"""

GRID = """
name: same
sampler: grid
replicates: 2
fixed: {task: cycle, epochs: 3, stream_length: 240, batch_size: 8, state_size: 4}
factors:
  learning_rate: {values: [0.01, 0.1]}
  input_encoding: {values: [raw, onehot]}
  output_framing: {values: [regression, classification]}
  grad_noise: {values: [0.0, 0.01]}
"""


def run_into(sweep: Path, store: Path, name: str) -> optuna.Study:
    store.mkdir()
    storage = f"sqlite:///{store}/optuna.db"
    assert main(["run", str(sweep), "--storage", storage, "--no-tracking", "--quiet"]) == 0
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_same_file_same_trial_parameters(tmp_path, capsys, sampler):
    name = f"sampled-{sampler}"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SAMPLED.format(name=name, sampler=sampler))
    first = run_into(sweep, tmp_path / "a", name)
    second = run_into(sweep, tmp_path / "b", name)
    capsys.readouterr()
    assert len(first.trials) == len(second.trials) == 6
    assert all(t.state == TrialState.COMPLETE for t in [*first.trials, *second.trials])
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    # Momentum is only sampled for the momentum optimizer.
    assert all(("momentum" in t.params) == (t.params["optimizer"] == "momentum") for t in first.trials)


def test_same_grid_same_numbers(tmp_path, capsys):
    """Two fresh runs of one grid on one machine: every trial value and every replicate curve is identical."""
    sweep = tmp_path / "same.yaml"
    sweep.write_text(GRID)
    first = run_into(sweep, tmp_path / "a", "same")
    second = run_into(sweep, tmp_path / "b", "same")
    capsys.readouterr()

    def outcomes(study: optuna.Study) -> dict[tuple, tuple]:
        out = {}
        for t in study.get_trials(states=(TrialState.COMPLETE,)):
            reps = [
                (r["replicate"], r["seed"], r["verdict"], r["skill"], r["val_loss"], r["curve"])
                for r in t.user_attrs["replicates"]
            ]
            out[tuple(sorted(t.params.items()))] = (t.value, reps)
        return out

    a, b = outcomes(first), outcomes(second)
    assert len(a) == len(b) == 16
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
