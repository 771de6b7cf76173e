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
from pathlib import Path
from typing import IO

LOCK_FILE = "server.lock"


class WorkDirBusy(RuntimeError):
    """Another live process holds the work directory."""


def lock_work_dir(work_dir: str | Path) -> IO[str]:
    """Lock the work directory for this process; keep the returned file open while serving."""
    directory = Path(work_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+")
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
