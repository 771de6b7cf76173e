"""Issue 8, the serving half: what hostile or careless callers did to the server, tried again.

Each test starts a real server and attacks it the way the issue describes, over real gRPC; each
would fail on the code before the fix (noted per test). KServe calls use tritonclient's own
protobuf modules (this process must not import headswap.protocol.kserve_v2_pb2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import BUILTIN_NAME
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from hostile import big_png, code_of, cpu_seconds, metrics_text, raw_call, rss_mb, tiny_png, wait_until

ESPRESSO = 967
# For tests that send requests past the default --max-message-bytes (16 MiB).
LARGE_MESSAGES = ("--max-message-bytes", str(64 * 2**20))
SERVING = health_pb2.HealthCheckResponse.SERVING


def classify(server, images, timeout=120, **kwargs) -> pb.ClassifyResponse:
    return pb_grpc.InferenceStub(server.channel()).Classify(pb.ClassifyRequest(images=images, **kwargs),
                                                            timeout=timeout)


def refused_while_held(server, image: bytes) -> grpc.RpcError | None:
    """Classify `image` every 50 ms (up to 5 s) until the server refuses it with RESOURCE_EXHAUSTED,
    as it does once a slow call holds the slot; that refusal, or None."""
    for _ in range(100):
        time.sleep(0.05)
        try:
            classify(server, [image], top_k=1)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return err
    return None


def assert_clean_log(server) -> None:
    log = server.log()
    assert "Traceback" not in log and "crashed" not in log, log[-3000:]


# --- item 1: one small request must not take gigabytes ------------------------------------------

def test_many_tiny_images_go_in_bounded_chunks_and_memory_stays_flat(server_factory, registry_copy, photos):
    """Before: 256 x 1x1 PNG in one Classify took the server from 163 MB to 3.4 GB (one ORT batch of 256)."""
    # 38.5 MB KServe requests: past the default --max-message-bytes (16 MiB), allowed here
    server = server_factory(registry_copy, "--max-batch-size", "8", *LARGE_MESSAGES)
    for _ in range(10):  # steady state: ordinary traffic, the arena at its usual batches
        classify(server, [photos["coffee"]] * 8, top_k=1)
    steady = rss_mb(server.proc.pid)
    tiny = tiny_png()
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(server.channel())
    pixels = np.zeros((256, 224, 224, 3), dtype=np.uint8).tobytes()
    peak = steady
    for round_ in range(6):
        response = classify(server, [tiny] * 256, top_k=1)
        assert len(response.results) == 256
        infer = service_pb2.ModelInferRequest(model_name=BUILTIN_NAME, raw_input_contents=[pixels], inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[256, 224, 224, 3])])
        assert len(kserve.ModelInfer(infer, timeout=120).raw_output_contents[0]) == 256 * 1000 * 4
        peak = max(peak, rss_mb(server.proc.pid))
    final = rss_mb(server.proc.pid)
    assert final - steady < 150, f"resident memory went from {steady:.0f} MB to {final:.0f} MB (peak {peak:.0f})"
    # No ONNX Runtime call ever saw more than --max-batch-size images.
    text = metrics_text(server.metrics_port)
    le8 = sum(float(v) for v in re.findall(r'headswap_batch_size_bucket\{le="8\.0",model="[^"]+"\} (\S+)', text))
    total = sum(float(v) for v in re.findall(r'headswap_batch_size_count\{model="[^"]+"\} (\S+)', text))
    assert total > 0 and le8 == total, f"{total - le8} batches larger than 8"
    assert_clean_log(server)


def test_request_pixel_budget_is_checked_from_headers(server_factory, registry_copy, photos):
    """Before: no per-request pixel bound (only per image)."""
    server = server_factory(registry_copy, "--max-request-pixels", "40000000")
    with pytest.raises(grpc.RpcError) as err:
        classify(server, [big_png()] * 2, top_k=1)  # 72 Mpx in all
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "72000000" in err.value.details() and "40000000" in err.value.details()
    assert classify(server, [photos["coffee"]], top_k=1).results[0].predictions[0].index == ESPRESSO


def test_concurrent_inference_calls_are_bounded(server_factory, registry_copy, photos):
    """Before: no admission bound; inference calls could take every gRPC worker thread."""
    server = server_factory(registry_copy, "--max-inference-calls", "1", "--max-request-pixels", "400000000")
    errors: list[grpc.StatusCode] = []
    slow = threading.Thread(target=lambda: errors.append(code_of(classify, server, [big_png()] * 6, top_k=1)))
    slow.start()
    try:
        refused = refused_while_held(server, photos["coffee"])  # once the slow call holds the only slot
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        health = health_pb2_grpc.HealthStub(server.channel())
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
    finally:
        slow.join(120)
    assert errors == [grpc.StatusCode.OK]
    assert_clean_log(server)


def test_one_caller_cannot_take_every_inference_slot(server_factory, registry_copy, photos):
    """Before: one caller could hold every --max-inference-calls slot, and every other caller was
    refused. Now a caller (a credential; without authentication, as here, a client address) holds
    at most --max-inference-calls-per-caller of them."""
    server = server_factory(registry_copy, "--host", "[::]", "--max-inference-calls", "4",
                            "--max-inference-calls-per-caller", "1", "--max-request-pixels", "400000000")
    other_address = grpc.insecure_channel(f"[::1]:{server.port}")  # the first caller uses 127.0.0.1
    errors: list[grpc.StatusCode] = []
    slow = threading.Thread(target=lambda: errors.append(code_of(classify, server, [big_png()] * 6, top_k=1)))
    slow.start()
    try:
        refused = refused_while_held(server, photos["coffee"])  # once the slow call holds its caller's only slot
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "--max-inference-calls-per-caller" in refused.details(), refused.details()
        answer = pb_grpc.InferenceStub(other_address).Classify(
            pb.ClassifyRequest(images=[photos["coffee"]], top_k=1), timeout=30)
        assert answer.results[0].predictions[0].index == ESPRESSO
        assert slow.is_alive(), "the slow call ended before the other caller was served: nothing was shown"
    finally:
        slow.join(120)
        other_address.close()
    assert errors == [grpc.StatusCode.OK]
    assert_clean_log(server)


# --- item 3: decoding respects deadlines, cancellation and the SIGTERM grace period -------------

def test_decoding_stops_soon_after_the_deadline(server_factory, registry_copy):
    """Before: 48 x 36 Mpx with a 3 s deadline kept both cores busy for 17 s."""
    # 24 large PNGs are 19 MB: past the default --max-message-bytes (16 MiB), allowed here
    server = server_factory(registry_copy, "--max-request-pixels", "2000000000", *LARGE_MESSAGES)
    pid = server.proc.pid
    with pytest.raises(grpc.RpcError) as err:
        classify(server, [big_png()] * 24, timeout=1.5, top_k=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.5)  # about one large decode after the deadline, plus slack for a busy machine
    before = cpu_seconds(pid)
    time.sleep(2.0)
    used = cpu_seconds(pid) - before
    assert used < 0.5, f"the server still used {used:.2f} CPU-seconds over 2 s after the caller's deadline"
    assert_clean_log(server)


def test_cancelled_call_stops_decoding(server_factory, registry_copy):
    """Before: a cancelled call decoded on to the end."""
    server = server_factory(registry_copy, "--max-request-pixels", "2000000000", *LARGE_MESSAGES)
    stub = pb_grpc.InferenceStub(server.channel())
    future = stub.Classify.future(pb.ClassifyRequest(images=[big_png()] * 24, top_k=1), timeout=120)
    time.sleep(1.5)
    assert not future.done(), "the request was answered before it could be cancelled"
    future.cancel()
    time.sleep(1.5)
    before = cpu_seconds(server.proc.pid)
    time.sleep(2.0)
    used = cpu_seconds(server.proc.pid) - before
    assert used < 0.5, f"the server still used {used:.2f} CPU-seconds over 2 s after the call was cancelled"
    assert_clean_log(server)


def test_sigterm_drain_respects_the_grace_period(server_factory, registry_copy):
    """Before: SIGTERM with a large request in flight took 15 s against a 10 s grace period."""
    server = server_factory(registry_copy, "--max-request-pixels", "2000000000", "--grace-period-s", "1",
                            *LARGE_MESSAGES)
    stub = pb_grpc.InferenceStub(server.channel())
    future = stub.Classify.future(pb.ClassifyRequest(images=[big_png()] * 40, top_k=1), timeout=300)
    time.sleep(1.5)
    assert not future.done(), "the request was answered before the server was stopped"
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(60)
    took = time.monotonic() - started
    assert code == 0
    assert took < 1 + 5, f"exit took {took:.1f} s with a 1 s grace period"
    with pytest.raises(grpc.RpcError):
        future.result()


# --- item 4: one model-name rule at every API -------------------------------------------------

BAD_NAMES = ["../../etc/passwd", "/etc/passwd", "..", ".", "efficientnet\x00lite0", "x" * 300,
             "efficientnet-lite0/", "./efficientnet-lite0", "efficientnet-lite0/1/..", "EfficientNet-Lite0",
             "efficientnet-lite0\n", " efficientnet-lite0"]
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def test_model_names_outside_the_rule_are_refused_everywhere(server_factory, registry_copy, photos):
    """Before: INTERNAL plus a traceback for ../../etc/passwd, NUL, 300 characters; aliases
    (efficientnet-lite0/, ./efficientnet-lite0, the absolute path) loaded as separate models."""
    server = server_factory(registry_copy)
    channel = server.channel()
    inference, models = pb_grpc.InferenceStub(channel), pb_grpc.ModelsStub(channel)
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    image = service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    for name in BAD_NAMES + [str(registry_copy / BUILTIN_NAME)]:
        calls = {
            "Classify": lambda: inference.Classify(pb.ClassifyRequest(images=[photos["coffee"]], model=name), timeout=30),
            "GetModel": lambda: models.GetModel(pb.GetModelRequest(name=name), timeout=30),
            "ActivateModel": lambda: models.ActivateModel(pb.ActivateModelRequest(name=name, version=1), timeout=30),
            "RollbackModel": lambda: models.RollbackModel(pb.RollbackModelRequest(name=name), timeout=30),
            "ModelInfer": lambda: kserve.ModelInfer(service_pb2.ModelInferRequest(
                model_name=name, inputs=[image], raw_input_contents=[len(photos["coffee"]).to_bytes(4, "little")
                                                                     + photos["coffee"]]), timeout=30),
            "ModelMetadata": lambda: kserve.ModelMetadata(service_pb2.ModelMetadataRequest(name=name), timeout=30),
            "RepositoryModelLoad": lambda: kserve.RepositoryModelLoad(
                service_pb2.RepositoryModelLoadRequest(model_name=name), timeout=30),
        }
        for method, call in calls.items():
            code = code_of(call)
            assert code in REFUSED, f"{method}({name[:40]!r}) answered {code}"
        ready = kserve.ModelReady(service_pb2.ModelReadyRequest(name=name), timeout=30)
        assert not ready.ready
        assert code_of(health.Check, health_pb2.HealthCheckRequest(service=name), timeout=5) == \
            grpc.StatusCode.NOT_FOUND
    # The real model was loaded once and still serves; nothing else was ever loaded.
    assert classify(server, [photos["coffee"]], top_k=1).results[0].predictions[0].index == ESPRESSO
    assert health.Check(health_pb2.HealthCheckRequest(service=BUILTIN_NAME), timeout=5).status == SERVING
    log = server.log()
    assert len(re.findall(r"loaded \S+ version", log)) == 1, log[-3000:]
    assert_clean_log(server)


# --- item 5: metric labels only from registry models ------------------------------------------

def test_unknown_model_names_share_one_metric_label(server_factory, registry_copy, photos):
    """Before: 40,000 unique names grew /metrics from 8 KB to 113 MB."""
    server = server_factory(registry_copy)
    inference = pb_grpc.InferenceStub(server.channel())
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(server.channel())
    classify(server, [photos["coffee"]], top_k=1)
    tiny = tiny_png()
    before = len(metrics_text(server.metrics_port))
    for i in range(1500):
        code = code_of(inference.Classify, pb.ClassifyRequest(images=[tiny], model=f"no-such-model-{i}"), timeout=10)
        assert code == grpc.StatusCode.NOT_FOUND
        code = code_of(kserve.ModelMetadata, service_pb2.ModelMetadataRequest(name=f"nope-{i}"), timeout=10)
        assert code == grpc.StatusCode.NOT_FOUND
    text = metrics_text(server.metrics_port)
    assert "no-such-model-" not in text and "nope-" not in text
    assert 'model="_unknown"' in text and f'model="{BUILTIN_NAME}"' in text
    assert len(text) < before + 20_000, f"/metrics grew from {before} to {len(text)} bytes"


# --- item 10 on the inference side: versions and bodies no caller can turn into INTERNAL -------

def _threads(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Threads:")).split()[1])


def test_idle_connections_to_the_metrics_port_are_bounded_and_timed_out(server_factory, registry_copy):
    """prometheus_client's own server gave each connection a thread for ever: 3,000 idle sockets, 3,000 threads."""
    server = server_factory(registry_copy, "--metrics-max-connections", "4", "--metrics-timeout-s", "1")
    assert "headswap_requests_total" in metrics_text(server.metrics_port)
    before = _threads(server.proc.pid)
    idle = [socket.create_connection(("127.0.0.1", server.metrics_port)) for _ in range(300)]
    time.sleep(0.5)
    assert _threads(server.proc.pid) <= before + 4, "each idle connection holds a thread"
    for sock in idle:  # every one is closed by the server: past the bound at once, the rest after 1 s
        sock.settimeout(10)
        assert sock.recv(1) == b""
        sock.close()
    assert "headswap_requests_total" in metrics_text(server.metrics_port)
    deadline = time.monotonic() + 10
    while _threads(server.proc.pid) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _threads(server.proc.pid) <= before, "the metrics threads did not end"
    assert_clean_log(server)


