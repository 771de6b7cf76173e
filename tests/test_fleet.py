"""Training as a fleet (issue 20), on loopback: a real PostgreSQL server (Debian's package), real
headswap processes (serving replicas of role inference, trainers of role trainer) sharing one job
store and one model store (a directory, and moto's S3 server), called with real gRPC clients.

- across replicas: FineTune on replica A, WatchJob on replica B streams every event; ListJobs is
  the same on both; a cancel through B stops the job on whichever trainer runs it; quotas;
- a trainer killed with SIGKILL: the other trainer claims the job again once its lease expires,
  it succeeds, exactly one version is published and the staged upload is removed;
- a trainer held past its lease (SIGSTOP, SIGCONT): it can neither publish nor change the job;
- PostgreSQL stopped mid-run and started again: Classify keeps answering, training calls are
  UNAVAILABLE naming the store (never its password), and everything recovers with no job lost;
- restarts of every process keep the job history and the staged uploads;
- a wrong password or a schema newer than the code stops the start with one line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import BUILTIN_NAME, encode, start_server
from postgres import PASSWORD
from test_object_store import bucket_url, copy_exported, s3_endpoint, wait_for  # noqa: F401 - fixtures

from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.registry.registry import Registry
from headswap.training.store import JobState, JobStore, open_job_store

LEASE = "3"  # seconds: a lost trainer's job is claimed again quickly
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


@pytest.fixture(scope="module")
def many() -> list[tuple[bytes, str]]:
    """300 real handwritten digits (scikit-learn), two classes, upscaled as a camera would send them:
    enough for a 1000-epoch job to run for a while (cancels, kills, freezes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    chosen: list[tuple[bytes, str]] = []
    for label in (0, 1):
        for index in np.flatnonzero(digits.target == label)[:150]:
            gray = (digits.images[index] * (255 / 16)).astype(np.uint8)
            big = np.kron(gray, np.ones((8, 8), np.uint8))
            chosen.append((encode(np.repeat(big[..., None], 3, axis=2), "PNG"), f"digit-{label}"))
    return chosen


@pytest.fixture(scope="module")
def examples(many) -> list[tuple[bytes, str]]:
    """20 of each class: a quick job."""
    return many[:20] + many[150:170]


@pytest.fixture
def fleet(postgres_server, tmp_path):
    """Start processes on one fresh database; every one is killed at the end of the test."""
    dsn = postgres_server.create_database(f"fleet_{os.urandom(4).hex()}")
    started = []

    def start(model_dir, role: str, name: str, *args: str, wait: bool = True, **kwargs):
        server = start_server(Path(model_dir) if "://" not in str(model_dir) else model_dir, tmp_path / name,
                              "--role", role, "--job-store", dsn, "--job-lease-s", LEASE, "--poll-interval-s", "0.5",
                              *args, env={**postgres_server.env, **kwargs.pop("env", {})}, wait=wait)
        started.append(server)
        return server

    start.dsn = dsn
    start.started = started
    yield start
    for server in started:
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
            server.proc.kill()
            server.proc.wait()
    for server in started:  # nothing in any log shows the password
        assert PASSWORD not in server.log()


def store_for(dsn: str, tmp_path: Path) -> JobStore:
    os.environ["PGPASSWORD"] = PASSWORD
    return open_job_store(dsn, tmp_path)


def training(server) -> pb_grpc.TrainingStub:
    return pb_grpc.TrainingStub(server.channel())


def upload(config: pb.FineTuneConfig, examples) -> list[pb.FineTuneRequest]:
    return [pb.FineTuneRequest(config=config),
            pb.FineTuneRequest(batch=pb.ExampleBatch(examples=[pb.Example(image=i, label=l) for i, l in examples]))]


def final_event(server, job_id: str, timeout: float = 600) -> pb.JobEvent:
    events = list(training(server).WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout))
    assert events and events[-1].state in TERMINAL, events[-3:]
    return events[-1]


def trainer_of(fleet, store: JobStore, job_id: str):
    """The trainer process that holds the job's lease (its owner names host:pid:tag)."""
    owner = wait_for(lambda: store.get(job_id).lease_owner, 60, "the job to be claimed")
    pid = int(owner.split(":")[1])
    return next(s for s in fleet.started if s.proc.pid == pid)


def staged(model_dir: Path, job_id: str) -> bool:
    return (model_dir / ".jobs" / job_id).exists()


def no_tracebacks(*servers) -> None:
    for server in servers:
        assert "Traceback" not in server.log(), server.log()[-3000:]


