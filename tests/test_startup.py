"""Start-up and stop (issue 24): the recommended configuration starts, failures that waiting cannot
heal end the process with their cause on one line, a model store that does not answer is waited
for, and a drain under overload holds its limit.

Real `headswap serve` processes, real gRPC clients.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from conftest import BUILTIN_NAME, ServerProcess, start_server
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.api.drain import DRAIN_EXIT_MARGIN_S

# headswap.server is not imported here: it loads the KServe protocol module, which clashes with
# tritonclient's in one process (tests/test_fuzz.py).
TRAINING_SERVICE = "headswap.v1.Training"

SERVING = health_pb2.HealthCheckResponse.SERVING


def health(server: ServerProcess, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(server.channel())
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    except grpc.RpcError:
        return -1


def serve(model_dir: str | Path, work: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`headswap serve`, output captured (for the failures, which never listen)."""
    command = [sys.executable, "-m", "headswap.cli", "serve", "--port", "0", "--metrics-port", "-1",
               "--host", "127.0.0.1", "--model-dir", str(model_dir), "--work-dir", str(work), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


# --- the recommended configuration ----------------------------------------------------------


def test_jax_backend_on_an_empty_model_dir_exports_and_serves(tmp_path):
    """KERAS_BACKEND=jax (what docs/training.md recommended) no longer stops the first export: it
    runs on TensorFlow whatever the variable says; the server reaches SERVING, and its trainer
    health turns SERVING only once the warm worker says it is ready."""
    server = start_server(tmp_path / "models", tmp_path / "work", wait=False,
                          env={"KERAS_BACKEND": "jax", "HEADSWAP_TRAINER_WARM_START": "true"})
    try:
        server.wait_ready(timeout=400)
        assert (tmp_path / "models" / BUILTIN_NAME).is_dir()
        deadline = time.monotonic() + 180
        while health(server, TRAINING_SERVICE) != SERVING:
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log()[-3000:]
            time.sleep(0.2)
        warm_log = (tmp_path / "work" / "warm-worker.log").read_text()
        assert re.search(r"warm worker \d+ ready \(Keras [\d.]+, backend jax\)", warm_log), warm_log[-2000:]
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


# --- failures that waiting cannot heal ------------------------------------------------------


@pytest.mark.parametrize("case", ["model-dir-is-a-file", "weights-unreadable", "source-does-not-exist"])
def test_a_failure_that_cannot_heal_exits_non_zero_with_its_cause(case, tmp_path):
    """Each ends the process with a non-zero exit and one line naming the cause: the settings'
    files at once (before anything listens), a failed export as soon as the export fails (its
    subprocess imports TensorFlow first: seconds here)."""
    models = tmp_path / "models"
    args: list[str] = []
    if case == "model-dir-is-a-file":
        models.write_text("not a directory")
        expected, within = r"--model-dir .* is a file, not a directory", 30
    elif case == "weights-unreadable":
        args = ["--weights", str(tmp_path / "missing.pth")]
        expected, within = r"--weights .*missing\.pth cannot be read", 30
    else:
        args = ["--model", "builtin:no-such-model"]
        expected, within = r"exporting the default model builtin:no-such-model failed .*unknown", 120
    started = time.monotonic()
    proc = serve(models, tmp_path / "work", *args)
    try:
        out, _ = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"still running after {within} s:\n{out[-3000:]}")
    assert proc.returncode != 0, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("headswap: ") and re.search(expected, last), out[-3000:]
    assert "Traceback" not in out
    print(f"{case}: exit {proc.returncode} after {time.monotonic() - started:.1f} s: {last}")


# --- what can heal: a model store that does not answer yet ----------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("moto's server did not start")
            time.sleep(0.1)


