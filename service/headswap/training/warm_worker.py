"""The serving process's handle on a warm training worker: started once, reused job after job.

A fresh worker per job paid for process start, importing Keras and its backend, and opening
the base model's ONNX session: seconds that dominated a small fine-tune. A warm worker
(`python -m headswap.training.worker --warm`) does that once and then waits for jobs on its
stdin, one JSON line each; it answers on a pipe of its own with the job's exit code. It stays a
separate process (TensorFlow/JAX, their memory and threads never enter the serving process),
dies with the server (PR_SET_PDEATHSIG, and it exits when its stdin closes), and is killed to
cancel a job: the scheduler then starts a fresh one.

Each worker runs one Keras backend (`backends.py`), set in its environment when it starts: a
process cannot change backends once Keras is imported. It says on the control pipe when it is
ready (imported and warmed up); `on_ready` hears of it, and of the end of a worker that was ready,
so that the server can report headswap.v1.Training SERVING only while a trainer is ready.

Only the scheduler thread starts workers and runs jobs (PR_SET_PDEATHSIG follows the thread that
forked); `preload` may be called from any thread.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from headswap.training import backends

log = logging.getLogger(__name__)

MAX_JOBS_PER_WORKER = 50  # then a fresh process: nothing a framework leaks can pile up for ever


class WarmWorker:
    """One worker process, ready for the next job."""

    def __init__(self, log_path: Path, backend: str | None = None,
                 on_ready: Callable[[bool], None] | None = None) -> None:
        self.log_path = log_path
        self.backend = backend or backends.default("auto")
        self._on_ready = on_ready or (lambda ready: None)
        self.ready = threading.Event()
        env = {**backends.worker_environment(self.backend),
               "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), "PYTHONUNBUFFERED": "1"}
        read_end, write_end = os.pipe()  # worker -> server: one JSON line per finished job
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "headswap.training.worker", "--warm", "--parent-pid", str(os.getpid()),
                 "--control-fd", str(write_end), "--work-dir", str(log_path.parent)],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                pass_fds=(write_end,))
        os.close(write_end)
        self._write_lock = threading.Lock()
        self._codes: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # job exit codes; None: gone
        self.jobs_run = 0
        # Reads the control pipe until the worker closes it (exits): the ready line can come while
        # no job runs, and nobody else would read it.
        threading.Thread(target=self._read_answers, args=(os.fdopen(read_end, "rb"),),
                         name=f"warm-worker-{self.proc.pid}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def usable(self, backend: str | None = None) -> bool:
        """Alive, not worn out, and (when given) running `backend`."""
        return self.alive() and self.jobs_run < MAX_JOBS_PER_WORKER and backend in (None, self.backend)

    def _read_answers(self, answers: Any) -> None:
        with answers:
            for line in answers:
                try:
                    message = json.loads(line)
                    if message.get("ready"):
                        self.ready.set()
                        self._on_ready(True)
                        continue
                    code = int(message["code"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.error("warm worker %d answered %r; stopping it", self.pid, line[:200])
                    code = 1
                    self.proc.kill()
                self._codes.put(code)
        self._codes.put(None)
        if self.ready.is_set():
            self.ready.clear()
            self._on_ready(False)

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
        code = self._codes.get()
        return self.proc.wait() if code is None else code

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
