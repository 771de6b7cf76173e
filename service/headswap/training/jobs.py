"""Fine-tune jobs in the serving process: accept uploads, queue, run workers, finish, activate.

The serving process never imports TensorFlow: it validates and stores the upload
(`dataset.py`), records the job (`store.py`), and runs the training in a worker subprocess
(`python -m headswap.training.worker JOB_DIR`) that reports progress into the same SQLite
database and publishes the new version atomically at its very end. What stays here:

- one job at a time (the rest wait in a FIFO queue): training takes every core;
- cancel = SIGTERM to the worker (SIGKILL after a grace period), job CANCELLED;
- when a worker succeeds: activate the version if asked and good enough (through the
  ModelManager in role `all`, so it answers at once), then the final `done` event;
- after a crash: jobs left QUEUED/RUNNING are marked FAILED when the next process starts (the
  work directory is locked by then: server.py), their uploaded images are removed, and the
  worker of a dead server dies with it (PR_SET_PDEATHSIG), so no stray version appears later;
- bounds on what callers can pile up: uploads streaming at once (`upload_slots`), jobs queued or
  running (--max-queued-jobs), bytes of uploads kept in the work directory (--max-work-dir-bytes);
- jobs remember their submitter; `owner=` restricts get/list/cancel/watch to one submitter's
  jobs (someone else's job is NotFound, as if absent).

Name rules (checked when the upload starts and again when the job is created):
the new name must be a valid registry name, must not be the base model itself, must not be an
existing model that is not a fine-tune of the same base source (a fine-tune of the same base
gets a new version), and no other QUEUED/RUNNING job may be training that name.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from headswap.admission import Slots
from headswap.config import Settings
from headswap.errors import (AlreadyExists, FailedPrecondition, InvalidInput, NotFound, ResourceExhausted,
                             shown_name)
from headswap.metrics import JOBS, JOBS_RUNNING
from headswap.registry.registry import Registry, check_model_name, model_name_for_source
from headswap.training.dataset import DatasetWriter, Example, Upload, out_of_space
from headswap.training.spec import FineTuneSpec
from headswap.training.store import INTERRUPTED, JobEvent, JobRecord, JobState, JobStore
from headswap.training.warm_worker import WarmWorker

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
WORKER_LOG = "worker.log"
RESULT_FILE = "result.json"
CANCEL_GRACE_S = 5.0
PHASE2_KINDS = ("builtin", "keras")


@dataclass(frozen=True)
class BaseModel:
    """The registry version a fine-tune starts from."""

    name: str
    version: int
    source: str
    manifest: dict[str, Any] = field(repr=False)

    @property
    def kind(self) -> str:
        return self.source.partition(":")[0]


@dataclass(frozen=True)
class Submission:
    """The answer to FineTune."""

    job_id: str
    num_images: int
    num_classes: int
    skipped: list[int]


class JobManager:
    """Owns the job store, the queue and the one running worker."""

    def __init__(self, settings: Settings, registry: Registry, manager: Any = None) -> None:
        self.settings = settings
        self.registry = registry
        self.manager = manager  # inference ModelManager in role `all`, None in role `trainer`
        work = Path(settings.work_dir).expanduser().resolve()
        self.jobs_dir = work / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(work / "jobs.sqlite")
        # Before any request: what a previous process left unfinished can never finish.
        for job_id in self.store.fail_unfinished():
            log.warning("job %s was interrupted by a restart; marked failed", job_id)
        for leftover in self.jobs_dir.glob(".incoming-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for job_dir in self.jobs_dir.iterdir():  # nothing runs yet: no job still needs its images
            if job_dir.is_dir() and not job_dir.name.startswith("."):
                self._cleanup(job_dir.name)
        self.upload_slots = Slots("uploads already streaming", settings.max_uploads, "--max-uploads")
        self.watch_slots = Slots("WatchJob streams already open", settings.max_watchers, "--max-watchers")
        self._inflight_bytes: dict[str, int] = {}  # upload id -> bytes received so far
        self._lock = threading.Condition()
        self._queue: collections.deque[str] = collections.deque()
        self._running: dict[str, subprocess.Popen] = {}
        self._cancelling: set[str] = set()
        self._stopping = False
        self._scheduler: threading.Thread | None = None
        # The warm worker (warm_worker.py): started by the scheduler once a FineTune request has
        # come in (servers that never train never pay for it), then kept ready between jobs.
        self._warm: WarmWorker | None = None
        self._want_warm = False
        self._warm_base: dict[str, Any] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._scheduler = threading.Thread(target=self._schedule, name="job-scheduler", daemon=True)
        self._scheduler.start()

    def close(self) -> None:
        """Stop: queued jobs fail, the running worker is stopped and its job fails (interrupted)."""
        with self._lock:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            running = dict(self._running)
            self._lock.notify_all()
        for job_id in queued:
            self.store.finish(job_id, JobState.FAILED, error="interrupted: the server stopped before the job started")
        for job_id, proc in running.items():
            self.store.finish(job_id, JobState.FAILED, error=INTERRUPTED)
            _stop_process(proc)
        if self._scheduler is not None:
            self._scheduler.join(timeout=CANCEL_GRACE_S + 5)

    # --- requests --------------------------------------------------------------------------

    def prepare(self, config: dict[str, Any]) -> tuple[FineTuneSpec, BaseModel]:
        """Check the config before any image is read: bad names fail fast."""
        spec = FineTuneSpec.from_request(config)
        check_model_name(spec.name)
        base = self.resolve_base(spec.base_model)
        if spec.unfreeze_top_layers and base.kind not in PHASE2_KINDS:
            raise FailedPrecondition(
                f"phase 2 (unfreeze_top_layers={spec.unfreeze_top_layers}) needs a Keras backbone; the base "
                f"{base.name} comes from {base.source}, whose layers cannot be unfrozen. Train the head only "
                "(unfreeze_top_layers=0) or start from a builtin: or keras: model")
        self._check_name(spec, base)
        self._check_queue()
        self._prepare_worker(base)
        return spec, base

    def _prepare_worker(self, base: BaseModel) -> None:
        """Have a warm worker ready, with this base's extractor ready, by the time the upload ends."""
        s = self.settings
        preload = {"model_dir": s.model_dir, "cache_dir": str(self.registry.cache_dir), "name": base.name,
                   "version": base.version, "source": base.source, "weights": self._weights_for(base),
                   "threads": s.cpu_threads}
        with self._lock:
            self._warm_base = preload
            warm = self._warm
            if not self._want_warm:
                self._want_warm = True
                self._lock.notify_all()
        if warm is not None and warm.alive():
            warm.preload(preload)

    def submit(self, config: dict[str, Any], batches: Iterable[Iterable[Example]], submitter: str = "") -> Submission:
        """Receive and validate the whole upload, store it, queue the job; returns its id."""
        spec, base = self.prepare(config)
        job_id = uuid.uuid4().hex[:12]
        writer = DatasetWriter(self.jobs_dir / f".incoming-{job_id}", self.settings, spec.skip_invalid_images)
        try:
            for batch in batches:
                batch = list(batch)
                self._reserve_bytes(job_id, sum(len(example.image) for example in batch))
                writer.add(batch)
            upload = writer.finish(spec)
            with self._lock:
                if self._stopping:
                    raise FailedPrecondition("the server is shutting down; send the job again later")
                self._check_name(spec, base)  # another upload for the name may have finished meanwhile
                self._check_queue()
                job_dir = self.jobs_dir / job_id
                self._write_job_file(writer.directory, job_id, spec, base, upload)
                os.rename(writer.directory, job_dir)
                try:
                    self.store.create(job_id, spec.name, base.name, spec.to_dict(), upload.num_images,
                                      upload.num_classes, _received_message(upload), submitter=submitter)
                except BaseException:
                    shutil.rmtree(job_dir, ignore_errors=True)
                    raise
                self._queue.append(job_id)
                self._lock.notify_all()
        except BaseException as err:
            writer.discard()
            full = out_of_space(err, self.jobs_dir)  # after the discard: the space a retry would have
            if full is not None:
                log.warning("upload %s refused: %s", job_id, full)
                raise full from None
            raise
        finally:
            with self._lock:
                self._inflight_bytes.pop(job_id, None)
        log.info("job %s queued: %s from %s, %d images, %d classes%s", job_id, spec.name, base.name,
                 upload.num_images, upload.num_classes,
                 f", skipped {len(upload.skipped)} undecodable" if upload.skipped else "")
        return Submission(job_id, upload.num_images, upload.num_classes, upload.skipped)

    def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        return self.store.get(job_id, owner)

    def list(self, owner: str | None = None) -> list[JobRecord]:
        return self.store.list(owner)

    def cancel(self, job_id: str, owner: str | None = None) -> JobRecord:
        """Cancel a queued or running job; the running worker is stopped, nothing is published."""
        job = self.store.get(job_id, owner)
        if job.state.terminal:
            raise FailedPrecondition(f"job {job_id} has already finished ({job.state.name}); nothing to cancel")
        with self._lock:
            if job_id in self._queue:
                self._queue.remove(job_id)
                self.store.finish(job_id, JobState.CANCELLED, message="cancelled before it started")
                self._cleanup(job_id)
                return self.store.get(job_id)
            proc = self._running.get(job_id)
            self._cancelling.add(job_id)
        if proc is not None:
            _stop_process(proc)
            # The scheduler thread records the outcome once it sees the worker exit.
            deadline = time.monotonic() + CANCEL_GRACE_S + 5
            while not self.store.get(job_id).state.terminal and time.monotonic() < deadline:
                time.sleep(0.05)
        self.store.finish(job_id, JobState.CANCELLED, message="cancelled")
        return self.store.get(job_id)

    def watch(self, job_id: str, is_active: Callable[[], bool], poll_s: float = 0.2,
              owner: str | None = None) -> Iterator[JobEvent]:
        """Every event of the job from the first, then new ones as they come, until the last."""
        self.store.get(job_id, owner)  # NotFound for an unknown job (or someone else's)
        sequence = 0
        while is_active():
            events = self.store.events_after(job_id, sequence)
            for event in events:
                yield event
                sequence = event.sequence
                if event.state.terminal:
                    return
            if not events:
                time.sleep(poll_s)

    # --- checks ----------------------------------------------------------------------------

    def _check_queue(self) -> None:
        limit = self.settings.max_queued_jobs
        count = self.store.unfinished()
        if count >= limit:
            raise ResourceExhausted(f"{count} jobs are already queued or running; the limit is {limit} "
                                    "(--max-queued-jobs); wait for one to finish or cancel one")

    def stored_bytes(self) -> int:
        """Bytes of uploaded images kept in the work directory: queued and running jobs' data
        (finished jobs' images are removed) plus what uploads in progress have received."""
        on_disk = 0
        for path in self.jobs_dir.glob("*/images.bin"):
            try:
                on_disk += path.stat().st_size
            except FileNotFoundError:
                pass
        with self._lock:
            return on_disk + sum(self._inflight_bytes.values())

    def _reserve_bytes(self, upload_id: str, size: int) -> None:
        """Count a batch against --max-work-dir-bytes before it is written."""
        limit = self.settings.max_work_dir_bytes
        used = self.stored_bytes()
        if used + size > limit:
            raise ResourceExhausted(f"the work directory holds {used} bytes of uploads and this batch adds {size}; "
                                    f"the limit is {limit} (--max-work-dir-bytes); wait for queued jobs to "
                                    "finish or send less")
        with self._lock:
            self._inflight_bytes[upload_id] = self._inflight_bytes.get(upload_id, 0) + size

    def resolve_base(self, base_model: str) -> BaseModel:
        """A registry model name, or a source (builtin:/keras:/hub:) already exported to the registry."""
        name = base_model
        if ":" in base_model:
            name = self._name_for_source(base_model)
        elif base_model not in self.registry.models() or not self.registry.versions(base_model):
            raise NotFound(f"base model {base_model!r} does not exist; models in the registry: "
                           f"{', '.join(self.registry.models()) or 'none'}")
        version = self.registry.resolve(name)
        manifest = self.registry.manifest(name, version)
        if manifest.get("kind") == "fine-tune":
            origin = manifest.get("base_model", {}).get("name", "its base")
            raise InvalidInput(f"base model {name!r} is itself a fine-tune; fine-tune from {origin!r} instead "
                               "(the new head is trained on the base's features)")
        if "embedding" not in manifest.get("outputs", {}):
            raise FailedPrecondition(f"base model {name!r} version {version} does not expose an embedding "
                                     "output; export it again with `headswap export`")
        return BaseModel(name, version, str(manifest.get("source", "")), manifest)

    def _name_for_source(self, source: str) -> str:
        kind = source.partition(":")[0].strip().lower()
        if kind not in ("builtin", "keras", "hub"):
            raise InvalidInput(f"base model {source!r}: a registry model name, or a source builtin:NAME, "
                               "keras:APPLICATION or hub:HANDLE")
        candidates = []
        try:
            candidates.append(model_name_for_source(source))
        except InvalidInput:
            pass
        candidates += [m for m in self.registry.models() if m not in candidates]
        wanted = source.strip().lower()
        for name in candidates:
            version = self.registry.active_version(name)
            if version is None:
                continue
            manifest = self.registry.manifest(name, version)
            if manifest.get("kind") != "fine-tune" and str(manifest.get("source", "")).lower() == wanted:
                return name
        raise NotFound(f"base model {source} is not in the registry; export it first "
                       f"(`headswap export {source}`) or name a registry model: "
                       f"{', '.join(self.registry.models()) or 'none'}")

    def _check_name(self, spec: FineTuneSpec, base: BaseModel) -> None:
        if spec.name == base.name:
            raise AlreadyExists(f"the new model cannot be named after its base {base.name!r}; choose a new name")
        versions = self.registry.versions(spec.name)
        if versions:
            manifest = self.registry.manifest(spec.name, versions[-1])
            same_base = manifest.get("kind") == "fine-tune" and \
                manifest.get("base_model", {}).get("source") == base.source
            if not same_base:
                what = f"a fine-tune of {manifest.get('base_model', {}).get('source')}" \
                    if manifest.get("kind") == "fine-tune" else f"a {manifest.get('kind', 'zero-shot')} model"
                raise AlreadyExists(f"model {spec.name!r} already exists and is {what}, not a fine-tune of "
                                    f"{base.source}; choose another name")
        running = self.store.active_names().get(spec.name)
        if running:
            raise AlreadyExists(f"job {running} is already training {spec.name!r}; wait for it or cancel it "
                                f"(`headswap cancel {running}`)")

    def _weights_for(self, base: BaseModel) -> str:
        """The server's --weights file, for the base built from the server's own --model source."""
        s = self.settings
        return s.weights if s.weights and base.source.lower() == s.model.lower() else ""

    def _write_job_file(self, directory: Path, job_id: str, spec: FineTuneSpec, base: BaseModel,
                        upload: Upload) -> None:
        s = self.settings
        weights = self._weights_for(base)
        job = {
            "job_id": job_id,
            "spec": spec.to_dict(),
            "base": {"name": base.name, "version": base.version, "source": base.source, "weights": weights},
            "labels": upload.labels,
            "train_counts": upload.train_counts,
            "val_counts": upload.val_counts,
            "skipped": upload.skipped,
            "explicit_validation": upload.explicit_validation,
            "conflicting_duplicates": upload.conflicting_duplicates,
            "runtime": {"model_dir": s.model_dir, "cache_dir": str(self.registry.cache_dir),
                        "db": str(self.store.path), "threads": s.cpu_threads,
                        "max_image_pixels": s.max_image_pixels,
                        "embedding_cache_dir": str(self.jobs_dir.parent / "embedding-cache"),
                        "embedding_cache_bytes": s.embedding_cache_mb << 20},
        }
        (directory / JOB_FILE).write_text(json.dumps(job, indent=2))

    # --- running ---------------------------------------------------------------------------

    def _schedule(self) -> None:
        """One job at a time, in arrival order. Runs in its own thread: it is the workers' parent
        thread, so PR_SET_PDEATHSIG ties them to this process."""
        try:
            self._schedule_jobs()
        finally:
            if self._warm is not None:
                self._warm.stop()

    def _schedule_jobs(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping and not self._needs_warm_worker():
                    self._lock.wait(timeout=5.0)  # also notices a warm worker that died while idle
                if self._stopping:
                    return
                job_id = self._queue.popleft() if self._queue else None
            if job_id is None:
                self._ready_worker()
                continue
            JOBS_RUNNING.inc()
            try:
                self._run(job_id)
            except Exception:
                log.exception("job %s: the scheduler failed", job_id)
                self.store.finish(job_id, JobState.FAILED, error="internal error running the job; see the server log")
            finally:
                JOBS_RUNNING.dec()
            JOBS.labels(self.store.get(job_id).state.name.lower()).inc()
            self._cleanup(job_id)

    def _needs_warm_worker(self) -> bool:
        return self._want_warm and (self._warm is None or not self._warm.usable())

    def _ready_worker(self) -> WarmWorker:
        """The warm worker, started afresh if there is none, it died (a cancel kills it) or it
        has run its share of jobs. Scheduler thread only (PR_SET_PDEATHSIG follows this thread)."""
        if self._warm is not None and not self._warm.usable():
            self._warm.stop()
            self._warm = None
        if self._warm is None:
            self._warm = WarmWorker(self.jobs_dir.parent / "warm-worker.log")
            log.info("warm training worker pid %d starting", self._warm.pid)
            with self._lock:
                base = self._warm_base
            if base is not None:
                self._warm.preload(base)
        return self._warm

    def _run(self, job_id: str) -> None:
        job_dir = self.jobs_dir / job_id
        with self._lock:
            if self._stopping:
                return
        worker = self._ready_worker()
        with self._lock:
            self._running[job_id] = worker.proc
        if self.store.start(job_id, worker.pid):
            log.info("job %s: running in warm worker pid %d", job_id, worker.pid)
            code = worker.run(job_dir)
        else:  # cancelled between queue and start: the worker stays ready for the next job
            code = 3
        with self._lock:
            self._running.pop(job_id, None)
            cancelled = job_id in self._cancelling
            self._cancelling.discard(job_id)
        job = self.store.get(job_id)
        if cancelled:
            note = f"; version {job.version} of {job.model} had already been stored (not activated)" \
                if job.version else ""
            self.store.finish(job_id, JobState.CANCELLED, message="cancelled" + note)
        elif job.state.terminal:
            return  # the server is stopping, or the job was finished meanwhile
        elif code == 0 and job.version:
            self._succeed(job)
        else:
            self.store.finish(job_id, JobState.FAILED, error=_failure_reason(code, job.error, job_dir / WORKER_LOG))
        log.info("job %s: %s", job_id, self.store.get(job_id).state.name)

    def _succeed(self, job: JobRecord) -> None:
        """Activate when asked and good enough, then the final event (carrying model and version)."""
        spec = FineTuneSpec.from_dict(job.config)
        metrics = json.loads(job.metrics_json or "{}")
        accuracy = float(metrics.get("val_accuracy", 0.0))
        activated = False
        message = f"stored {job.model} version {job.version} (validation accuracy {accuracy:.4f})"
        if spec.activate and accuracy >= spec.min_val_accuracy:
            try:
                if self.manager is not None:
                    self.manager.activate(job.model, job.version)  # loads and warms it, then swaps
                else:
                    self.registry.activate(job.model, job.version)
                activated = True
                message += "; now active"
            except Exception as err:  # the version stays stored; say why it is not serving
                log.exception("job %s: activation failed", job.job_id)
                message += f"; not activated: {err}"
        elif spec.activate:
            message += f"; not activated: below min_val_accuracy {spec.min_val_accuracy:.4f}"
        if self.settings.keep_versions:
            try:
                pruned = self.registry.prune(job.model, self.settings.keep_versions)
                if pruned:
                    log.info("job %s: removed old versions %s of %s (--keep-versions %d)", job.job_id, pruned,
                             job.model, self.settings.keep_versions)
            except Exception:  # retention is housekeeping: the job itself succeeded
                log.exception("job %s: pruning old versions of %s failed", job.job_id, job.model)
        self.store.finish(job.job_id, JobState.SUCCEEDED, message=message, activated=activated)

    def _cleanup(self, job_id: str) -> None:
        """Drop the uploaded images once a job is over; job.json and the worker log stay."""
        job_dir = self.jobs_dir / job_id
        for name in ("images.bin", "index.npz", "features"):
            path = job_dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(CANCEL_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


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


def _received_message(upload: Upload) -> str:
    train = sum(upload.train_counts.values())
    val = sum(upload.val_counts.values())
    text = f"received {upload.num_images} images of {upload.num_classes} classes ({train} train, {val} validation)"
    if upload.skipped:
        text += f"; skipped {len(upload.skipped)} undecodable images: indices {upload.skipped[:20]}"
    if upload.conflict_example is not None:
        first, first_label, second, second_label = upload.conflict_example
        text += (f"; {upload.conflicting_duplicates} images were uploaded more than once with different labels "
                 f"(identical bytes, e.g. image {first} as {shown_name(first_label)} and image {second} as "
                 f"{shown_name(second_label)})")
    return text + "; queued"
