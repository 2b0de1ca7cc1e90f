"""The Optuna driver: a sweep spec in, a study of finished trials out.

Propose vs run: Optuna proposes configurations (grid cells are enqueued explicitly, so a cell is never proposed
twice and the momentum/adam conditional never duplicates work); `run_trial` trains a configuration's replicates as
one population and reports the mean skill. Tracking attaches from outside through `TrialSink`s.

Resume: a trial is *done* when COMPLETE, or FAIL with a recorded `error` (a deterministic failure is a result, not
something to retry). A trial that was RUNNING when its worker died (same host, dead pid, or a stale Optuna heartbeat)
or FAIL without an error (interrupted) is retried by enqueueing its parameters again.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import math
import os
import queue
import socket
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from lstm_sweep.config import TrialConfig
from lstm_sweep.executor import Executor, Job, JobFailed, Outcome, make_executor
from lstm_sweep.locks import StudyLock, engine_url, ensure_local_store
from lstm_sweep.metrics import floor_skill
from lstm_sweep.spec import SweepSpec, mask_url
from lstm_sweep.step_parts import StepParts
from lstm_sweep.train import TrialResult, layout_key, lone_graph_key

HEARTBEAT_SECONDS = 30  # override with LSTM_SWEEP_HEARTBEAT_SECONDS
GRACE_SECONDS = 120  # override with LSTM_SWEEP_GRACE_SECONDS


class TrialSink(Protocol):
    """Receives every finished replicate (e.g. the MLflow tracker); returns a run id or None."""

    def log_replicate(
        self, result: TrialResult, *, trial_number: int, config_id: str, replicate: int, params: Mapping[str, Any]
    ) -> str | None: ...


def config_id(params: Mapping[str, Any]) -> str:
    """A short stable name for a configuration (its sampled factor values)."""
    return hashlib.sha1(_params_key(params).encode()).hexdigest()[:10]


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    from lstm_sweep.errors import ConfigError

    try:
        seconds = int(value)
    except ValueError:
        raise ConfigError(name, value, "a whole number of seconds >= 1") from None
    if seconds < 1:
        raise ConfigError(name, value, "a whole number of seconds >= 1")
    return seconds


def heartbeat_seconds() -> int:
    """How often a worker beats for its trials (LSTM_SWEEP_HEARTBEAT_SECONDS, default HEARTBEAT_SECONDS)."""
    return _env_seconds("LSTM_SWEEP_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)


def grace_seconds() -> int:
    """How long without a beat before a trial counts as dead (LSTM_SWEEP_GRACE_SECONDS, default GRACE_SECONDS)."""
    return _env_seconds("LSTM_SWEEP_GRACE_SECONDS", GRACE_SECONDS)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna RDB storage with heartbeats, so a dead worker's trial is noticed by the others."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # We beat for asked trials ourselves (_Heartbeat), so Optuna's hint about Study.optimize does not apply.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ensure_local_store(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(
        engine_url(url),
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_seconds(),
        grace_period=grace_seconds(),
        heartbeat_stale_trial_callback=_retry_stale,
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
    skip = {"trials", "storage", "tracking_uri", "epoch_metrics", "source", "description", "n_configs", "n_runs"}
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


def _never_claimed(t: FrozenTrial) -> bool:
    """A trial popped from the queue by a worker that died before it could even sign it (no `worker` attribute,
    hence no heartbeat either) and older than the grace period: nobody will ever finish it."""
    if "worker" in t.user_attrs or t.datetime_start is None:
        return False
    age = datetime.datetime.now() - t.datetime_start
    return age.total_seconds() > grace_seconds()


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
        if _is_dead_local(t) or _never_claimed(t):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            rec.failed_stale.append(t.number)
    trials = study.get_trials(deepcopy=False)
    rec.abandoned = [t.number for t in trials if t.state == TrialState.FAIL and "error" not in t.user_attrs]
    live = [t for t in trials if _is_done(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)]
    taken = {_params_key(_trial_params(t)) for t in live}
    if spec.sampler == "grid":
        cells = spec.grid_cells()[: limit if limit is not None else spec.trials]
        # Queue cells that share a data layout next to each other, so a batch forms few, large populations; the
        # costliest layouts first, so the small ones fill the workers' gaps at the end instead of a big one.
        wanted = sorted(cells, key=lambda c: _layout_order(spec, c))
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


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker stopped beating (older than the grace period) and return their numbers.

    The driver asks and tells, so Optuna never runs this check for us. The storage's stale-trial callback
    (`_retry_stale`) queues each one's parameters again; call it under the study lock, like `recover`.
    """
    before = {t._trial_id: t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not before:
        return []
    optuna.storages.fail_stale_trials(study)
    after = {t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return sorted(number for trial_id, number in before.items() if trial_id in after)


def _close_orphans(sinks: Sequence[TrialSink], numbers: Sequence[int]) -> None:
    if not numbers:
        return
    for sink in sinks:
        close = getattr(sink, "close_orphans", None)
        if close is not None:
            close(numbers)


def _layout_order(spec: SweepSpec, cell: Mapping[str, Any]) -> tuple[float, str]:
    config = spec.config_for(cell, 0)
    return -relative_cost(config), json.dumps(population_key(config), default=str)


def relative_cost(config: TrialConfig) -> float:
    """A rough training cost per member, for ordering work: the recurrent matmuls dominate."""
    return float(config.epochs * config.seq_len * config.state_size * (config.state_size + 16) * config.num_layers)


def _trial_params(t: FrozenTrial) -> dict[str, Any]:
    """The cell a trial stands for. A trial just popped from the queue has no params until it is suggested, so its
    queued fixed params count: otherwise a concurrent `recover` would queue the same cell a second time."""
    fixed = t.system_attrs.get("fixed_params")
    if fixed and t.state in (TrialState.WAITING, TrialState.RUNNING):
        return dict(fixed)
    return dict(t.params)


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
    return sum(floor_skill(s) for s in skills) / len(skills)


# Trials asked per batch. Big batches leave the workers idle less often (each batch ends when its slowest
# population does); the last population of a batch waits for the next if the queue may hold more of it.
BATCH_TRIALS = {"grid": 128, "random": 64, "qmc": 64, "tpe": 1}  # TPE learns from each result before the next


@dataclass
class Proposal:
    """A trial Optuna proposed, resolved into the configurations of its replicates."""

    trial: Trial
    params: dict[str, Any]
    config_id: str
    configs: list[TrialConfig]


def propose(study: optuna.Study, spec: SweepSpec, count: int) -> list[Proposal]:
    """Up to `count` new trials: a grid claims its enqueued cells (so no cell is ever proposed twice), other
    samplers ask Optuna."""
    proposals: list[Proposal] = []
    trials = _claim_queued(study, count) if spec.sampler == "grid" else (study.ask() for _ in range(count))
    for trial in trials:
        trial.set_user_attr("worker", worker_id())  # first thing: lets `recover` tell whose trial it is
        params = spec.suggest(trial)
        cid = config_id(params)
        configs = [spec.config_for(params, r) for r in range(spec.replicates)]
        trial.set_user_attr("config_id", cid)
        trial.set_user_attr("config", configs[0].as_dict() | {"seed": None})
        proposals.append(Proposal(trial, params, cid, configs))
    return proposals


def _claim_queued(study: optuna.Study, count: int) -> Iterator[Trial]:
    """Up to `count` queued trials, oldest first, each claimed exactly once across workers.

    What `study.ask` does for a queued trial, but with one read of the queue per batch: `ask` reads every queued
    trial to pop one (about 0.1 s each for the default grid, with the workers idle meanwhile). The claim itself is
    the storage's atomic WAITING -> RUNNING switch, so a trial another worker took in between is skipped.
    """
    if count <= 0:
        return
    storage = study._storage
    claimed = 0
    for queued in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if claimed == count:
            return
        try:
            if not storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        claimed += 1
        yield Trial(study, queued._trial_id)


def population_key(config: TrialConfig) -> tuple[Any, ...]:
    """Trials train together when they share a data layout and a state size: mixing sizes would pad every
    member to the largest (a 16-unit member padded to 64 costs about 3x), and sizes are few, so traces stay few."""
    return (*layout_key(config), config.state_size)


def group_by_layout(proposals: Sequence[Proposal]) -> list[list[Proposal]]:
    """Trials whose replicates share a population key train together as one population."""
    groups: dict[tuple[Any, ...], list[Proposal]] = {}
    for p in proposals:
        groups.setdefault(population_key(p.configs[0]), []).append(p)
    return list(groups.values())


def group_lone_runs(proposals: Sequence[Proposal]) -> list[list[Proposal]]:
    """Population off: trials whose runs train on the same compiled graph go together, whatever their layout, so
    one worker compiles each graph once (a lone run's graph depends on its shapes, not on its data)."""
    groups: dict[tuple[Any, ...], list[Proposal]] = {}
    for p in proposals:
        groups.setdefault(lone_graph_key(p.configs[0]), []).append(p)
    return list(groups.values())


def jobs_for(
    group: Sequence[Proposal], population: bool, sweep_runs: int, pieces: int = 1, parts: StepParts | None = None
) -> list[Job]:
    """One job with every replicate of every trial in the group: a population, or (population off) lone runs
    trained one after another, split into `pieces` jobs to keep that many workers busy.

    Lone runs of one graph (`group_lone_runs`) stay together because each worker compiles every graph it trains:
    spread run by run over two workers, both compiled everything, and at seq_len 8 that took all the second
    worker's gain. Each job carries the runs the whole sweep file plans (`sweep_runs`) as its layout's run count,
    which decides XLA (`population.uses_xla`): the count is the same in every batch, resumed or not, on any
    worker, so whether a trial's graph is compiled by XLA (which rounds differently) never depends on how the
    batches fell. For the same reason every job gets the sweep's `parts` (`SweepSpec.step_parts`).
    """
    configs = [c for p in group for c in p.configs]
    if population:
        return [Job(configs, sweep_runs, parts=parts)]
    size = -(-len(configs) // min(max(pieces, 1), len(configs)))  # ceiling division
    return [Job(configs[i : i + size], sweep_runs, together=False, parts=parts) for i in range(0, len(configs), size)]


def split_results(group: Sequence[Proposal], outcomes: Sequence[Outcome]) -> list[list[TrialResult]] | JobFailed:
    """The jobs' results regrouped per trial, or the first failure (it fails the whole group)."""
    flat: list[TrialResult] = []
    for outcome in outcomes:
        if isinstance(outcome, JobFailed):
            return outcome
        flat.extend(outcome)
    n = len(group[0].configs)
    return [flat[i * n : (i + 1) * n] for i in range(len(group))]


def record_results(proposal: Proposal, results: Sequence[TrialResult], sinks: Sequence[TrialSink]) -> float:
    """Hand each replicate to the sinks (MLflow), keep the outcomes on the trial, return the objective."""
    records = []
    for r, result in enumerate(results):
        run_id = None
        for sink in sinks:
            run_id = (
                sink.log_replicate(
                    result,
                    trial_number=proposal.trial.number,
                    config_id=proposal.config_id,
                    replicate=r,
                    params=proposal.configs[r].as_dict(),
                )
                or run_id
            )
        records.append(replicate_record(result, r, run_id))
    proposal.trial.set_user_attr("replicates", records)
    proposal.trial.set_user_attr("verdicts", dict(Counter(r.verdict for r in results)))
    return objective_value(results)


class _Heartbeat:
    """Beats for every trial this worker holds, so others can tell it is alive (Optuna's stale-trial check)."""

    def __init__(self, study: optuna.Study) -> None:
        self.storage = study._storage
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="lstm-sweep-heartbeat")
        # Asked through the study's storage (Optuna wraps an RDBStorage in a cache, which is not one itself).
        self.enabled = getattr(self.storage, "get_heartbeat_interval", lambda: None)() is not None

    def __enter__(self) -> _Heartbeat:
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        if self.enabled:
            self.thread.join(timeout=5)

    def hold(self, trials: Sequence[Trial]) -> None:
        """Beat for these trials too, until each is released."""
        with self.lock:
            self.trial_ids |= {t._trial_id for t in trials}
        self._record()

    def release(self, trial: Trial) -> None:
        with self.lock:
            self.trial_ids.discard(trial._trial_id)

    def _record(self) -> None:
        if not self.enabled:
            return
        with self.lock:
            ids = list(self.trial_ids)
        for trial_id in ids:
            with contextlib.suppress(Exception):  # a finished trial refuses heartbeats; nothing to do
                self.storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]

    def _beat(self) -> None:
        interval = heartbeat_seconds()
        while not self.stop_event.wait(interval):
            self._record()


class _Writer:
    """One background thread that records finished groups (MLflow runs, trial attributes, tell) while the
    next group trains, so tracking overlaps training instead of adding to it."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True, name="lstm-sweep-writer")
        self.thread.start()

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            try:
                if self.error is None:
                    job()
            except BaseException as err:  # surfaced to the main thread by drain()
                self.error = err
            finally:
                self.queue.task_done()
        self.queue.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_error()
        self.queue.put(job)

    def drain(self) -> None:
        self.queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()


@dataclass
class Batch:
    """Proposed trials grouped into populations, their jobs, and the executor's outcomes as they come."""

    groups: list[list[Proposal]]
    job_groups: list[list[Job]]
    outcomes: Iterator[Outcome]


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
    batch_trials: int | None = None,
    workers: int = 1,
    population: bool = True,
    executor: Executor | None = None,
) -> SweepOutcome:
    """Run (or continue) the sweep until its budget of trials is done.

    Trials are proposed in batches, grouped by data layout, and each group trains as one population; a group's
    results are recorded by a background writer while the next group trains. `workers` > 1 trains in that many
    processes (the stores stay in this one); `population=False` trains every run on its own. A caller may pass an
    executor it started earlier (and closes itself), so that workers import TensorFlow while it sets up tracking.
    """
    with contextlib.ExitStack() as cleanup:
        if executor is None:  # first: worker processes import TensorFlow while this one opens the study and proposes
            executor = make_executor(workers, render_curves=any(getattr(s, "draws_curves", False) for s in sinks))
            cleanup.callback(executor.close)
        study_lock = StudyLock(storage_url, spec.name)
        cleanup.callback(study_lock.close)  # after the writer, before the executor; also when the study is refused
        with study_lock():  # several workers may start at once: each sees the others' enqueued cells
            study = open_study(spec, storage_url)
            outcome = SweepOutcome(study=study)
            total = planned_trials(spec, trials)
            outcome.recovery = recover(study, spec, total)
        _close_orphans(sinks, outcome.recovery.abandoned)
        batch = batch_trials or BATCH_TRIALS[spec.sampler]
        verdict_counts: Counter[str] = Counter()
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            verdict_counts.update(t.user_attrs.get("verdicts", {}))
        counter_lock = threading.Lock()

        def done_count() -> int:
            return sum(1 for t in study.get_trials(deepcopy=False) if _is_done(t))

        # Progress counts what storage said at the last batch plus what this process finished since: reading every
        # trial after each one would make a sweep quadratic in its size.
        progress = {"done": 0}
        writing = {"trials": 0}  # trained, handed to the writer, not yet told: neither done nor to be proposed again
        queued = {"trials": 0}  # handed to the executor, not yet collected (the batch training and the one behind it)
        heartbeat = _Heartbeat(study)

        def finish(
            proposal: Proposal, state: TrialState, value: float | None, verdicts: Sequence[str], written: bool = False
        ) -> None:
            with counter_lock:  # told and uncounted from `writing` at once, so `remaining` never counts a trial twice
                frozen = study.tell(proposal.trial, value if state == TrialState.COMPLETE else None, state=state)
                writing["trials"] -= int(written)
                if state == TrialState.COMPLETE:
                    outcome.trained += 1
                    outcome.verdicts.update(verdicts)
                    verdict_counts.update(verdicts)
                elif state == TrialState.FAIL:
                    outcome.failed += 1
                if state in (TrialState.COMPLETE, TrialState.FAIL):  # what done_count counts
                    progress["done"] += 1
                if on_trial:
                    on_trial(frozen, verdict_counts, progress["done"], total)
            heartbeat.release(proposal.trial)

        def remaining_trials() -> int:
            with counter_lock:
                progress["done"] = done_count()
                return total - progress["done"] - writing["trials"] - queued["trials"]

        def record_job(group: list[Proposal], results: list[list[TrialResult]]) -> Callable[[], None]:
            def job() -> None:
                for proposal, trial_results in zip(group, results, strict=True):
                    value = record_results(proposal, trial_results, sinks)
                    finish(proposal, TrialState.COMPLETE, value, [r.verdict for r in trial_results], written=True)

            return job

        writer = _Writer()
        in_flight: list[Proposal] = []  # every trial this run asked for; on Ctrl-C the untold ones are failed
        carry: list[Proposal] = []
        # With worker processes, the next batch is proposed and queued while this one trains: the workers go straight
        # from one batch to the next instead of waiting for the main process to propose. Not for TPE, whose next
        # proposal learns from the last result; the batches themselves are the same either way (`remaining_trials`
        # counts queued trials as taken), so the same trials train with the same numbers.
        ahead = 2 if workers > 1 and spec.sampler != "tpe" else 1
        parts = spec.step_parts()  # one compiled epoch per shape, whichever runs share a job

        def plan_batch() -> Batch | None:
            """Propose the next batch, group it, hand its jobs to the executor; None when nothing is left."""
            nonlocal carry
            with study_lock():
                stale = fail_stale(study)
            if stale:
                outcome.recovery.failed_stale.extend(stale)
                _close_orphans(sinks, stale)
            remaining = remaining_trials()
            if remaining <= 0:
                return None
            wanted = max(0, min(batch, remaining) - len(carry))
            fresh = propose(study, spec, wanted)
            in_flight.extend(fresh)
            if not carry + fresh:
                return None
            heartbeat.hold([p.trial for p in fresh])
            groups = group_by_layout(carry + fresh) if population else group_lone_runs(fresh)
            carry = []
            if population and len(groups) > 1 and wanted > 0 and len(fresh) == wanted:
                # The queue may hold more cells of the last layout: train that population whole, next batch.
                carry = groups.pop()
            # Longest first: with several workers the batch then ends close to when its total work does.
            groups.sort(key=lambda g: -sum(relative_cost(c) for p in g for c in p.configs))
            pieces = -(-workers // len(groups))  # enough lone-run jobs for every worker
            job_groups = [jobs_for(group, population, spec.n_runs(), pieces, parts) for group in groups]
            with counter_lock:
                queued["trials"] += sum(len(group) for group in groups)
            return Batch(
                groups, job_groups, executor.run([job for jobs in job_groups for job in jobs], spec.thresholds)
            )

        def collect(planned: Batch) -> None:
            """Wait for a batch's outcomes and hand each group to the writer (or fail it with its error)."""
            for group, jobs in zip(planned.groups, planned.job_groups, strict=True):
                results = split_results(group, [next(planned.outcomes) for _ in jobs])
                if isinstance(results, JobFailed):
                    with counter_lock:
                        queued["trials"] -= len(group)
                    for proposal in group:
                        proposal.trial.set_user_attr("error", mask_url(results.message)[:2000])
                        proposal.trial.set_user_attr("traceback", mask_url(results.traceback)[-4000:])
                        finish(proposal, TrialState.FAIL, None, [])
                    continue
                with counter_lock:
                    queued["trials"] -= len(group)
                    writing["trials"] += len(group)
                writer.submit(record_job(group, results))

        pending: collections.deque[Batch] = collections.deque()
        try:
            with heartbeat:
                # No waiting for the writer between batches: the workers train the next batch while it records.
                while True:
                    while len(pending) < ahead and (planned := plan_batch()) is not None:
                        pending.append(planned)
                    if not pending:
                        break
                    collect(pending.popleft())
                writer.drain()
        except KeyboardInterrupt:
            outcome.interrupted = True
            try:
                writer.drain()  # keep what finished training
            finally:
                for proposal in in_flight:
                    if study._storage.get_trial(proposal.trial._trial_id).state == TrialState.RUNNING:
                        study.tell(proposal.trial, state=TrialState.FAIL)  # no error attr: retried next run
        finally:
            writer.close()
        return outcome
