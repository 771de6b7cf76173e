"""The two databases a job store can live in: SQLite (embedded, the default) and PostgreSQL
(shared by every replica and trainer of a fleet).

The job store (`store.py`) writes one SQL dialect, with `?` placeholders; a `Database` gives it
transactions and hides the few differences:
- placeholders (`?` for sqlite3, `%s` for psycopg);
- locking a job row for a read-then-write: SQLite takes the whole database up front
  (`BEGIN IMMEDIATE`), PostgreSQL locks the row (`FOR UPDATE`, and `SKIP LOCKED` for claims, so
  two trainers never wait on each other's claim);
- wake-ups: PostgreSQL's LISTEN/NOTIFY (delivered at commit; a hint, never data), SQLite none
  (watchers poll, which is cheap on a local file);
- migrations: applied under a lock (`BEGIN IMMEDIATE`; `pg_advisory_xact_lock`), so replicas
  starting together apply each one once.

Every failure to reach the database becomes `StoreUnavailable`, whose message names the store
by host and database only: a DSN's password never reaches a log line or a caller.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from headswap.errors import Unavailable

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "headswap_jobs"
MIGRATION_LOCK = 0x68656164  # pg_advisory_xact_lock key: "head"


class StoreUnavailable(Unavailable):
    """The job database cannot be reached (UNAVAILABLE); it says which one, never its password."""


class StoreMisconfigured(ValueError):
    """A job store setting that retrying cannot fix: a malformed DSN, a wrong password, a missing
    database, a schema newer than this code. Refused at start-up with this message."""


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> "Cursor": ...

    def fetchone(self) -> tuple | None: ...

    def fetchall(self) -> list[tuple]: ...


class Database(Protocol):
    """What the job store needs of a database."""

    name: str  # for messages: a path, or host/database
    for_update: str  # appended to a SELECT that is followed by an UPDATE of the same rows
    skip_locked: str  # appended to the claim's SELECT

    def transaction(self) -> contextlib.AbstractContextManager[Cursor]: ...

    def notify(self, db: Cursor, job_id: str) -> None: ...

    def wait(self, timeout: float) -> None: ...

    def wake(self) -> None: ...

    def migrate(self, migrations: Sequence[str]) -> None: ...

    def close(self) -> None: ...


class _QmarkCursor:
    """psycopg's cursor with sqlite3's `?` placeholders, so both back ends run the same SQL."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.wrote = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "_QmarkCursor":
        self._cursor.execute(sql.replace("?", "%s"), tuple(params))
        self.wrote = self.wrote or sql.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE")
        return self

    def fetchone(self) -> tuple | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple]:
        return self._cursor.fetchall()


def _current_version(db: Cursor) -> int:
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION "
               "NOT NULL)")
    (version,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    return int(version)


def _apply(db: Cursor, migrations: Sequence[str], name: str) -> None:
    """Apply the migrations this database has not had yet; refuse one newer than the code."""
    current = _current_version(db)
    if current > len(migrations):
        raise StoreMisconfigured(f"the job store {name} has schema version {current}, newer than this headswap "
                                 f"(which knows versions up to {len(migrations)}); run a newer headswap, or point "
                                 "--job-store at another database")
    for version in range(current + 1, len(migrations) + 1):
        for statement in migrations[version - 1].split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO schema_migrations (version, applied) VALUES (?, ?)", (version, time.time()))
        log.info("job store %s: applied schema migration %d", name, version)


class SqliteDatabase:
    """An SQLite file in WAL mode: the server, its workers and watchers read and write it at once.
    Every transaction opens its own short connection, so any thread of any process may use it."""

    for_update = ""
    skip_locked = ""

    def __init__(self, path: str | Path, poll_s: float = 0.2) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.poll_s = poll_s
        self._wake = threading.Condition()
        self._generation = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as err:
            raise StoreMisconfigured(f"cannot open the job database {self.path}: {err}") from None

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
    def transaction(self) -> Iterator[Cursor]:
        """One write transaction, taken up front so read-then-write steps cannot interleave."""
        try:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db  # sqlite3.Connection.execute returns a cursor: the same shape
                    changed = db.total_changes
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as err:
            raise StoreUnavailable(f"the job database {self.path} cannot be used: {err}") from None
        if changed:
            self.wake()

    def notify(self, db: Cursor, job_id: str) -> None:
        """Nothing to send to other processes: they poll the file."""

    def wait(self, timeout: float) -> None:
        """Until a write of this process (`wake`), or the polling interval for other processes'."""
        with self._wake:
            generation = self._generation
            self._wake.wait_for(lambda: self._generation != generation, min(timeout, self.poll_s))

    def wake(self) -> None:
        with self._wake:
            self._generation += 1
            self._wake.notify_all()

    def migrate(self, migrations: Sequence[str]) -> None:
        with self.transaction() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)").fetchall()}
            if columns and "submitter" not in columns:  # a file from before jobs had owners
                db.execute("ALTER TABLE jobs ADD COLUMN submitter TEXT NOT NULL DEFAULT ''")
            _apply(db, migrations, self.name)

    def close(self) -> None:
        pass


