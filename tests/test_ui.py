"""The MLflow UI checked as a person would see it: `lstm-sweep ui` over a tiny sweep's store, in headless Chromium.

The runs page is a React app, so the test loads it in a real browser (`chromium --headless --dump-dom`) rather than
asking the REST API. The view it loads groups the runs by the `lstm_sweep.role` tag and shows the `verdict` tag as
a column: that is MLflow's own "share view" mechanism (an experiment tag `mlflow.sharedViewState.<key>` holding the
view as JSON, opened with `?viewStateShareKey=<key>`), the same thing the UI writes when a person shares a view.
Without it the child runs sit collapsed under the parent and no tag column is shown.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_sweep
from lstm_sweep.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SHARE_KEY = "lstm-sweep-ui-test"

TINY = tiny_sweep("uitiny", epochs=1)


def chromium() -> str:
    """Path of the Chromium binary, installing it once with scripts/install-browser.sh if it is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["bash", str(ROOT / "scripts" / "install-browser.sh")], timeout=600, check=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing and scripts/install-browser.sh could not install it (needs root + apt)")
    return CHROMIUM


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def non_loopback_address() -> str | None:
    """This machine's outbound IPv4 address (no packet is sent), or None if it only has loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`lstm-sweep ui` exited with {proc.returncode} before answering {url}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"MLflow server did not answer {url} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop `lstm-sweep ui` and the mlflow server (and its workers) it started: they share one process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    # the group may outlive its leader (uvicorn workers); make sure nothing of it is left
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def browser(binary: str, profile: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """One headless Chromium run with a fresh profile; the virtual time budget lets the React app load its runs."""
    shutil.rmtree(profile, ignore_errors=True)
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--hide-scrollbars",
        "--window-size=1400,900",
        "--virtual-time-budget=15000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def visible_text(dom: str) -> str:
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html.unescape(text))


def test_mlflow_ui_lists_parent_and_trials_with_verdicts(tmp_path):
    binary = chromium()
    sweep = tmp_path / "uitiny.yaml"
    sweep.write_text(TINY)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert main(["run", str(sweep), "--storage", storage, "--tracking-uri", tracking, "--quiet"]) == 0

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("uitiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("lstm_sweep.role") == "trial"]
    assert len(children) == 8
    expected = {r.info.run_name: r.data.tags["verdict"] for r in children}
    view = {
        "selectedColumns": ["tags.`verdict`", "tags.`config_id`", "tags.`replicate`"],
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "lstm_sweep.role"}]},
    }
    client.set_experiment_tag(exp.experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(view))

    port = free_port()
    script = Path(sys.executable).with_name("lstm-sweep")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from lstm_sweep.cli import main; main()"]
    # what a user runs; the default --host is 127.0.0.1
    proc = subprocess.Popen(
        [*cmd, "ui", "--tracking-uri", tracking, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(f"{base}/health", proc)

        outside = non_loopback_address()
        if outside is not None:
            with pytest.raises(OSError), socket.create_connection((outside, port), timeout=2):
                pass

        url = f"{base}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={SHARE_KEY}"
        profile = tmp_path / "chromium-profile"
        text = ""
        for _attempt in range(3):  # the SPA occasionally needs a second load before the grid is filled
            with contextlib.suppress(subprocess.TimeoutExpired):
                text = visible_text(browser(binary, profile, "--dump-dom", url, timeout=45).stdout)
            if all(name in text for name in expected) and "sweep uitiny" in text:
                break
        assert "Group by: lstm_sweep.role" in text, text[:2000]
        assert "sweep uitiny" in text, text[:2000]  # the parent run
        for name in expected:
            assert name in text, f"child run {name!r} not listed: {text[:2000]}"
        # the verdict column: the child rows' cells, in the page's order, carry each child's verdict
        for verdict in set(expected.values()):
            assert f" {verdict} " in text
        counts = {v: len(re.findall(rf"\b{v}\b", text)) for v in set(expected.values())}
        assert counts == {v: list(expected.values()).count(v) for v in counts}, counts

        shot_dir = ROOT / "results" / "ui"
        shot_dir.mkdir(parents=True, exist_ok=True)
        shot = shot_dir / "experiment.png"
        shot.unlink(missing_ok=True)
        browser(binary, profile, f"--screenshot={shot}", url, timeout=60)
        assert shot.exists() and shot.stat().st_size > 10_000
    finally:
        stop(proc)
