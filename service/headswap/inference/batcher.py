"""Dynamic batching: concurrent requests for one model version become one ONNX Runtime call.

Like TF Serving's batching and Triton's dynamic batcher: a worker thread takes what is queued,
waits up to `timeout_s` for more only while other requests are still being decoded (so a lone
client never waits), and runs them as one batch of at most `max_batch` images. A request whose
deadline passes while queued is answered DEADLINE_EXCEEDED without being run; a full queue is
refused with RESOURCE_EXHAUSTED instead of growing without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from headswap import metrics
from headswap.errors import DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


@dataclass
class _Item:
    batch: np.ndarray
    deadline: float | None
    future: Future = field(default_factory=Future)


class Batcher:
    """Queue + one worker thread in front of an inference function."""

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], label: str, max_batch: int,
                 timeout_s: float, max_queue: int) -> None:
        self._infer = infer
        self._label = label
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._max_queue = max_queue
        self._queue: deque[_Item] = deque()
        self._queued_images = 0
        self._incoming = 0  # requests announced (being decoded) but not yet submitted
        self._cond = threading.Condition()
        self._closed = False
        self._queue_depth = metrics.QUEUE_DEPTH.labels(label)  # resolved once: off the hot path
        self._batch_size = metrics.BATCH_SIZE.labels(label)
        self._thread = threading.Thread(target=self._run, name=f"batcher-{label}", daemon=True)
        self._thread.start()

    def announce(self) -> None:
        """A request for this model is being decoded: worth waiting for before running a batch."""
        with self._cond:
            self._incoming += 1

    def withdraw(self) -> None:
        """An announced request will not be submitted (it failed before inference)."""
        with self._cond:
            self._incoming = max(0, self._incoming - 1)
            self._cond.notify()

    def submit(self, batch: np.ndarray, deadline: float | None = None, announced: bool = True) -> Future:
        """Queue a float32 batch; the future resolves to its probabilities."""
        item = _Item(batch, deadline)
        with self._cond:
            if announced:
                self._incoming = max(0, self._incoming - 1)
            if self._closed:
                raise Unavailable(f"{self._label} is being unloaded; retry")
            if self._queued_images + len(batch) > self._max_queue:
                self._cond.notify()
                raise ResourceExhausted(f"{self._label}: inference queue is full "
                                        f"({self._queued_images} images waiting); retry later")
            self._queue.append(item)
            self._queued_images += len(batch)
            self._queue_depth.set(self._queued_images)
            self._cond.notify()
        return item.future

    def close(self) -> None:
        """Run what is queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _take_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first_at = time.monotonic()
            while (self._queued_images < self._max_batch and self._incoming > 0 and not self._closed):
                remaining = self._timeout_s - (time.monotonic() - first_at)
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            items: list[_Item] = []
            size = 0
            while self._queue and (not items or size + len(self._queue[0].batch) <= self._max_batch):
                item = self._queue.popleft()
                items.append(item)
                size += len(item.batch)
                self._queued_images -= len(item.batch)
            self._queue_depth.set(self._queued_images)
            return items

    def _run(self) -> None:
        while True:
            items = self._take_batch()
            if items is None:
                return
            try:
                self._run_batch(items)
            except Exception:  # the worker must outlive any one batch, or the model stops answering
                log.exception("batcher %s: unexpected error", self._label)

    def _run_batch(self, items: list[_Item]) -> None:
        """Run one gathered batch and hand each request its rows."""
        now = time.monotonic()
        live = []
        for item in items:
            if not item.future.set_running_or_notify_cancel():
                continue  # the caller gave up (its deadline passed) while it was queued
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(DeadlineExceeded(
                    "the request's deadline passed while it waited in the inference queue"))
            else:
                live.append(item)
        if not live:
            return
        try:
            batch = live[0].batch if len(live) == 1 else np.concatenate([i.batch for i in live])
            self._batch_size.observe(len(batch))
            probabilities = self._infer(batch)
        except Exception as err:  # hand the failure to every waiting request
            log.exception("inference failed for %s", self._label)
            for item in live:
                item.future.set_exception(err)
            return
        start = 0
        for item in live:
            item.future.set_result(probabilities[start:start + len(item.batch)])
            start += len(item.batch)
