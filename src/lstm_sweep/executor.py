"""Where training jobs run: in this process, or in worker processes that each import TensorFlow once.

A job is a list of configurations that share a data layout, trained as one population or one after another; it
comes back as their results or as the error it raised. The parent process keeps the Optuna and MLflow stores, so with
SQLite there is one writer however many workers train.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from lstm_sweep.config import TrialConfig
from lstm_sweep.metrics import Thresholds
from lstm_sweep.step_parts import StepParts
from lstm_sweep.train import TrialResult, train_population


@dataclass(frozen=True)
class Job:
    """Configurations that train as one population (or one lone configuration), and how many runs of their layout
    the caller will train with the same graph (a sweep passes its planned runs): that decides XLA."""

    configs: list[TrialConfig]
    layout_runs: int = 1
    together: bool = True  # one population; else each configuration alone, one after another on one graph
    parts: StepParts | None = None  # the optional step parts to compile (a sweep's, `SweepSpec.step_parts`)


@dataclass(frozen=True)
class JobFailed:
    """A job raised: the error line and its traceback, recorded on the trials and the sweep goes on."""

    message: str
    traceback: str


Outcome = list[TrialResult] | JobFailed


class Executor(Protocol):
    def run(self, jobs: Sequence[Job], thresholds: Thresholds) -> Iterator[Outcome]:
        """Each job's outcome, in job order. Worker pools start the jobs at once; in process, training happens as
        the outcomes are read."""
        ...

    def close(self) -> None: ...


def run_job(job: Job, thresholds: Thresholds, render_curves: bool = False) -> Outcome:
    """Train one job; with render_curves, also draw each result's curves.png here (in a worker process that is
    parallel work taken off the single writer thread, which otherwise trails the workers at the end)."""
    try:
        if job.together:
            results = train_population(job.configs, thresholds=thresholds, layout_runs=job.layout_runs, parts=job.parts)
        else:
            runs, parts = job.layout_runs, job.parts
            results = [
                train_population([c], thresholds=thresholds, layout_runs=runs, parts=parts)[0] for c in job.configs
            ]
        if render_curves:
            from lstm_sweep.curves import curve_png

            for result in results:
                result.artifacts["curves.png"] = curve_png(result)
        return results
    except Exception as err:
        return JobFailed(f"{err.__class__.__name__}: {err}", traceback.format_exc())


class InProcess:
    """Train in this process (the default)."""

    def __init__(self) -> None:
        prepare_tensorflow(inter_op=2)

    def run(self, jobs: Sequence[Job], thresholds: Thresholds) -> Iterator[Outcome]:
        for job in jobs:
            yield run_job(job, thresholds)

    def close(self) -> None:
        pass


def prepare_tensorflow(inter_op: int) -> None:
    """Before TensorFlow's first op in a training process: no Keras, the on-disk XLA cache, then the threads."""
    from lstm_sweep.xla_cache import enable_xla_cache

    skip_keras()
    enable_xla_cache()
    configure_threads(inter_op)


def skip_keras() -> None:
    """Keep `import tensorflow` from loading Keras, which training never uses.

    TensorFlow imports Keras eagerly, and Keras scikit-learn and SciPy: measured here, 3.6 s of the 8.8 s a
    process spends importing TensorFlow, paid again by every worker. TensorFlow skips Keras when the import fails,
    and a module set to None in `sys.modules` fails to import. Only for processes that train and have not loaded
    TensorFlow yet (once loaded, Keras is there anyway); `tf.keras` is then unavailable in that process.
    """
    if "tensorflow" not in sys.modules:
        for name in ("keras", "tf_keras"):
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def configure_threads(inter_op: int) -> None:
    """One thread per op. These graphs are chains of tiny ops: splitting one op over cores costs more in hand-offs
    than it saves (measured: a single thread per op is as fast as two), while running independent ops side by
    side (`inter_op`) does pay in one process. Must run before TensorFlow's first op; later it cannot change."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        pass  # TensorFlow already ran an op in this process (a notebook, a test): keep its settings


def _init_worker() -> None:
    """One TF thread per worker: N workers on N cores, instead of N workers fighting over every core."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    prepare_tensorflow(inter_op=1)


def _run_job_star(args: tuple[Job, Thresholds, bool]) -> Outcome:
    return run_job(*args)


class WorkerPool:
    """`--workers N`: N spawned processes; jobs are handed out as workers free up, results come back in order."""

    def __init__(self, workers: int, render_curves: bool = False) -> None:
        context = multiprocessing.get_context("spawn")
        self.pool = context.Pool(workers, initializer=_init_worker)
        self.render_curves = render_curves

    def run(self, jobs: Sequence[Job], thresholds: Thresholds) -> Iterator[Outcome]:
        """Queues the jobs at once (behind any queued before), so workers go from one batch to the next."""
        return self.pool.imap(_run_job_star, [(job, thresholds, self.render_curves) for job in jobs])

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def make_executor(workers: int, render_curves: bool = False) -> Executor:
    """In this process for one worker (the writer thread then draws curves beside training), else a pool."""
    return WorkerPool(workers, render_curves) if workers > 1 else InProcess()
