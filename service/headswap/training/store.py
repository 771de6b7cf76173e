"""Fine-tune jobs and their progress events, persisted in SQLite (WAL mode).

Two kinds of processes write here: the server (job creation, queueing, cancel, activation, the
final event) and the training worker (progress events, the published version). SQLite in WAL
mode lets both write and the server's WatchJob streams read at once. Every operation opens its
own short connection, so any thread of any process may call any method.

A job's row only moves forward: once it is SUCCEEDED, FAILED or CANCELLED it never changes
again (`finish` and guarded writes check the state inside the transaction), so a worker that
outlives a cancel or a restart cannot overwrite the outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from headswap.errors import NotFound, shown_name


class JobState(enum.IntEnum):
    """Same numbers as headswap.v1.JobState."""

    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Phase:
    """What a job is doing, as reported in events (JobEvent.phase)."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    EXTRACTING_FEATURES = "extracting_features"
    TRAINING_HEAD = "training_head"
    FINE_TUNING = "fine_tuning"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


INTERRUPTED = "interrupted: the server stopped while the job ran"


@dataclass
class JobEvent:
    """One progress report. `sequence` numbers a job's events from 1."""

    job_id: str
    state: JobState
    phase: str
    epoch: int = 0
    total_epochs: int = 0
    loss: float = 0.0
    accuracy: float = 0.0
    val_accuracy: float = 0.0
    images_per_second: float = 0.0
    eta_seconds: float = 0.0
    message: str = ""
    model: str = ""
    version: int = 0
    metrics_json: str = ""
    time: float = 0.0
    sequence: int = 0