def test_slow_drip_connections_to_the_metrics_port_are_closed_on_time(server_factory, registry_copy):
    """Before: the timeout was per read, so clients sending a byte every half second kept all the
    slots and every scrape was refused, for as long as they kept dripping."""
    server = server_factory(registry_copy, "--metrics-max-connections", "4", "--metrics-timeout-s", "2")
    drippers = [socket.create_connection(("127.0.0.1", server.metrics_port)) for _ in range(4)]
    stop = threading.Event()
    closed: list[float] = []
    started = time.monotonic()

    def drip(sock: socket.socket) -> None:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
        try:
            for byte in request:
                if stop.wait(0.5):
                    return
                sock.sendall(bytes([byte]))
        except OSError:  # closed by the server
            closed.append(time.monotonic() - started)

    threads = [threading.Thread(target=drip, args=(sock,), daemon=True) for sock in drippers]
    for thread in threads:
        thread.start()
    time.sleep(3.5)  # past the timeout, the drippers still dripping
    assert "headswap_requests_total" in metrics_text(server.metrics_port)
    for thread in threads:
        thread.join(timeout=10)
    stop.set()
    assert len(closed) == 4 and max(closed) < 6, closed
    for sock in drippers:
        sock.close()
    assert_clean_log(server)


def _open_files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_client_connections_are_bounded_and_timed_out(server_factory, registry_copy):
    """Before: no bound on connections, and one that sent nothing was kept for grpc's default 120 s
    handshake timeout: 19,000 such connections held 19,000 file descriptors (of a 20,000 limit)
    and 400 MB; connections with no call open were kept for 5 minutes."""
    server = server_factory(registry_copy, "--max-connections", "20", "--handshake-timeout-s", "2",
                            "--connection-idle-timeout-s", "3", "--health-port", "0")
    ask = health_pb2.HealthCheckRequest()
    kept = health_pb2_grpc.HealthStub(server.channel())
    assert kept.Check(ask, timeout=5).status == SERVING  # a client connected before the flood
    pid = server.proc.pid
    time.sleep(0.5)
    before = _open_files(pid)
    flood = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    time.sleep(0.5)
    assert _open_files(pid) <= before + 20, "connections past --max-connections were kept"
    assert kept.Check(ask, timeout=5).status == SERVING  # its connection keeps working
    # The kubelet's probes (k8s/: the health port) open a new connection each time: the flood on the
    # gRPC port does not reach them, so it cannot fail a liveness probe and get the pod restarted.
    probe = grpc.insecure_channel(f"127.0.0.1:{health_port_of(server)}")
    assert health_pb2_grpc.HealthStub(probe).Check(ask, timeout=5).status == SERVING
    probe.close()
    for sock in flood:  # every one is closed by the server: past the bound at once, the rest after 2 s
        sock.settimeout(15)
        while sock.recv(4096):  # the server's HTTP/2 settings, then the end (a timeout fails the test)
            pass
        sock.close()
    channels = [grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(10)]
    for channel in channels:  # new clients are served again
        assert health_pb2_grpc.HealthStub(channel).Check(ask, timeout=5).status == SERVING
    deadline = time.monotonic() + 30  # their connections, idle now, are closed after 3 s (grpc adds jitter)
    while _open_files(pid) > before - 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _open_files(pid) <= before - 1, "idle connections were kept past --connection-idle-timeout-s"
    assert health_pb2_grpc.HealthStub(channels[0]).Check(ask, timeout=5).status == SERVING  # reconnects
    assert_clean_log(server)


