"""One thread that runs callbacks at their deadlines: a timer for many waits, not a thread each.

Used to end what a caller holds past its time (a call whose request message has not come, a
metrics connection still open). Callbacks run in this thread and must be short. It wakes at most
every `tick_s` plus when an earlier deadline comes in, so a busy server pays a heap push per wait,
not a thread wake-up.

A cancelled entry lets go of its callback (and what it holds) at once; the heap drops cancelled
slots when they are more than half of it, so a flood of waits that end early (a rapid-reset
attack cancels every call it opens) costs memory in proportion to the waits still open.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Deadlines:
    """Run `callback()` at `deadline` (time.monotonic) unless cancelled first."""

    def __init__(self, name: str, tick_s: float = 0.2) -> None:
        self.name, self.tick_s = name, tick_s
        self._heap: list[tuple[float, int, list]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._cancelled = 0  # cancelled entries still in the heap

    def at(self, deadline: float, callback: Callable[[], None]) -> list:
        """Schedule `callback`; the returned entry can be passed to `cancel`."""
        entry = [callback]
        with self._cond:
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, next(self._order), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif earliest:
                self._cond.notify()
        return entry

    def cancel(self, entry: list) -> None:
        """The callback will not run; its heap slot is dropped once cancelled slots are half the heap."""
        with self._cond:
            if entry[0] is None:
                return
            entry[0] = None
            self._cancelled += 1
            if self._cancelled * 2 > len(self._heap) and self._cancelled > 64:
                self._heap = [item for item in self._heap if item[2][0] is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                self._cond.wait(max(0.0, self._heap[0][0] - time.monotonic()))
                now, due = time.monotonic(), []
                while self._heap and self._heap[0][0] <= now:
                    entry = heapq.heappop(self._heap)[2]
                    if entry[0] is None:
                        self._cancelled -= 1
                    due.append(entry[0])
                    entry[0] = None  # ran (or cancelled): a late cancel() counts nothing
            for callback in due:
                if callback is not None:
                    try:
                        callback()
                    except Exception:  # noqa: BLE001 - one failing callback must not stop the others
                        log.exception("%s: a deadline callback failed", self.name)
            time.sleep(self.tick_s)
