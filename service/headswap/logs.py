"""Logging set-up: plain text for people, or one JSON object per line for log collectors.

Lines that callers can cause at will (a refused or failed call, an audit line for a refusal)
carry `extra={"throttle": key}`: at most `per_minute` of them per key and minute reach the log,
so a caller sending a flood of bad calls cannot fill the disk or push the real audit trail out of
a rotated log. When a key goes over, one line says so; the first line of the next minute says
how many were left out (the `headswap_requests_total` metric still counts every call).
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from pythonjsonlogger.json import JsonFormatter

THROTTLE_KEYS = 4096  # distinct keys remembered; keys come from method names, status codes, credential names


class Throttle(logging.Filter):
    """At most `per_minute` records per `throttle` key and minute; records without one pass."""

    def __init__(self, per_minute: int) -> None:
        super().__init__()
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._windows: dict[str, list[float | int]] = {}  # key -> [window start, logged, left out]

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, "throttle", None)
        if key is None:
            return True
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= 60:
                if len(self._windows) >= THROTTLE_KEYS:
                    self._windows.clear()
                left_out = int(window[2]) if window is not None else 0
                window = self._windows[key] = [now, 0, 0]
                if left_out:
                    record.msg = f"{record.msg} [{left_out} more lines like this were left out in the minute before]"
                    record.left_out = left_out
            if window[1] >= self.per_minute:
                window[2] += 1
                return False
            window[1] += 1
            if window[1] == self.per_minute:
                record.msg = (f"{record.msg} [the limit of {self.per_minute} lines like this a minute is reached "
                              "(--log-refusals-per-minute): more are left out and counted]")
        return True


def configure(level: str = "INFO", fmt: str = "text", refusals_per_minute: int = 60) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"levelname": "level", "asctime": "time"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(Throttle(refusals_per_minute))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