def test_replicas_share_jobs_cancel_reaches_any_trainer_and_quotas_hold(exported_registry, fleet, examples, many,
                                                                        photos, tmp_path):
    model_dir = tmp_path / "registry"
    shutil.copytree(exported_registry, model_dir)
    quotas = ("--max-queued-jobs", "3", "--max-queued-jobs-per-submitter", "2")
    a = fleet(model_dir, "inference", "replica-a", *quotas)
    b = fleet(model_dir, "inference", "replica-b", *quotas)
    trainers = [fleet(model_dir, "trainer", f"trainer-{i}") for i in (1, 2)]
    store = store_for(fleet.dsn, tmp_path)

    # A trainer of a fleet only claims: it serves no Training API of its own.
    with pytest.raises(grpc.RpcError) as info:
        training(trainers[0]).ListJobs(pb.ListJobsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # FineTune on A; B streams every event of it, from the first to SUCCEEDED.
    config = pb.FineTuneConfig(base_model=BUILTIN_NAME, name="digits", epochs=3, seed=0, validation_split=0.25,
                               activate=True)
    accepted = training(a).FineTune(iter(upload(config, examples)), timeout=120)
    events = list(training(b).WatchJob(pb.WatchJobRequest(job_id=accepted.job_id), timeout=600))
    phases = [e.phase for e in events]
    assert phases[0] == "receiving" and "claimed" in phases and "training_head" in phases, phases
    assert "publishing" in phases and events[-1].state == pb.JOB_STATE_SUCCEEDED, events[-1]
    # The trainers started cold (the tests' servers start their worker with the first job): the
    # user is told why the first job waits.
    assert any("waiting for the trainer to start" in e.message for e in events), [e.message for e in events]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    version = events[-1].version
    listed = {replica.target: [(j.job_id, j.state, j.version) for j in training(replica).ListJobs(
        pb.ListJobsRequest(), timeout=10).jobs] for replica in (a, b)}
    assert listed[a.target] == listed[b.target] == [(accepted.job_id, pb.JOB_STATE_SUCCEEDED, version)]
    assert not staged(model_dir, accepted.job_id)  # the upload left the store with the job
    zero = examples[0][0]
    for replica in (a, b):  # each replica follows the new active version
        answer = wait_for(lambda: pb_grpc.InferenceStub(replica.channel()).Classify(
            pb.ClassifyRequest(model="digits", images=[zero]), timeout=30), 30, "the new model on a replica")
        assert (answer.model, answer.version) == ("digits", version)
        assert answer.results[0].predictions[0].label == "digit-0"

    # A cancel through B stops the job on whichever trainer runs it, and nothing is published.
    long = training(a).FineTune(iter(upload(pb.FineTuneConfig(base_model=BUILTIN_NAME, name="long", epochs=1000),
                                            many)), timeout=120)
    runner = trainer_of(fleet, store, long.job_id)
    wait_for(lambda: store.get(long.job_id).phase == "training_head", 120, "the long job to train")
    assert training(b).CancelJob(pb.CancelJobRequest(job_id=long.job_id), timeout=30).state == \
        pb.JOB_STATE_CANCELLED
    cancelled_at = time.monotonic()
    wait_for(lambda: f"job {long.job_id} was cancelled or taken over; stopping its worker" in runner.log(), 10,
             "the trainer to stop the cancelled job")
    stopped_after = time.monotonic() - cancelled_at
    assert final_event(a, long.job_id).state == pb.JOB_STATE_CANCELLED
    assert not staged(model_dir, long.job_id)
    time.sleep(1)
    assert Registry(model_dir).versions("long") == []
    print(f"\ncancel reached the trainer within {stopped_after:.2f} s")

    # Quotas: 2 jobs per submitter (anonymous callers are one submitter), 3 in all.
    queued = [training(a).FineTune(iter(upload(pb.FineTuneConfig(base_model=BUILTIN_NAME, name=f"q{i}",
                                                                 epochs=1000), many)), timeout=120)
              for i in range(2)]
    with pytest.raises(grpc.RpcError) as info:
        training(b).FineTune(iter(upload(pb.FineTuneConfig(base_model=BUILTIN_NAME, name="q9"), examples)),
                             timeout=120)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "you have 2 jobs queued or running; the limit per submitter is 2 (--max-queued-jobs-per-submitter)" \
        in info.value.details()
    for job in queued:
        training(b).CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=30)
    small = fleet(model_dir, "inference", "replica-c", "--max-staged-bytes", "1000")
    with pytest.raises(grpc.RpcError) as info:
        training(small).FineTune(iter(upload(pb.FineTuneConfig(base_model=BUILTIN_NAME, name="big"), examples)),
                                 timeout=120)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.search(r"holds \d+ bytes of staged uploads and this job adds \d+; the limit is 1000 "
                     r"\(--max-staged-bytes\)", info.value.details()), info.value.details()
    assert pb_grpc.InferenceStub(a.channel()).Classify(pb.ClassifyRequest(images=[photos["coffee"]]),
                                                       timeout=30).results[0].predictions[0].label == "espresso"
    no_tracebacks(a, b, small, *trainers)
    store.close()