@dataclass
class JobRecord:
    """A job as stored: what ListJobs/GetJob describe."""

    job_id: str
    state: JobState
    name: str
    base_model: str
    phase: str
    error: str
    model: str
    version: int
    created: float
    finished: float
    metrics_json: str
    config_json: str
    activated: bool
    worker_pid: int
    num_images: int
    num_classes: int
    submitter: str = ""  # who sent the job (the credential's name; "" without authentication)
    last_event: JobEvent | None = None

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json or "{}")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    state INTEGER NOT NULL,
    name TEXT NOT NULL,
    base_model TEXT NOT NULL,
    phase TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    finished REAL NOT NULL DEFAULT 0,
    metrics_json TEXT NOT NULL DEFAULT '',
    config_json TEXT NOT NULL DEFAULT '',
    activated INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER NOT NULL DEFAULT 0,
    num_images INTEGER NOT NULL DEFAULT 0,
    num_classes INTEGER NOT NULL DEFAULT 0,
    submitter TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
);
"""

_JOB_COLUMNS = [f.name for f in dataclasses.fields(JobRecord) if f.name != "last_event"]
_EVENT_FIELDS = {f.name for f in dataclasses.fields(JobEvent)}


class JobStore:
    """The job database at `path` (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "submitter" not in columns:  # a database from before jobs had owners
                db.execute("ALTER TABLE jobs ADD COLUMN submitter TEXT NOT NULL DEFAULT ''")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so read-then-write steps cannot interleave."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # --- writing ---------------------------------------------------------------------------

    def create(self, job_id: str, name: str, base_model: str, config: dict[str, Any], num_images: int,
               num_classes: int, message: str, submitter: str = "") -> None:
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO jobs (job_id, state, name, base_model, phase, created, config_json, "
                       "num_images, num_classes, submitter) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, int(JobState.QUEUED), name, base_model, Phase.QUEUED, now, json.dumps(config),
                        num_images, num_classes, submitter))
            self._append(db, JobEvent(job_id, JobState.QUEUED, Phase.RECEIVING, message=message, time=now))

    def start(self, job_id: str, pid: int) -> bool:
        """QUEUED -> RUNNING with the worker's pid; False when the job was cancelled meanwhile."""
        with self._write() as db:
            if self._state(db, job_id) != JobState.QUEUED:
                return False
            db.execute("UPDATE jobs SET state = ?, worker_pid = ? WHERE job_id = ?",
                       (int(JobState.RUNNING), pid, job_id))
            self._append(db, JobEvent(job_id, JobState.RUNNING, Phase.QUEUED, message="worker started",
                                      time=time.time()))
        return True

    def progress(self, job_id: str, pid: int | None = None, **fields: Any) -> bool:
        """Record a progress event of a running job (the worker's writes pass its pid).

        Refused (False) when the job is no longer RUNNING or another worker owns it: a worker
        that lives on after a cancel or a restart writes nothing.
        """
        with self._write() as db:
            row = db.execute("SELECT state, worker_pid FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[0] != JobState.RUNNING or (pid is not None and row[1] != pid):
                return False
            event = JobEvent(job_id, JobState.RUNNING, time=time.time(), **fields)
            db.execute("UPDATE jobs SET phase = ? WHERE job_id = ?", (event.phase, job_id))
            self._append(db, event)
        return True

    def set_result(self, job_id: str, pid: int, model: str, version: int, metrics: dict[str, Any]) -> bool:
        """The worker published `model` version `version`: remember it before the job finishes."""
        with self._write() as db:
            row = db.execute("SELECT state, worker_pid FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[0] != JobState.RUNNING or row[1] != pid:
                return False
            db.execute("UPDATE jobs SET model = ?, version = ?, metrics_json = ? WHERE job_id = ?",
                       (model, version, json.dumps(metrics), job_id))
        return True

    def set_error(self, job_id: str, pid: int, error: str) -> None:
        """The worker's own account of why it failed, read by the server when it exits."""
        with self._write() as db:
            db.execute("UPDATE jobs SET error = ? WHERE job_id = ? AND worker_pid = ? AND state = ?",
                       (error, job_id, pid, int(JobState.RUNNING)))

    def finish(self, job_id: str, state: JobState, message: str = "", error: str = "",
               activated: bool = False) -> bool:
        """Move a job to a terminal state and append the final event; False if already final."""
        assert state.terminal
        phase = {JobState.SUCCEEDED: Phase.DONE, JobState.FAILED: Phase.FAILED,
                 JobState.CANCELLED: Phase.CANCELLED}[state]
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT state, model, version, metrics_json FROM jobs WHERE job_id = ?",
                             (job_id,)).fetchone()
            if row is None or JobState(row[0]).terminal:
                return False
            db.execute("UPDATE jobs SET state = ?, phase = ?, error = ?, finished = ?, activated = ? "
                       "WHERE job_id = ?", (int(state), phase, error, now, int(activated), job_id))
            event = JobEvent(job_id, state, phase, message=message or error, time=now)
            if state == JobState.SUCCEEDED:
                event.model, event.version, event.metrics_json = row[1], int(row[2]), row[3]
            self._append(db, event)
        return True

    def fail_unfinished(self, reason: str = INTERRUPTED) -> list[str]:
        """At start-up: jobs a previous process left QUEUED or RUNNING can never finish."""
        with self._connect() as db:
            ids = [row[0] for row in db.execute("SELECT job_id FROM jobs WHERE state IN (?, ?)",
                                                (int(JobState.QUEUED), int(JobState.RUNNING)))]
        return [job_id for job_id in ids if self.finish(job_id, JobState.FAILED, error=reason)]

    def _append(self, db: sqlite3.Connection, event: JobEvent) -> None:
        (last,) = db.execute("SELECT COALESCE(MAX(sequence), 0) FROM events WHERE job_id = ?",
                             (event.job_id,)).fetchone()
        event.sequence = last + 1
        data = dataclasses.asdict(event)
        data["state"] = int(event.state)
        db.execute("INSERT INTO events (job_id, sequence, data) VALUES (?, ?, ?)",
                   (event.job_id, event.sequence, json.dumps(data)))

    @staticmethod
    def _state(db: sqlite3.Connection, job_id: str) -> JobState | None:
        row = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobState(row[0]) if row else None

    # --- reading ---------------------------------------------------------------------------

    def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        """One job; NotFound when it does not exist or (with `owner`) belongs to someone else:
        another caller's job ids are not even confirmed to exist."""
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or (owner is not None and dict(zip(_JOB_COLUMNS, row))["submitter"] != owner):
                raise NotFound(f"unknown job {shown_name(str(job_id))}; `headswap jobs` lists the known ones")
            last = db.execute("SELECT data FROM events WHERE job_id = ? ORDER BY sequence DESC LIMIT 1",
                              (job_id,)).fetchone()
        return self._record(row, last[0] if last else None)

    def list(self, owner: str | None = None) -> list[JobRecord]:
        """Every job (or every job of `owner`), newest first."""
        with self._connect() as db:
            if owner is None:
                rows = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs ORDER BY created DESC").fetchall()
            else:
                rows = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE submitter = ? "
                                  "ORDER BY created DESC", (owner,)).fetchall()
            lasts = dict(db.execute("SELECT e.job_id, e.data FROM events e JOIN (SELECT job_id, MAX(sequence) s "
                                    "FROM events GROUP BY job_id) m ON e.job_id = m.job_id AND e.sequence = m.s"))
        return [self._record(row, lasts.get(row[0])) for row in rows]

    def events_after(self, job_id: str, sequence: int) -> list[JobEvent]:
        with self._connect() as db:
            rows = db.execute("SELECT data FROM events WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                              (job_id, sequence)).fetchall()
        return [_event(data) for (data,) in rows]

    def unfinished(self) -> int:
        """How many jobs are QUEUED or RUNNING."""
        with self._connect() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)",
                                  (int(JobState.QUEUED), int(JobState.RUNNING))).fetchone()
        return int(count)

    def active_names(self) -> dict[str, str]:
        """Model name -> job id for every QUEUED or RUNNING job."""
        with self._connect() as db:
            rows = db.execute("SELECT name, job_id FROM jobs WHERE state IN (?, ?)",
                              (int(JobState.QUEUED), int(JobState.RUNNING))).fetchall()
        return dict(rows)

    @staticmethod
    def _record(row: tuple, last_event: str | None) -> JobRecord:
        values = dict(zip(_JOB_COLUMNS, row))
        values["state"] = JobState(values["state"])
        values["activated"] = bool(values["activated"])
        return JobRecord(**values, last_event=_event(last_event) if last_event else None)


def _event(data: str) -> JobEvent:
    values = {k: v for k, v in json.loads(data).items() if k in _EVENT_FIELDS}
    values["state"] = JobState(values["state"])
    return JobEvent(**values)
