"""Prometheus metrics, named after Triton's and TF Serving's where they overlap.

Module-level collectors (the prometheus_client idiom); `serve_metrics` exposes them on HTTP.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("headswap_requests_total", "gRPC requests handled",
                   ["method", "model", "version", "code"])
REQUEST_LATENCY = Histogram("headswap_request_duration_seconds", "gRPC request latency",
                            ["method", "model"],
                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
IMAGES = Counter("headswap_images_total", "Images classified", ["model", "version"])
BATCH_SIZE = Histogram("headswap_batch_size", "Images per ONNX Runtime call", ["model"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
QUEUE_DEPTH = Gauge("headswap_queue_depth", "Images waiting for inference", ["model"])
LOADED_MODELS = Gauge("headswap_loaded_models", "Model versions resident in this process")
SWAPS = Counter("headswap_model_swaps_total", "Active version changes applied", ["model"])
LOAD_FAILURES = Counter("headswap_model_load_failures_total", "Versions refused at load", ["model"])
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

JOBS = Counter("headswap_finetune_jobs_total", "Fine-tune jobs by final state", ["state"])
JOBS_RUNNING = Gauge("headswap_finetune_jobs_running", "Fine-tune jobs in progress")


def serve_metrics(port: int, host: str = "0.0.0.0", certfile: str = "", keyfile: str = "") -> int:
    """Start the /metrics endpoint (HTTPS with a certificate and key); returns the bound port (0 picks one).

    The certificate is read once: a rotated metrics certificate is served after a restart.
    """
    server, _thread = start_http_server(port, addr=host, certfile=certfile or None, keyfile=keyfile or None)
    return server.server_address[1]
