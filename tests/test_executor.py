"""Where jobs run: results come back whole, errors come back as JobFailed, curves can be drawn ahead."""

from __future__ import annotations

from lstm_sweep.config import TrialConfig
from lstm_sweep.executor import JobFailed, run_job
from lstm_sweep.metrics import Thresholds

TINY = TrialConfig(stream_length=240, epochs=2)


def test_a_worker_can_draw_each_runs_curves_ahead_for_tracking() -> None:
    drawn = run_job([TINY, TINY.replace(seed=1)], Thresholds(), render_curves=True)
    assert not isinstance(drawn, JobFailed)
    assert all(r.artifacts["curves.png"].startswith(b"\x89PNG") for r in drawn)
    plain = run_job([TINY], Thresholds())
    assert not isinstance(plain, JobFailed) and plain[0].artifacts == {}


def test_a_job_that_raises_comes_back_as_its_error() -> None:
    failed = run_job([TINY.replace(seq_len=400)], Thresholds())
    assert isinstance(failed, JobFailed)
    assert "seq_len" in failed.message and "Traceback" in failed.traceback
