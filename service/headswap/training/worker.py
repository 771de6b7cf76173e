"""The training worker: `python -m headswap.training.worker JOB_DIR --parent-pid PID`.

A subprocess so that TensorFlow (its memory, its threads, a crash) never touches the serving
process. It reports progress into the job database, only while the job is RUNNING and owned by
its pid (a cancel or a restart makes every further write fail, and the worker stops), publishes
the new version atomically at its very end, and records the result. It dies with the server
(PR_SET_PDEATHSIG): a crashed server leaves no worker behind to publish a version later.

Exit codes: 0 published, 1 failed (the reason is in the job's `error`), 3 stopped (cancelled or
no longer owner).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from headswap import logs
from headswap.errors import HeadswapError
from headswap.training.store import JobState, JobStore

log = logging.getLogger("headswap.training.worker")

PR_SET_PDEATHSIG = 1
OWNERSHIP_TIMEOUT_S = 60.0


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when the server goes; exit now if it is already gone."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the ownership checks still stop stray writes
        pass
    if parent_pid and os.getppid() != parent_pid:
        sys.exit(3)


class StoreReporter:
    """Progress events into the job store; raises Stopped when the job is not ours any more."""

    def __init__(self, store: JobStore, job_id: str, pid: int) -> None:
        self.store, self.job_id, self.pid = store, job_id, pid

    def __call__(self, phase: str, **fields: Any) -> None:
        from headswap.training.trainer import Stopped

        if not self.store.progress(self.job_id, pid=self.pid, phase=phase, **fields):
            raise Stopped(f"job {self.job_id} is no longer running in this worker")


def wait_for_ownership(store: JobStore, job_id: str, pid: int) -> bool:
    """The server records our pid right after starting us: wait for it to be there."""
    deadline = time.monotonic() + OWNERSHIP_TIMEOUT_S
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job.state != JobState.QUEUED:
            return job.state == JobState.RUNNING and job.worker_pid == pid
        time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    logs.configure("INFO")
    job_file = json.loads((args.job_dir / "job.json").read_text())
    store = JobStore(job_file["runtime"]["db"])
    job_id, pid = job_file["job_id"], os.getpid()
    if not wait_for_ownership(store, job_id, pid):
        log.warning("job %s is not ours to run; exiting", job_id)
        return 3
    from headswap.training import trainer  # TensorFlow starts here, after the cheap checks

    try:
        result = trainer.run(trainer.TrainingJob.load(args.job_dir, job_file), StoreReporter(store, job_id, pid))
    except trainer.Stopped as err:
        log.info("%s", err)
        return 3
    except HeadswapError as err:
        log.error("job %s failed: %s", job_id, err)
        store.set_error(job_id, pid, str(err))
        return 1
    except Exception as err:  # anything else is a bug or an environment problem: keep the trace in the log
        log.exception("job %s crashed", job_id)
        store.set_error(job_id, pid, f"training failed: {type(err).__name__}: {err}")
        return 1
    if not store.set_result(job_id, pid, result.model, result.version, result.metrics):
        log.warning("job %s: stored %s version %d, but the job was cancelled meanwhile", job_id,
                    result.model, result.version)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
