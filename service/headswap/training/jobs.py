"""Fine-tune jobs on a serving replica: accept uploads, stage them, record jobs; cancel and watch.

Any replica with a job store (`store.py`: the embedded SQLite file, or a PostgreSQL database
shared by the fleet) accepts FineTune, WatchJob, ListJobs, GetJob and CancelJob. It never imports
TensorFlow and never trains: it validates the upload (`dataset.py`) into a local directory,
copies it into the model store (`staging.py`, so that any trainer can run the job), records the
job as QUEUED, and answers. Trainers (`runner.py`: in this process in role `all`, or processes
of role `trainer`) claim and run the jobs.

- A cancel is recorded in the store at once and reaches the trainer that runs the job at its next
  heartbeat; it is refused once the job has begun publishing its version.
- Watchers read the job's event rows and are woken by the store (PostgreSQL NOTIFY; polling).
- Bounds on what callers can pile up: uploads streaming at once (`upload_slots`), jobs queued or
  running in all (--max-queued-jobs) and per submitter (--max-queued-jobs-per-submitter), bytes
  staged in the model store (--max-staged-bytes), bytes of uploads being received on this
  replica's disk (--max-work-dir-bytes).
- Jobs remember their submitter; `owner=` restricts get/list/cancel/watch to one submitter's
  jobs (someone else's job is NotFound, as if absent).
- The store may be unreachable (PostgreSQL down): these calls then answer UNAVAILABLE naming it,
  and Classify is not affected. The store is opened (and migrated) in the background until it
  answers; a store that can never work (a wrong password, a newer schema) stops the start.

Name rules (checked when the upload starts and again when the job is created):
the new name must be a valid registry name, must not be the base model itself, must not be an
existing model that is not a fine-tune of the same base source (a fine-tune of the same base
gets a new version), and no other QUEUED/RUNNING job may be training that name.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from headswap.admission import Slots
from headswap.config import Settings
from headswap.errors import (AlreadyExists, FailedPrecondition, InvalidInput, NotFound, ResourceExhausted,
                             Unavailable, shown_name)
from headswap.registry.registry import Registry, check_model_name, model_name_for_source
from headswap.training import staging
from headswap.training.databases import StoreMisconfigured
from headswap.training.dataset import DatasetWriter, Example, Upload, out_of_space
from headswap.training.spec import FineTuneSpec
from headswap.training.store import JobEvent, JobRecord, JobStore, open_job_store

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
PHASE2_KINDS = ("builtin", "keras")
WATCH_POLL_S = 1.0  # longest a watcher sleeps between reads when no wake-up comes


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
    """The job store as a serving replica sees it, plus the in-process trainer in role `all`."""

    def __init__(self, settings: Settings, registry: Registry, manager: Any = None) -> None:
        self.settings = settings
        self.registry = registry
        self.manager = manager  # inference ModelManager in role `all`, None elsewhere
        work = Path(settings.work_dir).expanduser().resolve()
        self.jobs_dir = work / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.jobs_dir.glob(".incoming-*"):  # uploads a previous process was receiving
            shutil.rmtree(leftover, ignore_errors=True)
        self.upload_slots = Slots("uploads already streaming", settings.max_uploads, "--max-uploads")
        self.watch_slots = Slots("WatchJob streams already open", settings.max_watchers, "--max-watchers")
        self._inflight_bytes: dict[str, int] = {}  # upload id -> bytes received so far
        self._lock = threading.Condition()
        self._stopping = False
        self._store: JobStore | None = None
        self.runner: Any = None  # training.runner.JobRunner when this process trains (role all)

    # --- the store -------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the job store and apply its migrations. StoreUnavailable: not reachable yet
        (retried by the caller); StoreMisconfigured: never will be (the start fails)."""
        with self._lock:
            if self._store is not None:
                return
        s = self.settings
        store = open_job_store(s.job_store, self.jobs_dir.parent, s.job_store_timeout_s)
        with self._lock:
            if self._store is None:
                self._store, store = store, None
        if store is not None:  # another thread opened it first
            store.close()
            return
        log.info("job store: %s (schema version %d)", self._store.name, self._store.schema_version())

    @property
    def store(self) -> JobStore:
        """The job store, once open; StoreUnavailable (UNAVAILABLE, naming it) until then."""
        if self._store is None:
            try:
                self.connect()
            except StoreMisconfigured as err:  # the start-up fails on it; a caller meanwhile gets this
                raise Unavailable(str(err)) from None
        assert self._store is not None
        return self._store

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            store = self._store
        if store is not None:
            store.close()

    def prepare(self, config: dict[str, Any], submitter: str = "") -> tuple[FineTuneSpec, BaseModel]:
        """Check the config before any image is read: bad names and full queues fail fast."""
        spec = FineTuneSpec.from_request(config)
        check_model_name(spec.name)
        base = self.resolve_base(spec.base_model)
        if spec.unfreeze_top_layers and base.kind not in PHASE2_KINDS:
            raise FailedPrecondition(
                f"phase 2 (unfreeze_top_layers={spec.unfreeze_top_layers}) needs a Keras backbone; the base "
                f"{base.name} comes from {base.source}, whose layers cannot be unfrozen. Train the head only "
                "(unfreeze_top_layers=0) or start from a builtin: or keras: model")
        self._check_name(spec, base)
        self._check_queue(submitter)
        self._prepare_worker(base)
        return spec, base

    def _prepare_worker(self, base: BaseModel) -> None:
        """Have this process's trainer (role `all`) ready with this base by the time the upload ends."""
        if self.runner is None:
            return
        s = self.settings
        self.runner.prepare({"model_dir": s.model_dir, "cache_dir": str(self.registry.cache_dir), "name": base.name,
                             "version": base.version, "source": base.source, "weights": self._weights_for(base),
                             "threads": s.cpu_threads})

    def submit(self, config: dict[str, Any], batches: Iterable[Iterable[Example]], submitter: str = "") -> Submission:
        """Receive and validate the whole upload, stage it in the model store, queue the job."""
        spec, base = self.prepare(config, submitter)
        job_id = uuid.uuid4().hex[:12]
        writer = DatasetWriter(self.jobs_dir / f".incoming-{job_id}", self.settings, spec.skip_invalid_images)
        staged = False
        staged_before = self.store.staged_bytes()  # read once: each batch is checked against it
        received = 0
        try:
            for batch in batches:
                batch = list(batch)
                size = sum(len(example.image) for example in batch)
                self._reserve_bytes(job_id, size)
                received += size
                self._check_staged_bytes(received, staged_before)
                writer.add(batch)
            upload = writer.finish(spec)
            with self._lock:
                if self._stopping:
                    raise FailedPrecondition("the server is shutting down; send the job again later")
            self._check_name(spec, base)  # another upload for the name may have finished meanwhile
            self._check_queue(submitter)
            self._write_job_file(writer.directory, job_id, spec, base, upload)
            self._check_staged_bytes(sum(f.stat().st_size for f in writer.directory.iterdir() if f.is_file()))
            staged = True
            data_bytes = staging.stage(self.registry.store, job_id, writer.directory)
            self.store.create(job_id, spec.name, base.name, spec.to_dict(), upload.num_images, upload.num_classes,
                              _received_message(upload), submitter=submitter, data_bytes=data_bytes)
        except BaseException as err:
            writer.discard()
            if staged:  # the job was not recorded: nobody else would ever remove its upload
                try:
                    staging.remove(self.registry.store, job_id)
                except Exception as cleanup:  # noqa: BLE001 - the store is failing: say so, keep the first error
                    log.warning("upload %s: its staged copy could not be removed: %s", job_id, cleanup)
            full = out_of_space(err, self.jobs_dir)  # after the discard: the space a retry would have
            if full is not None:
                log.warning("upload %s refused: %s", job_id, full)
                raise full from None
            raise
        finally:
            with self._lock:
                self._inflight_bytes.pop(job_id, None)
        writer.discard()  # the store has it now
        log.info("job %s queued: %s from %s, %d images, %d classes%s", job_id, spec.name, base.name,
                 upload.num_images, upload.num_classes,
                 f", skipped {len(upload.skipped)} undecodable" if upload.skipped else "")
        return Submission(job_id, upload.num_images, upload.num_classes, upload.skipped)

    def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        return self.store.get(job_id, owner)

    def list(self, owner: str | None = None) -> list[JobRecord]:
        return self.store.list(owner)

    def cancel(self, job_id: str, owner: str | None = None) -> JobRecord:
        """Cancel a queued or running job: recorded at once, for every replica; the trainer that
        runs it stops its worker at its next heartbeat, and nothing is published. Refused
        (FailedPrecondition) once the job has begun publishing its version."""
        job = self.store.cancel(job_id, owner)
        try:
            staging.remove(self.registry.store, job_id)
            self.store.mark_data_removed(job_id)
        except Exception as err:  # noqa: BLE001 - the trainers' sweep removes it later
            log.warning("job %s: its staged upload could not be removed yet: %s", job_id, err)
        log.info("job %s cancelled", job_id)
        return job

    def watch(self, job_id: str, is_active: Callable[[], bool], owner: str | None = None) -> Iterator[JobEvent]:
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
                self.store.wait_for_events(WATCH_POLL_S)

    # --- checks ----------------------------------------------------------------------------

    def _check_queue(self, submitter: str = "") -> None:
        s = self.settings
        count = self.store.unfinished()
        if count >= s.max_queued_jobs:
            raise ResourceExhausted(f"{count} jobs are already queued or running; the limit is {s.max_queued_jobs} "
                                    "(--max-queued-jobs); wait for one to finish or cancel one")
        mine = self.store.unfinished(submitter)
        if mine >= s.max_queued_jobs_per_submitter:
            who = f"{submitter!r} has" if submitter else "you have"
            raise ResourceExhausted(f"{who} {mine} jobs queued or running; the limit per submitter is "
                                    f"{s.max_queued_jobs_per_submitter} (--max-queued-jobs-per-submitter); wait "
                                    "for one to finish or cancel one")

    def _check_staged_bytes(self, size: int, used: int | None = None) -> None:
        """`size` more bytes against --max-staged-bytes; `used`: the store's figure if already read."""
        limit = self.settings.max_staged_bytes
        used = self.store.staged_bytes() if used is None else used
        if used + size > limit:
            raise ResourceExhausted(f"the model store holds {used} bytes of staged uploads and this job adds {size}; "
                                    f"the limit is {limit} (--max-staged-bytes); wait for queued jobs to finish "
                                    "or send less")

    def stored_bytes(self) -> int:
        """Bytes of uploads being received on this replica's disk."""
        with self._lock:
            return sum(self._inflight_bytes.values())

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
            "runtime": {},  # the trainer that claims the job writes its own (runner._write_runtime)
        }
        (directory / JOB_FILE).write_text(json.dumps(job, indent=2))


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
