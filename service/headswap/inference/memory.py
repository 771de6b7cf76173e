"""Keeping resident memory flat across model swaps (glibc malloc settings).

ONNX Runtime sessions allocate from many threads; glibc then grows one malloc arena per thread
and keeps freed pages, so resident memory creeps up with every reload (what TF Serving and
Triton users report). Two remedies: few arenas, and handing freed pages back after an unload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)
_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (like MALLOC_ARENA_MAX); call before threads start."""
    if hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_ARENA_MAX, arenas)


def return_freed_memory() -> None:
    """Collect garbage and ask glibc to give freed memory back to the OS."""
    gc.collect()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
