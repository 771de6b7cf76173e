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
JOBS = Counter("headswap_finetune_jobs_total", "Fine-tune jobs by final state", ["state"])
JOBS_RUNNING = Gauge("headswap_finetune_jobs_running", "Fine-tune jobs in progress")


def serve_metrics(port: int, host: str = "0.0.0.0") -> int:
    """Start the /metrics HTTP endpoint; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]
