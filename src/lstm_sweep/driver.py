"""The Optuna driver: a sweep spec in, a study of finished trials out.

Propose vs run: Optuna proposes configurations (grid cells are enqueued explicitly, so a cell is never proposed
twice and the momentum/adam conditional never duplicates work); `run_trial` trains a configuration's replicates as
one population and reports the mean skill. Tracking attaches from outside through `TrialSink`s.

Resume: a trial is *done* when COMPLETE, or FAIL with a recorded `error` (a deterministic failure is a result, not
something to retry). A trial that was RUNNING when its worker died (same host, dead pid, or a stale Optuna heartbeat)
or FAIL without an error (interrupted) is retried by enqueueing its parameters again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from lstm_sweep.config import TrialConfig
from lstm_sweep.spec import SweepSpec, mask_url
from lstm_sweep.train import TrialResult, train_population

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
SKILL_FLOOR = -1.0  # a diverged replicate counts as skill -1 in the objective, not -inf


class TrialSink(Protocol):
    """Receives every finished replicate (e.g. the MLflow tracker); returns a run id or None."""

    def log_replicate(
        self, result: TrialResult, *, trial_number: int, config_id: str, replicate: int, params: Mapping[str, Any]
    ) -> str | None: ...


def config_id(params: Mapping[str, Any]) -> str:
    """A short stable name for a configuration (its sampled factor values)."""
    blob = json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna RDB storage with heartbeats, so a dead worker's trial is noticed by the others."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        failed_trial_callback=_retry_stale,
    )


def _retry_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna found a trial whose worker stopped beating: queue its parameters again."""
    params = trial.system_attrs.get("fixed_params") or trial.params
    study.enqueue_trial(dict(params), user_attrs={"retry_of": trial.number, "enqueued_by": worker_id()})


def open_study(spec: SweepSpec, storage_url: str) -> optuna.Study:
    """Create or continue the sweep's study; a study built from a different sweep definition is refused."""
    storage = make_storage(storage_url)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=spec.sampler_for(),
        direction="maximize",
        load_if_exists=True,
    )
    resolved = _comparable(spec.to_dict())
    previous = study.user_attrs.get("sweep")
    if previous is None:
        study.set_user_attr("sweep", spec.to_dict())
    elif _comparable(previous) != resolved:
        from lstm_sweep.errors import SweepFileError

        raise SweepFileError(
            f"{spec.source}: name: study {spec.name!r} in {mask_url(storage_url)} was made from a different sweep "
            "definition; expected a new sweep name (or delete the study to start over)",
            spec.source,
        )
    return study


def _comparable(d: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a resolved spec that define the experiment (not budget or where it is stored)."""
    skip = {"trials", "storage", "tracking_uri", "source", "description", "n_configs", "n_runs"}
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in skip}, sort_keys=True, default=str))


def _is_done(t: FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs)


def _is_dead_local(t: FrozenTrial) -> bool:
    """A RUNNING trial whose worker was this host and whose process no longer exists."""
    owner = str(t.user_attrs.get("worker", ""))
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) != os.getpid() and _pid_is_other_program(int(pid))


def _pid_is_other_program(pid: int) -> bool:
    """A recycled pid belongs to another program if its command line does not mention lstm-sweep / lstm_sweep."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "lstm" not in cmdline and "pytest" not in cmdline


@dataclass
class Recovery:
    """What `recover` found and did on start-up."""

    failed_stale: list[int] = field(default_factory=list)
    abandoned: list[int] = field(default_factory=list)  # every FAIL without an error: killed or interrupted
    enqueued: int = 0


def recover(study: optuna.Study, spec: SweepSpec, limit: int | None) -> Recovery:
    """Fail trials of dead workers, then enqueue every grid cell or interrupted trial that is not done or queued."""
    rec = Recovery()
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_dead_local(t):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            rec.failed_stale.append(t.number)
    trials = study.get_trials(deepcopy=False)
    rec.abandoned = [t.number for t in trials if t.state == TrialState.FAIL and "error" not in t.user_attrs]
    live = [t for t in trials if _is_done(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)]
    taken = {_params_key(_trial_params(t)) for t in live}
    if spec.sampler == "grid":
        wanted = spec.grid_cells()[: limit if limit is not None else spec.trials]
    else:
        retried = {t.user_attrs.get("retry_of") for t in trials}
        wanted = [
            _trial_params(t)
            for t in trials
            if t.state == TrialState.FAIL and "error" not in t.user_attrs and t.number not in retried
        ]
    for cell in wanted:
        key = _params_key(cell)
        if key not in taken:
            study.enqueue_trial(dict(cell), user_attrs={"enqueued_by": worker_id()})
            taken.add(key)
            rec.enqueued += 1
    return rec


def _trial_params(t: FrozenTrial) -> dict[str, Any]:
    fixed = t.system_attrs.get("fixed_params")
    return dict(fixed) if t.state == TrialState.WAITING and fixed else dict(t.params)


def _params_key(params: Mapping[str, Any]) -> str:
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)


