"""Bounded admission: at most N calls of one kind at once, the next one refused at the door.

The gRPC server runs handlers on one thread pool with a thread for every admitted call
(server.pool_size). A call that may wait on its caller for long (an upload stream, a WatchJob
stream, a request message still arriving) holds its thread while it waits, so each such kind gets
a fixed number of slots (per client address, for messages still arriving), and what a caller can
hold stays bounded; request bytes being handled get a byte budget.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from headswap.errors import ResourceExhausted


class SlotsPerKey:
    """A counter with a limit per key (a client's address): `take(key)` refuses with
    RESOURCE_EXHAUSTED instead of waiting, and one key at its limit refuses only itself."""

    def __init__(self, what: str, limit: int, setting: str) -> None:
        self.what, self.limit, self.setting = what, limit, setting
        self._lock = threading.Lock()
        self._in_use: dict[str, int] = {}

    @contextlib.contextmanager
    def take(self, key: str) -> Iterator[None]:
        with self._lock:
            count = self._in_use.get(key, 0)
            if count >= self.limit:
                raise ResourceExhausted(f"{count} {self.what}; the limit is {self.limit} ({self.setting}); "
                                        "try again when one has finished")
            self._in_use[key] = count + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._in_use[key] - 1
                if left:
                    self._in_use[key] = left
                else:
                    del self._in_use[key]  # the dict holds only keys with slots taken


class Slots(SlotsPerKey):
    """One counter with a limit for a whole kind of call: `take()` refuses instead of waiting."""

    def take(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return super().take("")


class ByteBudget:
    """A byte count with a limit: `take(n)` refuses with RESOURCE_EXHAUSTED instead of waiting."""

    def __init__(self, what: str, limit: int, setting: str) -> None:
        self.what, self.limit, self.setting = what, limit, setting
        self._lock = threading.Lock()
        self.in_use = 0

    def take(self, nbytes: int) -> contextlib.AbstractContextManager[None]:
        """Reserve `nbytes` now (or raise); the returned context manager gives them back."""
        with self._lock:
            if self.in_use + nbytes > self.limit:
                raise ResourceExhausted(f"{_mib(self.in_use)} of {self.what} plus this request's {_mib(nbytes)} "
                                        f"would pass the limit of {_mib(self.limit)} ({self.setting}); "
                                        "retry later, or send smaller requests")
            self.in_use += nbytes
        return self._giving_back(nbytes)

    @contextlib.contextmanager
    def _giving_back(self, nbytes: int) -> Iterator[None]:
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= nbytes


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
