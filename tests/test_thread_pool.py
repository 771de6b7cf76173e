"""The gRPC handler pool (`headswap.thread_pool`): bounded, and idle threads retire without
stranding work that arrives as they do. The server-level check is in test_hostile_serving.py."""

from __future__ import annotations

import threading
import time

import pytest

from headswap.thread_pool import ShrinkingThreadPool
from hostile import wait_until


def test_pool_is_bounded_runs_everything_and_retires_idle_threads():
    pool = ShrinkingThreadPool(4, idle_s=0.2, thread_name_prefix="t")
    release = threading.Event()
    running = []

    def task(i: int) -> int:
        running.append(i)
        release.wait(10)
        return i * i

    futures = [pool.submit(task, i) for i in range(20)]
    assert wait_until(lambda: len(running) == 4, 10)
    time.sleep(0.1)
    assert pool.threads == 4 and len(running) == 4, "more threads than max_workers"
    release.set()
    assert [f.result(timeout=10) for f in futures] == [i * i for i in range(20)]
    assert wait_until(lambda: pool.threads == 0, 10), f"{pool.threads} idle threads never retired"
    # work after every thread retired starts a thread again; errors reach the caller
    assert pool.submit(sum, [1, 2, 3]).result(timeout=10) == 6
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=10)
    slow = pool.submit(time.sleep, 0.3)
    pool.shutdown(wait=True)  # waits for the running work and the threads
    assert slow.done() and pool.threads == 0
    with pytest.raises(RuntimeError):
        pool.submit(sum, [1])


def test_work_submitted_while_threads_retire_is_never_stranded():
    """Threads time out every millisecond while 8 submitters keep adding work: a thread must not
    retire once a submit has counted on it."""
    pool = ShrinkingThreadPool(16, idle_s=0.001, thread_name_prefix="race")
    results: list = []
    lock = threading.Lock()

    def submitter(n: int) -> None:
        for i in range(300):
            future = pool.submit(lambda x=i: x)
            with lock:
                results.append(future)
            if i % 7 == 0:
                time.sleep(0.002)  # let threads go idle and retire between bursts

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(f.result(timeout=10) for f in results) == 8 * sum(range(300))
    assert wait_until(lambda: pool.threads == 0, 10)
