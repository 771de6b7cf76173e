"""Prometheus metrics, named after Triton's and TF Serving's where they overlap.

Module-level collectors (the prometheus_client idiom); `serve_metrics` exposes them on HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

from headswap.api.tls import CertificateFiles
from headswap.deadlines import Deadlines

log = logging.getLogger(__name__)

# protocol: grpc, or http (the Open Inference Protocol's REST endpoints, --http-port); method: the
# gRPC method's name (a REST endpoint counts as the KServe V2 method it stands for); code: gRPC's.
REQUESTS = Counter("headswap_requests_total", "Requests handled (gRPC and REST)",
                   ["method", "model", "version", "code", "protocol"])
REQUEST_LATENCY = Histogram("headswap_request_duration_seconds", "Request latency (gRPC and REST)",
                            ["method", "model", "protocol"],
                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
IMAGES = Counter("headswap_images_total", "Images classified", ["model", "version"])
TIER_FP32_IMAGES = Counter("headswap_tier_fp32_images_total",
                           "Images a bf16 or int8 tier answered in fp32: a near tie re-checked, or a whole batch while "
                           "that measured faster", ["model", "version", "reason"])
BATCH_SIZE = Histogram("headswap_batch_size", "Images per ONNX Runtime call", ["model"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
QUEUE_DEPTH = Gauge("headswap_queue_depth", "Images waiting for inference", ["model"])
BATCH_CAP = Gauge("headswap_batch_cap", "Most queued images a lane takes now: the batch size with the lowest "
                  "measured time per image, at most --max-batch-size", ["model"])
LOADED_MODELS = Gauge("headswap_loaded_models", "Model versions resident in this process")
SWAPS = Counter("headswap_model_swaps_total", "Active version changes applied", ["model"])
LOAD_FAILURES = Counter("headswap_model_load_failures_total", "Versions refused at load", ["model"])
CONNECTIONS_CLOSED = Counter("headswap_connections_closed_total", "Client connections the server closed, by reason",
                             ["reason"])
# Where each inference request's time goes, in microseconds like Triton's nv_inference_*_duration_us
# (there counters; here histograms, so quantiles show too). Labels: registry model and version.
LATENCY_BUCKETS_US = (100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
                      500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000)


def _latency_histogram(name: str, what: str) -> Histogram:
    """One phase of an inference request's time, per registry model and version, in microseconds."""
    return Histogram(f"headswap_inference_{name}_duration_us", f"{what} (microseconds)", ["model", "version"],
                     buckets=LATENCY_BUCKETS_US)


INFERENCE_REQUEST_DURATION = _latency_histogram(
    "request", "Inference request time in the server: decode + queue + inference + hand-back")
INFERENCE_QUEUE_DURATION = _latency_histogram("queue", "Time a request waited in the dynamic batcher's queue")
INFERENCE_DECODE_DURATION = _latency_histogram("compute_input", "Decoding and preprocessing a request's images")
INFERENCE_COMPUTE_DURATION = _latency_histogram("compute_infer", "The ONNX Runtime call a request's batch ran in")

# Rollouts (headswap.inference.rollout): per version of a model in a running rollout, in this process.
ROLLOUT_REQUESTS = Counter("headswap_rollout_requests_total", "Answers counted in a rollout (shadow runs included)",
                           ["model", "version", "role"])
ROLLOUT_ERRORS = Counter("headswap_rollout_errors_total", "Failed answers counted in a rollout",
                         ["model", "version", "role"])
