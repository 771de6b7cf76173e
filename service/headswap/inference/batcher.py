"""Dynamic batching: concurrent requests for one model version become one ONNX Runtime call.

Like TF Serving's batching and Triton's dynamic batcher: a worker thread takes what is queued,
waits up to `timeout_s` for more only while other requests are still being decoded (so a lone
client never waits), and runs them as one batch of at most `max_batch` images. With several lanes
(one worker per lane, each lane its own ONNX Runtime session) batches run side by side, the queue
shared between the idle lanes, like Triton's instance groups. A request whose
deadline passes while queued is answered DEADLINE_EXCEEDED without being run; a full queue is
refused with RESOURCE_EXHAUSTED instead of growing without bound.

When the model is idle (nothing queued or running, nobody else decoding), a one-chunk request
runs in its caller's thread instead (`run_inline`), skipping the two thread hand-offs; a batch
that runs alone uses the runtime's `infer_lone` (every thread, spinning when that measures faster)
and holds every lane while it runs, so no other batch competes for its threads.

How many queued images a lane takes at most is measured, not fixed: the lanes try the sizes
`max_batch` ... 4, 2, 1 and keep the one with the lowest time per image (`measured_choice.Fastest`), so
a machine whose cache favours small batches is not made to run large ones just because they queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from headswap import metrics
from headswap.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from headswap.inference.measured_choice import Fastest
from headswap.inference.stats import ModelStats

log = logging.getLogger(__name__)


class Pending(Future):
    """A queued request's future, with when it was queued, run and answered (perf_counter_ns),
    so the caller can tell queueing from inference in its statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.queued_ns = time.perf_counter_ns()
        self.infer_started_ns = self.infer_done_ns = 0


@dataclass
class _Item:
    batch: np.ndarray
    deadline: float | None
    future: Pending = field(default_factory=Pending)
    rank: int = 0  # images its request already queued before this chunk (0 for a request's first)
    queued_at: float = field(default_factory=time.monotonic)


def rows_of(outputs: np.ndarray | tuple[np.ndarray, ...], start: int, stop: int) -> np.ndarray | tuple[np.ndarray, ...]:
    """Rows start:stop of a run's outputs: one array (probabilities), or a tuple of arrays with the
    same first dimension (probabilities and the out-of-distribution score)."""
    if isinstance(outputs, tuple):
        return tuple(output[start:stop] for output in outputs)
    return outputs[start:stop]


# A chunk waiting longer than this runs in arrival order whatever its rank: no request starves.
RANK_AGING_S = 2.0


def batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a lane chooses between, largest first (so until a full batch has been
    measured, lanes batch as much as `max_batch` allows): `max_batch`, then powers of two below it."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [max(1, max_batch)] + sizes[::-1]


