"""Where jobs run: results come back whole, errors come back as JobFailed, curves can be drawn ahead."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_sweep.config import TrialConfig
from lstm_sweep.driver import Proposal, group_lone_runs, jobs_for
from lstm_sweep.executor import Job, JobFailed, run_job
from lstm_sweep.metrics import Thresholds
from lstm_sweep.population import XLA_MIN_RUNS, uses_xla
from lstm_sweep.step_parts import StepParts
from lstm_sweep.train import TrialResult, _population_for, population_graph_key, train

TINY = TrialConfig(stream_length=240, epochs=2)


def curve(result: TrialResult, key: str) -> np.ndarray:
    return np.array([r[key] for r in result.history], dtype=np.float64)


def test_a_worker_can_draw_each_runs_curves_ahead_for_tracking() -> None:
    drawn = run_job(Job([TINY, TINY.replace(seed=1)]), Thresholds(), render_curves=True)
    assert not isinstance(drawn, JobFailed)
    assert all(r.artifacts["curves.png"].startswith(b"\x89PNG") for r in drawn)
    plain = run_job(Job([TINY]), Thresholds())
    assert not isinstance(plain, JobFailed) and plain[0].artifacts == {}


def test_a_job_that_raises_comes_back_as_its_error() -> None:
    failed = run_job(Job([TINY.replace(seq_len=400)]), Thresholds())
    assert isinstance(failed, JobFailed)
    assert "seq_len" in failed.message and "Traceback" in failed.traceback


def test_every_job_carries_the_runs_the_sweep_plans() -> None:
    """Lone runs of one layout share a graph, so the sweep's plan (not 1, and not the batch, which varies with
    resumes and workers) decides whether XLA's compile pays."""
    configs = [[TINY.replace(seed=s, learning_rate=lr)] for lr in (0.01, 0.1) for s in (0, 1, 2)]
    group = [Proposal(None, {}, str(i), c) for i, c in enumerate(configs)]  # type: ignore[arg-type]
    together = jobs_for(group, population=True, sweep_runs=576)
    assert [(len(j.configs), j.layout_runs) for j in together] == [(6, 576)]
    alone = jobs_for(group, population=False, sweep_runs=576)
    assert [(len(j.configs), j.layout_runs, j.together) for j in alone] == [(6, 576, False)]
    assert alone[0].configs == together[0].configs
    halves = jobs_for(group, population=False, sweep_runs=576, pieces=2)
    assert [len(j.configs) for j in halves] == [3, 3]
    assert [c for j in halves for c in j.configs] == together[0].configs
    assert len(jobs_for(group, population=False, sweep_runs=576, pieces=20)) == 6


@pytest.mark.parametrize(
    ("changes", "same_graph"),
    [
        ({"input_encoding": "scaled"}, True),  # raw and scaled inputs: one number per step either way
        ({"target_scale": "scaled"}, True),
        ({"learning_rate": 0.5, "momentum": 0.0, "grad_noise": 0.01, "seed": 4}, True),
        ({"input_encoding": "onehot"}, False),
        ({"output_framing": "classification"}, False),
        ({"state_size": 32}, False),
        ({"seq_len": 3}, False),
        ({"batch_size": 8}, False),
        ({"num_layers": 2}, False),
    ],
)
def test_lone_runs_group_by_the_graph_they_train_on(changes: dict[str, object], same_graph: bool) -> None:
    """Population off, a job may hold runs of several layouts: those sharing a compiled graph go to one worker."""
    base = TINY.replace(input_encoding="raw", output_framing="regression")
    group = [Proposal(None, {}, str(i), [c]) for i, c in enumerate([base, base.replace(**changes)])]  # type: ignore[arg-type]
    grouped = group_lone_runs(group)
    assert [len(g) for g in grouped] == ([2] if same_graph else [1, 1])
    first, second = (_population_for(p.configs, layout_runs=576) for p in group)
    assert (first is second) == same_graph  # the trainer does reuse one graph for them
    assert (population_graph_key(group[0].configs, 576) == population_graph_key(group[1].configs, 576)) == same_graph


