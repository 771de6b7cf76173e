"""Shared fixtures: a registry holding the real built-in model, and real server processes.

The server always runs as a subprocess (`python -m headswap.cli serve`) on a free port and is
called with real gRPC clients, as production callers would.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BUILTIN = "builtin:efficientnet-lite0"
BUILTIN_NAME = "efficientnet-lite0"
# Servers started by tests take a free REST port unless a test names one (the default, 8080, may be
# taken, and servers run side by side).
os.environ.setdefault("HEADSWAP_HTTP_PORT", "0")


def encode(array: np.ndarray, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photos that ship with scikit-image, encoded as a client would send them."""
    from skimage import data

    return {"chelsea": encode(data.chelsea(), "PNG"), "coffee": encode(data.coffee(), "JPEG", quality=95),
            "rocket": encode(data.rocket(), "JPEG", quality=95), "astronaut": encode(data.astronaut(), "WEBP")}


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "headswap.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"headswap {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def exported_registry(tmp_path_factory) -> Path:
    """A registry with the built-in EfficientNet-Lite0 exported once for the whole session."""
    root = tmp_path_factory.mktemp("registry-base")
    run_cli("export", BUILTIN, "--model-dir", str(root))
    return root


@pytest.fixture
def registry_copy(exported_registry, tmp_path) -> Path:
    """A private copy of the exported registry that a test may change freely."""
    target = tmp_path / "registry"
    shutil.copytree(exported_registry, target)
    return target


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    log_path: Path
    port: int = 0
    metrics_port: int = 0
    http_port: int = 0
    channels: list = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_target(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.target, options=[("grpc.max_send_message_length", 256 << 20),
                                                              ("grpc.max_receive_message_length", 256 << 20)])
        self.channels.append(channel)
        return channel

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not self.port:
            match = re.search(r"gRPC listening on port (\d+), metrics on (\d+|off)(?:, REST on (\d+|off))?", self.log())
            if match:
                self.port = int(match.group(1))
                self.metrics_port = int(match.group(2)) if match.group(2).isdigit() else 0
                self.http_port = int(match.group(3)) if (match.group(3) or "").isdigit() else 0
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{self.log()}")
            time.sleep(0.1)
        stub = health_pb2_grpc.HealthStub(self.channel())
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server never became SERVING:\n{self.log()}")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        for channel in self.channels:
            channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                raise AssertionError(f"server ignored signal {sig}:\n{self.log()}") from None
        return self.proc.returncode


def start_server(model_dir: Path, work_dir: Path, *args: str, env: dict | None = None,
                 wait: bool = True) -> ServerProcess:
    """Start `headswap serve` on free ports, logs to a file in work_dir."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / f"server-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "headswap.cli", "serve", "--port", "0", "--metrics-port", "0",
               "--host", "127.0.0.1", "--model-dir", str(model_dir), "--work-dir", str(work_dir),
               "--threads", "2", *args]
    # Most test servers never train: their warm training worker (5 s of CPU, 0.4 GB) starts with
    # their first FineTune instead of at start. Tests of the default pass it explicitly.
    defaults = {"PYTHONUNBUFFERED": "1", "HEADSWAP_TRAINER_WARM_START": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **defaults, **(env or {})})
    server = ServerProcess(proc, log_path)
    if wait:
        server.wait_ready()
    return server


@pytest.fixture
def server_factory(tmp_path) -> Iterator:
    """Start servers for one test; all are stopped at its end."""
    started: list[ServerProcess] = []

    def factory(model_dir: Path, *args: str, **kwargs) -> ServerProcess:
        server = start_server(model_dir, tmp_path / f"work{len(started)}", *args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="session")
def shared_server(exported_registry, tmp_path_factory) -> Iterator[ServerProcess]:
    """One read-only server for the tests that only classify."""
    work = tmp_path_factory.mktemp("shared-server")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    server = start_server(registry, work)
    yield server
    server.stop()


@pytest.fixture
def client(shared_server):
    """A tritonclient gRPC client (KServe V2) on the shared server."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url=shared_server.target)
    yield client
    client.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian's package) for the session, in a temporary directory."""
    from postgres import remove, start_postgres

    server = start_postgres()
    yield server
    remove(server)
