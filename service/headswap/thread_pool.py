"""The gRPC handler pool: a thread per call, as many as the calls admitted, and idle ones retire.

grpc's sync server runs each call on a thread of the executor it is given. `server.pool_size` gives
it one thread per admitted call (1024 by default), so a burst of slow callers never leaves others
waiting for a thread. `concurrent.futures.ThreadPoolExecutor` starts threads as needed but never
stops one: after a burst of 120 stalled calls a server kept 137 threads (18 before) for good, each
with its stack, each counted against the pod's pids limit. Here a thread that has waited `idle_s`
for work exits.

Two counts, kept under one lock, decide: `queued` (work not yet taken) and `idle` (threads waiting
for work). `submit` starts a thread when the queued work outnumbers the waiting threads. A thread
whose wait times out exits only when nothing is queued; otherwise it goes back to take the work that
counted on it. (ThreadPoolExecutor's idle semaphore over-counts idle threads; with threads that
retire, that could strand work with no thread left to run it.)
"""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent import futures
from typing import Any, Callable


class ShrinkingThreadPool(futures.Executor):
    """At most `max_workers` threads, started when work finds none idle, ended after `idle_s` idle."""

    def __init__(self, max_workers: int, idle_s: float, thread_name_prefix: str = "pool") -> None:
        if max_workers < 1 or idle_s <= 0:
            raise ValueError("max_workers must be at least 1 and idle_s positive")
        self._max_workers = max_workers
        self._idle_s = idle_s
        self._prefix = thread_name_prefix
        # queue.Queue, not SimpleQueue: SimpleQueue.get(timeout=...) never returned for one thread in
        # about 30 runs of test_thread_pool's race (CPython 3.11.7, 1 ms waits).
        self._work: queue.Queue[tuple[futures.Future, Callable, tuple, dict] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)  # notified as each thread exits
        self._threads = 0
        self._idle = 0  # threads waiting for work
        self._queued = 0  # work put in the queue and not yet taken
        self._names = itertools.count()
        self._shutdown = False

    @property
    def threads(self) -> int:
        """Threads alive now (busy or idle)."""
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        future: futures.Future = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._work.put((future, fn, args, kwargs))
            self._queued += 1
            if self._queued > self._idle and self._threads < self._max_workers:
                self._threads += 1
                threading.Thread(target=self._run, name=f"{self._prefix}_{next(self._names)}", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; threads finish what is queued, then exit."""
        with self._lock:
            self._shutdown = True
            threads = self._threads
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    with self._lock:
                        self._queued -= 1
                    item[0].cancel()
        for _ in range(threads):
            self._work.put(None)
        if wait:
            with self._lock:
                self._ended.wait_for(lambda: self._threads == 0)

    def _exit(self) -> None:
        """Under the lock: this thread is about to return."""
        self._threads -= 1
        self._ended.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                item = self._work.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queued == 0:  # no work counted on this thread: retire
                        self._exit()
                        return
                continue  # work came as the wait ended: take it
            with self._lock:
                self._idle -= 1
                if item is None:
                    self._exit()
                    return
                self._queued -= 1
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as err:  # handed to the caller through the future, as the stdlib pool does
                    future.set_exception(err)
            del item, future, fn, args, kwargs
