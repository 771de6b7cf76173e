"""Client streams with an idle timeout and a total time limit.

grpc's sync server hands a streaming handler an iterator whose `next()` blocks until the caller
sends, with no timeout: an upload that sends nothing would hold its thread forever. `paced`
reads that iterator in a helper thread (through a 2-message queue, so flow control still holds
back a fast sender) and lets the handler wait with a timeout instead. When the caller is idle
for too long, or the stream has been open too long, the handler gets DeadlineExceeded and ends
the call: the caller sees DEADLINE_EXCEEDED with a message naming the limit (rather than a bare
CANCELLED from `context.cancel()`). The helper thread ends with the call.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator, TypeVar

from headswap.errors import DeadlineExceeded

T = TypeVar("T")
_END = object()


def paced(requests: Iterator[T], idle_s: float, total_s: float, what: str = "the stream") -> Iterator[T]:
    """The caller's messages; DeadlineExceeded after `idle_s` without one or `total_s` in all."""
    items: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def read() -> None:
        try:
            for request in requests:
                if not _put(items, request, stop):
                    return
            _put(items, _END, stop)
        except BaseException as err:  # the caller went away (grpc.RpcError): hand it over
            _put(items, err, stop)

    threading.Thread(target=read, name="stream-reader", daemon=True).start()
    started = time.monotonic()
    try:
        while True:
            left = total_s - (time.monotonic() - started)
            if left <= 0:
                raise DeadlineExceeded(f"{what} has been open for {total_s:g} s, the most allowed "
                                       "(--max-upload-seconds); send less data per call")
            try:
                item = items.get(timeout=min(idle_s, left))
            except queue.Empty:
                if min(idle_s, left) == left:
                    continue  # the total limit: reported at the top of the loop
                raise DeadlineExceeded(f"{what} sent nothing for {idle_s:g} s (--upload-idle-timeout-s); "
                                       "the call was ended, send the data without pauses") from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _put(items: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Blocking put that gives up once the consumer has stopped; False when it did."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False