def test_a_store_that_does_not_answer_is_retried_until_it_does(exported_registry, tmp_path):
    """An S3 endpoint down at start-up: the replica says so in the log, again and again (backoff up
    to a steady interval), and serves once the store answers; it never gives up NOT_SERVING."""
    from headswap.registry.registry import Registry

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "HEADSWAP_S3_ENDPOINT_URL": endpoint}
    url = "s3://startup-bucket/registry"
    server = start_server(url, tmp_path / "work", "--role", "inference", "--poll-interval-s", "0.5",
                          env=env, wait=False)
    moto = None
    try:
        deadline = time.monotonic() + 60
        while len(re.findall(r"model store .* does not answer", server.log())) < 3:
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log()[-3000:]
            time.sleep(0.2)
        moto = start_moto(port)
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            import s3fs

            s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("startup-bucket")
            local = Registry(exported_registry)
            path, manifest = local.verified_model_path(BUILTIN_NAME, local.active_version(BUILTIN_NAME))
            seed = tmp_path / "seed" / "model.onnx"
            seed.parent.mkdir()
            shutil.copy(path, seed)
            Registry(url, cache_dir=tmp_path / "cache").publish(
                BUILTIN_NAME, seed, {k: v for k, v in manifest.items()
                                     if k not in ("name", "version", "sha256", "format")}, activate=True)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        server.wait_ready(timeout=120)
        assert "Traceback" not in server.log()
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        if moto is not None:
            moto.kill()
            moto.wait()


# --- the drain limit ------------------------------------------------------------------------


def photo_batch(count: int) -> list[bytes]:
    """`count` distinct 320x240 JPEGs: decoding and classifying them keeps both cores busy."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
        images.append(buffer.getvalue())
    return images


@pytest.mark.parametrize("connections", ["one", "one-per-call"])
def test_drain_under_overload_holds_its_limit(connections, exported_registry, tmp_path):
    """16 calls of 256 images on 2 cores, SIGTERM, --grace-period-s 3: what still runs at the limit
    is ended with UNAVAILABLE and a message, nothing is CANCELLED or INTERNAL, and the process
    exits 0 within the limit plus DRAIN_EXIT_MARGIN_S (the bound the manifests' stop timeouts
    are checked against)."""
    grace = 3.0
    registry = tmp_path / "registry"
    shutil.copytree(exported_registry, registry)
    server = start_server(registry, tmp_path / "work", "--role", "inference", "--grace-period-s", str(grace),
                          "--max-queue", "8192")
    images = photo_batch(256)
    outcomes: list[tuple[grpc.StatusCode, str]] = []
    lock = threading.Lock()
    sent = threading.Barrier(17)

    def call(index: int) -> None:
        # grpc shares one connection between channels with the same options; a distinct one opens its own
        distinct = index if connections == "one-per-call" else 0
        channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20),
                                                                ("headswap.test.connection", distinct)])
        server.channels.append(channel)
        stub = pb_grpc.InferenceStub(channel)
        future = stub.Classify.future(pb.ClassifyRequest(images=images, top_k=1), timeout=120)
        sent.wait()
        try:
            future.result()
            outcome = (grpc.StatusCode.OK, "")
        except grpc.RpcError as err:
            outcome = (err.code(), err.details() or "")
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    sent.wait()
    time.sleep(1.5)  # every call has arrived and is being decoded or classified
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=60)
    took = time.monotonic() - signalled
    for thread in threads:
        thread.join(60)
    log = server.log()
    print(f"exit {code} {took:.2f} s after SIGTERM (limit {grace} s + {DRAIN_EXIT_MARGIN_S} s); outcomes: "
          f"{sorted(c.name for c, _ in outcomes)}")
    assert code == 0, log[-3000:]
    # The bound the issue demands, plus a little for this test's own view of the process under load.
    assert took <= grace + DRAIN_EXIT_MARGIN_S + 0.5, log[-3000:]
    assert len(outcomes) == 16
    unavailable = [details for status, details in outcomes if status == grpc.StatusCode.UNAVAILABLE]
    assert unavailable, outcomes
    assert all("--grace-period-s" in details for details in unavailable), sorted(set(unavailable))
    assert {status for status, _ in outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes
    assert "Traceback" not in log
