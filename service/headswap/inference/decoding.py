"""Fair sharing of image decoding between concurrent requests.

Decoding is CPU work done in the callers' threads. Slots are taken per image, not per request,
and handed out first come first served, so a request of 48 large images interleaves with other
callers instead of holding the cores for its whole length. Large images (a 36 Mpx PNG takes
about half a second) may hold at most `large_slots` of the slots at once, so small images (the
usual traffic) always find a slot within one small decode.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Callable, Iterator

# Above this many pixels an image counts as large (a 12 Mpx phone photo decodes in ~0.1 s here).
LARGE_IMAGE_PIXELS = 4_000_000
# How often a waiter re-checks whether its caller is still there.
WAIT_SLICE_S = 0.05


class DecodeSlots:
    """A FIFO counting semaphore with a sub-limit for large images."""

    def __init__(self, slots: int, large_slots: int | None = None) -> None:
        self.slots = max(1, slots)
        self.large_slots = max(1, min(self.slots, large_slots if large_slots is not None else self.slots - 1))
        self._cond = threading.Condition()
        self._waiting: deque[tuple[object, bool]] = deque()
        self._busy = 0
        self._busy_large = 0

    def _eligible(self, large: bool) -> bool:
        return self._busy < self.slots and (not large or self._busy_large < self.large_slots)

    def _my_turn(self, ticket: object) -> bool:
        """The first waiter that could run now runs (a large image waiting for a large slot does not
        hold up the small ones behind it)."""
        for waiting, large in self._waiting:
            if self._eligible(large):
                return waiting is ticket
        return False

    @contextlib.contextmanager
    def hold(self, pixels: int, check: Callable[[], None]) -> Iterator[None]:
        """Hold one slot while decoding an image of `pixels` pixels. `check` raises when the caller
        should stop (deadline passed, call cancelled); it is called while waiting."""
        large = pixels > LARGE_IMAGE_PIXELS
        ticket = object()
        with self._cond:
            self._waiting.append((ticket, large))
            try:
                while not self._my_turn(ticket):
                    self._cond.wait(WAIT_SLICE_S)
                    check()
            except BaseException:
                self._waiting.remove((ticket, large))
                self._cond.notify_all()
                raise
            self._waiting.remove((ticket, large))
            self._busy += 1
            self._busy_large += large
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._busy_large -= large
                self._cond.notify_all()
