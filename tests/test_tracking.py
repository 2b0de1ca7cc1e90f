"""MLflow layout of one run: which keys are charted per epoch, and the history.csv that keeps them all."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lstm_sweep.config import TrialConfig
from lstm_sweep.metrics import EPOCH_METRICS
from lstm_sweep.tracking import SweepTracker
from lstm_sweep.train import RECORD_KEYS, TrialResult

EPOCHS = 3


def _result() -> TrialResult:
    history = [
        {k: float(i) + e / 10 for i, k in enumerate(RECORD_KEYS)}
        | {"epoch": e, "baseline_loss": 12.0, "distinct_symbols": float(e)}
        for e in range(1, EPOCHS + 1)
    ]
    return TrialResult(
        config=TrialConfig(epochs=EPOCHS),
        history=history,
        verdict="partial",
        escape_epoch=None,
        diverged_step=None,
        actual="abc",
        pred="abd",
        seconds=0.1,
    )


@pytest.mark.parametrize("charted", [("grad_norm_bias",), EPOCH_METRICS])
def test_charted_keys_per_epoch_and_every_key_in_history_csv(tmp_path, charted) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "tracked", charted)
    tracker.start_sweep({"name": "tracked"}, None)
    result = _result()
    run_id = tracker.log_replicate(result, trial_number=0, config_id="c", replicate=0, params={"seq_len": 1})
    client = MlflowClient(tracking_uri=uri)
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == ([1, 2, 3] if key in charted else []), key
    run = client.get_run(run_id)
    for key in EPOCH_METRICS:  # the last value of every measure, charted or not
        assert run.data.metrics[f"final_{key}"] == pytest.approx(result.final[key]), key
    assert "final_loss" not in run.data.metrics  # the summary's other name for final_val_loss
    assert run.data.params == {"seq_len": "1"}
    history = pd.read_csv(client.download_artifacts(run_id, "history.csv", str(tmp_path)))
    assert list(history.columns) == list(RECORD_KEYS)
    expected = pd.DataFrame(result.history)[list(RECORD_KEYS)]
    pd.testing.assert_frame_equal(history, expected, check_dtype=False)
