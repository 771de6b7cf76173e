"""A hung or failing model store (issue 25, item 4): moto's S3 server in its own process, frozen
with SIGSTOP (it still accepts TCP connections, and never answers), thawed with SIGCONT, killed.

A real `headswap serve` on the bucket, called with real gRPC clients, must answer UNAVAILABLE
naming the store within about --store-timeout-s, log one short line and no traceback, never log
credentials, keep serving what it has loaded, and work again once the store is back. A model
change whose write was not confirmed is answered "outcome unknown" and the test checks afterwards
that what the store did agrees with the answer.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import s3fs

from conftest import BUILTIN_NAME
from headswap.errors import StoreOutcomeUnknown, StoreUnavailable
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.registry.registry import Registry

# KServe V2 through tritonclient's protobuf modules: headswap.protocol.kserve_v2_pb2 declares the
# same `inference` package, and the two cannot be loaded in one process (tests/test_fuzz.py).
from tritonclient.grpc import service_pb2 as kpb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as kpb_grpc  # noqa: E402
from test_object_store import classify, copy_exported, fake_model, wait_for

TIMEOUT_S = 2.0  # --store-timeout-s in these tests
SECRET = "store-secret-never-logged-7f3a9c"
# An answer "within about the bound": the bound, a client retry's backoff, and a slow 2-core machine.
PROMPT_S = 2 * TIMEOUT_S + 2


class MotoProcess:
    """moto's S3 server as a process of its own, so that it can be stopped, continued and killed."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("moto's server did not start")
                time.sleep(0.1)

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.thaw()
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def moto(monkeypatch) -> Iterator[MotoProcess]:
    """A moto process per test; this process and the servers it starts talk to it."""
    server = MotoProcess()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                        "HEADSWAP_S3_ENDPOINT_URL": server.endpoint}.items():
        monkeypatch.setenv(name, value)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def bucket(moto) -> str:
    name = f"headswap-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=moto.endpoint, skip_instance_cache=True).mkdir(name)
    return f"s3://{name}/registry"