class Batcher:
    """Queue + one worker thread per lane in front of the lanes' inference functions."""

    def __init__(self, lanes: Sequence[Callable[[np.ndarray], np.ndarray]], label: str, max_batch: int,
                 timeout_s: float, max_queue: int, stats: ModelStats | None = None,
                 infer_lone: Callable[[np.ndarray], np.ndarray] | None = None, cpu_timed: bool = False) -> None:
        """`cpu_timed`: each lane runs on its calling thread alone (a one-thread ONNX Runtime session),
        so the batch sizes are compared by that thread's CPU time per image, which the preemption of
        a busy machine does not blur (CPU time varied 0.08-0.16 between batches of one size at 16
        clients, wall time 0.2-0.35); otherwise by wall time."""
        if not lanes:
            raise ValueError("a batcher needs at least one lane")
        self._lanes = list(lanes)
        # for a batch that runs while no other request runs, is queued or is being decoded
        self._infer_lone = infer_lone or self._lanes[0]
        self._stats = stats
        self._label = label
        self._max_batch = max_batch
        self._sizes = batch_sizes(max_batch)
        self._size_choice = Fastest(len(self._sizes))  # used under _cond: the lanes share it
        self._cpu_timed = cpu_timed
        self._batch_cap = metrics.BATCH_CAP.labels(label)
        self._batch_cap.set(max_batch)
        self._timeout_s = timeout_s
        self._max_queue = max_queue
        self._queue: deque[_Item] = deque()
        self._queued_images = 0
        self._incoming = 0  # requests announced (being decoded) but not yet submitted
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0  # batches running, in the workers or inline in a caller's thread
        self._exclusive = False  # a lone batch runs on every thread: no lane starts another
        self._queue_depth = metrics.QUEUE_DEPTH.labels(label)  # resolved once: off the hot path
        self._batch_size = metrics.BATCH_SIZE.labels(label)
        self._threads = [threading.Thread(target=self._run, args=(lane,), name=f"batcher-{label}-{lane}",
                                          daemon=True) for lane in range(len(self._lanes))]
        for thread in self._threads:
            thread.start()

    def announce(self) -> None:
        """A request for this model is being decoded: worth waiting for before running a batch."""
        with self._cond:
            self._incoming += 1

    def withdraw(self) -> None:
        """An announced request will not be submitted (it failed before inference)."""
        with self._cond:
            self._incoming = max(0, self._incoming - 1)
            self._wake_lanes()

    def submit(self, batch: np.ndarray, deadline: float | None = None, announced: bool = True,
               rank: int = 0) -> Pending:
        """Queue a float32 batch; the future resolves to its outputs (`rows_of`). `rank` is how many images
        the same request queued before this chunk: lower ranks run first, so a one-image request does
        not wait behind the later chunks of a 256-image one."""
        item = _Item(batch, deadline, rank=rank)
        with self._cond:
            if announced:
                self._incoming = max(0, self._incoming - 1)
            if self._closed:
                raise Unavailable(f"{self._label} is being unloaded; retry")
            if self._queued_images + len(batch) > self._max_queue:
                self._cond.notify_all()
                raise ResourceExhausted(f"{self._label}: inference queue is full "
                                        f"({self._queued_images} images waiting); retry later")
            self._queue.append(item)
            self._queued_images += len(batch)
            self._queue_depth.set(self._queued_images)
            self._cond.notify_all()
        return item.future

    def close(self) -> None:
        """Run what is queued, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + 30
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _wake_lanes(self) -> None:
        """Wake the idle lanes, under `_cond`, only when there is queued work for them: every lane
        waits for a queue (and, filling a batch, for it to grow), so waking them on an empty queue
        only costs each request two thread wake-ups and GIL hand-offs (one client's case)."""
        if self._queue:
            self._cond.notify_all()

    def _take_batch(self) -> tuple[list[_Item], bool] | None:
        """The next batch for an idle lane, and whether it runs alone (then it holds every lane)."""
        with self._cond:
            while not self._queue or self._exclusive:
                if self._closed and not self._queue:
                    return None
                self._cond.wait()
            first_at = time.monotonic()
            cap = self._cap()
            while (self._queued_images < cap and self._incoming > 0 and not self._closed):
                remaining = self._timeout_s - (time.monotonic() - first_at)
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if not self._queue or self._exclusive:  # another lane took it meanwhile
                return [], False
            # Share what is queued between the idle lanes rather than run it all on this one.
            idle = max(1, len(self._lanes) - self._running)
            share = max(1, -(-self._queued_images // idle))
            items = self._pick(min(cap, share))
            self._queued_images -= sum(len(item.batch) for item in items)
            self._queue_depth.set(self._queued_images)
            lone = self._running == 0 and len(items) == 1 and not self._queue and self._incoming == 0
            self._running += 1
            self._exclusive = lone
            if self._queue:
                self._cond.notify_all()  # an idle lane can take the rest
            return items, lone

    def _cap(self) -> int:
        """Under `_cond`: the most images the next lane batch takes (mostly the cheapest size so far)."""
        option = self._size_choice.pick()
        if option == self._size_choice.best():  # the gauge shows the choice, not a probe
            self._batch_cap.set(self._sizes[option])
        return self._sizes[option]

    def _measured(self, size: int, cost_ns: int) -> None:
        """Under `_cond`: a lane batch of `size` images cost `cost_ns`."""
        if size in self._sizes:
            self._size_choice.record(self._sizes.index(size), cost_ns / size)

    def _pick(self, limit: int) -> list[_Item]:
        """Up to `limit` images (or one chunk, if larger): lowest rank first (a request's first chunk
        before others' later chunks), arrival order within a rank and for chunks waiting past
        RANK_AGING_S."""
        now = time.monotonic()
        order = sorted(range(len(self._queue)), key=lambda i: (
            0 if now - self._queue[i].queued_at > RANK_AGING_S else self._queue[i].rank, i))
        chosen: list[int] = []
        size = 0
        for i in order:
            length = len(self._queue[i].batch)
            if not chosen or size + length <= limit:
                chosen.append(i)
                size += length
            if size >= limit:
                break
        taken = set(chosen)
        items = [self._queue[i] for i in sorted(chosen)]
        self._queue = deque(item for i, item in enumerate(self._queue) if i not in taken)
        return items

    def _run(self, lane: int) -> None:
        while True:
            taken = self._take_batch()
            if taken is None:
                return
            items, lone = taken
            if not items:
                continue
            measured = None
            try:
                measured = self._run_batch(items, self._infer_lone if lone else self._lanes[lane])
            except Exception:  # the worker must outlive any one batch, or the model stops answering
                log.exception("batcher %s: unexpected error", self._label)
            finally:
                with self._cond:
                    if measured is not None and not lone:  # a lone batch ran on other threads
                        self._measured(*measured)
                    self._running -= 1
                    self._exclusive = False
                    self._wake_lanes()

    def run_inline(self, batch: np.ndarray) -> Pending | None:
        """Run an announced request's only chunk in the caller's thread when the model is idle
        (nothing queued or running, no other request being decoded): a lone request then skips the
        two thread hand-offs of the queue. None when busy (or the chunk may be one of several, so
        decoding the next one should overlap this one's inference): `submit` it instead."""
        if len(batch) >= self._max_batch:
            return None
        with self._cond:
            if self._closed or self._running or self._queue or self._incoming > 1:
                return None
            self._running += 1
            self._exclusive = True
            self._incoming = max(0, self._incoming - 1)  # this request's own announcement
        future = Pending()
        future.set_running_or_notify_cancel()
        try:
            self._batch_size.observe(len(batch))
            future.infer_started_ns = time.perf_counter_ns()
            probabilities = self._infer_lone(batch)
            future.infer_done_ns = time.perf_counter_ns()
            if self._stats is not None:
                self._stats.executed(len(batch), future.infer_done_ns - future.infer_started_ns)
            future.set_result(probabilities)
        except Exception as err:  # as in the worker: the caller gets the failure, the log the cause
            log.exception("inference failed for %s", self._label)
            future.set_exception(err)
        finally:
            with self._cond:
                self._running -= 1
                self._exclusive = False
                self._wake_lanes()  # requests may have been queued meanwhile
        return future

    def _run_batch(self, items: list[_Item], infer: Callable[[np.ndarray], np.ndarray]) -> tuple[int, int] | None:
        """Run one gathered batch with `infer` and hand each request its rows; returns the run's images
        and its cost in ns (CPU or wall time, see `cpu_timed`), None if nothing ran or it failed."""
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
            return None
        try:
            batch = live[0].batch if len(live) == 1 else np.concatenate([i.batch for i in live])
            self._batch_size.observe(len(batch))
            infer_started_ns = time.perf_counter_ns()
            cpu_started_ns = time.thread_time_ns() if self._cpu_timed else 0
            probabilities = infer(batch)
            infer_ns = time.perf_counter_ns() - infer_started_ns
            cost_ns = time.thread_time_ns() - cpu_started_ns if self._cpu_timed else infer_ns
        except Exception as err:  # hand the failure to every waiting request
            log.exception("inference failed for %s", self._label)
            for item in live:
                item.future.set_exception(err)
            return None
        if self._stats is not None:
            self._stats.executed(len(batch), infer_ns)
        start = 0
        done_ns = infer_started_ns + infer_ns
        for item in live:
            item.future.infer_started_ns, item.future.infer_done_ns = infer_started_ns, done_ns
            item.future.set_result(rows_of(probabilities, start, start + len(item.batch)))
            start += len(item.batch)
        return len(batch), cost_ns