def test_a_lost_trainer_job_is_claimed_again_and_published_once(exported_registry, bucket_url, fleet,  # noqa: F811
                                                                many, tmp_path):
    """Over S3 (moto): SIGKILL the trainer running a job; then freeze another past its lease."""
    registry, _ = copy_exported(exported_registry, bucket_url, tmp_path)
    a = fleet(bucket_url, "inference", "replica-a")
    t1 = fleet(bucket_url, "trainer", "trainer-1")
    t2 = fleet(bucket_url, "trainer", "trainer-2")
    store = store_for(fleet.dsn, tmp_path)

    config = pb.FineTuneConfig(base_model=BUILTIN_NAME, name="killed", epochs=1000, seed=0, activate=True)
    job = training(a).FineTune(iter(upload(config, many)), timeout=120)
    victim = trainer_of(fleet, store, job.job_id)
    wait_for(lambda: store.get(job.job_id).phase in ("extracting_features", "training_head"), 120, "the job to run")
    worker = store.get(job.job_id).worker_pid
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(30)
    wait_for(lambda: not Path(f"/proc/{worker}").exists(), 30, "its worker to die with it")
    final = final_event(a, job.job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final
    record = store.get(job.job_id)
    assert record.attempt == 2 and record.lease_owner == ""
    history = [e.message for e in training(a).WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=30)]
    assert any("again (attempt 2: the lease of" in m and "expired)" in m for m in history), history
    assert registry.versions("killed") == [final.version]  # exactly one version
    assert not Registry(bucket_url, cache_dir=tmp_path / "c1").store.exists(f".jobs/{job.job_id}/job.json")

    # A trainer held past its lease (the trainer and its worker frozen) can neither publish nor
    # change the job once it wakes: the other trainer's attempt owns it.
    survivor = t2 if victim is t1 else t1
    third = fleet(bucket_url, "trainer", "trainer-3")
    config = pb.FineTuneConfig(base_model=BUILTIN_NAME, name="frozen", epochs=1000, seed=0, activate=False)
    job = training(a).FineTune(iter(upload(config, many)), timeout=120)
    holder = trainer_of(fleet, store, job.job_id)
    wait_for(lambda: store.get(job.job_id).phase in ("extracting_features", "training_head"), 120, "the job to run")
    worker = store.get(job.job_id).worker_pid
    for pid in (holder.proc.pid, worker):
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: store.get(job.job_id).attempt == 2, 60, "another trainer to claim the job")
    finally:
        for pid in (holder.proc.pid, worker):
            os.kill(pid, signal.SIGCONT)
    final = final_event(a, job.job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED and store.get(job.job_id).attempt == 2
    wait_for(lambda: f"job {job.job_id} was cancelled or taken over" in holder.log(), 30,
             "the woken trainer to see it lost the job")
    time.sleep(2)  # what the woken worker might still do
    assert registry.versions("frozen") == [final.version]
    assert store.get(job.job_id).state == JobState.SUCCEEDED
    assert store.get(job.job_id).version == final.version
    no_tracebacks(a, survivor, third)
    store.close()


def test_postgresql_down_and_every_process_restarted(exported_registry, postgres_server, fleet, examples, many,
                                                     photos, tmp_path):
    model_dir = tmp_path / "registry"
    shutil.copytree(exported_registry, model_dir)
    a = fleet(model_dir, "inference", "replica-a")
    t1 = fleet(model_dir, "trainer", "trainer-1")
    config = pb.FineTuneConfig(base_model=BUILTIN_NAME, name="outage", epochs=1000, seed=0, activate=True)
    job = training(a).FineTune(iter(upload(config, many)), timeout=120)
    wait_for(lambda: training(a).GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=10).phase in
             ("extracting_features", "training_head", "claimed"), 120, "the job to start")

    postgres_server.stop()
    try:
        inference = pb_grpc.InferenceStub(a.channel())
        assert inference.Classify(pb.ClassifyRequest(images=[photos["coffee"]]),
                                  timeout=30).results[0].predictions[0].label == "espresso"
        for call in (lambda: training(a).ListJobs(pb.ListJobsRequest(), timeout=30),
                     lambda: training(a).GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=30),
                     lambda: training(a).FineTune(iter(upload(pb.FineTuneConfig(base_model=BUILTIN_NAME, name="x"),
                                                              examples)), timeout=60)):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert f"postgresql 127.0.0.1:{postgres_server.port}/" in info.value.details()
            assert PASSWORD not in info.value.details()
        time.sleep(float(LEASE) + 1)  # past the lease: the trainer cannot renew it meanwhile
    finally:
        postgres_server.start()
    final = final_event(a, job.job_id)  # it recovers by itself, and the job is not lost
    assert final.state == pb.JOB_STATE_SUCCEEDED, final
    assert Registry(model_dir).versions("outage") == [final.version]

    # Restarts: a job queued while no trainer runs survives the restart of every process.
    assert t1.stop() == 0
    queued = training(a).FineTune(iter(upload(pb.FineTuneConfig(base_model=BUILTIN_NAME, name="after", epochs=3,
                                                                 activate=True), examples)), timeout=120)
    assert staged(model_dir, queued.job_id)
    assert a.stop() == 0
    a2 = fleet(model_dir, "inference", "replica-a2")
    jobs = {j.job_id: j for j in training(a2).ListJobs(pb.ListJobsRequest(), timeout=30).jobs}
    assert jobs[job.job_id].state == pb.JOB_STATE_SUCCEEDED and jobs[queued.job_id].state == pb.JOB_STATE_QUEUED
    assert staged(model_dir, queued.job_id)
    fleet(model_dir, "trainer", "trainer-1b")
    assert final_event(a2, queued.job_id).state == pb.JOB_STATE_SUCCEEDED
    assert not staged(model_dir, queued.job_id)
    no_tracebacks(*fleet.started)


