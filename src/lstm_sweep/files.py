"""Writing result files (reports, diagnoses) so a reader or a crash never leaves half a file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def file_mode(path: Path) -> int:
    """Keep an existing file's mode; a new file gets what open() would give it (0666 minus the umask), not
    mkstemp's private 0600."""
    if path.exists():
        return path.stat().st_mode & 0o777
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside the target, fsync it, then rename over the target (atomic on POSIX): a
    reader sees the old file or the new one, and after a crash the renamed file is not empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
