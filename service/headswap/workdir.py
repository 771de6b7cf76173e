"""The work directory belongs to one server process at a time.

Everything in it (the job database, uploads in progress, workers' files) assumes a single owner:
a second server on the same directory would mark the first one's running job failed and delete
its upload at start-up. So the server takes an exclusive `flock` on `<work_dir>/server.lock`
before it reads or touches anything there; the kernel releases it when the process dies, so a
crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO

LOCK_FILE = "server.lock"


class WorkDirBusy(RuntimeError):
    """Another live process holds the work directory."""


class WorkDirUnusable(ValueError):
    """The work directory cannot be created or written: a file, read-only, not permitted.

    A ValueError, so that `server.run` ends the start with its one-line message as it does for
    unusable TLS and credentials files."""


def check_writable(directory: Path, setting: str = "--work-dir") -> None:
    """Create `directory` and prove it writable by writing a file in it, or raise WorkDirUnusable.

    A real write, not os.access: root passes os.access on a read-only directory (mode 0555),
    and nothing passes a read-only mount; either way the first upload would otherwise fail."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WorkDirUnusable(f"{setting} {directory} is a file, not a directory; give {setting} a directory "
                              "(it is created when missing)") from None
    except OSError as err:
        raise WorkDirUnusable(f"{setting} {directory} cannot be created: {err.strerror or err}") from None
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as err:
        reason = "it is a file, not a directory" if isinstance(err, NotADirectoryError) else \
            f"{err.strerror or err}"
        raise WorkDirUnusable(f"{setting} {directory} is not writable ({reason}); the server keeps its job "
                              f"database and uploads there: give {setting} a writable directory") from None


def lock_work_dir(work_dir: str | Path) -> IO[str]:
    """Lock the work directory for this process; keep the returned file open while serving."""
    directory = Path(work_dir).expanduser()
    check_writable(directory)
    try:
        handle = open(directory / LOCK_FILE, "a+")
    except OSError as err:  # e.g. a directory named server.lock, or a lock file root-owned and read-only
        raise WorkDirUnusable(f"--work-dir {directory}: cannot open {LOCK_FILE}: {err.strerror or err}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise WorkDirBusy(f"the work directory {directory.resolve()} is in use by another headswap server "
                          f"(pid {holder}); give each server its own --work-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
