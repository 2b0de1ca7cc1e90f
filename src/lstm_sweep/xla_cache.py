"""XLA executables kept on disk, so a layout compiled once loads instead of compiling again.

An XLA compile of one epoch costs 2-9 s here, as much as 20 lone trials of that layout; every worker process of a
sweep, and every later sweep, used to pay it again. TensorFlow can persist its compiled executables itself
(`--tf_xla_persistent_cache_directory`); this module only turns that on, in a folder per TensorFlow version and CPU
(an executable built for one CPU's instruction set must not run on another that shares a home directory).

`LSTM_SWEEP_XLA_CACHE` chooses the folder; `off` turns the cache off. Default: $XDG_CACHE_HOME/lstm-sweep/xla
(~/.cache/lstm-sweep/xla). TensorFlow never evicts entries (about 1 MB each); delete the folder to reclaim space.
"""

from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

CACHE_ENV = "LSTM_SWEEP_XLA_CACHE"
FLAG = "--tf_xla_persistent_cache_directory"
# Names TensorFlow is installed under (read without importing it: the import takes seconds)
TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos", "tf-nightly")


def cache_root() -> Path | None:
    """The folder the user asked for (or the default), None when turned off."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() in ("off", "0", "none", "false"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "lstm-sweep" / "xla"


def machine_tag() -> str:
    """TensorFlow's version and a digest of what the CPU can execute: executables are only valid for both."""
    tf_version = "unknown"
    for distribution in TF_DISTRIBUTIONS:
        try:
            tf_version = metadata.version(distribution)
            break
        except metadata.PackageNotFoundError:
            continue
    cpu = platform.machine() + platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                cpu += line
    except OSError:
        pass
    return f"tf{tf_version}-{hashlib.sha1(cpu.encode()).hexdigest()[:12]}"


def enable_xla_cache() -> Path | None:
    """Point TensorFlow's persistent XLA cache at our folder; returns it, or None if off or not writable.

    Must run before TensorFlow's first op in the process (its flags are read once, then fixed). A
    `--tf_xla_persistent_cache_directory` the user put in TF_XLA_FLAGS wins.
    """
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if FLAG in flags:
        return None
    root = cache_root()
    if root is None:
        return None
    folder = root / machine_tag()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a cache is an optimisation: without a writable folder, compile as before
    if not os.access(folder, os.W_OK):
        return None
    os.environ["TF_XLA_FLAGS"] = f"{flags} {FLAG}={folder}".strip()
    return folder
