"""The per-run curve PNG that tracking logs: drawn in worker processes, so this needs matplotlib, not MLflow."""

from __future__ import annotations

import io
import math
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lstm_sweep.train import TrialResult

RELATIVE_LOSS_RANGE = (1e-4, 10.0)  # loss / mean-prediction loss: 1 is the plateau, 1e-4 a near-perfect fit


class _CurveFigure:
    """One figure per epoch count whose axes never change, so everything but the two lines and the title is drawn
    once and restored from a pixel copy for each run (about 7 ms a run instead of 33 ms for a full draw: with
    hundreds of runs per sweep, on the workers' cores).

    The y axis is loss relative to the mean-prediction (baseline) loss, which puts every run on one fixed scale:
    1 is the plateau, below it the run does better than predicting the mean."""

    def __init__(self, epochs: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.fig = Figure(figsize=(4.8, 2.8), dpi=80)  # no pyplot: safe outside the main thread
        self.canvas = FigureCanvasAgg(self.fig)
        self.ax = self.fig.subplots()
        (self.train,) = self.ax.plot([], [], label="train", animated=True)
        (self.val,) = self.ax.plot([], [], label="validation", animated=True)
        self.ax.axhline(1.0, color="grey", ls="--", lw=1, label="mean prediction (plateau)")
        self.ax.set_yscale("log")
        self.ax.set_ylim(*RELATIVE_LOSS_RANGE)
        self.ax.set_xlim(0.5, max(epochs, 1) + 0.5)
        self.ax.set_xlabel("epoch")
        self.ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.ax.set_ylabel("loss / mean-prediction loss", fontsize=8)
        self.ax.legend(fontsize=7, loc="lower left")
        self.title = self.ax.set_title(" ", animated=True)
        self.fig.subplots_adjust(left=0.15, right=0.97, bottom=0.16, top=0.89)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.fig.bbox)

    def png(self, result: TrialResult) -> bytes:
        from PIL import Image

        history = result.history
        epochs = [r["epoch"] for r in history]
        baseline = result.final["baseline_loss"]
        for line, key in ((self.train, "train_loss"), (self.val, "val_loss")):
            line.set_data(epochs, [_relative(r[key], baseline) for r in history])
        skill = result.final["skill"]
        self.title.set_text(f"{result.verdict}: final skill {skill:.3f}" if math.isfinite(skill) else result.verdict)
        self.canvas.restore_region(self.background)
        for artist in (self.train, self.val, self.title):
            self.ax.draw_artist(artist)
        width, height = self.canvas.get_width_height()
        image = Image.frombuffer("RGBA", (width, height), self.canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        buffer = io.BytesIO()
        image.save(buffer, format="png")
        return buffer.getvalue()


def _relative(loss: float, baseline: float) -> float:
    """Loss over the baseline loss; NaN (a gap in the line) for a non-finite or negative loss or a baseline that is
    not positive and finite."""
    if not (0 < baseline < math.inf and 0 <= loss < math.inf):
        return math.nan
    return max(loss / baseline, RELATIVE_LOSS_RANGE[0] / 2)  # a perfect fit shows on the floor, not as a gap


_FIGURES = threading.local()


def curve_png(result: TrialResult) -> bytes:
    """Train and validation loss per epoch, relative to the mean-prediction loss, as a small PNG (one figure per
    thread and epoch count; the bytes are logged as they are)."""
    figures: dict[int, _CurveFigure] | None = getattr(_FIGURES, "by_epochs", None)
    if figures is None:
        figures = _FIGURES.by_epochs = {}
    epochs = result.config.epochs
    if epochs not in figures:
        figures[epochs] = _CurveFigure(epochs)
    return figures[epochs].png(result)
