"""Where training jobs run: in this process, or in worker processes that each import TensorFlow once.

A job is a list of configurations that share a data layout (a population, or a single configuration); it comes
back as their results or as the error it raised. The parent process keeps the Optuna and MLflow stores, so with
SQLite there is one writer however many workers train.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from lstm_sweep.config import TrialConfig
from lstm_sweep.metrics import Thresholds
from lstm_sweep.train import TrialResult

Job = list[TrialConfig]


@dataclass(frozen=True)
class JobFailed:
    """A job raised: the error line and its traceback, recorded on the trials and the sweep goes on."""

    message: str
    traceback: str


Outcome = list[TrialResult] | JobFailed


class Executor(Protocol):
    def run(self, jobs: Sequence[Job], thresholds: Thresholds) -> Iterator[Outcome]:
        """Yield each job's outcome, in job order."""
        ...

    def close(self) -> None: ...


def run_job(job: Job, thresholds: Thresholds) -> Outcome:
    from lstm_sweep.train import train_population

    try:
        return train_population(job, thresholds=thresholds)
    except Exception as err:
        return JobFailed(f"{err.__class__.__name__}: {err}", traceback.format_exc())


class InProcess:
    """Train in this process (the default)."""

    def run(self, jobs: Sequence[Job], thresholds: Thresholds) -> Iterator[Outcome]:
        for job in jobs:
            yield run_job(job, thresholds)

    def close(self) -> None:
        pass


def _init_worker() -> None:
    """One TF thread per worker: N workers on N cores, instead of N workers fighting over every core."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _run_job_star(args: tuple[Job, Thresholds]) -> Outcome:
    return run_job(*args)


class WorkerPool:
    """`--workers N`: N spawned processes; jobs are handed out as workers free up, results come back in order."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pool = context.Pool(workers, initializer=_init_worker)

    def run(self, jobs: Sequence[Job], thresholds: Thresholds) -> Iterator[Outcome]:
        yield from self.pool.imap(_run_job_star, [(job, thresholds) for job in jobs])

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def make_executor(workers: int) -> Executor:
    return WorkerPool(workers) if workers > 1 else InProcess()