def idle_reflection_stream(channel: grpc.Channel, release: threading.Event, timeout: float = 90):
    """A reflection stream that asks once, then stays open sending nothing until `release` is set."""

    def idle():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(60)

    return reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(idle(), timeout=timeout)


def test_idle_reflection_streams_are_bounded(server_factory, registry_copy):
    """grpcio-reflection's streams each hold a pool thread: 300 idle ones took every thread, and
    health checks and ListModels timed out."""
    server = server_factory(registry_copy, "--max-reflection-streams", "2")
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    release = threading.Event()
    held = [idle_reflection_stream(server.channel(), release) for _ in range(2)]
    for stream in held:
        assert next(stream).list_services_response.service  # admitted and answered
    for _ in range(50):
        with pytest.raises(grpc.RpcError) as err:
            next(stub.ServerReflectionInfo(iter([ask]), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-reflection-streams" in err.value.details()
    health = health_pb2_grpc.HealthStub(server.channel())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
    assert pb_grpc.ModelsStub(server.channel()).ListModels(pb.ListModelsRequest(), timeout=2).models
    release.set()
    for stream in held:
        assert list(stream) == []  # ended by the caller, cleanly
    deadline = time.monotonic() + 10
    while True:  # the slots are free again
        try:
            assert next(stub.ServerReflectionInfo(iter([ask]), timeout=10)).list_services_response.service
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.1)
    assert_clean_log(server)


def stalled_calls(channel: grpc.Channel, methods: list[str], release: threading.Event) -> list[grpc.Future]:
    """Calls that send their headers and then nothing (no request message): each method once."""

    def nothing():
        release.wait(120)
        return
        yield

    return [channel.stream_unary(method, request_serializer=None, response_deserializer=None).future(
        nothing(), timeout=120) for method in methods]


def test_handler_threads_of_a_burst_retire_when_idle(server_factory, registry_copy, photos):
    """Before: the gRPC handler pool (a thread for every admitted call) never ended a thread, so one
    burst of 120 slow calls left the process 120 threads for good. Now a thread idle for
    --idle-thread-timeout-s exits, and calls after that start threads again."""
    server = server_factory(registry_copy, "--request-arrival-timeout-s", "3", "--max-waiting-calls-per-client",
                            "150", "--idle-thread-timeout-s", "2")
    pid = server.proc.pid
    assert classify(server, [photos["coffee"]], top_k=1, timeout=30).results[0].predictions[0].index == ESPRESSO
    before = _threads(pid)
    release = threading.Event()
    held = stalled_calls(server.channel(), ["/headswap.v1.Models/ListModels"] * 120, release)
    assert wait_until(lambda: _threads(pid) >= before + 100, 10), (before, _threads(pid))
    for call in held:  # each ends at the arrival timeout, and gives its thread back
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    release.set()
    assert wait_until(lambda: _threads(pid) <= before + 4, 15), f"{_threads(pid)} threads, {before} before the burst"
    assert classify(server, [photos["coffee"]], top_k=1, timeout=30).results[0].predictions[0].index == ESPRESSO
    assert health_pb2_grpc.HealthStub(server.channel()).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=3).status == SERVING


