"""The per-run curve PNG: drawn into a reused figure by restoring a pixel copy, so nothing may leak between runs."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from lstm_sweep import curves
from lstm_sweep.config import TrialConfig
from lstm_sweep.train import RECORD_KEYS, TrialResult


def _result(losses: list[float], baseline: float = 2.0, verdict: str = "escaped") -> TrialResult:
    history = [
        {k: 0.0 for k in RECORD_KEYS}
        | {"epoch": e, "train_loss": v, "val_loss": v, "baseline_loss": baseline, "skill": 1 - v / baseline}
        for e, v in enumerate(losses, start=1)
    ]
    return TrialResult(
        config=TrialConfig(epochs=len(losses)),
        history=history,
        verdict=verdict,  # type: ignore[arg-type]
        escape_epoch=None,
        diverged_step=None,
        actual="",
        pred="",
        seconds=0.0,
    )


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_a_runs_png_does_not_keep_the_previous_runs_lines() -> None:
    falling = _result([2.0 / 2**k for k in range(10)])
    flat = _result([2.0] * 10, verdict="plateau")
    curves.curve_png(falling)
    reused = curves.curve_png(flat)
    fresh = curves._CurveFigure(10).png(flat)
    assert reused == fresh
    assert not np.array_equal(_pixels(reused), _pixels(curves.curve_png(falling)))


def test_a_plateaued_runs_line_lies_on_the_mean_prediction_line() -> None:
    """Relative loss 1 is the dashed plateau line; a run at the baseline loss is drawn there, not elsewhere."""
    figure = curves._CurveFigure(10)
    blank = _pixels(figure.png(_result([math.nan] * 10)))
    on_plateau = _pixels(figure.png(_result([2.0] * 10)))
    changed_rows = np.flatnonzero(np.any(blank != on_plateau, axis=(1, 2)))
    title_rows = changed_rows[changed_rows < blank.shape[0] * 0.1]
    line_rows = np.setdiff1d(changed_rows, title_rows)
    _, y_pixel = figure.ax.transData.transform((5, 1.0))
    plateau_row = blank.shape[0] - y_pixel  # image rows count from the top
    assert line_rows.size and abs(np.median(line_rows) - plateau_row) <= 2


def test_a_diverged_run_draws_without_error() -> None:
    png = curves.curve_png(_result([1.0, 5.0, math.inf, math.nan], verdict="diverged"))
    assert png.startswith(b"\x89PNG")
