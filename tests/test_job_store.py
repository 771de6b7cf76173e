"""The job store's contract, run against both back ends: the embedded SQLite file and a real
PostgreSQL server (Debian's package, started by tests/postgres.py)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from postgres import PASSWORD

from headswap.errors import FailedPrecondition, NotFound
from headswap.training.databases import PostgresDatabase, StoreMisconfigured, StoreUnavailable
from headswap.training.store import MIGRATIONS, Claim, JobState, JobStore, Phase, open_job_store

LEASE = 30.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, monkeypatch) -> JobStore:
    if request.param == "sqlite":
        job_store = open_job_store("", tmp_path)
    else:
        server = request.getfixturevalue("postgres_server")
        monkeypatch.setenv("PGPASSWORD", PASSWORD)
        job_store = open_job_store(server.create_database(f"contract_{uuid.uuid4().hex[:8]}"), tmp_path)
    yield job_store
    job_store.close()


def add(store: JobStore, job_id: str, submitter: str = "", data_bytes: int = 0) -> None:
    store.create(job_id, f"model-{job_id}", "base", {"epochs": 1}, 10, 2, "received", submitter=submitter,
                 data_bytes=data_bytes)


def test_jobs_events_and_owners(store):
    add(store, "a", submitter="alice", data_bytes=100)
    time.sleep(0.01)
    add(store, "b", submitter="bob", data_bytes=50)
    assert [job.job_id for job in store.list()] == ["b", "a"]
    assert [job.job_id for job in store.list(owner="alice")] == ["a"]
    job = store.get("a")
    assert (job.state, job.submitter, job.data_bytes, job.attempt) == (JobState.QUEUED, "alice", 100, 0)
    assert job.last_event.phase == Phase.RECEIVING and job.last_event.message == "received"
    with pytest.raises(NotFound, match="unknown job 'a'"):
        store.get("a", owner="bob")
    assert store.unfinished() == 2 and store.unfinished("alice") == 1
    assert store.staged_bytes() == 150 and store.staged_bytes("bob") == 50
    assert store.active_names() == {"model-a": "a", "model-b": "b"}
    assert store.schema_version() == len(MIGRATIONS)


def test_claims_take_the_oldest_job_once_each(store):
    for i in range(12):
        add(store, f"job{i:02d}")
    claim = store.claim("trainer-1", LEASE, 2)
    assert claim == Claim("job00", 1)
    job = store.get("job00")
    assert (job.state, job.lease_owner, job.phase) == (JobState.RUNNING, "trainer-1", Phase.CLAIMED)
    assert job.lease_expires > time.time() + LEASE - 5
    # Four trainers claiming at once never get the same job (FOR UPDATE SKIP LOCKED / BEGIN IMMEDIATE).
    with ThreadPoolExecutor(4) as pool:
        claims = list(pool.map(lambda i: store.claim(f"trainer-{i % 4}", LEASE, 2), range(11)))
    assert sorted(c.job_id for c in claims) == [f"job{i:02d}" for i in range(1, 12)]
    assert store.claim("trainer-9", LEASE, 2) is None
    assert store.unfinished() == 12


def test_an_expired_lease_is_claimed_again_and_fences_the_first_trainer(store):
    add(store, "j")
    first = store.claim("t1", 0.2, 2)
    assert store.heartbeat(first, 0.2) and store.progress(first, phase=Phase.TRAINING_HEAD, epoch=1)
    time.sleep(0.4)
    second = store.claim("t2", LEASE, 2)
    assert second == Claim("j", 2)
    assert "claimed by trainer t2 again (attempt 2: the lease of t1 expired)" in store.get("j").last_event.message
    # The first trainer can no longer do anything to the job.
    assert not store.heartbeat(first, LEASE)
    assert not store.progress(first, phase=Phase.TRAINING_HEAD, epoch=2)
    assert not store.begin_publish(first, "m", 1)
    assert not store.set_result(first, "m", 1, {})
    assert not store.finish("j", JobState.SUCCEEDED, claim=first)
    store.set_error(first, "late")
    assert store.get("j").error == ""
    assert store.begin_publish(second, "m", 1) and store.set_result(second, "m", 1, {"val_accuracy": 1.0})
    assert store.finish("j", JobState.SUCCEEDED, message="stored", claim=second)
    job = store.get("j")
    assert (job.state, job.version, job.attempt, job.tries) == (JobState.SUCCEEDED, 1, 2, 2)
    assert job.last_event.version == 1 and job.last_event.model == "m"
    assert not store.finish("j", JobState.FAILED)  # terminal states never change


def test_a_job_whose_trainers_keep_dying_fails_after_max_attempts(store):
    add(store, "j")
    store.claim("t1", 0.05, 2)
    time.sleep(0.1)
    store.claim("t2", 0.05, 2)
    time.sleep(0.1)
    assert store.claim("t3", LEASE, 2) is None
    job = store.get("j")
    assert job.state == JobState.FAILED
    assert "its trainer stopped answering (t2: the lease expired) on each of 2 attempts (--max-job-attempts 2)" \
        in job.error


def test_release_requeues_without_counting_the_try(store):
    add(store, "j")
    first = store.claim("t1", LEASE, 1)
    assert store.release(first, "trainer t1 is shutting down")
    job = store.get("j")
    assert (job.state, job.tries, job.lease_owner) == (JobState.QUEUED, 0, "")
    assert "released: trainer t1 is shutting down" in job.last_event.message
    again = store.claim("t2", LEASE, 1)  # one attempt allowed, and still available
    assert again == Claim("j", 2)
    assert not store.progress(first, phase=Phase.TRAINING_HEAD)


def test_cancel_wins_before_publishing_and_is_refused_after(store):
    add(store, "queued")
    assert store.cancel("queued").state == JobState.CANCELLED
    assert store.get("queued").last_event.message == "cancelled before it started"
    with pytest.raises(FailedPrecondition, match="already finished"):
        store.cancel("queued")

    add(store, "running")
    claim = store.claim("t1", LEASE, 2)
    with pytest.raises(NotFound):
        store.cancel("running", owner="someone-else")
    assert store.cancel("running").state == JobState.CANCELLED
    assert not store.heartbeat(claim, LEASE)  # the trainer learns at its next heartbeat
    assert not store.begin_publish(claim, "m", 1)  # and can never publish

    add(store, "publishing")
    claim = store.claim("t1", LEASE, 2)
    assert store.begin_publish(claim, "model-publishing", 7)
    with pytest.raises(FailedPrecondition, match="already publishing model-publishing version 7"):
        store.cancel("publishing")
    assert store.get("publishing").state == JobState.RUNNING


def test_watchers_are_woken_and_read_every_event(store):
    add(store, "j")
    claim = store.claim("t1", LEASE, 2)
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        sequence = 0
        while not done.is_set():
            for event in store.events_after("j", sequence):
                seen.append(event.phase)
                sequence = event.sequence
                if event.state.terminal:
                    done.set()
            store.wait_for_events(5.0)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for epoch in range(3):
        store.progress(claim, phase=Phase.TRAINING_HEAD, epoch=epoch)
    store.finish("j", JobState.FAILED, error="boom", claim=claim)
    watcher.join(timeout=30)
    assert not watcher.is_alive()
    assert seen == [Phase.RECEIVING, Phase.CLAIMED, *[Phase.TRAINING_HEAD] * 3, Phase.FAILED]


def test_a_schema_newer_than_the_code_is_refused(store):
    with store.db.transaction() as db:
        db.execute("INSERT INTO schema_migrations (version, applied) VALUES (?, ?)", (len(MIGRATIONS) + 5, 0.0))
    with pytest.raises(StoreMisconfigured, match=f"schema version {len(MIGRATIONS) + 5}, newer than this headswap"):
        JobStore(store.db)


def test_postgresql_migrations_run_once_when_replicas_start_together(postgres_server, monkeypatch, tmp_path):
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    dsn = postgres_server.create_database("together")
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: open_job_store(dsn, tmp_path), range(4)))
    with stores[0].db.transaction() as db:
        rows = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
    for job_store in stores:
        job_store.close()


def test_postgresql_errors_name_the_store_never_the_password(postgres_server, monkeypatch, tmp_path):
    dsn = postgres_server.create_database("errors")
    with_password = dsn.replace("headswap@", f"headswap:{PASSWORD}@")
    monkeypatch.delenv("PGPASSWORD", raising=False)
    bad = with_password.replace(PASSWORD, "wrong-password")
    with pytest.raises(StoreMisconfigured) as info:
        PostgresDatabase(bad, timeout_s=3).check_connection()
    assert "password authentication failed" in str(info.value)
    assert f"127.0.0.1:{postgres_server.port}/errors" in str(info.value) and "wrong-password" not in str(info.value)
    with pytest.raises(StoreMisconfigured, match="does not exist"):
        PostgresDatabase(with_password.replace("/errors", "/nowhere"), timeout_s=3).check_connection()
    with pytest.raises(StoreMisconfigured, match="not a valid PostgreSQL DSN"):
        open_job_store("postgresql://x@[::1/broken", tmp_path)
    with pytest.raises(StoreMisconfigured, match="ftp://... is not supported"):
        open_job_store("ftp://somewhere/db", tmp_path)

    job_store = open_job_store(with_password, tmp_path, timeout_s=2)
    add(job_store, "j")
    postgres_server.stop()
    try:
        with pytest.raises(StoreUnavailable) as info:
            job_store.get("j")
        message = str(info.value)
        assert f"the job store postgresql 127.0.0.1:{postgres_server.port}/errors is unavailable" in message
        assert PASSWORD not in message and "headswap:" not in message
    finally:
        postgres_server.start()
    deadline = time.monotonic() + 30
    while True:  # the pool reconnects by itself
        try:
            assert job_store.get("j").state == JobState.QUEUED
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    job_store.close()


def test_a_dsn_password_never_reaches_the_log_line_of_settings():
    from headswap.config import Settings, redact_url

    assert redact_url("postgresql://app:s3cret@db.internal:5432/jobs") == "postgresql://app:***@db.internal:5432/jobs"
    assert redact_url("host=db user=app password=s3cret dbname=jobs") == "host=db user=app password=*** dbname=jobs"
    described = Settings(job_store="postgresql://app:s3cret@db/jobs").describe()
    assert "s3cret" not in str(described) and described["job_store"] == "postgresql://app:***@db/jobs"
    assert Settings().describe()["job_store"] == ""