def health_port_of(server) -> int:
    deadline = time.monotonic() + 30
    while not (match := re.search(r"health port (\d+)", server.log())):
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.1)
    return int(match[1])


def test_calls_that_never_send_their_message_are_bounded(server_factory, registry_copy, photos):
    """Before: grpc's sync server gave each unary call a thread as soon as its headers came, and
    the thread waited for the message with no timeout: 300 calls that sent headers and nothing
    else (health Check will do, no credentials needed) took all 188 threads, and health checks
    timed out; on the health port, 2 such calls were enough."""
    server = server_factory(registry_copy, "--request-arrival-timeout-s", "6", "--max-waiting-calls-per-client",
                            "251", "--health-port", "0")
    health_port = health_port_of(server)
    methods = ["/grpc.health.v1.Health/Check", "/inference.GRPCInferenceService/ModelInfer",
               "/headswap.v1.Inference/Classify", "/headswap.v1.Models/ListModels", "/grpc.health.v1.Health/Watch"]
    release = threading.Event()
    started = time.monotonic()
    held = stalled_calls(server.channel(), (methods * 50)[:250], release)
    health_channel = grpc.insecure_channel(f"127.0.0.1:{health_port}")
    held_health = stalled_calls(health_channel, ["/grpc.health.v1.Health/Check"] * 40, release)
    time.sleep(1)  # every stalled call has reached the server
    # Others are still answered, from the same address too (one waiting slot is left for them).
    assert health_pb2_grpc.HealthStub(server.channel()).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=3).status == SERVING
    assert health_pb2_grpc.HealthStub(health_channel).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=3).status == SERVING
    assert classify(server, [photos["coffee"]], top_k=1, timeout=10).results[0].predictions[0].index == ESPRESSO
    # One address cannot wait on more calls than its limit.
    held += stalled_calls(server.channel(), ["/headswap.v1.Models/ListModels"], release)
    time.sleep(0.5)
    refused = stalled_calls(server.channel(), ["/grpc.health.v1.Health/Check"] * 3, release)
    for call in refused:
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-waiting-calls-per-client" in err.value.details()
    # Every stalled call ends after the arrival timeout, with a status saying why.
    for call in held + held_health:
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=60)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--request-arrival-timeout-s" in err.value.details()
    assert time.monotonic() - started < 30
    release.set()
    assert health_pb2_grpc.HealthStub(server.channel()).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=3).status == SERVING
    # A single-request method still wants its message: a call that closes without one is refused.
    with pytest.raises(grpc.RpcError) as err:
        server.channel().stream_unary("/headswap.v1.Models/ListModels", request_serializer=None,
                                      response_deserializer=None)(iter([]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one" in err.value.details()
    assert_clean_log(server)


def test_request_bytes_being_handled_are_bounded(server_factory, registry_copy):
    """Before: nothing bounded the request bytes held at once but the call count: 32 concurrent
    60 MB requests took the server from 190 MB to 1.9 GB resident (the pod's limit is 1.5 GiB)."""
    server = server_factory(registry_copy, "--max-request-bytes-in-flight", str(100 * 2**20))
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(server.channel())
    pixels = np.random.default_rng(0).integers(0, 256, (60, 224, 224, 3), dtype=np.uint8).tobytes()  # 9 MB

    def infer() -> grpc.StatusCode | service_pb2.ModelInferResponse:
        request = service_pb2.ModelInferRequest(model_name=BUILTIN_NAME, raw_input_contents=[pixels], inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[60, 224, 224, 3])])
        try:
            return kserve.ModelInfer(request, timeout=120)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "--max-request-bytes-in-flight" in err.details() and "MiB" in err.details(), err.details()
            return err.code()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: infer(), range(16)))  # 144 MB at once against a 100 MiB budget
    answered = [a for a in answers if not isinstance(a, grpc.StatusCode)]
    assert answered and len(answered) < 16, f"{len(answered)} of 16 answered"
    assert all(len(a.raw_output_contents[0]) == 60 * 1000 * 4 for a in answered)
    assert not isinstance(infer(), grpc.StatusCode)  # the budget is given back
    assert_clean_log(server)


