"""The `lstm-sweep` command. Usage errors print one line and exit 2; no traceback reaches the user."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from lstm_sweep.config import FACTORS, SETTINGS, Factor
from lstm_sweep.errors import ConfigError, LstmSweepError

USAGE_ERROR = 2


def _quiet_tensorflow() -> None:
    """TF's C++ start-up chatter would drown the seed's three report lines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _check_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A storage or tracking URL must be one: checked here, before a store library turns it into a traceback."""
    if value is not None and "://" not in value:
        from lstm_sweep.spec import mask_url

        raise click.BadParameter(
            f"got {mask_url(value)!r}, expected a URL such as sqlite:///path/to.db or postgresql://host/db"
        )
    return value


def url_option(name: str, **kwargs: Any) -> Callable[..., Any]:
    """A --storage or --tracking-uri option, checked to be a URL."""
    return click.option(name, callback=_check_url, **kwargs)


PORT = click.IntRange(min=1, max=65535)


def _serve(cmd: list[str]) -> None:
    """Run an MLflow server in the foreground; if it fails (a port in use, say), so does this command."""
    import subprocess

    with contextlib.suppress(KeyboardInterrupt):
        code = subprocess.run(cmd, check=False).returncode
        if code:
            raise click.exceptions.Exit(code)


def _click_type(factor: Factor) -> Any:
    if factor.kind == "choice":
        return click.Choice(factor.choices)
    if factor.kind == "int":
        return int
    if factor.kind == "float":
        return float
    return bool


def factor_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """One option per factor and per data setting, named after it with dashes; unset options keep the default."""
    from lstm_sweep.config import SEED_CONFIG

    for name, factor in reversed([*FACTORS.items(), *SETTINGS.items()]):
        default = getattr(SEED_CONFIG, name)
        flag = "--" + name.replace("_", "-")
        if factor.kind == "bool":
            func = click.option(
                f"{flag}/--no-{flag[2:]}", name, default=None, help=f"{factor.help} [default: {default}]"
            )(func)
        else:
            func = click.option(
                flag, name, type=_click_type(factor), default=None, help=f"{factor.help} [default: {default}]"
            )(func)
    return click.option("--text-path", "text_path", default=None, help="text file for --task text")(func)


def _overrides(options: dict[str, Any]) -> dict[str, Any]:
    names = {*FACTORS, *SETTINGS, "text_path"}
    return {k: v for k, v in options.items() if k in names and v is not None}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lstm-sweep")
def cli() -> None:
    """Find out why a small LSTM sits at the mean-prediction plateau, and what gets it out."""


@cli.command()
@factor_options
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the report lines")
def seed(as_json: bool, **options: Any) -> None:
    """Train the seed configuration (or a variant of it) and print Loss / Actual / Pred and the verdict.

    Defaults reproduce DESIGN.md's story: raw ord() codes in and out, sequences of length 1 from a zero state,
    MSE on a U(-1,1) readout, momentum SGD 1e-3 / 0.9 with the seed's gradient noise.
    """
    from lstm_sweep.config import SEED_CONFIG

    config = SEED_CONFIG.replace(**_overrides(options))
    from lstm_sweep.executor import prepare_tensorflow
    from lstm_sweep.train import train

    prepare_tensorflow(inter_op=2)
    result = train(config)
    summary = result.summary()
    if as_json:
        from lstm_sweep.diagnose import json_safe

        click.echo(json.dumps(json_safe(summary), sort_keys=True))
        return
    click.echo(f"Loss: {summary['loss']:.4f}")
    click.echo(f"Actual: {summary['actual']}")
    click.echo(f"Pred: {summary['pred']}")
    where = f" at epoch {result.escape_epoch}" if result.escape_epoch else ""
    if result.diverged_step is not None:
        where = f" at step {result.diverged_step}"
    click.echo(
        f"Verdict: {result.verdict}{where} (baseline {summary['baseline_loss']:.4f}, skill {summary['skill']:.4f}, "
        f"symbol accuracy {summary['symbol_accuracy']:.3f}, {summary['distinct_symbols']} distinct symbols, "
        f"{summary['seconds']:.1f} s)"
    )


@cli.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
def validate(sweep_file: str) -> None:
    """Check a sweep file and print the resolved spec: factors, roles, configurations and runs."""
    from lstm_sweep.spec import load_sweep

    spec = load_sweep(sweep_file)
    click.echo(_describe(spec))


def _describe(spec: Any) -> str:
    d = spec.to_dict()
    lines = [f"sweep {spec.name}: {spec.description}".rstrip(": ")]
    lines.append(f"  sampler {spec.sampler}, seed {spec.seed}, replicates {spec.replicates}")
    for name, f in d["factors"].items():
        domain = f.get("values", f.get("value"))
        if domain is None:
            domain = (
                f"[{f['low']}, {f['high']}]"
                + (" log" if f.get("log") else "")
                + (f" step {f['step']}" if f.get("step") else "")
            )
        lines.append(f"  {f['role']:<10} {name:<20} {domain}")
    for name, value in d.get("fixed", {}).items():
        lines.append(f"  {'fixed':<10} {name:<20} {value}")
    what = "grid configurations" if spec.sampler == "grid" else "trials"
    lines.append(f"  {spec.n_configs()} {what} x {spec.replicates} replicates = {spec.n_runs()} training runs")
    lines.append(f"  storage {d['storage']}, tracking {d['tracking_uri']}")
    lines.append(f"  charted per epoch in MLflow: {', '.join(d['epoch_metrics'])} (every key in history.csv)")
    return "\n".join(lines)


def sweep_run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options `run` and `worker` share."""
    options = [
        click.option("--trials", type=click.IntRange(min=1), default=None, help="stop after this many trials in all"),
        click.option(
            "--workers",
            type=click.IntRange(min=1, max=64),
            default=1,
            show_default=True,
            help="training processes on this host (the stores stay in the main process)",
        ),
        click.option(
            "--population/--no-population",
            default=True,
            show_default=True,
            help="train trials that share a data layout as one batched graph",
        ),
        click.option("--no-tracking", is_flag=True, help="do not log to MLflow (Optuna storage only)"),
        click.option("--quiet", is_flag=True, help="no progress bar"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@url_option("--storage", default=None, help="Optuna storage URL [default: the sweep file's, or SQLite in results/]")
@url_option("--tracking-uri", default=None, help="MLflow tracking URI [default: sqlite:///results/mlflow.db]")
@sweep_run_options
def run(sweep_file: str, **options: Any) -> None:
    """Run (or continue) a sweep: one Optuna trial per configuration, one MLflow run per replicate."""
    _run_sweep_command(sweep_file, **options)


def _run_sweep_command(
    sweep_file: str,
    trials: int | None,
    storage: str | None,
    tracking_uri: str | None,
    no_tracking: bool,
    quiet: bool,
    workers: int,
    population: bool,
    batch_trials: int | None = None,
) -> None:
    """What `run` and `worker` do: open or join the sweep, train until its budget is done, print a summary."""
    from pathlib import Path

    from lstm_sweep.executor import make_executor
    from lstm_sweep.spec import load_sweep, mask_url

    spec = load_sweep(sweep_file)
    from lstm_sweep.driver import planned_trials, run_sweep
    from lstm_sweep.progress import SweepProgress

    storage_url = storage or spec.storage
    uri = tracking_uri or spec.tracking_uri
    sinks = []
    tracker = None
    status = "FINISHED"
    # Worker processes start first and import TensorFlow while this one sets up MLflow (seconds each); with
    # tracking, they also draw each run's curves.png for the tracker. (One worker trains in this process, which
    # imports TensorFlow here.)
    executor = make_executor(workers, render_curves=not no_tracking)
    try:
        if not no_tracking:
            from lstm_sweep.driver import open_study
            from lstm_sweep.locks import StudyLock, engine_url
            from lstm_sweep.tracking import SweepTracker  # imports MLflow: seconds, only when tracking

            # Workers starting together would race to create the MLflow schema, experiment and parent run.
            setup_lock = StudyLock(storage_url, spec.name)
            try:
                with setup_lock():
                    open_study(spec, storage_url)  # a study of another definition is refused before MLflow is touched
                    tracker = SweepTracker(engine_url(uri), spec.name, spec.epoch_metrics)
                    tracker.start_sweep(spec.to_dict(), Path(sweep_file).read_text(encoding="utf-8"))
            finally:
                setup_lock.close()
            sinks.append(tracker)
        total = planned_trials(spec, trials)
        click.echo(
            f"sweep {spec.name}: {total} trials x {spec.replicates} replicates, storage {mask_url(storage_url)}"
            + ("" if no_tracking else f", tracking {mask_url(uri)}")
        )
        with SweepProgress(total, enabled=not quiet) as progress:
            outcome = run_sweep(
                spec,
                storage_url=storage_url,
                trials=trials,
                sinks=sinks,
                on_trial=progress.update,
                workers=workers,
                population=population,
                batch_trials=batch_trials,
                executor=executor,
            )
        if outcome.interrupted:
            status = "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            executor.close()
        finally:
            if tracker is not None:
                tracker.end_sweep(status)
    rec = outcome.recovery
    if rec.failed_stale:
        click.echo(f"recovered {len(rec.failed_stale)} interrupted trial(s): {rec.failed_stale}")
    verdicts = ", ".join(f"{k} {v}" for k, v in sorted(outcome.verdicts.items())) or "none"
    click.echo(f"trained {outcome.trained} trial(s) this run ({verdicts}); {outcome.failed} failed")
    if outcome.interrupted:
        click.echo("interrupted: run the same command again to continue")
        raise click.exceptions.Exit(130)


@cli.command()
@click.argument("sweep", required=False, default=None)
@url_option("--storage", default=None, help="Optuna storage URL (when SWEEP is a name)")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="[default: results/<sweep>/]")
@url_option("--tracking-uri", default=None, help="MLflow store to attach the report to")
def report(sweep: str | None, storage: str | None, out_dir: str | None, tracking_uri: str | None) -> None:
    """Write the analysis of a sweep (a sweep file or a study name) to results/<sweep>/."""
    from lstm_sweep.reporting import make_report

    paths = make_report(sweep or "sweeps/plateau.yaml", storage=storage, out_dir=out_dir, tracking_uri=tracking_uri)
    click.echo(f"report written: {paths[0]}" + (f" (+{len(paths) - 1} files)" if len(paths) > 1 else ""))


@cli.command()
@url_option("--tracking-uri", default=None, help="[default: sqlite:///results/mlflow.db]")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind; loopback unless you mean it")
@click.option("--port", default=5000, show_default=True, type=PORT)
def ui(tracking_uri: str | None, host: str, port: int) -> None:
    """Serve the MLflow UI for the sweep store (127.0.0.1 only by default)."""
    from lstm_sweep.locks import ensure_local_store
    from lstm_sweep.spec import DEFAULT_TRACKING_URI
    from lstm_sweep.tracking import artifact_root_for

    uri = tracking_uri or DEFAULT_TRACKING_URI
    ensure_local_store(uri)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    root = artifact_root_for(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    click.echo(f"MLflow UI on http://{host}:{port} (Ctrl-C to stop)")
    _serve(cmd)


@cli.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@url_option("--storage", required=True, help="the team's Optuna storage, e.g. postgresql://user:password@host/db")
@url_option("--tracking-uri", required=True, help="the team's MLflow, e.g. http://host:5000 (see `server`)")
@sweep_run_options
@click.option(
    "--batch",
    "batch_trials",
    type=click.IntRange(min=1, max=1024),
    default=8,
    show_default=True,
    help="trials taken at a time (smaller shares the queue more evenly between workers)",
)
def worker(sweep_file: str, **options: Any) -> None:
    """Join a sweep from any host: like `run`, for many concurrent processes on one shared study.

    Every grid cell still trains exactly once; a worker that dies is noticed by the others after the grace
    period (its trials are retried and its MLflow runs marked KILLED).
    """
    _run_sweep_command(sweep_file, **options)


@cli.command()
@url_option("--backend-store-uri", required=True, help="where runs are stored, e.g. postgresql://user:pw@host/db")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind; loopback unless you mean it")
@click.option("--port", default=5000, show_default=True, type=PORT)
@click.option(
    "--artifacts-destination",
    default="results/mlartifacts",
    show_default=True,
    help="where the server keeps artifacts it receives (a folder or an object-store URI)",
)
def server(backend_store_uri: str, host: str, port: int, artifacts_destination: str) -> None:
    """Start an MLflow tracking server for a team; workers pass --tracking-uri http://HOST:PORT.

    Artifacts are proxied through the server (workers need no access to the artifact store).
    """
    from pathlib import Path

    from lstm_sweep.locks import engine_url, ensure_local_store
    from lstm_sweep.spec import mask_url

    ensure_local_store(backend_store_uri)
    destination = artifacts_destination
    if "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)
        destination = Path(destination).resolve().as_uri()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        engine_url(backend_store_uri),
        "--host",
        host,
        "--port",
        str(port),
        "--serve-artifacts",
        "--artifacts-destination",
        destination,
    ]
    click.echo(
        f"MLflow tracking server on http://{host}:{port}, runs in {mask_url(backend_store_uri)}, "
        f"artifacts in {mask_url(destination)} (Ctrl-C to stop)"
    )
    _serve(cmd)


@cli.command()
@click.argument("sweep_file", required=False, default=None, type=click.Path(dir_okay=False))
@factor_options
@click.option(
    "--replicates",
    type=click.IntRange(min=1, max=100),
    default=None,
    help="seeds per configuration [default: 3, or the sweep file's]",
)
@click.option("--name", default=None, help="Optuna study and MLflow experiment name [default: diagnose-<hash>]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the summary")
@click.option("--no-neighbourhood", is_flag=True, help="only diagnose the configuration, try no changes")
@url_option("--storage", default=None, help="Optuna storage URL [default: sqlite:///results/<name>/optuna.db]")
@url_option("--tracking-uri", default=None, help="MLflow tracking URI [default: sqlite:///results/mlflow.db]")
@click.option("--quiet", is_flag=True, help="no progress bar")
def diagnose(
    sweep_file: str | None,
    replicates: int | None,
    name: str | None,
    as_json: bool,
    no_neighbourhood: bool,
    storage: str | None,
    tracking_uri: str | None,
    quiet: bool,
    **options: Any,
) -> None:
    """Say why a configuration (default: the seed's) sits where it does, from its measured diagnostics, then try
    every factor changed alone (values from SWEEP_FILE's domains, or built-in ones) to find what gets it out.

    Writes results/<name>/diagnosis.md and curves.png, also attached to the sweep's MLflow parent run.
    """
    from lstm_sweep import diagnose as diagnosis

    plan = diagnosis.plan_diagnosis(
        _overrides(options),
        sweep_file=sweep_file,
        replicates=replicates,
        name=name,
        storage=storage,
        tracking_uri=tracking_uri,
        neighbourhood=not no_neighbourhood,
    )

    def show_findings(found: diagnosis.Diagnosis) -> None:
        if not as_json:
            click.echo("\n".join(found.header_lines()))

    result = diagnosis.run_diagnosis(plan, on_findings=show_findings, progress=not (quiet or as_json))
    if as_json:
        click.echo(json.dumps(result.to_json(), sort_keys=True))
    else:
        for line in result.neighbourhood_lines():
            click.echo(line)
        click.echo(f"Wrote {' and '.join(result.files)} (also on the MLflow parent run of experiment {result.name})")
    if result.interrupted:
        click.echo("interrupted: run the same command again to continue", err=True)
        raise click.exceptions.Exit(130)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the group, turning our errors and click usage errors into one line and exit 2."""
    _quiet_tensorflow()
    try:
        result = cli.main(args=argv, prog_name="lstm-sweep", standalone_mode=False)
        if isinstance(result, int):  # click returns a command's Exit code instead of raising it
            return result
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.exceptions.Abort:
        click.echo("lstm-sweep: interrupted", err=True)
        return 130
    except click.UsageError as err:
        command = f" {err.ctx.command_path.split(' ', 1)[-1]}" if err.ctx and " " in err.ctx.command_path else ""
        click.echo(f"lstm-sweep{command}: {err.format_message()} (see --help)", err=True)
        return USAGE_ERROR
    except click.ClickException as err:
        click.echo(f"lstm-sweep: {err.format_message()}", err=True)
        return USAGE_ERROR
    except LstmSweepError as err:
        for line in str(err).splitlines() or [err.__class__.__name__]:
            click.echo(f"lstm-sweep: {line}", err=True)
        return USAGE_ERROR if isinstance(err, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
