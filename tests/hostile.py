"""What the hostile-caller tests and the fuzz suite share: server process figures, attack payloads."""

from __future__ import annotations

import functools
import io
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

CLOCK_TICKS = 100  # os.sysconf("SC_CLK_TCK") on Linux


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return response.read().decode()


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 40)).save(buffer, "PNG")
    return buffer.getvalue()


@functools.lru_cache(maxsize=2)
def big_png(side: int = 6000) -> bytes:
    """A side x side RGB PNG (36 Mpx at 6000) that is small on the wire (~0.8 MB) and slow to decode."""
    ramp = (np.add.outer(np.arange(side), np.arange(side)) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([ramp, ramp[::-1], ramp.T], axis=-1)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def raw_call(channel: grpc.Channel, method: str, body: bytes, timeout: float = 30) -> grpc.StatusCode:
    """Send raw bytes as a unary request body (no protobuf on this side); the status code answered."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        call(body, timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()

def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    """The status a call ends with (OK when it returns)."""
    try:
        call(*args, **kwargs)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def wait_until(condition, timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