def test_health_watch_streams_are_bounded(server_factory, registry_copy):
    """Before: health is open to every caller and each Watch stream held a thread (the interceptors'
    wrappers left grpc's health servicer in its blocking mode): 300 Watch streams took every thread
    and health checks timed out; on the health port, 16 filled its call limit."""
    server = server_factory(registry_copy, "--max-health-watchers", "3", "--health-port", "0")
    channels = [server.channel(), grpc.insecure_channel(f"127.0.0.1:{health_port_of(server)}")]
    ask = health_pb2.HealthCheckRequest()
    for channel in channels:
        health = health_pb2_grpc.HealthStub(channel)
        held = [health.Watch(ask, timeout=60) for _ in range(3)]
        for stream in held:
            assert next(stream).status == SERVING
        for _ in range(30):
            with pytest.raises(grpc.RpcError) as err:
                next(health.Watch(ask, timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-health-watchers" in err.value.details()
        assert health.Check(ask, timeout=3).status == SERVING
        for stream in held:
            stream.cancel()
        deadline = time.monotonic() + 10
        while True:  # the slots are free again
            try:
                assert next(health.Watch(ask, timeout=10)).status == SERVING
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
    assert_clean_log(server)


def test_a_flood_of_bad_calls_cannot_flood_the_log(server_factory, registry_copy, tmp_path, photos):
    """Before: every refused or failed call wrote a log line (up to 2 KB) and every refusal an audit
    line, so a caller could fill the disk, or push the audit trail out of a rotated log, at will."""
    token = "flood-test-token"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps([{"name": "reader", "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                                   "scopes": ["classify"]}]))
    server = server_factory(registry_copy, "--log-refusals-per-minute", "5", "--auth-tokens-file", str(tokens))
    channel = server.channel()
    stub = pb_grpc.InferenceStub(channel)
    bearer = [("authorization", f"Bearer {token}")]
    raw_classify = channel.unary_unary("/headswap.v1.Inference/Classify", request_serializer=None,
                                       response_deserializer=None)
    for _ in range(200):
        assert code_of(stub.Classify, pb.ClassifyRequest(images=[b"x"]), timeout=10) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert code_of(stub.Classify, pb.ClassifyRequest(images=[photos["coffee"]], model="no-such-model"),
                       metadata=bearer, timeout=10) == grpc.StatusCode.NOT_FOUND
        assert code_of(raw_classify, b"\xff\xff\xff\xff", metadata=bearer, timeout=10) == \
            grpc.StatusCode.INVALID_ARGUMENT  # not protobuf
    log = server.log()
    for marker in ("result=UNAUTHENTICATED", "Classify failed", "Classify refused"):
        lines = [line for line in log.splitlines() if marker in line]
        assert 1 <= len(lines) <= 5, (marker, len(lines))
        assert "--log-refusals-per-minute" in lines[-1], lines[-1]
    text = metrics_text(server.metrics_port)  # the metric counts every call, logged or not
    for code in ("UNAUTHENTICATED", "NOT_FOUND", "INVALID_ARGUMENT"):
        counted = re.search(rf'headswap_requests_total{{code="{code}",method="Classify",[^}}]*}} (\S+)', text)
        assert counted and float(counted[1]) == 200, (code, counted)
    # What the caller may do is still answered and logged as before.
    response = stub.Classify(pb.ClassifyRequest(images=[photos["coffee"]], top_k=1), metadata=bearer, timeout=30)
    assert response.results[0].predictions[0].index == ESPRESSO
    assert_clean_log(server)


def test_log_throttle_says_how_many_lines_it_left_out(monkeypatch):
    """The minute after a flood, the first line of its kind carries the count of lines left out."""
    from headswap import logs

    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    throttle = logs.Throttle(per_minute=3)

    def record(key: str | None) -> logging.LogRecord:
        made = logging.LogRecord("t", logging.INFO, __file__, 1, "Classify failed: %s", ("no model",), None)
        if key is not None:
            made.throttle = key
        return made

    passed = [throttle.filter(record("Classify NOT_FOUND")) for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert throttle.filter(record("Classify INVALID_ARGUMENT"))  # another kind has its own budget
    assert all(throttle.filter(record(None)) for _ in range(10))  # lines callers cannot cause pass
    clock[0] += 61
    first = record("Classify NOT_FOUND")
    assert throttle.filter(first)
    assert "7 more lines like this were left out" in first.getMessage()


def test_streams_end_at_the_connection_age(server_factory, registry_copy):
    """Before: the connection age (5 min, then 60 s of grace) was hard-coded; it is the bound on how
    long an idle reflection or WatchJob stream stays open."""
    server = server_factory(registry_copy, "--max-connection-age-s", "2", "--connection-age-grace-s", "1")
    release = threading.Event()
    stream = idle_reflection_stream(server.channel(), release, timeout=60)
    assert next(stream).list_services_response.service
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        next(stream)
    release.set()
    assert time.monotonic() - started < 10, "the stream outlived the connection age and its grace"
    assert err.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED  # ended by the server, not by our deadline
    health = health_pb2_grpc.HealthStub(server.channel())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING  # clients reconnect
    assert_clean_log(server)


def test_kserve_version_strings_and_malformed_bodies(shared_server):
    """Before: model_version "²" or 5000 digits, and a garbage protobuf body, answered INTERNAL."""
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(shared_server.channel())
    for version in ["²", "9" * 5000, "-1", "0", "1.0", " 1", "1\n", "١"]:
        for call, request in ((kserve.ModelMetadata, service_pb2.ModelMetadataRequest(name=BUILTIN_NAME,
                                                                                        version=version)),
                              (kserve.ModelReady, service_pb2.ModelReadyRequest(name=BUILTIN_NAME, version=version))):
            assert code_of(call, request, timeout=10) == grpc.StatusCode.INVALID_ARGUMENT, version[:20]
    channel = shared_server.channel()
    for method in ("/headswap.v1.Inference/Classify", "/headswap.v1.Models/GetModel",
                   "/inference.GRPCInferenceService/ModelInfer", "/grpc.health.v1.Health/Check"):
        for body in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11):  # never valid protobuf
            assert raw_call(channel, method, body) == grpc.StatusCode.INVALID_ARGUMENT, (method, body)
    # Field 3 is Classify's `model` (a string): invalid UTF-8 there is a malformed body too.
    assert raw_call(channel, "/headswap.v1.Inference/Classify", b"\x1a\x02\xc3\x28") == \
        grpc.StatusCode.INVALID_ARGUMENT
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    assert_clean_log(shared_server)


def test_malformed_stream_messages(shared_server):
    """A garbage frame inside a request stream: INVALID_ARGUMENT, for our services and grpc's own."""
    channel = shared_server.channel()
    for method, kind in (("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
                         ("/headswap.v1.Training/FineTune", "stream_unary")):
        call = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
        try:
            result = call(iter([b"\xff\xff\xff\xff"]), timeout=30)
            if kind == "stream_stream":
                list(result)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code)
    assert_clean_log(shared_server)


# --- the pure logic underneath: fair decode slots, rank-ordered batches ------------------------

def test_decode_slots_keep_one_slot_for_small_images():
    from headswap.inference.decoding import LARGE_IMAGE_PIXELS, DecodeSlots

    slots = DecodeSlots(2)
    large = LARGE_IMAGE_PIXELS + 1
    entered = threading.Event()

    def second_large() -> None:
        with slots.hold(large, lambda: None):
            entered.set()

    with slots.hold(large, lambda: None):
        waiter = threading.Thread(target=second_large)
        waiter.start()
        time.sleep(0.2)
        assert not entered.is_set()  # a second large image waits for the large slot...
        with slots.hold(100, lambda: None):  # ...while a small one still gets the other slot
            pass
    waiter.join(5)
    assert entered.is_set()

    def stop() -> None:
        raise TimeoutError("caller gone")

    with slots.hold(large, lambda: None):
        with pytest.raises(TimeoutError):
            with slots.hold(large, stop):  # a waiter whose caller is gone leaves the queue
                pass


def test_batcher_runs_a_requests_first_chunk_before_others_later_chunks():
    from headswap.inference.batcher import Batcher

    started = threading.Event()
    release = threading.Event()
    order: list[float] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        order.append(float(batch[0, 0]))
        started.set()
        release.wait(10)
        return np.zeros((len(batch), 2), dtype=np.float32)

    batcher = Batcher([infer], "rank-test", max_batch=8, timeout_s=0.0, max_queue=1000)
    try:
        chunk = lambda tag, n=8: np.full((n, 1), tag, dtype=np.float32)  # noqa: E731
        first = batcher.submit(chunk(0), announced=False)  # occupies the worker
        assert started.wait(5)
        later = [batcher.submit(chunk(1), announced=False, rank=8 * (i + 1)) for i in range(3)]
        victim = batcher.submit(chunk(2, 1), announced=False, rank=0)
        release.set()
        for future in [first, victim, *later]:
            future.result(10)
    finally:
        batcher.close()
    assert order[:2] == [0.0, 2.0], order  # the one-image request ran next, before the 256-image one's rest
