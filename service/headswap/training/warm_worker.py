"""The serving process's handle on a warm training worker: started once, reused job after job.

A fresh worker per job paid for process start, importing Keras and its backend, and opening
the base model's ONNX session: seconds that dominated a small fine-tune. A warm worker
(`python -m headswap.training.worker --warm`) does that once and then waits for jobs on its
stdin, one JSON line each; it answers on a pipe of its own with the job's exit code. It stays a
separate process (TensorFlow/JAX, their memory and threads never enter the serving process),
dies with the server (PR_SET_PDEATHSIG, and it exits when its stdin closes), and is killed to
cancel a job: the scheduler then starts a fresh one.

Only the scheduler thread starts workers and runs jobs (PR_SET_PDEATHSIG follows the thread that
forked); `preload` may be called from any thread.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_JOBS_PER_WORKER = 50  # then a fresh process: nothing a framework leaks can pile up for ever


class WarmWorker:
    """One worker process, ready for the next job."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               "PYTHONUNBUFFERED": "1"}
        read_end, write_end = os.pipe()  # worker -> server: one JSON line per finished job
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "headswap.training.worker", "--warm", "--parent-pid", str(os.getpid()),
                 "--control-fd", str(write_end), "--work-dir", str(log_path.parent)],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                pass_fds=(write_end,))
        os.close(write_end)
        self._answers = os.fdopen(read_end, "rb")
        self._write_lock = threading.Lock()
        self.jobs_run = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def usable(self) -> bool:
        return self.alive() and self.jobs_run < MAX_JOBS_PER_WORKER

    def _send(self, message: dict[str, Any]) -> bool:
        with self._write_lock:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps(message).encode() + b"\n")
                self.proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def preload(self, base: dict[str, Any]) -> None:
        """Open this base's ONNX session now (the worker does it while idle)."""
        self._send({"preload": base})

    def run(self, job_dir: Path) -> int:
        """Hand over a job and wait for its exit code (0 published, 1 failed, 3 stopped); a worker
        that dies meanwhile (cancelled, crashed) gives its process exit code (negative: signal)."""
        self.jobs_run += 1
        if not self._send({"job": str(job_dir)}):
            return self.proc.wait()
        line = self._answers.readline()
        if not line:
            return self.proc.wait()
        try:
            return int(json.loads(line)["code"])
        except (ValueError, KeyError, TypeError):
            log.error("warm worker %d answered %r; stopping it", self.pid, line[:200])
            self.stop()
            return 1

    def stop(self) -> None:
        """Close its stdin (it exits when idle), then make sure it is gone."""
        with self._write_lock:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._answers.close()
