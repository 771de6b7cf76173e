"""Fine-tune jobs and their progress events: one store, in SQLite (embedded) or PostgreSQL (shared).

Who writes here:
- any serving replica with a job store: job creation (`create`), cancels, reads for
  WatchJob/ListJobs/GetJob;
- trainers: `claim` the oldest queued job (or one whose trainer's lease expired) and hold it by
  `heartbeat`; on SIGTERM they `release` it for another trainer;
- the training worker a trainer runs: progress events, the version it is about to publish
  (`begin_publish`), its result.

Fencing. A claim gives the job a new `attempt` number. Every write a trainer or its worker makes
names the attempt and takes effect only while the job is RUNNING under that attempt: a trainer
that lost its lease (killed, frozen, partitioned) can never publish, change the state or append an
event once another attempt has begun, or once the job was cancelled. Publishing is a state of its
own: `begin_publish` records the version number before it is written, so a cancel either wins
(the publish is refused) or is refused ("already publishing version N").

A job's row only moves forward: once SUCCEEDED, FAILED or CANCELLED it never changes again. Every
change appends an event row, and wakes watchers in every process (PostgreSQL NOTIFY; SQLite
watchers poll).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from headswap.errors import FailedPrecondition, NotFound, shown_name
from headswap.training.databases import Cursor, Database, SqliteDatabase, open_database


class JobState(enum.IntEnum):
    """Same numbers as headswap.v1.JobState (and the KEDA trigger's query counts 1 and 2)."""

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
    CLAIMED = "claimed"
    EXTRACTING_FEATURES = "extracting_features"
    TRAINING_HEAD = "training_head"
    FINE_TUNING = "fine_tuning"
    EXPORTING = "exporting"
    PUBLISHING = "publishing"
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
    attempt: int = 0  # the fencing token: claims so far
    tries: int = 0  # claims that did not end by a release (bounded by --max-job-attempts)
    lease_owner: str = ""  # the trainer holding the job while it is RUNNING
    lease_expires: float = 0.0
    data_bytes: int = 0  # bytes of the upload staged in the model store
    data_removed: bool = False
    publishing_version: int = 0  # the version being published, once begun
    last_event: JobEvent | None = None

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json or "{}")


@dataclass(frozen=True)
class Claim:
    """A job a trainer holds: every write it makes names `attempt`."""

    job_id: str
    attempt: int