def test_a_store_that_cannot_work_stops_the_start(exported_registry, postgres_server, fleet, tmp_path):
    model_dir = tmp_path / "registry"
    shutil.copytree(exported_registry, model_dir)
    wrong = fleet(model_dir, "inference", "wrong-password", wait=False, env={"PGPASSWORD": "not-the-password"})
    assert wrong.proc.wait(60) != 0
    log = wrong.log()
    assert "password authentication failed" in log and f"127.0.0.1:{postgres_server.port}/" in log, log[-2000:]
    assert "Traceback" not in log and "not-the-password" not in log

    store = store_for(fleet.dsn, tmp_path)
    with store.db.transaction() as db:
        db.execute("INSERT INTO schema_migrations (version, applied) VALUES (?, ?)", (99, 0.0))
    store.close()
    newer = fleet(model_dir, "inference", "newer-schema", wait=False)
    assert newer.proc.wait(60) != 0
    assert "schema version 99, newer than this headswap" in newer.log(), newer.log()[-2000:]
    assert "Traceback" not in newer.log()


def test_a_trainer_stopped_mid_job_releases_it_to_another_at_once(exported_registry, fleet, many, tmp_path):
    """SIGTERM a trainer whose job cannot finish within --trainer-drain-s: it releases the job at
    once (no lease to wait out), exits 0, and the other trainer runs the job to the end."""
    model_dir = tmp_path / "registry"
    shutil.copytree(exported_registry, model_dir)
    a = fleet(model_dir, "inference", "replica-a")
    drain = ("--trainer-drain-s", "3", "--job-lease-s", "60")  # a long lease: only a release is fast
    fleet(model_dir, "trainer", "trainer-1", *drain)
    fleet(model_dir, "trainer", "trainer-2", *drain)
    store = store_for(fleet.dsn, tmp_path)
    config = pb.FineTuneConfig(base_model=BUILTIN_NAME, name="handed-over", epochs=1000, seed=0, activate=True)
    job = training(a).FineTune(iter(upload(config, many)), timeout=120)
    holder = trainer_of(fleet, store, job.job_id)
    wait_for(lambda: store.get(job.job_id).phase == "training_head", 120, "the job to train")
    stopped_at = time.monotonic()
    holder.proc.send_signal(signal.SIGTERM)
    assert holder.proc.wait(60) == 0
    took = time.monotonic() - stopped_at
    assert took < 3 + 10 + 5, took  # the drain limit (then the release), well inside a pod's grace
    final = final_event(a, job.job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final
    history = [e.message for e in training(a).WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=30)]
    assert any(f"released: trainer {socket.gethostname()}:{holder.proc.pid}:" in m and "is shutting down" in m
               for m in history), history
    record = store.get(job.job_id)
    assert record.attempt == 2 and record.tries == 1  # the release did not count as a lost try
    assert f"job {job.job_id} released for another trainer" in holder.log()
    assert Registry(model_dir).versions("handed-over") == [final.version]
    no_tracebacks(*fleet.started)
    store.close()