def replicate_record(result: TrialResult, replicate: int, run_id: str | None) -> dict[str, Any]:
    """The per-replicate outcome kept as a trial user attribute (the analysis reads these)."""
    final = result.final

    def num(x: Any) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    return {
        "replicate": replicate,
        "seed": result.config.seed,
        "verdict": result.verdict,
        "skill": num(final["skill"]),
        "symbol_accuracy": num(final["symbol_accuracy"]),
        "accuracy_lift": num(final["accuracy_lift"]),
        "val_loss": num(final["val_loss"]),
        "baseline_loss": num(final["baseline_loss"]),
        "distinct_symbols": int(final["distinct_symbols"]),
        "pred_std_ratio": num(final["pred_std_ratio"]),
        "escape_epoch": result.escape_epoch,
        "diverged_step": result.diverged_step,
        "mlflow_run_id": run_id,
        "seconds": round(result.seconds, 4),
        "curve": {k: [num(r[k]) for r in result.history] for k in ("train_loss", "val_loss", "skill")},
    }


def objective_value(results: Sequence[TrialResult]) -> float:
    """Mean final validation skill over replicates, each floored at SKILL_FLOOR."""
    skills = [r.final["skill"] for r in results]
    return sum(max(SKILL_FLOOR, s) if math.isfinite(s) else SKILL_FLOOR for s in skills) / len(skills)


def run_trial(
    spec: SweepSpec, trial: Trial, sinks: Sequence[TrialSink] = ()
) -> tuple[float, list[TrialResult]]:
    """Propose-side already done: read the trial's params, train the replicates together, record the outcome."""
    if spec.sampler == "grid" and "enqueued_by" not in trial.user_attrs:
        trial.study.stop()
        raise optuna.TrialPruned("grid queue empty: every cell is done or taken by another worker")
    trial.set_user_attr("worker", worker_id())
    params = spec.suggest(trial)
    cid = config_id(params)
    configs: list[TrialConfig] = [spec.config_for(params, r) for r in range(spec.replicates)]
    trial.set_user_attr("config_id", cid)
    trial.set_user_attr("config", configs[0].as_dict() | {"seed": None})
    try:
        results = train_population(configs, thresholds=spec.thresholds)
    except Exception as err:
        trial.set_user_attr("error", f"{err.__class__.__name__}: {mask_url(str(err))}"[:2000])
        trial.set_user_attr("traceback", mask_url(traceback.format_exc())[-4000:])
        raise
    records = []
    for r, result in enumerate(results):
        run_id = None
        for sink in sinks:
            run_id = sink.log_replicate(
                result,
                trial_number=trial.number,
                config_id=cid,
                replicate=r,
                params=configs[r].as_dict(),
            ) or run_id
        records.append(replicate_record(result, r, run_id))
    trial.set_user_attr("replicates", records)
    trial.set_user_attr("verdicts", dict(Counter(r.verdict for r in results)))
    return objective_value(results), results


@dataclass
class SweepOutcome:
    """What a `run` call did, for the command's closing line."""

    study: optuna.Study
    trained: int = 0
    failed: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    recovery: Recovery = field(default_factory=Recovery)
    interrupted: bool = False


ProgressHook = Callable[[FrozenTrial, Counter[str], int, int], None]


def planned_trials(spec: SweepSpec, limit: int | None) -> int:
    return min(limit, spec.n_configs()) if limit is not None and spec.sampler == "grid" else (limit or spec.trials)


def run_sweep(
    spec: SweepSpec,
    *,
    storage_url: str,
    trials: int | None = None,
    sinks: Sequence[TrialSink] = (),
    on_trial: ProgressHook | None = None,
) -> SweepOutcome:
    """Run (or continue) the sweep until its budget of trials is done."""
    study = open_study(spec, storage_url)
    outcome = SweepOutcome(study=study)
    total = planned_trials(spec, trials)
    outcome.recovery = recover(study, spec, total)
    for sink in sinks:
        close = getattr(sink, "close_orphans", None)
        if close is not None and outcome.recovery.abandoned:
            close(outcome.recovery.abandoned)

    def done_count() -> int:
        return sum(1 for t in study.get_trials(deepcopy=False) if _is_done(t))

    verdict_counts: Counter[str] = Counter()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        verdict_counts.update(t.user_attrs.get("verdicts", {}))

    def objective(trial: Trial) -> float:
        value, results = run_trial(spec, trial, sinks)
        outcome.trained += 1
        outcome.verdicts.update(r.verdict for r in results)
        verdict_counts.update(r.verdict for r in results)
        return value

    def after(study: optuna.Study, frozen: FrozenTrial) -> None:
        if frozen.state == TrialState.FAIL:
            outcome.failed += 1
        finished = done_count()
        if on_trial:
            on_trial(frozen, verdict_counts, finished, total)
        if finished >= total or (spec.sampler == "grid" and not _has_waiting(study)):
            study.stop()

    remaining = total - done_count()
    if remaining <= 0:
        return outcome
    if spec.sampler == "grid" and not _has_waiting(study):
        return outcome
    try:
        study.optimize(
            objective,
            n_trials=remaining + outcome.recovery.enqueued,
            catch=(Exception,),
            callbacks=[after],
            gc_after_trial=False,
        )
    except KeyboardInterrupt:
        outcome.interrupted = True
    return outcome


def _has_waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