class TriggerProxy:
    """A loopback TCP proxy in front of moto that, once armed, calls `on_match` once, the moment a
    request line matching `watch` arrives, before forwarding it (to freeze moto with that request
    in flight)."""

    def __init__(self, upstream: str, watch: bytes, on_match: Callable[[], None]) -> None:
        host, port = upstream.rsplit("//", 1)[-1].split(":")
        self.upstream = (host, int(port))
        self.watch = re.compile(watch)
        self.on_match = on_match
        self.matched = threading.Event()
        self.armed = threading.Event()
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=30)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if from_client and self.armed.is_set() and self.watch.search(chunk):
                    with self._lock:
                        first = not self.matched.is_set()
                        self.matched.set()
                    if first:
                        self.on_match()
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def expect_unavailable(call: Callable[[], object], bucket: str) -> str:
    """The call fails UNAVAILABLE, naming the store, long before the caller's own 30 s deadline."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call()
    elapsed = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    details = err.value.details()
    assert bucket in details and "\n" not in details and SECRET not in details, details
    assert elapsed < PROMPT_S, f"answered after {elapsed:.1f} s: {details}"
    return details


def assert_clean_log(server) -> None:
    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert SECRET not in log
    assert " INTERNAL" not in log and "crashed" not in log, log[-5000:]


def store_server(server_factory, bucket: str, endpoint: str):
    return server_factory(bucket, "--role", "inference", "--poll-interval-s", "0.5",
                          "--store-timeout-s", str(TIMEOUT_S), env={"HEADSWAP_S3_ENDPOINT_URL": endpoint})


def seed(exported_registry: Path, bucket: str, tmp_path: Path) -> Registry:
    """Version 1 active, version 2 published beside it (the same model), for pins and activations."""
    registry, first = copy_exported(exported_registry, bucket, tmp_path)
    assert first == 1
    manifest = registry.manifest(BUILTIN_NAME, 1)
    assert registry.publish(BUILTIN_NAME, tmp_path / "seed" / "model.onnx",
                            {k: v for k, v in manifest.items() if k not in ("name", "version", "sha256", "format")}) == 2
    return registry


# --- a frozen, then thawed, then killed store against a real server --------------------------


def test_frozen_store_answers_unavailable_naming_it_then_recovers(exported_registry, bucket, moto, server_factory,
                                                                  photos, tmp_path):
    seed(exported_registry, bucket, tmp_path)
    server = store_server(server_factory, bucket, moto.endpoint)
    models = pb_grpc.ModelsStub(server.channel())
    kserve = kpb_grpc.GRPCInferenceServiceStub(server.channel())
    assert classify(server, photos["coffee"]).version == 1

    moto.freeze()
    try:
        details = expect_unavailable(lambda: models.ListModels(pb.ListModelsRequest(), timeout=30), bucket)
        assert "--store-timeout-s" in details
        expect_unavailable(lambda: models.GetModel(pb.GetModelRequest(name=BUILTIN_NAME), timeout=30), bucket)
        expect_unavailable(lambda: classify(server, photos["coffee"], version=2), bucket)  # not loaded: a lookup
        expect_unavailable(lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(name=BUILTIN_NAME), timeout=30),
                           bucket)
        # What is loaded keeps answering from memory while the store is away.
        answer = classify(server, photos["coffee"])
        assert answer.version == 1 and answer.results[0].predictions[0].label == "espresso"
    finally:
        moto.thaw()

    # Back: every call works again, the pinned version loads.
    wait_for(lambda: models.ListModels(pb.ListModelsRequest(), timeout=30).models, 30, "ListModels after SIGCONT")
    assert list(models.GetModel(pb.GetModelRequest(name=BUILTIN_NAME), timeout=30).versions) == [1, 2]
    assert classify(server, photos["coffee"], version=2).version == 2
    assert kserve.ModelMetadata(kpb.ModelMetadataRequest(name=BUILTIN_NAME), timeout=30).name == BUILTIN_NAME

    # Killed: connections refused. One line, no traceback, UNAVAILABLE (it was INTERNAL).
    moto.kill()
    expect_unavailable(lambda: models.ListModels(pb.ListModelsRequest(), timeout=30), bucket)
    expect_unavailable(lambda: models.GetModel(pb.GetModelRequest(name=BUILTIN_NAME), timeout=30), bucket)
    assert classify(server, photos["coffee"]).version == 1

    log = server.log()
    assert_clean_log(server)
    store_lines = [line for line in log.splitlines() if f"model store {bucket}" in line]
    assert store_lines and all(len(line) < 600 for line in store_lines), store_lines
    assert any("answers again" in line for line in store_lines), store_lines


@pytest.mark.parametrize("stage", ["read", "write"])
def test_activation_during_a_freeze_is_answered_truthfully(exported_registry, bucket, moto, server_factory, tmp_path,
                                                           stage):
    """moto is frozen the moment the activation's read of active.json (stage read) or its
    conditional PUT (stage write) reaches it. A read: "nothing was changed", and after SIGCONT the
    change indeed never lands. A write: "the outcome is unknown, check before retrying", and after
    SIGCONT the write lands: the caller was not told it failed."""
    registry = seed(exported_registry, bucket, tmp_path)
    method = rb"HEAD" if stage == "read" else rb"PUT"
    proxy = TriggerProxy(moto.endpoint, method + rb" /[^ ]*/active\.json", moto.freeze)
    try:
        server = store_server(server_factory, bucket, proxy.endpoint)
        models = pb_grpc.ModelsStub(server.channel())
        proxy.armed.set()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            models.ActivateModel(pb.ActivateModelRequest(name=BUILTIN_NAME, version=2), timeout=60)
        elapsed = time.monotonic() - started
        assert proxy.matched.is_set()
        details = err.value.details()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, details
        assert bucket in details and "\n" not in details and SECRET not in details, details
        assert elapsed < 60 - 5, f"ActivateModel took {elapsed:.1f} s"  # far from the caller's deadline
        if stage == "read":
            assert "nothing was changed" in details and "unknown" not in details, details
        else:
            assert "outcome is unknown" in details and "--store-timeout-s" in details, details
            assert "headswap models" in details and "GetModel" in details, details
    finally:
        moto.thaw()

    # What the store does once it is back agrees with the answer.
    expected = 1 if stage == "read" else 2
    if stage == "write":
        wait_for(lambda: registry.active_version(BUILTIN_NAME) == 2, 30, "the unconfirmed write to land")
    else:
        time.sleep(3 * TIMEOUT_S)  # the client's retries of the read reach moto: nothing is written after them
    assert registry.active_version(BUILTIN_NAME) == expected
    info = wait_for(lambda: pb_grpc.ModelsStub(server.channel()).GetModel(pb.GetModelRequest(name=BUILTIN_NAME),
                                                                          timeout=30), 30, "GetModel after SIGCONT")
    assert info.active_version == expected
    proxy.close()
    assert_clean_log(server)


# --- the registry on its own: what a training worker's publish sees ----------------------------


def test_publish_to_a_frozen_store_says_it_waits_and_fails_at_the_bound(bucket, moto, tmp_path, caplog):
    """A training worker publishes through Registry: it hears "waiting for the model store" (a job
    progress event) and gets StoreUnavailable at the bound instead of sitting in `exporting`."""
    # the first version with the default bound: on a loaded machine 1 s can pass before the store answers
    Registry(bucket, cache_dir=tmp_path / "seed-cache").publish("digits", fake_model(tmp_path / "v1.onnx", seed=1),
                                                                {}, activate=True)
    registry = Registry(bucket, cache_dir=tmp_path / "cache", store_timeout_s=1.0)
    notices: list[str] = []
    registry.on_store_wait = notices.append
    moto.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:
            registry.publish("digits", fake_model(tmp_path / "v2.onnx", seed=2), {})
        assert time.monotonic() - started < 10  # the bound (a few timeouts of 1 s), not a frozen wait
        assert bucket in str(err.value) and SECRET not in str(err.value)
        assert notices and all(n.startswith(f"waiting for the model store {bucket}") for n in notices), notices
        with pytest.raises(StoreUnavailable) as err:
            registry.activate("digits", 1)  # its first lookup already goes unanswered: nothing sent
        assert not isinstance(err.value, StoreOutcomeUnknown)
    finally:
        moto.thaw()
    assert registry.versions("digits") == [1]
    assert registry.publish("digits", fake_model(tmp_path / "v3.onnx", seed=3), {}) >= 2
    assert SECRET not in caplog.text


def test_outcome_unknown_is_a_store_unavailable():
    """The transport maps both to UNAVAILABLE (errors.Unavailable), so no handler needs to know them."""
    from headswap.api.status import status_for

    assert status_for(StoreOutcomeUnknown("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_for(StoreUnavailable("x")) == grpc.StatusCode.UNAVAILABLE


def test_local_store_failures_are_unavailable_too(tmp_path):
    """A local registry that fails a read (here active.json is a directory: EISDIR) answers
    StoreUnavailable naming the directory, not an OSError that would become INTERNAL."""
    registry = Registry(tmp_path / "reg", store_timeout_s=1.0)
    (tmp_path / "reg" / "m" / "active.json").mkdir(parents=True)
    with pytest.raises(StoreUnavailable, match=f"model store {re.escape(str(tmp_path / 'reg'))} unavailable"):
        registry.active_state("m")


def test_store_urls_and_reasons_never_carry_credentials():
    from headswap.registry.bounded import _reason, shown_url

    assert shown_url("s3://AKIA:secret@models/headswap?X-Amz-Signature=abc") == "s3://models/headswap"
    reason = _reason(OSError('Could not connect to "http://key:secret@10.0.0.1:9000/b?X-Amz-Credential=k"'))
    assert "secret" not in reason and "Credential" not in reason and "10.0.0.1:9000/b" in reason


def test_publish_abandoned_mid_upload_never_appears(bucket, moto, monkeypatch, tmp_path):
    """moto freezes while the new version's model.onnx is being uploaded: the publish fails at
    the bound with "nothing was published", and after SIGCONT the upload that was left running
    finishes but never writes the manifest, so no reader ever sees that version."""
    Registry(bucket, cache_dir=tmp_path / "seed-cache").publish("digits", fake_model(tmp_path / "v1.onnx", seed=1), {})
    proxy = TriggerProxy(moto.endpoint, rb"PUT /[^ ]*/2/model\.onnx", moto.freeze)
    proxy.armed.set()
    monkeypatch.setenv("HEADSWAP_S3_ENDPOINT_URL", proxy.endpoint)
    # 2 s: long enough that the steps before the upload (listing, the version claim) finish on a
    # loaded 2-core machine, so the freeze is what the bound meets (1 s failed there once, early).
    timeout_s = 2.0
    registry = Registry(bucket, cache_dir=tmp_path / "cache", store_timeout_s=timeout_s)
    try:
        with pytest.raises(StoreUnavailable) as err:
            registry.publish("digits", fake_model(tmp_path / "v2.onnx", seed=2), {})
        assert proxy.matched.is_set(), str(err.value)
        assert not isinstance(err.value, StoreOutcomeUnknown) and "nothing was published" in str(err.value)
    finally:
        moto.thaw()
    monkeypatch.setenv("HEADSWAP_S3_ENDPOINT_URL", moto.endpoint)
    reader = Registry(bucket, cache_dir=tmp_path / "reader")
    time.sleep(2 * timeout_s + 2)  # the abandoned upload's retries (2 tries of the bound) run out meanwhile
    assert reader.versions("digits") == [1]
    assert 2 in reader.versions_including_incomplete("digits")  # claimed, never committed
    proxy.close()
