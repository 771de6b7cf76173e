"""The registry on object storage: a real S3-compatible server (moto) on loopback, real processes.

Writers and readers are separate processes talking S3 over HTTP, as replicas in a cluster would.
A small TCP proxy between a writer and the server slows the writer's upload down or holds its
manifest PUT, so that the writer can be SIGKILLed at a chosen point of a publish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import moto.server as moto_server
import numpy as np
import pytest
import s3fs

from conftest import BUILTIN_NAME
from headswap.errors import CorruptModel, FailedPrecondition, NotFound
from headswap.registry.object_store import CLAIM, ObjectStore
from headswap.registry.registry import RECHECK_FILE, Registry
from headswap.registry.store import open_store

POLL = "0.5"


# --- the S3 server --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port; every process of the session is pointed at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "HEADSWAP_S3_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def bucket_url(s3_endpoint) -> str:
    """A fresh bucket per test; the registry lives under a prefix in it."""
    name = f"headswap-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(name)
    return f"s3://{name}/registry"


class Proxy:
    """A loopback TCP proxy in front of the S3 server that can slow uploads or hold one request.

    `watch` is a regex on the client's bytes (an HTTP request line); once it matches, `matched`
    is set, `bytes_after_match` counts what follows, and with `hold=True` nothing more is
    forwarded on that connection: the request never completes.
    """

    def __init__(self, upstream: str, watch: bytes, hold: bool = False, rate: float = 0.0) -> None:
        host, port = upstream.rsplit("//", 1)[-1].split(":")
        self.upstream = (host, int(port))
        self.watch = re.compile(watch)
        self.hold = hold
        self.rate = rate
        self.matched = threading.Event()
        self.bytes_after_match = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        tail = b""
        watching = False
        try:
            while True:
                chunk = source.recv(16384)
                if not chunk:
                    break
                if from_client:
                    if watching:
                        self.bytes_after_match += len(chunk)
                    elif self.watch.search(tail + chunk):
                        watching = True
                        self.matched.set()
                    tail = chunk[-512:]
                    if watching and self.hold:
                        self.closed.wait()
                        break
                    if self.rate:
                        time.sleep(len(chunk) / self.rate)
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
        self.closed.set()
        self.listener.close()


# --- helpers --------------------------------------------------------------------------------


def fake_model(path: Path, size: int = 300_000, seed: int = 0) -> Path:
    """Bytes standing in for an ONNX file: the registry stores and checks them, never parses them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def python(code: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """A separate writer/reader process (the same interpreter, this repository's package)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{err}"
    return out


def copy_exported(exported_registry: Path, url: str, tmp_path: Path) -> tuple[Registry, int]:
    """Publish the exported built-in model into the bucket, as an operator seeding a registry."""
    local = Registry(exported_registry)
    path, manifest = local.verified_model_path(BUILTIN_NAME, local.active_version(BUILTIN_NAME))
    onnx = tmp_path / "seed" / "model.onnx"
    onnx.parent.mkdir(parents=True, exist_ok=True)
    onnx.write_bytes(path.read_bytes())
    remote = Registry(url, cache_dir=tmp_path / "cache")
    version = remote.publish(BUILTIN_NAME, onnx, {k: v for k, v in manifest.items()
                                                  if k not in ("name", "version", "sha256", "format")}, activate=True)
    return remote, version


def classify(server, image: bytes, model: str = "", version: int = 0, timeout: float = 30):
    from headswap.protocol import headswap_v1_pb2 as pb
    from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

    return pb_grpc.InferenceStub(server.channel()).Classify(
        pb.ClassifyRequest(images=[image], top_k=1, model=model, version=version), timeout=timeout)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except grpc.RpcError as err:
            last = err
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


# --- the store on its own -------------------------------------------------------------------


def test_open_store_routes_urls(tmp_path):
    assert type(open_store(f"memory://headswap-{uuid.uuid4().hex}")).__name__ == "ObjectStore"
    assert type(open_store(str(tmp_path))).__name__ == "LocalStore"
    assert type(open_store(f"file://{tmp_path}")).__name__ == "LocalStore"
    with pytest.raises(ValueError):
        ObjectStore(f"memory://x-{uuid.uuid4().hex}").read_bytes("a/../../b")


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_store_operations(kind, request, tmp_path):
    url = f"memory://headswap-{uuid.uuid4().hex}" if kind == "memory" else request.getfixturevalue("bucket_url")
    store = ObjectStore(url)
    with pytest.raises(FileNotFoundError):
        store.read_bytes("m/active.json")
    assert store.list_dirs("") == [] and store.list_dirs("m") == []
    store.write_bytes("m/active.json", b'{"version": 1}')
    store.write_bytes("m/active.json", b'{"version": 2}')
    assert store.read_bytes("m/active.json") == b'{"version": 2}'

    version = tmp_path / "v"
    version.mkdir()
    fake_model(version / "model.onnx")
    (version / "manifest.json").write_text("{}")
    store.publish_dir(version, "m/1")
    assert store.list_dirs("") == ["m"] and store.list_dirs("m") == ["1"]  # a poller sees it at once
    assert store.exists("m/1/manifest.json") and store.exists(f"m/1/{CLAIM}")
    with pytest.raises(FileExistsError):
        store.publish_dir(version, "m/1")
    store.write_bytes(f"m/2/{CLAIM}", b"{}")  # a number claimed by a writer still uploading (or dead)
    with pytest.raises(FileExistsError, match="taken"):
        store.publish_dir(version, "m/2")
    assert not store.exists("m/2/model.onnx") and not store.exists("m/2/manifest.json")
    store.delete_prefix("m/2")

    cached = store.local_path("m/1/model.onnx", tmp_path / "cache")
    assert cached.read_bytes() == (version / "model.onnx").read_bytes()
    stamp = cached.stat().st_mtime_ns
    assert store.local_path("m/1/model.onnx", tmp_path / "cache") == cached and cached.stat().st_mtime_ns == stamp
    store.write_bytes("m/1/model.onnx", b"replaced")  # same key, new content: fetched again
    assert store.local_path("m/1/model.onnx", tmp_path / "cache").read_bytes() == b"replaced"
    assert not cached.exists()

    store.delete_prefix("m/1")
    assert store.list_dirs("m") == [] and not store.exists("m/1/manifest.json")


# --- (a) the registry over S3 ---------------------------------------------------------------


def test_registry_over_s3(bucket_url, tmp_path):
    registry = Registry(bucket_url, cache_dir=tmp_path / "cache")
    assert registry.url == bucket_url and registry.models() == []
    first = registry.publish("digits", fake_model(tmp_path / "a.onnx", seed=1), {"labels": ["0", "1"]})
    second = registry.publish("digits", fake_model(tmp_path / "b.onnx", seed=2), {"labels": ["0", "1"]})
    assert (first, second) == (1, 2)
    assert registry.models() == ["digits"] and registry.versions("digits") == [1, 2]
    assert registry.manifest("digits", 2)["labels"] == ["0", "1"]
    assert registry.active_version("digits") is None  # never activated: nothing answers yet

    registry.activate("digits", 1)
    registry.activate("digits", 2)
    other = Registry(bucket_url, cache_dir=tmp_path / "other-cache")  # a second reader
    assert other.active_version("digits") == 2
    assert registry.rollback("digits") == 1 and other.active_version("digits") == 1
    with pytest.raises(FailedPrecondition):
        registry.rollback("digits")
    with pytest.raises(NotFound):
        registry.activate("digits", 7)
    with pytest.raises(NotFound):
        registry.manifest("digits", 7)

    path, manifest = other.verified_model_path("digits", 2)
    assert path.read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["sha256"]
    assert str(path).startswith(str(tmp_path / "other-cache"))

    # An object changed behind the registry's back (same size, other bytes) is refused.
    ObjectStore(bucket_url).write_bytes("digits/2/model.onnx", fake_model(tmp_path / "evil", seed=3).read_bytes())
    with pytest.raises(CorruptModel, match="sha256"):
        other.verified_model_path("digits", 2)
    ObjectStore(bucket_url).delete_prefix("digits/1/model.onnx")
    with pytest.raises(CorruptModel, match="missing"):
        other.verified_model_path("digits", 1)


def test_a_version_with_an_extra_file_over_s3(bucket_url, tmp_path):
    """An int8 version's fp32 file (RECHECK_FILE) is stored beside its model over S3, its sha256 in the
    manifest, fetched into the reader's cache and checked like the model; nothing else can be stored."""
    registry = Registry(bucket_url, cache_dir=tmp_path / "cache")
    fp32 = fake_model(tmp_path / "fp32.onnx", seed=4)
    stale = {"labels": ["0", "1"], "files": {RECHECK_FILE: "0" * 64}}  # a manifest copied from another version
    version = registry.publish("digits", fake_model(tmp_path / "int8.onnx", seed=5), stale,
                               extra_files={RECHECK_FILE: fp32})
    reader = Registry(bucket_url, cache_dir=tmp_path / "reader-cache")
    _, manifest = reader.verified_model_path("digits", version)
    assert manifest["files"] == {RECHECK_FILE: hashlib.sha256(fp32.read_bytes()).hexdigest()}
    files = reader.verified_extra_files("digits", version, manifest)
    assert files[RECHECK_FILE].read_bytes() == fp32.read_bytes()
    path, fp32_manifest = reader.verified_fp32_path("digits", version)
    assert path == files[RECHECK_FILE] and fp32_manifest["sha256"] == manifest["files"][RECHECK_FILE]
    # a version without extra files records none, even from a manifest that listed some
    plain = registry.publish("digits", fake_model(tmp_path / "plain.onnx", seed=6), stale)
    assert "files" not in registry.manifest("digits", plain)
    assert reader.verified_fp32_path("digits", plain)[0].read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    with pytest.raises(ValueError, match="cannot carry"):
        registry.publish("digits", fp32, {"labels": ["0", "1"]}, extra_files={"../active.json": fp32})
    assert registry.versions("digits") == [version, plain]
    # changed behind the registry's back: refused
    evil = fake_model(tmp_path / "evil", seed=7).read_bytes()
    ObjectStore(bucket_url).write_bytes(f"digits/{version}/{RECHECK_FILE}", evil)
    with pytest.raises(CorruptModel, match=f"sha256 of {RECHECK_FILE}"):
        Registry(bucket_url, cache_dir=tmp_path / "third-cache").verified_extra_files("digits", version, manifest)


def test_concurrent_writers_get_distinct_versions(bucket_url, tmp_path):
    """Three processes publish at once: each version number is taken by exactly one of them."""
    writers = []
    for w in range(3):
        code = f"""
            import json, sys
            from pathlib import Path
            import numpy as np
            from headswap.registry.registry import RECHECK_FILE, Registry
            registry = Registry({bucket_url!r}, cache_dir=Path({str(tmp_path)!r}) / "cache{w}")
            out = []
            for i in range(3):
                model = Path({str(tmp_path)!r}) / "w{w}-{{}}".format(i) / "model.onnx"
                model.parent.mkdir()
                model.write_bytes(np.random.default_rng({w} * 10 + i).bytes(200_000))
                out.append([registry.publish("shared", model, {{"writer": {w}, "i": i}}), {w}, i])
            print(json.dumps(out))
        """
        writers.append(python(code))
    published = [entry for proc in writers for entry in json.loads(finish(proc))]
    versions = sorted(v for v, _, _ in published)
    assert len(set(versions)) == 9
    registry = Registry(bucket_url, cache_dir=tmp_path / "check")
    assert registry.versions("shared") == versions
    for version, writer, i in published:
        path, manifest = registry.verified_model_path("shared", version)  # sha256 matches: no mixing
        assert (manifest["writer"], manifest["i"]) == (writer, i)
        assert path.read_bytes() == np.random.default_rng(writer * 10 + i).bytes(200_000)


# --- (b) a writer killed mid-upload ---------------------------------------------------------


PUBLISH_ONE = """
    import sys
    from pathlib import Path
    from headswap.registry.registry import RECHECK_FILE, Registry
    url, name, model = sys.argv[1:4]
    print("version", Registry(url, cache_dir=Path(model).parent / "cache").publish(name, Path(model), {}), flush=True)
"""


def publish_in_subprocess(url: str, name: str, model: Path, endpoint: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(PUBLISH_ONE), url, name, str(model)],
                            env={**os.environ, "HEADSWAP_S3_ENDPOINT_URL": endpoint},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_publisher(url: str, name: str, model: Path, s3_endpoint: str, stage: str) -> None:
    """Start a publisher behind the proxy and SIGKILL it at `stage`.

    during-model: while model.onnx is half uploaded (the PUT is throttled to 1 MB/s);
    before-manifest: model.onnx is complete and the manifest PUT is held by the proxy.
    """
    if stage == "during-model":
        proxy = Proxy(s3_endpoint, rb"PUT /[^ ]*/model\.onnx", rate=1_000_000)
    else:
        proxy = Proxy(s3_endpoint, rb"PUT /[^ ]*/manifest\.json", hold=True)
    proc = publish_in_subprocess(url, name, model, proxy.endpoint)
    try:
        assert proxy.matched.wait(60), proc.communicate(timeout=5)
        if stage == "during-model":
            wait_for(lambda: proxy.bytes_after_match > 300_000, 30, "part of model.onnx uploaded")
        else:
            time.sleep(0.5)
        assert proc.poll() is None, "the publisher finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proxy.close()


@pytest.mark.parametrize("stage", ["during-model", "before-manifest"])
def test_killed_writer_leaves_no_version(bucket_url, s3_endpoint, tmp_path, stage):
    registry = Registry(bucket_url, cache_dir=tmp_path / "cache")
    registry.publish("digits", fake_model(tmp_path / "v1.onnx", seed=1), {}, activate=True)
    big = fake_model(tmp_path / "big" / "model.onnx", size=3_000_000, seed=2)
    kill_publisher(bucket_url, "digits", big, s3_endpoint, stage)

    store = ObjectStore(bucket_url)
    assert registry.versions("digits") == [1]  # what every reader trusts
    assert registry.versions_including_incomplete("digits") == [1, 2]  # the claim is left behind
    assert store.exists("digits/2/model.onnx") == (stage == "before-manifest")
    assert not store.exists("digits/2/manifest.json")
    with pytest.raises(NotFound):
        registry.resolve("digits", 2)
    assert registry.active_version("digits") == 1

    # The next publish skips the abandoned number and is whole.
    assert registry.publish("digits", fake_model(tmp_path / "v3.onnx", seed=3), {}) == 3
    assert registry.versions("digits") == [1, 3]
    registry.verified_model_path("digits", 3)


# --- (b, c) real server processes on the bucket ---------------------------------------------


def inference_server(server_factory, url: str):
    return server_factory(url, "--role", "inference", "--poll-interval-s", POLL)


def test_killed_upload_is_never_served(exported_registry, bucket_url, s3_endpoint, server_factory, photos, tmp_path):
    from headswap.protocol import headswap_v1_pb2 as pb
    from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

    registry, first = copy_exported(exported_registry, bucket_url, tmp_path)
    server = inference_server(server_factory, bucket_url)
    answer = classify(server, photos["coffee"])
    assert (answer.model, answer.version) == (BUILTIN_NAME, first)
    assert answer.results[0].predictions[0].label == "espresso"

    # The whole real model.onnx lands; the writer dies before its manifest.
    onnx = tmp_path / "seed" / "model.onnx"
    kill_publisher(bucket_url, BUILTIN_NAME, onnx, s3_endpoint, "before-manifest")
    assert ObjectStore(bucket_url).exists(f"{BUILTIN_NAME}/{first + 1}/model.onnx")
    time.sleep(6 * float(POLL))
    assert classify(server, photos["coffee"]).version == first
    with pytest.raises(grpc.RpcError) as err:
        classify(server, photos["coffee"], version=first + 1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    info = pb_grpc.ModelsStub(server.channel()).GetModel(pb.GetModelRequest(name=BUILTIN_NAME))
    assert list(info.versions) == [first] and info.active_version == first

    # A whole version, published and activated later, is picked up by the poller.
    manifest = registry.manifest(BUILTIN_NAME, first)
    third = registry.publish(BUILTIN_NAME, onnx, {k: v for k, v in manifest.items()
                                                  if k not in ("name", "version", "sha256", "format")})
    assert third == first + 2
    assert classify(server, photos["coffee"]).version == first  # published is not active
    registry.activate(BUILTIN_NAME, third)
    wait_for(lambda: classify(server, photos["coffee"]).version == third, 30, "the server to swap")


PUBLISH_AND_ACTIVATE = """
    import json, sys
    from pathlib import Path
    from headswap.registry.registry import RECHECK_FILE, Registry
    url, onnx, manifest, name = sys.argv[1:5]
    registry = Registry(url, cache_dir=Path(onnx).parent / "cache")
    print(registry.publish(name, Path(onnx), json.loads(Path(manifest).read_text()), activate=True))
"""


def test_writer_process_publishes_two_inference_servers_pick_it_up(exported_registry, bucket_url, server_factory,
                                                                      photos, tmp_path):
    """A writer process publishes; two inference replicas on the same bucket serve what it wrote."""
    registry, first = copy_exported(exported_registry, bucket_url, tmp_path)
    readers = [inference_server(server_factory, bucket_url) for _ in range(2)]
    for reader in readers:
        assert classify(reader, photos["coffee"]).version == first

    onnx = tmp_path / "seed" / "model.onnx"
    manifest_file = tmp_path / "manifest.json"
    manifest = registry.manifest(BUILTIN_NAME, first)
    manifest_file.write_text(json.dumps({k: v for k, v in manifest.items()
                                         if k not in ("name", "version", "sha256", "format")}))
    for name, expected in ((BUILTIN_NAME, first + 1), ("lite0-copy", 1)):
        writer = subprocess.run([sys.executable, "-c", textwrap.dedent(PUBLISH_AND_ACTIVATE), bucket_url,
                                 str(onnx), str(manifest_file), name], capture_output=True, text=True, timeout=120)
        assert writer.returncode == 0, writer.stderr
        assert int(writer.stdout.split()[-1]) == expected

    deadline = 8 * float(POLL) + 20  # a few poll intervals, plus loading and warming up the new session
    for reader in readers:
        wait_for(lambda: classify(reader, photos["coffee"]).version == first + 1, deadline, "the new active version")
        answer = classify(reader, photos["coffee"], model="lite0-copy")
        assert (answer.model, answer.version) == ("lite0-copy", 1)
        assert answer.results[0].predictions[0].label == "espresso"


def digits_examples(per_class: int = 20, classes: tuple[int, ...] = (0, 1)) -> list[tuple[bytes, str]]:
    """Real labelled images: scikit-learn's handwritten digits, 8x8 scaled up to 64x64 RGB PNGs."""
    from conftest import encode
    from sklearn.datasets import load_digits

    digits = load_digits()
    examples = []
    for label in classes:
        for index in np.flatnonzero(digits.target == label)[:per_class]:
            gray = (digits.images[index] * (255 / 16)).astype(np.uint8)
            examples.append((encode(np.repeat(np.kron(gray, np.ones((8, 8), np.uint8))[..., None], 3, axis=2), "PNG"),
                             f"digit-{label}"))
    return examples


def test_trainer_finetunes_two_inference_servers_serve_it(exported_registry, bucket_url, server_factory, photos,
                                                          tmp_path):
    """A trainer-role process fine-tunes over gRPC and publishes to the bucket; two inference replicas
    on the same bucket answer with the new model within a few poll intervals."""
    from headswap.protocol import headswap_v1_pb2 as pb
    from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

    copy_exported(exported_registry, bucket_url, tmp_path)
    readers = [inference_server(server_factory, bucket_url) for _ in range(2)]
    trainer = server_factory(bucket_url, "--role", "trainer", "--poll-interval-s", POLL)

    examples = digits_examples()
    config = pb.FineTuneConfig(base_model=BUILTIN_NAME, name="digits", epochs=2, batch_size=8, seed=0,
                               validation_split=0.25, activate=True)
    requests = [pb.FineTuneRequest(config=config),
                pb.FineTuneRequest(batch=pb.ExampleBatch(examples=[pb.Example(image=image, label=label)
                                                                   for image, label in examples]))]
    training = pb_grpc.TrainingStub(trainer.channel())
    accepted = training.FineTune(iter(requests), timeout=120)
    assert (accepted.num_images, accepted.num_classes) == (40, 2)
    final = None
    for event in training.WatchJob(pb.WatchJobRequest(job_id=accepted.job_id), timeout=600):
        final = event
        if event.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            break
    assert final is not None and final.state == pb.JOB_STATE_SUCCEEDED, f"{final}\n{trainer.log()}"
    assert final.model == "digits"
    job = training.GetJob(pb.GetJobRequest(job_id=accepted.job_id), timeout=10)
    assert job.activated

    registry = Registry(bucket_url, cache_dir=tmp_path / "check")
    assert final.version in registry.versions("digits")
    assert registry.active_version("digits") == final.version
    registry.verified_model_path("digits", final.version)

    zero = next(image for image, label in examples if label == "digit-0")
    for reader in readers:
        answer = wait_for(lambda: classify(reader, zero, model="digits"), 8 * float(POLL) + 20,
                          "the fine-tuned model on a reader")
        assert (answer.model, answer.version) == ("digits", final.version)
        assert answer.results[0].predictions[0].label in ("digit-0", "digit-1")
        assert classify(reader, photos["coffee"]).results[0].predictions[0].label == "espresso"
