"""Metric label values for model names: only models the registry holds.

Callers choose the model names they send; used as Prometheus labels as they come, every unique
name would be a new time series (40,000 names grew /metrics to 113 MB). Names the registry does
not hold share one label, UNKNOWN, so cardinality is bounded by what is stored, not by callers.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

UNKNOWN = "_unknown"
# A registry listing at most this often when unknown names arrive (a flood of unique names
# costs one listing per interval, not one per call).
REFRESH_S = 5.0


class ModelLabels:
    """name -> itself when the registry holds it, else UNKNOWN ("" stays "": no model named)."""

    def __init__(self) -> None:
        self._list: Callable[[], Iterable[str]] = lambda: ()
        self._known: frozenset[str] = frozenset()
        self._listed_at = float("-inf")
        self._lock = threading.Lock()

    def attach(self, list_models: Callable[[], Iterable[str]]) -> None:
        """Follow a registry (its `models` method)."""
        self._list = list_models
        self._listed_at = float("-inf")

    def __call__(self, name: str) -> str:
        if not name or name in self._known:
            return name
        with self._lock:
            if time.monotonic() - self._listed_at >= REFRESH_S:
                self._listed_at = time.monotonic()
                try:
                    self._known = frozenset(self._list())
                except Exception:  # a registry hiccup must not fail the call being counted
                    pass
        return name if name in self._known else UNKNOWN


model_label = ModelLabels()
