"""Hostile callers on the REST port: every case gets a clear status, the server keeps serving, no
traceback reaches the log and no memory stays held. Raw sockets, so that the bytes are exactly the
hostile ones (no client library would send them)."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import threading
import time

import pytest

from conftest import BUILTIN_NAME, start_server
from hostile import rss_mb

ARRIVAL_S = 2.0
MAX_MESSAGE = 4 << 20
IN_FLIGHT = 40 << 20
INFER = f"/v2/models/{BUILTIN_NAME}/infer"


@pytest.fixture(scope="module")
def rest_server(exported_registry, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile-rest")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    server = start_server(registry, work, "--request-arrival-timeout-s", str(ARRIVAL_S),
                          "--max-message-bytes", str(MAX_MESSAGE), "--max-connections", "64",
                          "--max-request-bytes-in-flight", str(IN_FLIGHT))
    yield server
    assert server.stop() == 0, server.log()[-3000:]  # a clean drain with the REST port open
    assert "Traceback" not in server.log()


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of one response (read to its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, json.loads(rest[:length]) if length else {}


def post(server, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    head = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    with connect(server) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\n".encode()
                     + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + body)
        status, _, answer = read_response(sock)
    return status, answer


def assert_serving(server) -> None:
    """Still answering, a real classification included, and nothing crashed."""
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 224 * 224 * 3}}]}).encode()
    status, answer = post(server, header + bytes(224 * 224 * 3), {"Inference-Header-Content-Length": len(header)})
    assert status == 200 and answer["outputs"][0]["shape"] == [1, 1000], answer
    assert "Traceback" not in server.log()
    assert server.proc.poll() is None


def pixels_header(**tensor) -> dict:
    return {"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8", **tensor}]}


BAD_BODIES = [
    ("malformed JSON", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("not an object", b"[1, 2, 3]", {}, 400, "JSON object"),
    ("deeply nested JSON", b"[" * 200_000 + b"]" * 200_000, {}, 400, "nested too deeply"),
    ("deeply nested data", json.dumps(pixels_header(data=json.loads("[" * 500 + "1" + "]" * 500))).encode(), {}, 400,
     "needs 150528 values"),
    ("data length disagrees with shape", json.dumps(pixels_header(data=list(range(10)))).encode(), {}, 400,
     "needs 150528 values"),
    ("strings as pixels", json.dumps(pixels_header(data=["a"] * 150528)).encode(), {}, 400, "must be numbers"),
    ("pixel out of range", json.dumps(pixels_header(data=[300] * 150528)).encode(), {}, 400, "0..255"),
    ("shape of strings", json.dumps(pixels_header(shape=["1"], data=[1])).encode(), {}, 400, "list of integers"),
    ("binary_data_size past the end", json.dumps(pixels_header(parameters={"binary_data_size": 150528})).encode()
     + bytes(1000), "header", 400, "runs past the end"),
    ("binary_data_size negative", json.dumps(pixels_header(parameters={"binary_data_size": -5})).encode(),
     "header", 400, "binary_data_size"),
    ("bytes left after the tensors", json.dumps(pixels_header(parameters={"binary_data_size": 150528})).encode()
     + bytes(150528 + 7), "header", 400, "7 bytes after the JSON header"),
    ("Inference-Header-Content-Length past the body", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"},
     400, "larger than the body"),
    ("Inference-Header-Content-Length cuts the JSON", b'{"inputs": []}', {"Inference-Header-Content-Length": "5"},
     400, "not valid JSON"),
    ("Inference-Header-Content-Length not a number", b'{"inputs": []}', {"Inference-Header-Content-Length": "-1"},
     400, "whole number"),
    ("BYTES length prefix past the end", json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                                  "parameters": {"binary_data_size": 8}}]}).encode()
     + struct.pack("<I", 1 << 30) + b"abcd", "header", 400, "claims 1073741824 bytes"),
    ("compressed body", b"{}", {"Content-Encoding": "gzip"}, 400, "Content-Encoding"),
]


@pytest.mark.parametrize("body, headers, status, words", [case[1:] for case in BAD_BODIES],
                         ids=[case[0] for case in BAD_BODIES])
def test_bad_bodies_get_400_with_a_reason(rest_server, body, headers, status, words):
    if headers == "header":  # the JSON part is everything up to the binary data
        text = body[:body.index(b"}]}") + 3]
        headers = {"Inference-Header-Content-Length": str(len(text))}
    got, answer = post(rest_server, body, headers)
    assert got == status and words in answer["error"], answer


def test_a_100_mb_array_is_refused_before_it_is_read(rest_server):
    before = rss_mb(rest_server.proc.pid)
    body = b'{"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "FP32", "data": [' + b"0.5," * (25 << 20)
    with connect(rest_server) as sock:  # declared: 413 from the headers alone, the connection closed
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) + 10}\r\n\r\n".encode()
                     + body[:1 << 20])
        status, headers, answer = read_response(sock)
        assert status == 413 and "--max-message-bytes" in answer["error"] and headers["connection"] == "close"
    with connect(rest_server) as sock:  # chunked, never declared: cut once it passes the limit
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        sent = 0
        try:
            while sent < len(body):
                piece = body[sent:sent + (1 << 20)]
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent += len(piece)
        except OSError:
            pass  # the server stopped reading: expected
        status, _, answer = read_response(sock)
        assert status == 413 and "--max-message-bytes" in answer["error"]
        assert sent < len(body)
    assert rss_mb(rest_server.proc.pid) - before < 150
    assert_serving(rest_server)


def timed_refusal(server, first: bytes, drip: bytes, every_s: float = 0.3) -> tuple[int, dict, float]:
    """Send `first`, then one byte of `drip` every `every_s` until the server answers."""
    started = time.monotonic()
    with connect(server) as sock:
        sock.sendall(first)
        stop = threading.Event()

        def dripping() -> None:
            for byte in drip:
                if stop.wait(every_s):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        thread = threading.Thread(target=dripping, daemon=True)
        thread.start()
        try:
            status, _, answer = read_response(sock)
        finally:
            stop.set()
            thread.join()
    return status, answer, time.monotonic() - started


def test_slowloris_on_headers_and_body_and_endless_chunks_get_408(rest_server):
    cases = {
        "headers": (f"POST {INFER} HTTP/1.1\r\nHost: x\r\n".encode(), b"X-Slow: " + b"a" * 1000),
        "body": (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode(), b"0" * 5000),
        "chunked body that never ends": (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                         .encode(), b"1\r\na\r\n" * 1000),
        "Content-Length past the body": (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{}}".encode(),
                                         b""),
    }
    for name, (first, drip) in cases.items():
        status, answer, took = timed_refusal(rest_server, first, drip)
        assert status == 408 and "--request-arrival-timeout-s" in answer["error"], (name, answer)
        assert ARRIVAL_S - 0.1 < took < ARRIVAL_S + 3, (name, took)
    assert_serving(rest_server)


def test_too_many_headers_and_oversized_headers_get_431(rest_server):
    for headers in ("".join(f"X-H{i}: v\r\n" for i in range(10_000)), f"X-Big: {'a' * 100_000}\r\n"):
        with connect(rest_server) as sock:
            try:
                sock.sendall(f"GET /v2 HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
            except OSError:
                pass  # closed while we were still sending
            status, _, answer = read_response(sock)
            assert status == 431 and "--http-max-header" in answer["error"], answer
    assert_serving(rest_server)


def test_garbage_and_a_body_longer_than_its_content_length(rest_server):
    with connect(rest_server) as sock:
        sock.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        status, headers, answer = read_response(sock)
        assert status == 400 and "malformed HTTP" in answer["error"] and headers["connection"] == "close"
    with connect(rest_server) as sock:  # the extra bytes are not a request: 400, then closed
        body = b'{"inputs": []}'
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n".encode() + body)
        first, _, _ = read_response(sock)
        assert first == 400
    assert_serving(rest_server)


def test_json_bodies_in_flight_are_bounded(rest_server):
    """A declared 3 MiB JSON body holds 8 x 3 MiB of --max-request-bytes-in-flight (40 MiB here) while
    it arrives: a second one does not fit (429); once the first is gone, it does."""
    size = 3 << 20
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
    with connect(rest_server) as first:
        first.sendall(head + b"[" * 10)
        time.sleep(0.3)
        with connect(rest_server) as second:
            second.sendall(head + b"[" * 10)
            status, _, answer = read_response(second)
            assert status == 429 and "--max-request-bytes-in-flight" in answer["error"], answer
    time.sleep(0.3)
    status, answer = post(rest_server, b"[" * 100 + b" " * size)
    assert status == 400 and "not valid JSON" in answer["error"], answer  # admitted now, and read
    assert_serving(rest_server)


def test_connections_past_the_bound_are_closed_and_the_rest_serve(rest_server):
    sockets = [connect(rest_server) for _ in range(80)]
    try:
        closed = 0
        for sock in sockets:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except (TimeoutError, socket.timeout):
                pass
            except ConnectionResetError:
                closed += 1
        assert 10 <= closed <= 80 - 50, closed  # over --max-connections (64, gRPC's health checks aside)
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(0.5)
    assert_serving(rest_server)