ROLLOUT_LATENCY = Histogram("headswap_rollout_duration_seconds", "Answer latency of each version in a rollout",
                            ["model", "version", "role"],
                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
SHADOW_COMPARED = Counter("headswap_shadow_compared_images_total", "Images a shadow candidate answered beside stable",
                          ["model", "version"])
SHADOW_AGREED = Counter("headswap_shadow_agreed_images_total", "Shadow images whose top-1 matched stable's",
                        ["model", "version"])
SHADOW_DROPPED = Counter("headswap_shadow_dropped_total", "Mirrored requests not run by the shadow candidate",
                         ["model", "version", "reason"])

JOBS = Counter("headswap_finetune_jobs_total", "Fine-tune jobs by final state", ["state"])
JOBS_RUNNING = Gauge("headswap_finetune_jobs_running", "Fine-tune jobs in progress")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:
        """Scrapes are not logged."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's thread-per-connection server, bounded.

    Its own server gives every connection a thread that waits forever, and with TLS does the
    handshake in the accepting thread: 3,000 idle sockets held 3,000 threads, and one silent TLS
    client stopped every scrape. Here at most `max_connections` are served at once (more are closed
    on arrival), each connection's thread does its own TLS handshake, and every connection is closed
    `timeout_s` after it opened, whatever it sends: a scrape takes milliseconds, and a timeout per
    read alone let clients sending a byte every few seconds keep every slot.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], max_connections: int, timeout_s: float,
                 tls: MetricsTls | None) -> None:
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)[0][0]
        self.slots = threading.BoundedSemaphore(max_connections)
        self.timeout_s, self.tls = timeout_s, tls
        self.deadlines = Deadlines("metrics-deadlines")
        super().__init__(address, _QuietHandler)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the bound: closed at once, nothing is spent on it
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        connection = [request]  # the TLS socket replaces the plain one: the deadline shuts down the current one
        due = self.deadlines.at(time.monotonic() + self.timeout_s, lambda: _shut(connection))
        try:
            request.settimeout(self.timeout_s)
            if self.tls is not None:
                try:
                    request = connection[0] = self.tls.context().wrap_socket(request, server_side=True)
                except (OSError, ValueError):
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self.deadlines.cancel(due)
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        """A client that stalls past the timeout or drops the connection is not an error of ours."""
        if not isinstance(sys.exc_info()[1], OSError):
            log.warning("metrics connection from %s failed", client_address, exc_info=True)


def _shut(connection: list[socket.socket]) -> None:
    """End a connection past its time: its thread's blocked read or write fails, and it closes."""
    with contextlib.suppress(OSError):
        connection[0].shutdown(socket.SHUT_RDWR)


class MetricsTls:
    """The metrics port's TLS context, rebuilt when its certificate files change on disk (checked at
    most once a second, before a connection's handshake), like the gRPC port's: a rotated
    certificate (cert-manager renewing a mounted Secret) is served without a restart."""

    def __init__(self, certfile: str, keyfile: str) -> None:
        self.files = CertificateFiles(certfile, keyfile)  # ValueError: refuse to start with broken files
        self._context = self._load()

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.files.paths[0], self.files.paths[1])
        return context

    def context(self) -> ssl.SSLContext:
        """The context for a new connection: a new one when the files changed and are usable."""
        if self.files.fetch() is not None:  # changed, and checked to be a matching certificate and key
            try:
                self._context = self._load()
            except (OSError, ssl.SSLError) as err:  # changed again since the check: the next change retries
                log.warning("metrics TLS files changed but could not be loaded; still serving the previous "
                            "certificate: %s", err)
        return self._context


def load_tls(certfile: str, keyfile: str) -> MetricsTls | None:
    """The metrics port's TLS (None without a certificate); ValueError names a broken file."""
    if not certfile:
        return None
    try:
        return MetricsTls(certfile, keyfile)
    except ValueError as err:
        raise ValueError(f"--metrics-tls-cert-file {certfile} / --metrics-tls-key-file {keyfile}: {err}") from None


def serve_metrics(port: int, host: str, tls: MetricsTls | None, max_connections: int, timeout_s: float) -> int:
    """Start the /metrics endpoint (HTTPS with a TLS context); returns the bound port (0 picks one)."""
    server = MetricsServer((host, port), max_connections, timeout_s, tls)
    server.set_app(make_wsgi_app())
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server.server_address[1]