# Versioned migrations; each is applied once, in order, under a lock (databases._apply).
# 1: the schema of the embedded store before fleets (IF NOT EXISTS: an old SQLite file has it).
# 2: claims, leases, fencing and staged data.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY,
        state INTEGER NOT NULL,
        name TEXT NOT NULL,
        base_model TEXT NOT NULL,
        phase TEXT NOT NULL DEFAULT '',
        error TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        version INTEGER NOT NULL DEFAULT 0,
        created DOUBLE PRECISION NOT NULL,
        finished DOUBLE PRECISION NOT NULL DEFAULT 0,
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
    )
    """,
    """
    ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN tries INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN lease_expires DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN data_bytes BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN data_removed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN publishing_version INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created)
    """,
)

_UNFINISHED = (int(JobState.QUEUED), int(JobState.RUNNING))
_JOB_COLUMNS = [f.name for f in dataclasses.fields(JobRecord) if f.name != "last_event"]
_EVENT_FIELDS = {f.name for f in dataclasses.fields(JobEvent)}
_TERMINAL_PHASE = {JobState.SUCCEEDED: Phase.DONE, JobState.FAILED: Phase.FAILED,
                   JobState.CANCELLED: Phase.CANCELLED}


class JobStore:
    """The jobs of one deployment, in `database` (see `open_job_store`)."""

    def __init__(self, database: Database | str | Path) -> None:
        if isinstance(database, (str, Path)):  # a path: the embedded SQLite file
            database = SqliteDatabase(database)
        self.db = database
        self.db.migrate(MIGRATIONS)

    @property
    def name(self) -> str:
        """Where the jobs are, for messages (host and database; never a password)."""
        return self.db.name

    # --- serving replicas ------------------------------------------------------------------

    def create(self, job_id: str, name: str, base_model: str, config: dict[str, Any], num_images: int,
               num_classes: int, message: str, submitter: str = "", data_bytes: int = 0) -> None:
        now = time.time()
        with self.db.transaction() as db:
            db.execute("INSERT INTO jobs (job_id, state, name, base_model, phase, created, config_json, "
                       "num_images, num_classes, submitter, data_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, int(JobState.QUEUED), name, base_model, Phase.QUEUED, now, json.dumps(config),
                        num_images, num_classes, submitter, data_bytes))
            self._append(db, JobEvent(job_id, JobState.QUEUED, Phase.RECEIVING, message=message, time=now))

    def cancel(self, job_id: str, owner: str | None = None) -> JobRecord:
        """QUEUED or RUNNING -> CANCELLED, at once and for every process: the trainer running it
        sees it at its next heartbeat or write and stops, and can no longer publish. Refused
        (FailedPrecondition) once the job has begun publishing its version, or has finished."""
        with self.db.transaction() as db:
            row = self._row(db, job_id, lock=True)
            if row is None or (owner is not None and row["submitter"] != owner):
                raise NotFound(f"unknown job {shown_name(str(job_id))}; `headswap jobs` lists the known ones")
            state = JobState(row["state"])
            if state.terminal:
                raise FailedPrecondition(f"job {job_id} has already finished ({state.name}); nothing to cancel")
            if row["publishing_version"]:
                raise FailedPrecondition(f"job {job_id} is already publishing {row['name']} version "
                                         f"{row['publishing_version']}; it can no longer be cancelled (roll the "
                                         "version back once it is stored, or activate another)")
            message = "cancelled before it started" if state == JobState.QUEUED else "cancelled"
            self._finish(db, job_id, JobState.CANCELLED, message=message)
        return self.get(job_id)

    # --- trainers --------------------------------------------------------------------------

    def claim(self, owner: str, lease_s: float, max_attempts: int) -> Claim | None:
        """The oldest job that is QUEUED, or RUNNING under a lease that has expired, now RUNNING under
        `owner` with a new attempt number; None when there is none. A job whose lease expired
        after `max_attempts` tries is FAILED instead, with the reason."""
        while True:
            now = time.time()
            with self.db.transaction() as db:
                row = db.execute("SELECT job_id, state, attempt, tries, lease_owner FROM jobs WHERE state = ? OR "
                                 "(state = ? AND lease_expires < ?) ORDER BY created, job_id LIMIT 1"
                                 + self.db.skip_locked,
                                 (int(JobState.QUEUED), int(JobState.RUNNING), now)).fetchone()
                if row is None:
                    return None
                job_id, state, attempt, tries, previous = row
                if state == JobState.RUNNING and tries >= max_attempts:
                    self._finish(db, job_id, JobState.FAILED,
                                 error=f"its trainer stopped answering ({previous}: the lease expired) on each of "
                                       f"{tries} attempts (--max-job-attempts {max_attempts}); the last one was "
                                       "probably killed (out of memory?) or its node was lost")
                    continue
                attempt += 1
                db.execute("UPDATE jobs SET state = ?, attempt = ?, tries = ?, lease_owner = ?, lease_expires = ?, "
                           "phase = ?, error = '', publishing_version = 0 WHERE job_id = ?",
                           (int(JobState.RUNNING), attempt, tries + 1, owner, now + lease_s, Phase.CLAIMED, job_id))
                again = f" again (attempt {attempt}: the lease of {previous} expired)" if state == JobState.RUNNING \
                    else (f" (attempt {attempt})" if attempt > 1 else "")
                self._append(db, JobEvent(job_id, JobState.RUNNING, Phase.CLAIMED, time=now,
                                          message=f"claimed by trainer {owner}{again}"))
                return Claim(job_id, attempt)

    def heartbeat(self, claim: Claim, lease_s: float) -> bool:
        """Extend the lease; False when the job is not ours any more (cancelled, or claimed again)."""
        with self.db.transaction() as db:
            if not self._owned(db, claim):
                return False
            db.execute("UPDATE jobs SET lease_expires = ? WHERE job_id = ?", (time.time() + lease_s, claim.job_id))
        return True

    def release(self, claim: Claim, reason: str) -> bool:
        """Give the job back at once (a trainer draining on SIGTERM): QUEUED again, for another
        trainer; the try is not counted. False when it was not ours any more."""
        with self.db.transaction() as db:
            if not self._owned(db, claim):
                return False
            db.execute("UPDATE jobs SET state = ?, tries = tries - 1, lease_owner = '', lease_expires = 0, phase = ?, "
                       "worker_pid = 0 WHERE job_id = ?", (int(JobState.QUEUED), Phase.QUEUED, claim.job_id))
            self._append(db, JobEvent(claim.job_id, JobState.QUEUED, Phase.QUEUED, time=time.time(),
                                      message=f"released: {reason}; waiting for another trainer"))
        return True

    def expire_leases(self) -> int:
        """Embedded store at start-up: the work directory's lock says no trainer of it is alive, so
        its RUNNING jobs are claimed again now rather than when their leases run out."""
        with self.db.transaction() as db:
            rows = db.execute("SELECT job_id FROM jobs WHERE state = ?", (int(JobState.RUNNING),)).fetchall()
            db.execute("UPDATE jobs SET lease_expires = 0 WHERE state = ?", (int(JobState.RUNNING),))
        return len(rows)

    def set_worker(self, claim: Claim, pid: int) -> bool:
        with self.db.transaction() as db:
            if not self._owned(db, claim):
                return False
            db.execute("UPDATE jobs SET worker_pid = ? WHERE job_id = ?", (pid, claim.job_id))
        return True

    def progress(self, claim: Claim, **fields: Any) -> bool:
        """Record a progress event; refused (False) unless the job is RUNNING under this attempt."""
        with self.db.transaction() as db:
            if not self._owned(db, claim):
                return False
            event = JobEvent(claim.job_id, JobState.RUNNING, time=time.time(), **fields)
            db.execute("UPDATE jobs SET phase = ? WHERE job_id = ?", (event.phase, claim.job_id))
            self._append(db, event)
        return True

    def begin_publish(self, claim: Claim, model: str, version: int) -> bool:
        """The worker is about to write `model` version `version`: from here a cancel is refused.
        False (publish nothing) when the job was cancelled or claimed again meanwhile."""
        with self.db.transaction() as db:
            if not self._owned(db, claim):
                return False
            db.execute("UPDATE jobs SET publishing_version = ?, phase = ? WHERE job_id = ?",
                       (version, Phase.PUBLISHING, claim.job_id))
            self._append(db, JobEvent(claim.job_id, JobState.RUNNING, Phase.PUBLISHING, model=model, version=version,
                                      message=f"publishing {model} version {version}", time=time.time()))
        return True

    def set_result(self, claim: Claim, model: str, version: int, metrics: dict[str, Any]) -> bool:
        """The worker published `model` version `version`: remember it before the job finishes."""
        with self.db.transaction() as db:
            if not self._owned(db, claim):
                return False
            db.execute("UPDATE jobs SET model = ?, version = ?, metrics_json = ? WHERE job_id = ?",
                       (model, version, json.dumps(metrics), claim.job_id))
        return True

    def set_error(self, claim: Claim, error: str) -> None:
        """The worker's own account of why it failed, read by its trainer when it exits."""
        with self.db.transaction() as db:
            if self._owned(db, claim):
                db.execute("UPDATE jobs SET error = ? WHERE job_id = ?", (error, claim.job_id))

    def finish(self, job_id: str, state: JobState, message: str = "", error: str = "", activated: bool = False,
               claim: Claim | None = None) -> bool:
        """Move a job to a terminal state and append the final event; False if already final (or,
        with `claim`, when the job is not RUNNING under that attempt any more)."""
        with self.db.transaction() as db:
            if claim is not None and not self._owned(db, claim):
                return False
            row = self._row(db, job_id, lock=True)
            if row is None or JobState(row["state"]).terminal:
                return False
            self._finish(db, job_id, state, message, error, activated)
        return True

    def mark_data_removed(self, job_id: str) -> None:
        with self.db.transaction() as db:
            db.execute("UPDATE jobs SET data_removed = 1 WHERE job_id = ?", (job_id,))

    # --- reading ---------------------------------------------------------------------------

    def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        """One job; NotFound when it does not exist or (with `owner`) belongs to someone else:
        another caller's job ids are not even confirmed to exist."""
        with self.db.transaction() as db:
            row = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or (owner is not None and dict(zip(_JOB_COLUMNS, row))["submitter"] != owner):
                raise NotFound(f"unknown job {shown_name(str(job_id))}; `headswap jobs` lists the known ones")
            last = db.execute("SELECT data FROM events WHERE job_id = ? ORDER BY sequence DESC LIMIT 1",
                              (job_id,)).fetchone()
        return self._record(row, last[0] if last else None)

    def list(self, owner: str | None = None) -> list[JobRecord]:
        """Every job (or every job of `owner`), newest first."""
        columns = ", ".join(_JOB_COLUMNS)
        with self.db.transaction() as db:
            if owner is None:
                rows = db.execute(f"SELECT {columns} FROM jobs ORDER BY created DESC").fetchall()
            else:
                rows = db.execute(f"SELECT {columns} FROM jobs WHERE submitter = ? ORDER BY created DESC",
                                  (owner,)).fetchall()
            lasts = dict(db.execute("SELECT e.job_id, e.data FROM events e JOIN (SELECT job_id, MAX(sequence) s "
                                    "FROM events GROUP BY job_id) m ON e.job_id = m.job_id AND e.sequence = m.s"
                                    ).fetchall())
        return [self._record(row, lasts.get(row[0])) for row in rows]

    def events_after(self, job_id: str, sequence: int) -> list[JobEvent]:
        with self.db.transaction() as db:
            rows = db.execute("SELECT data FROM events WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                              (job_id, sequence)).fetchall()
        return [_event(data) for (data,) in rows]

    def wait_for_events(self, timeout: float) -> None:
        """Sleep until some job may have changed: a write in this process, a NOTIFY (PostgreSQL),
        the database's polling interval, or `timeout`."""
        self.db.wait(timeout)

    def unfinished(self, submitter: str | None = None) -> int:
        """How many jobs are QUEUED or RUNNING (of `submitter`, when given)."""
        sql = "SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)"
        params: tuple = _UNFINISHED
        if submitter is not None:
            sql, params = sql + " AND submitter = ?", (*params, submitter)
        with self.db.transaction() as db:
            (count,) = db.execute(sql, params).fetchone()
        return int(count)

    def staged_bytes(self, submitter: str | None = None) -> int:
        """Bytes of uploads still staged in the model store (unfinished jobs, failed ones kept)."""
        sql = "SELECT COALESCE(SUM(data_bytes), 0) FROM jobs WHERE data_removed = 0"
        params: tuple = ()
        if submitter is not None:
            sql, params = sql + " AND submitter = ?", (submitter,)
        with self.db.transaction() as db:
            (total,) = db.execute(sql, params).fetchone()
        return int(total)

    def with_staged_data(self) -> list[JobRecord]:
        """Finished jobs whose staged upload is still in the store (for clean-up)."""
        with self.db.transaction() as db:
            rows = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE data_removed = 0 AND state NOT IN "
                              "(?, ?)", _UNFINISHED).fetchall()
        return [self._record(row, None) for row in rows]

    def active_names(self) -> dict[str, str]:
        """Model name -> job id for every QUEUED or RUNNING job."""
        with self.db.transaction() as db:
            rows = db.execute("SELECT name, job_id FROM jobs WHERE state IN (?, ?)", _UNFINISHED).fetchall()
        return {name: job_id for name, job_id in rows}

    def schema_version(self) -> int:
        with self.db.transaction() as db:
            (version,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
        return int(version)

    def close(self) -> None:
        self.db.close()

    # --- inside transactions ---------------------------------------------------------------

    def _owned(self, db: Cursor, claim: Claim) -> bool:
        row = db.execute("SELECT state, attempt FROM jobs WHERE job_id = ?" + self.db.for_update,
                         (claim.job_id,)).fetchone()
        return row is not None and row[0] == JobState.RUNNING and row[1] == claim.attempt

    def _row(self, db: Cursor, job_id: str, lock: bool = False) -> dict[str, Any] | None:
        row = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE job_id = ?"
                         + (self.db.for_update if lock else ""), (job_id,)).fetchone()
        return dict(zip(_JOB_COLUMNS, row)) if row is not None else None

    def _finish(self, db: Cursor, job_id: str, state: JobState, message: str = "", error: str = "",
                activated: bool = False) -> None:
        assert state.terminal
        now = time.time()
        db.execute("UPDATE jobs SET state = ?, phase = ?, error = ?, finished = ?, activated = ?, lease_owner = '', "
                   "lease_expires = 0 WHERE job_id = ?",
                   (int(state), _TERMINAL_PHASE[state], error, now, int(activated), job_id))
        event = JobEvent(job_id, state, _TERMINAL_PHASE[state], message=message or error, time=now)
        if state == JobState.SUCCEEDED:
            model, version, metrics = db.execute("SELECT model, version, metrics_json FROM jobs WHERE job_id = ?",
                                                 (job_id,)).fetchone()
            event.model, event.version, event.metrics_json = model, int(version), metrics
        self._append(db, event)

    def _append(self, db: Cursor, event: JobEvent) -> None:
        (last,) = db.execute("SELECT COALESCE(MAX(sequence), 0) FROM events WHERE job_id = ?",
                             (event.job_id,)).fetchone()
        event.sequence = int(last) + 1
        data = dataclasses.asdict(event)
        data["state"] = int(event.state)
        db.execute("INSERT INTO events (job_id, sequence, data) VALUES (?, ?, ?)",
                   (event.job_id, event.sequence, json.dumps(data)))
        self.db.notify(db, event.job_id)

    @staticmethod
    def _record(row: tuple, last_event: str | None) -> JobRecord:
        values = dict(zip(_JOB_COLUMNS, row))
        values["state"] = JobState(values["state"])
        values["activated"] = bool(values["activated"])
        values["data_removed"] = bool(values["data_removed"])
        return JobRecord(**values, last_event=_event(last_event) if last_event else None)


def _event(data: str) -> JobEvent:
    values = {k: v for k, v in json.loads(data).items() if k in _EVENT_FIELDS}
    values["state"] = JobState(values["state"])
    return JobEvent(**values)


def open_job_store(url: str, work_dir: Path, timeout_s: float = 5.0) -> JobStore:
    """`--job-store`: empty = `work_dir`/jobs.sqlite; postgresql://... = a shared database."""
    return JobStore(open_database(url, Path(work_dir) / "jobs.sqlite", timeout_s))
