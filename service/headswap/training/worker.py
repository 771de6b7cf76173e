"""The training worker: `python -m headswap.training.worker JOB_DIR --parent-pid PID`, or warm:
`python -m headswap.training.worker --warm --parent-pid PID --control-fd FD`.

A subprocess so that TensorFlow or JAX (its memory, its threads, a crash) never touches the
serving process. A warm worker (`warm_worker.py` is the server's side) imports the trainer once,
then reads JSON lines on stdin: `{"preload": BASE}` readies that base's extractor while idle,
`{"job": JOB_DIR}` runs a job with its output in the job's worker.log, and answers
`{"code": N}` on the control pipe; it exits when stdin closes. Its first line on the control pipe,
`{"ready": true, ...}`, says that Keras is imported and warmed up. Its Keras backend is the
KERAS_BACKEND the server set in its environment (`backends.py`).

A job reports progress into the job store only while the job is RUNNING under the attempt its
trainer claimed (`store.Claim`: a cancel from any replica, or another trainer's claim after the
lease expired, makes every further write fail, and the worker stops). Just before the new
version is written it records the version it publishes (`JobStore.begin_publish`, refused after a
cancel), then records the result. SIGTERM from its trainer stops the job (cleanly: the export's
staging goes) and leaves the worker warm. It dies with its trainer (PR_SET_PDEATHSIG): a crashed
trainer leaves no worker behind to publish a version later.

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
from typing import Any, Callable

from headswap import logs
from headswap.config import env_name
from headswap.errors import HeadswapError
from headswap.training.databases import StoreUnavailable
from headswap.training.store import Claim, JobStore, Phase, open_job_store

log = logging.getLogger("headswap.training.worker")

PR_SET_PDEATHSIG = 1


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

    def __init__(self, store: JobStore, claim: Claim, patience_s: float = 30.0) -> None:
        self.store, self.claim = store, claim
        self.patience_s = patience_s  # how long a fenced write may wait for an unreachable store

    def __call__(self, phase: str, **fields: Any) -> None:
        """A progress event; while the store does not answer, training goes on without it (the
        trainer's heartbeat decides whether the job is still ours)."""
        from headswap.training.trainer import Stopped

        try:
            ours = self.store.progress(self.claim, phase=phase, **fields)
        except StoreUnavailable as err:
            log.warning("progress not recorded: %s", err)
            return
        if not ours:
            raise Stopped(f"job {self.claim.job_id} is no longer running under attempt {self.claim.attempt} "
                          "(cancelled, or claimed by another trainer)")

    def begin_publish(self, model: str, version: int) -> None:
        """Called by the registry right before the version is written: from here a cancel is
        refused; if the job was cancelled first (or the store cannot confirm it is still ours),
        nothing is published."""
        from headswap.training.trainer import Stopped

        if not confirmed(lambda: self.store.begin_publish(self.claim, model, version), self.patience_s):
            raise Stopped(f"job {self.claim.job_id} was cancelled or taken over before {model} version {version} "
                          "was published, or the job store could not confirm it; nothing was published")


def confirmed(write: Callable[[], bool], patience_s: float) -> bool:
    """A fenced write's answer, retried while the store does not answer, for up to `patience_s`
    (after that the lease has run out: the job is someone else's)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return write()
        except StoreUnavailable as err:
            if time.monotonic() > deadline:
                log.warning("giving up: %s", err)
                return False
            log.warning("waiting for the job store: %s", err)
            time.sleep(1.0)


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """Its trainer stops the job (a cancel, a lost lease, a drain): unwind, cleaning up as we go."""
    from headswap.training.trainer import Stopped

    raise Stopped("stopped by its trainer (cancelled, taken over, or the trainer is shutting down)")


_STORES: dict[tuple[str, str], JobStore] = {}


def job_store(runtime: dict[str, Any]) -> JobStore:
    """The trainer's job store: --job-store reaches workers in the environment (a DSN's password
    stays out of job.json); empty means the work directory's SQLite file. A warm worker keeps it
    open from job to job (a PostgreSQL connection with its password exchange costs tenths of a
    second per job)."""
    key = (os.environ.get(env_name("job_store"), ""), str(runtime["work_dir"]))
    if key not in _STORES:
        _STORES[key] = open_job_store(key[0], Path(key[1]))
    return _STORES[key]


def run_job(job_dir: Path) -> int:
    """Run one job (exit code semantics as the module says)."""
    job_file = json.loads((job_dir / "job.json").read_text())
    runtime = job_file["runtime"]
    store = job_store(runtime)
    claim = Claim(job_file["job_id"], int(runtime["attempt"]))
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return _run_claimed(job_dir, job_file, store, claim)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_claimed(job_dir: Path, job_file: dict[str, Any], store: JobStore, claim: Claim) -> int:
    from headswap.training import trainer  # TensorFlow starts here, after the cheap checks

    job_id = claim.job_id
    try:
        reporter = StoreReporter(store, claim, float(job_file["runtime"].get("lease_s", 30.0)))
        reporter(Phase.CLAIMED, message=f"worker {os.getpid()} started the job")
        result = trainer.run(trainer.TrainingJob.load(job_dir, job_file), reporter)
    except trainer.Stopped as err:
        log.info("%s", err)
        return 3
    except HeadswapError as err:
        log.error("job %s failed: %s", job_id, err)
        confirmed(lambda: store.set_error(claim, str(err)) or True, 5.0)
        return 1
    except Exception as err:  # anything else is a bug or an environment problem: keep the trace in the log
        log.exception("job %s crashed", job_id)
        confirmed(lambda: store.set_error(claim, f"training failed: {type(err).__name__}: {err}") or True, 5.0)
        return 1
    if not confirmed(lambda: store.set_result(claim, result.model, result.version, result.metrics),
                     float(job_file["runtime"].get("lease_s", 30.0))):
        log.warning("job %s: stored %s version %d, but the job was taken over meanwhile", job_id,
                    result.model, result.version)
        return 3
    return 0


def preload(base: dict[str, Any]) -> None:
    """Ready the base's feature extractor now, so the next job on it starts extracting at once: its
    ONNX session or, where jobs extract in Keras (a GPU node, `trainer.keras_extracts`), its Keras
    backbone with the one batch shape compiled."""
    import numpy as np

    from headswap.inference.images import Preprocessing
    from headswap.registry.registry import Registry
    from headswap.training import trainer

    registry = Registry(base["model_dir"], cache_dir=Path(base["cache_dir"]))
    path, manifest = registry.verified_fp32_path(base["name"], int(base["version"]))
    started = time.monotonic()
    if trainer.keras_extracts():
        pre = Preprocessing.from_manifest(manifest)
        embed = trainer.cached_keras_embedder(base["source"], base.get("weights") or None)
        embed(np.zeros((1, pre.height, pre.width, 3), np.float32))
        extractor = "keras"
    else:
        trainer.cached_ort_embedder(path, str(manifest["sha256"]), manifest["outputs"]["embedding"],
                                    int(base.get("threads") or 2))
        extractor = "onnxruntime"
    log.info("warm worker %d: %s version %d ready (%s, %.1f s)", os.getpid(), base["name"], int(base["version"]),
             extractor, time.monotonic() - started)


def serve_warm(control_fd: int, work_dir: Path) -> int:
    """Import once, then run jobs from stdin until it closes; each job's output goes to its log."""
    import keras

    from headswap.training import trainer  # the point: pay for the import (and a first fit) now

    trainer.configure_backend(work_dir / "compilation-cache")
    started = time.monotonic()
    trainer.set_random_seed(0)
    trainer.warm_up()
    log.info("warm worker %d: first fit done in %.1f s", os.getpid(), time.monotonic() - started)
    log.info("warm worker %d ready (Keras %s, backend %s)", os.getpid(), keras.__version__, keras.backend.backend())
    control = os.fdopen(control_fd, "w", buffering=1)
    # The server reports headswap.v1.Training SERVING from here on (warm_worker.WarmWorker.ready).
    control.write(json.dumps({"ready": True, "keras_backend": keras.backend.backend()}) + "\n")
    idle_out = os.dup(1)
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            log.error("warm worker: not a JSON line: %r", line[:200])
            continue
        if "preload" in message:
            try:
                preload(message["preload"])
            except Exception:  # the job will open it (or fail with a clear error) itself
                log.exception("warm worker: preload failed")
            continue
        job_dir = Path(message["job"])
        with open(job_dir / "worker.log", "ab", buffering=0) as job_log:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(job_log.fileno(), 1)
            os.dup2(job_log.fileno(), 2)
            try:
                code = run_job(job_dir)
            except Exception:
                log.exception("job in %s crashed the worker loop", job_dir)
                code = 1
            finally:
                keras.backend.clear_session()
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(idle_out, 1)
                os.dup2(idle_out, 2)
        control.write(json.dumps({"code": code}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job_dir", type=Path, nargs="?")
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--warm", action="store_true", help="wait for jobs on stdin (see the module docstring)")
    parser.add_argument("--control-fd", type=int, default=-1, help="warm: where exit codes are written")
    parser.add_argument("--work-dir", type=Path, default=None, help="warm: the server's work directory")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    logs.configure("INFO")
    if args.warm:
        if args.control_fd < 0:
            parser.error("--warm needs --control-fd")
        return serve_warm(args.control_fd, args.work_dir or Path.cwd())
    if args.job_dir is None:
        parser.error("JOB_DIR is required without --warm")
    from headswap.training import trainer

    trainer.configure_backend(args.job_dir.resolve().parent.parent / "compilation-cache")
    return run_job(args.job_dir)


if __name__ == "__main__":
    sys.exit(main())