def describe_dsn(dsn: str) -> str:
    """'host:port/dbname' of a PostgreSQL DSN, for logs and messages: never user or password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a malformed DSN: say so without echoing it
        return "postgresql (malformed DSN)"
    host = str(parts.get("host") or "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql {host}{port}/{parts.get('dbname') or parts.get('user') or ''}"


# SQLSTATE classes that waiting cannot heal: authentication (28), unknown database (3D000),
# missing privileges (42501).
_PERMANENT_SQLSTATES = ("28", "3D000", "42501")


class PostgresDatabase:
    """A PostgreSQL database shared by the fleet, through a small psycopg connection pool.

    A listener thread holds one more connection on LISTEN and wakes every watcher of this process
    when a job's events change; when that connection is down, watchers fall back to polling.
    """

    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, dsn: str, timeout_s: float = 5.0, pool_size: int = 8, poll_s: float = 1.0) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
        from psycopg_pool import ConnectionPool

        self.name = describe_dsn(dsn)
        try:
            conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            raise StoreMisconfigured(f"--job-store is not a valid PostgreSQL DSN ({self.name}); expected "
                                     "postgresql://USER@HOST:PORT/DATABASE (password from PGPASSWORD)") from None
        self._dsn = dsn
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._psycopg = psycopg
        # Opened once a first connection has worked (`open_database`): a pool retries quietly
        # for ever, so a wrong password would only ever show as timeouts.
        # `check`: a connection is tried before it is lent, so a restarted server costs no failed call.
        # `reconnect_timeout`: the pool's retries back off without a cap (1, 2, 4... s) until they give
        # up; giving up soon means the next call starts a fresh attempt, so a server back after a
        # long outage is used at once.
        self._pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, timeout=timeout_s, open=False,
                                    kwargs={"connect_timeout": max(1, int(timeout_s)), "autocommit": False},
                                    name="headswap-jobs", check=ConnectionPool.check_connection,
                                    reconnect_timeout=max(5.0, 2 * timeout_s))
        self._wake = threading.Condition()
        self._generation = 0
        self._listening = False
        self._closed = threading.Event()
        self._listener: threading.Thread | None = None

    def check_connection(self) -> None:
        """Connect once: StoreMisconfigured when retrying cannot help (wrong password, unknown
        database), StoreUnavailable when the server cannot be reached (yet)."""
        try:
            with self._psycopg.connect(self._dsn, connect_timeout=max(1, int(self.timeout_s))) as conn:
                conn.execute("SELECT 1")
        except self._psycopg.Error as err:
            raise self._error(err) from None

    def open_pool(self) -> None:
        self._pool.open(wait=False)

    def _error(self, err: Exception) -> Exception:
        state = getattr(err, "sqlstate", None) or ""
        reason = _first_line(str(err))
        if any(state.startswith(prefix) for prefix in _PERMANENT_SQLSTATES) or \
                "password authentication failed" in reason or ("database" in reason and "does not exist" in reason):
            return StoreMisconfigured(f"the job store {self.name} refused the connection: {reason}")
        return StoreUnavailable(f"the job store {self.name} is unavailable: {reason}; retry shortly")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Cursor]:
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection(timeout=self.timeout_s) as conn:
                conn.execute(f"SET LOCAL statement_timeout = {int(self.timeout_s * 1000)}")
                with conn.cursor() as cursor:
                    wrapped = _QmarkCursor(cursor)
                    yield wrapped
            if wrapped.wrote:  # committed: this process's waiters need not wait for the NOTIFY
                self.wake()
        except PoolTimeout:
            raise StoreUnavailable(f"the job store {self.name} is unavailable: no connection within "
                                   f"{self.timeout_s:g} s; retry shortly") from None
        except self._psycopg.OperationalError as err:
            raise self._error(err) from None

    def notify(self, db: Cursor, job_id: str) -> None:
        """Wake watchers in every process at commit (a hint: they read the events themselves)."""
        db.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, job_id))

    def wait(self, timeout: float) -> None:
        """Until a notification arrives or `timeout` passes; polling pace when not listening."""
        self._start_listener()
        with self._wake:
            generation = self._generation
            self._wake.wait_for(lambda: self._generation != generation,
                                timeout if self._listening else min(timeout, self.poll_s))

    def wake(self) -> None:
        """A write of this process: its own waiters need not wait for the NOTIFY's round trip."""
        with self._wake:
            self._generation += 1
            self._wake.notify_all()

    def _start_listener(self) -> None:
        with self._wake:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="job-store-listener", daemon=True)
                self._listener.start()

    def _listen(self) -> None:
        """LISTEN on a connection of its own; reconnect with backoff when it drops."""
        backoff = 0.5
        while not self._closed.is_set():
            try:
                with self._psycopg.connect(self._dsn, autocommit=True,
                                           connect_timeout=max(1, int(self.timeout_s))) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._set_listening(True)
                    backoff = 0.5
                    while not self._closed.is_set():
                        for _ in conn.notifies(timeout=1.0):  # each NOTIFY wakes the watchers at once
                            with self._wake:
                                self._generation += 1
                                self._wake.notify_all()
                            if self._closed.is_set():
                                break
            except self._psycopg.Error as err:
                log.debug("job store listener: %s", _first_line(str(err)))
            self._set_listening(False)
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 10.0)

    def _set_listening(self, listening: bool) -> None:
        with self._wake:
            self._listening = listening
            self._generation += 1
            self._wake.notify_all()

    def migrate(self, migrations: Sequence[str]) -> None:
        """Under a transaction-scoped advisory lock: replicas starting together wait for the first."""
        with self.transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            _apply(db, migrations, self.name)

    def close(self) -> None:
        self._closed.set()
        self._pool.close()


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def open_database(url: str, sqlite_default: Path, timeout_s: float) -> Database:
    """`--job-store`: empty for the embedded SQLite file, a path or sqlite:///PATH, or postgresql://."""
    if url.startswith(("postgresql://", "postgres://")):
        database = PostgresDatabase(url, timeout_s=timeout_s)
        database.check_connection()
        database.open_pool()
        return database
    if url.startswith("sqlite:///"):
        return SqliteDatabase(url[len("sqlite://"):])
    if "://" in url:
        raise StoreMisconfigured(f"--job-store {url.split('://')[0]}://... is not supported; use postgresql://... "
                                 "or leave it empty for the embedded SQLite database")
    return SqliteDatabase(url or sqlite_default)


def retry_until(action: Callable[[], None], what: str, stopping: threading.Event, interval_s: float = 5.0) -> bool:
    """Run `action` until it stops raising StoreUnavailable (logged at a steady interval);
    False when `stopping` is set first. StoreMisconfigured passes through."""
    while True:
        try:
            action()
            return True
        except StoreUnavailable as err:
            log.warning("%s: %s; retrying every %.0f s", what, err, interval_s)
        if stopping.wait(interval_s):
            return False
