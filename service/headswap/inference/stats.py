"""Per-model-version inference statistics: where each request's time went.

One `ModelStats` lives with each loaded version. The classifier and the batcher record into it;
it keeps Triton's cumulative counters (served by KServe's ModelStatistics call, which is what
`perf_analyzer` reads) and feeds the Prometheus latency histograms with the same figures:

- decode (Triton's compute_input): decoding and preprocessing a request's images;
- queue: from submission to the batcher until its batch starts;
- inference (compute_infer): the ONNX Runtime call the request's batch ran in;
- hand-back (compute_output): from the end of that call until the request's thread has its rows;
- total (success / fail): from the request entering the classifier until its answer is ready.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from headswap import metrics


@dataclass
class Duration:
    """A cumulative count and duration in nanoseconds (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(frozen=True)
class RequestTiming:
    """Where one request's time went, in nanoseconds."""

    decode_ns: int
    queue_ns: int
    infer_ns: int
    output_ns: int
    total_ns: int


@dataclass
class StatsSnapshot:
    """A consistent copy of one version's counters, taken under the lock."""

    name: str
    version: int
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> compute_infer

    @classmethod
    def empty(cls, name: str, version: int) -> "StatsSnapshot":
        """A version that has served nothing since it was (last) loaded."""
        return cls(name, version, 0, 0, 0, *(Duration() for _ in range(6)))


class ModelStats:
    """Thread-safe counters for one (model, version); cheap enough to update on every request."""

    def __init__(self, name: str, version: int) -> None:
        self.name, self.version = name, version
        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success, self._fail = Duration(), Duration()
        self._queue, self._compute_input, self._compute_infer = Duration(), Duration(), Duration()
        self._compute_output = Duration()
        self._batches: dict[int, Duration] = {}
        labels = (name, str(version))  # registry names only: the runtime exists, so the model does
        self._total_us = metrics.INFERENCE_REQUEST_DURATION.labels(*labels)
        self._queue_us = metrics.INFERENCE_QUEUE_DURATION.labels(*labels)
        self._decode_us = metrics.INFERENCE_DECODE_DURATION.labels(*labels)
        self._infer_us = metrics.INFERENCE_COMPUTE_DURATION.labels(*labels)

    def executed(self, images: int, infer_ns: int) -> None:
        """One ONNX Runtime call of `images` images took `infer_ns`."""
        with self._lock:
            self._execution_count += 1
            self._batches.setdefault(images, Duration()).add(infer_ns)

    def succeeded(self, images: int, timing: RequestTiming) -> None:
        """A request of `images` images was answered; every phase counts once per request, as in Triton."""
        with self._lock:
            self._inference_count += images
            self._last_inference_ms = time.time_ns() // 1_000_000
            self._success.add(timing.total_ns)
            self._compute_input.add(timing.decode_ns)
            self._queue.add(timing.queue_ns)
            self._compute_infer.add(timing.infer_ns)
            self._compute_output.add(timing.output_ns)
        self._total_us.observe(timing.total_ns / 1000)
        self._decode_us.observe(timing.decode_ns / 1000)
        self._queue_us.observe(timing.queue_ns / 1000)
        self._infer_us.observe(timing.infer_ns / 1000)

    def failed(self, ns: int) -> None:
        with self._lock:
            self._fail.add(ns)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            copy = lambda d: Duration(d.count, d.ns)  # noqa: E731
            return StatsSnapshot(self.name, self.version, self._last_inference_ms, self._inference_count,
                                 self._execution_count, copy(self._success), copy(self._fail), copy(self._queue),
                                 copy(self._compute_input), copy(self._compute_infer), copy(self._compute_output),
                                 {size: copy(d) for size, d in sorted(self._batches.items())})
