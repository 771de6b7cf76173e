"""A trainer: claims jobs from the job store and runs each in its warm worker, holding a lease.

Any number of trainers (processes of role `trainer`, or the one inside role `all`) share one job
store and one model store. Each:
- claims the oldest queued job (`JobStore.claim`), or one whose trainer's lease expired;
- copies the job's staged upload from the model store (`staging.fetch`) into its work directory;
- runs it in its warm worker (`warm_worker.py`), on the job's Keras backend (`backends.py`),
  renewing the lease every `HEARTBEAT_S`; a heartbeat that is refused means the job was
  cancelled (from any replica) or claimed by another trainer: the worker is stopped at once;
- finishes the job, fenced by its attempt number: activation when asked and good enough, the
  final event, the staged upload removed (a failed job's kept for --keep-failed-job-data-s).

On SIGTERM (`drain`) it stops claiming and lets the running job finish within the drain limit;
past it, the worker is stopped and the job released at once for another trainer.

The scheduler thread is the warm worker's parent thread: PR_SET_PDEATHSIG ties the worker to it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from headswap.config import Settings
from headswap.errors import HeadswapError
from headswap.metrics import JOBS, JOBS_RUNNING
from headswap.registry.registry import Registry
from headswap.training import backends, staging
from headswap.training.databases import StoreUnavailable
from headswap.training.spec import FineTuneSpec
from headswap.training.store import Claim, JobRecord, JobState, JobStore, Phase
from headswap.training.warm_worker import WarmWorker

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
WORKER_LOG = "worker.log"
HEARTBEAT_S = 0.5  # a cancel from any replica reaches the worker within this plus its stop
STOP_GRACE_S = 1.5  # SIGTERM lets the worker clean up (its export's staging); then SIGKILL
IDLE_WAIT_S = 2.0  # longest wait between claims when no job is queued (PostgreSQL wakes it sooner)
SWEEP_EVERY_S = 60.0  # how often staged uploads of finished jobs are looked for


def trainer_id() -> str:
    """Who holds a lease: host, pid and a random tag (a pid is reused across restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobRunner:
    """Claims and runs jobs, one at a time (training takes every core, or the one GPU)."""

    def __init__(self, settings: Settings, registry: Registry, store: Callable[[], JobStore],
                 manager: Any = None, on_ready: Callable[[bool], None] | None = None,
                 embedded: bool = False) -> None:
        self.settings = settings
        self.registry = registry
        self._store = store  # the job store, once reachable (raises StoreUnavailable until then)
        self.manager = manager  # the inference ModelManager in role `all`: activation answers at once
        self.on_ready = on_ready or (lambda ready: None)
        self.embedded = embedded  # the store is this work directory's own SQLite file
        self.owner = trainer_id()
        self.jobs_dir = Path(settings.work_dir).expanduser().resolve() / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Condition()
        self._stopping = False
        self._current: Claim | None = None
        self._released = False
        self._thread: threading.Thread | None = None
        self._warm: WarmWorker | None = None
        self._warm_base: dict[str, Any] | None = None
        self._want_warm = settings.trainer_warm_start
        self._last_sweep = 0.0
        self._job_done = threading.Event()  # set when the running job's worker answers

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for leftover in self.jobs_dir.iterdir():  # a previous process's local copies: the store has the jobs
            if leftover.is_dir() and not leftover.name.startswith("."):
                _remove_local_data(leftover)
        self._thread = threading.Thread(target=self._schedule, name="job-runner", daemon=True)
        self._thread.start()

    def drain(self, limit_s: float) -> None:
        """Stop claiming; give the running job `limit_s` to finish, then stop it and release it."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            running = self._current
        if running is not None:
            log.info("draining: job %s may finish within %.0f s", running.job_id, limit_s)
            deadline = time.monotonic() + limit_s
            with self._lock:
                while self._current == running and time.monotonic() < deadline:
                    self._lock.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                still = self._current == running
                if still:
                    self._released = True
            if still and self._warm is not None:
                _stop_job(self._warm, self._job_done)
            if still:
                try:
                    if self._store().release(running, f"trainer {self.owner} is shutting down"):
                        log.warning("job %s released for another trainer (it did not finish within %.0f s)",
                                    running.job_id, limit_s)
                except HeadswapError as err:  # its lease will expire instead
                    log.warning("job %s could not be released (%s); it is claimed again once its lease expires",
                                running.job_id, err)
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 5)

    def prepare(self, base: dict[str, Any]) -> None:
        """A FineTune for `base` is arriving: have the warm worker up, with this base's extractor."""
        with self._lock:
            self._warm_base = base
            self._want_warm = True
            warm = self._warm
            self._lock.notify_all()
        if warm is not None and warm.alive():
            warm.preload(base)

    # --- the scheduler thread --------------------------------------------------------------

    def _schedule(self) -> None:
        if self.embedded:
            try:
                interrupted = self._store().expire_leases()
                if interrupted:
                    log.warning("%d jobs were running when this server last stopped; they run again", interrupted)
            except StoreUnavailable as err:
                log.warning("job store: %s", err)
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    want_warm = self._want_warm
                if want_warm:
                    self._ready_worker(None)
                claim = self._claim()
                if claim is None:
                    self._sweep()
                    try:
                        self._store().wait_for_events(IDLE_WAIT_S)
                    except StoreUnavailable:
                        time.sleep(IDLE_WAIT_S)
                    continue
                JOBS_RUNNING.inc()
                try:
                    self._run(claim)
                except StoreUnavailable as err:  # its lease runs out, and it is claimed again
                    log.warning("job %s: lost the job store (%s); it is claimed again once its lease expires",
                                claim.job_id, err)
                except Exception:
                    log.exception("job %s: the trainer failed", claim.job_id)
                    self._finish(claim, JobState.FAILED, error="internal error running the job; see the trainer log")
                finally:
                    JOBS_RUNNING.dec()
                    with self._lock:
                        self._current = None
                        self._lock.notify_all()
                    _remove_local_data(self.jobs_dir / claim.job_id)
        finally:
            if self._warm is not None:
                self._warm.stop()

    def _claim(self) -> Claim | None:
        s = self.settings
        try:
            with self._lock:
                if self._stopping:
                    return None
            claim = self._store().claim(self.owner, s.job_lease_s, s.max_job_attempts)
        except StoreUnavailable as err:
            log.warning("cannot claim jobs: %s", err, extra={"throttle": "job store unavailable"})
            return None
        if claim is not None:
            with self._lock:
                self._current, self._released = claim, False
        return claim

    def _ready_worker(self, backend: str | None) -> WarmWorker:
        """The warm worker on `backend` (None: whichever runs), started afresh if there is none, it
        died (a cancel may kill it), it runs another backend, or it has run its share of jobs."""
        if self._warm is not None and not self._warm.usable(backend):
            self._warm.stop()
            self._warm = None
        if self._warm is None:
            chosen = backend or backends.default(self.settings.trainer_backend)
            self._warm = WarmWorker(self.jobs_dir.parent / "warm-worker.log", chosen, self.on_ready)
            log.info("warm training worker pid %d starting (Keras on %s)", self._warm.pid, chosen)
            with self._lock:
                base = self._warm_base
            if base is not None:
                self._warm.preload(base)
        return self._warm

    def _run(self, claim: Claim) -> None:
        store = self._store()
        job = store.get(claim.job_id)
        spec = FineTuneSpec.from_dict(job.config)
        job_dir = self.jobs_dir / claim.job_id
        shutil.rmtree(job_dir, ignore_errors=True)
        try:
            staging.fetch(self.registry.store, claim.job_id, job_dir)
        except (OSError, HeadswapError) as err:
            log.error("job %s: its upload cannot be read from the model store: %s", claim.job_id, err)
            self._finish(claim, JobState.FAILED, error=f"its upload could not be read from the model store "
                                                      f"{self.registry.url}: {err}")
            return
        self._write_runtime(job_dir, claim)
        backend = backends.for_job(self.settings.trainer_backend, spec.unfreeze_top_layers)
        worker = self._ready_worker(backend)
        if not worker.ready.is_set():
            store.progress(claim, phase=Phase.CLAIMED, message=f"waiting for the trainer to start (Keras on "
                                                                f"{backend}: the first job after a start pays for it)")
        if not store.set_worker(claim, worker.pid):
            return  # cancelled meanwhile: the worker stays ready for the next job
        log.info("job %s (attempt %d): running in warm worker pid %d", claim.job_id, claim.attempt, worker.pid)
        lost = threading.Event()
        beating = self._job_done = threading.Event()
        heart = threading.Thread(target=self._heartbeat, args=(claim, worker, lost, beating),
                                 name=f"heartbeat-{claim.job_id}", daemon=True)
        heart.start()
        try:
            code = worker.run(job_dir)
        finally:
            beating.set()
            heart.join()
        self._conclude(claim, code, lost.is_set(), job_dir)

    def _heartbeat(self, claim: Claim, worker: WarmWorker, lost: threading.Event, done: threading.Event) -> None:
        """Renew the lease while the job runs; stop the worker when the job is not ours any more."""
        s = self.settings
        last_ok = time.monotonic()
        while not done.wait(HEARTBEAT_S):
            try:
                ours = self._store().heartbeat(claim, s.job_lease_s)
                last_ok = time.monotonic()
            except StoreUnavailable as err:
                log.warning("job %s: cannot renew its lease: %s", claim.job_id, err,
                            extra={"throttle": "job store unavailable"})
                ours = time.monotonic() - last_ok < s.job_lease_s  # past the lease it is someone else's
            if not ours:
                lost.set()
                log.info("job %s was cancelled or taken over; stopping its worker", claim.job_id)
                _stop_job(worker, done)
                return

    def _conclude(self, claim: Claim, code: int, lost: bool, job_dir: Path) -> None:
        store = self._store()
        job = store.get(claim.job_id)
        with self._lock:
            released = self._released
        if released:
            return  # drained: another trainer runs it
        if lost or job.state != JobState.RUNNING or job.attempt != claim.attempt:
            log.info("job %s: %s (attempt %d stopped)", claim.job_id, job.state.name, claim.attempt)
            if job.state == JobState.CANCELLED:
                self._remove_staged(job)
            return
        if code == 0 and job.version:
            self._succeed(claim, job)
        else:
            self._finish(claim, JobState.FAILED, error=_failure_reason(code, job.error, job_dir / WORKER_LOG))
        final = store.get(claim.job_id)
        JOBS.labels(final.state.name.lower()).inc()
        log.info("job %s: %s", claim.job_id, final.state.name)
        if final.state == JobState.SUCCEEDED:
            self._remove_staged(final)

    def _succeed(self, claim: Claim, job: JobRecord) -> None:
        """Activate when asked and good enough, then the final event (carrying model and version)."""
        spec = FineTuneSpec.from_dict(job.config)
        metrics = json.loads(job.metrics_json or "{}")
        accuracy = float(metrics.get("val_accuracy", 0.0))
        activated = False
        message = f"stored {job.model} version {job.version} (validation accuracy {accuracy:.4f})"
        if spec.activate and accuracy >= spec.min_val_accuracy:
            try:
                if spec.rollout_mode and self.registry.active_version(job.model):
                    # a rollout beside the active version instead of all traffic at once (docs/rollouts.md);
                    # a first version has nothing to roll out against and is activated outright
                    self._start_rollout(job, spec)
                    message += f"; rolling out: {spec.rollout_mode} {spec.rollout_percent}%"
                elif self.manager is not None:
                    self.manager.activate(job.model, job.version)  # loads and warms it, then swaps
                    message += "; now active"
                else:
                    self.registry.activate(job.model, job.version)
                    message += "; now active"
                activated = True
            except Exception as err:  # the version stays stored; say why it is not serving
                log.warning("job %s: activation failed: %s", job.job_id, err)
                message += f"; not activated: {err}"
        elif spec.activate:
            message += f"; not activated: below min_val_accuracy {spec.min_val_accuracy:.4f}"
        if self.settings.keep_versions:
            try:
                pruned = self.registry.prune(job.model, self.settings.keep_versions)
                if pruned:
                    log.info("job %s: removed old versions %s of %s (--keep-versions %d)", job.job_id, pruned,
                             job.model, self.settings.keep_versions)
            except Exception as err:  # retention is housekeeping: the job itself succeeded
                log.warning("job %s: pruning old versions of %s failed: %s", job.job_id, job.model, err)
        self._finish(claim, JobState.SUCCEEDED, message=message, activated=activated)

    def _start_rollout(self, job: JobRecord, spec: FineTuneSpec) -> None:
        who = f"fine-tune job {job.job_id}"
        if self.manager is not None:  # loads and warms the candidate first
            self.manager.start_rollout(job.model, job.version, spec.rollout_mode, spec.rollout_percent, False, who)
            return
        from headswap.inference.rollout import Rollout, Rules

        rules = Rules.from_settings(self.settings)
        self.registry.start_rollout(job.model, job.version, lambda stable: Rollout.new(
            stable, job.version, spec.rollout_mode, spec.rollout_percent, False, rules, who).to_dict())

    def _finish(self, claim: Claim, state: JobState, **fields: Any) -> None:
        try:
            self._store().finish(claim.job_id, state, claim=claim, **fields)
        except StoreUnavailable as err:  # the lease expires and another trainer (or attempt) takes over
            log.warning("job %s: cannot record %s: %s", claim.job_id, state.name, err)

    def _write_runtime(self, job_dir: Path, claim: Claim) -> None:
        """This trainer's side of job.json: its model store view, caches, and the attempt it holds."""
        s = self.settings
        job = json.loads((job_dir / JOB_FILE).read_text())
        job["runtime"] = {"model_dir": s.model_dir, "cache_dir": str(self.registry.cache_dir),
                          "work_dir": str(self.jobs_dir.parent), "attempt": claim.attempt, "lease_s": s.job_lease_s,
                          "threads": s.cpu_threads, "max_image_pixels": s.max_image_pixels,
                          "embedding_cache_dir": str(self.jobs_dir.parent / "embedding-cache"),
                          "embedding_cache_bytes": s.embedding_cache_mb << 20}
        (job_dir / JOB_FILE).write_text(json.dumps(job, indent=2))

    # --- staged uploads --------------------------------------------------------------------

    def _remove_staged(self, job: JobRecord) -> None:
        try:
            staging.remove(self.registry.store, job.job_id)
            self._store().mark_data_removed(job.job_id)
        except (OSError, HeadswapError) as err:
            log.warning("job %s: its staged upload could not be removed yet: %s", job.job_id, err)

    def _sweep(self) -> None:
        """Remove staged uploads of finished jobs: at once for succeeded and cancelled ones (which
        a cancelling replica or a stopped trainer may have left), after --keep-failed-job-data-s
        for failed ones (so their images can be looked at, or the job sent again)."""
        now = time.time()
        if now - self._last_sweep < SWEEP_EVERY_S:
            return
        self._last_sweep = now
        try:
            finished = self._store().with_staged_data()
        except StoreUnavailable:
            return
        for job in finished:
            if job.state != JobState.FAILED or now - job.finished > self.settings.keep_failed_job_data_s:
                self._remove_staged(job)



def _remove_local_data(job_dir: Path) -> None:
    """Drop this trainer's copy of a job's images once it is over; job.json and worker.log stay."""
    for name in ("images.bin", "index.npz", "features"):
        path = job_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _stop_job(worker: WarmWorker, done: threading.Event) -> None:
    """SIGTERM: the worker stops its job (its export's staging is cleaned up) and stays warm; if
    the job has not ended within STOP_GRACE_S, SIGKILL (the next job starts a fresh worker)."""
    try:
        worker.proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    if not done.wait(STOP_GRACE_S) and worker.alive():
        worker.proc.kill()


def _failure_reason(code: int, error: str, worker_log: Path) -> str:
    """Why a worker failed: its own account, else the signal that killed it, else its log's tail."""
    if error:
        return error
    if code < 0:
        number = -code
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        usual = "; out of memory is the usual cause" if number == signal.SIGKILL else ""
        return f"worker killed by signal {number} ({name}{usual})"
    return _tail(worker_log) or f"the worker exited with code {code}"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-1000:]