@pytest.mark.parametrize(
    "changes",
    [{"grad_noise": 0.0}, {"optimizer": "adam"}, {"grad_clip": 1.0}, {"grad_noise_schedule": "annealed"}],
)
def test_lone_runs_that_need_other_step_parts_share_the_sweeps_epoch(changes: dict[str, object]) -> None:
    """Alone, each would compile its own epoch (`StepParts`); a sweep gives all its jobs the parts any run may need,
    so they go to one worker and share one compile, and each trains as it would alone."""
    base = TINY.replace(input_encoding="raw", output_framing="regression", grad_noise=0.01)
    configs = [base, base.replace(**changes)]
    group = [Proposal(None, {}, str(i), [c]) for i, c in enumerate(configs)]  # type: ignore[arg-type]
    assert [len(g) for g in group_lone_runs(group)] == [2]
    parts = StepParts.of(configs)
    assert population_graph_key([configs[0]], 576) != population_graph_key([configs[1]], 576)
    assert population_graph_key([configs[0]], 576, parts) == population_graph_key([configs[1]], 576, parts)
    lone = run_job(Job(configs, together=False, parts=parts), Thresholds())
    assert not isinstance(lone, JobFailed)
    for config, result in zip(configs, lone, strict=True):
        alone = train(config)
        for key in alone.history[0]:
            np.testing.assert_allclose(curve(result, key), curve(alone, key), rtol=1e-6, atol=1e-7, err_msg=key)


def test_lone_runs_of_a_job_equal_training_each_alone() -> None:
    configs = [TINY.replace(learning_rate=0.05), TINY.replace(seed=3)]
    lone = run_job(Job(configs, together=False), Thresholds())
    assert not isinstance(lone, JobFailed)
    assert [r.history for r in lone] == [train(c).history for c in configs]


def test_a_job_passes_its_run_count_to_the_xla_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSTM_SWEEP_XLA", "")
    config = TINY.replace(seq_len=2)
    for runs, xla in ((1, False), (XLA_MIN_RUNS, True)):
        assert not isinstance(run_job(Job([config], runs), Thresholds()), JobFailed)
        assert _population_for([config], runs).xla is xla


@pytest.mark.parametrize(
    ("seq_len", "runs", "forced", "expected"),
    [
        (1, 1, "", True),  # seq_len 1: XLA's compile costs about what tracing does
        (8, 1, "", False),  # a lone longer trial: the compile would not be repaid
        (8, XLA_MIN_RUNS - 1, "", False),
        (8, XLA_MIN_RUNS, "", True),
        (12, 64, "", True),
        (12, 64, "0", False),
        (8, 1, "1", True),
    ],
)
def test_xla_is_chosen_by_seq_len_and_runs_of_the_layout(
    monkeypatch: pytest.MonkeyPatch, seq_len: int, runs: int, forced: str, expected: bool
) -> None:
    monkeypatch.setenv("LSTM_SWEEP_XLA", forced)
    assert uses_xla(TINY.replace(seq_len=seq_len), runs) is expected


def test_a_training_process_imports_tensorflow_without_keras() -> None:
    """Workers and the in-process trainer skip Keras (seconds of every process's start) and still train."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lstm_sweep.executor import prepare_tensorflow\n"
        "prepare_tensorflow(inter_op=1)\n"
        "import tensorflow as tf\n"
        "from lstm_sweep.config import TrialConfig\n"
        "from lstm_sweep.train import train\n"
        "r = train(TrialConfig(task='cycle', epochs=1, stream_length=240, batch_size=8, state_size=4))\n"
        "loaded = [m for m in ('keras', 'tf_keras', 'sklearn') if sys.modules.get(m) is not None]\n"
        "print(loaded, r.final['val_loss'] > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[] True"
