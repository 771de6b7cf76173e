"""What the benchmarks share: a registry with the built-in model, and a real server subprocess."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BUILTIN = "builtin:efficientnet-lite0"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prepare_registry(work: Path, existing: Path | None) -> Path:
    """A private registry holding efficientnet-lite0: a copy of `existing`, or a fresh export."""
    model_dir = work / "registry"
    if existing:
        shutil.copytree(existing, model_dir)
    else:
        subprocess.run([sys.executable, "-m", "headswap.cli", "export", BUILTIN, "--model-dir", str(model_dir)],
                       check=True, capture_output=True)
    return model_dir


def start_server(model_dir: Path, work: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`headswap serve` on a free port, logging to work/server.log; returns once it is SERVING."""
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "headswap.cli", "serve", "--port", "0", "--metrics-port", "-1",
                                 "--http-port", "0", "--host", "127.0.0.1", "--model-dir", str(model_dir), "--work-dir", str(work), *args],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match = re.search(r"gRPC listening on port (\d+)", text)
        if match:
            port = int(match.group(1))
            stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, port
            except grpc.RpcError:
                pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{text}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def http_port(work: Path) -> int:
    """The REST port a server started by `start_server` in `work` reported (0 when off)."""
    match = re.search(r"REST on (\d+)", (work / "server.log").read_text(errors="replace"))
    return int(match.group(1)) if match else 0
