"""Embeddings cached by content, so a second job on the same images runs the backbone only on new ones.

Key: (base model, version, sha256 of the base's ONNX file, sha256 of the image bytes). The
embedding is a pure function of those (the preprocessing is part of the base version's manifest),
so a hit is exact. Layout, in the work directory:

    embedding-cache/<base key>/<sha[:2]>/<sha>.f32     raw little-endian float32, one embedding

One file per image keeps every write independent and crash-safe: it is written under a temporary
name and renamed into place, so a reader sees a whole file or none (a file of the wrong size is
treated as a miss and removed). Least recently used files go first when the cache is over its
budget (`--embedding-cache-mb`): a hit refreshes the file's modification time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SUFFIX = ".f32"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    """Embeddings of one base version, bounded in bytes across every base in `root`."""

    def __init__(self, root: Path, base_name: str, base_version: int, base_sha256: str, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        key = _UNSAFE.sub("_", f"{base_name}-v{base_version}-{base_sha256[:16]}")
        self.directory = self.root / key

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}{SUFFIX}"

    def get_many(self, keys: list[str], size: int | None = None) -> dict[int, np.ndarray]:
        """Position -> embedding for every key that is cached (whole); refreshes their LRU time."""
        found: dict[int, np.ndarray] = {}
        if not self.enabled:
            return found
        for position, key in enumerate(keys):
            path = self._path(key)
            try:
                raw = path.read_bytes()
            except OSError:
                continue
            if not raw or len(raw) % 4 or (size is not None and len(raw) != size * 4):
                path.unlink(missing_ok=True)  # not one of ours, or from an older layout
                continue
            found[position] = np.frombuffer(raw, dtype="<f4")
            try:
                os.utime(path)
            except OSError:
                pass
        return found

    def put_many(self, keys: list[str], embeddings: np.ndarray) -> int:
        """Store embeddings (write temp + rename each); returns how many were written."""
        if not self.enabled:
            return 0
        written = 0
        for key, embedding in zip(keys, np.asarray(embeddings, dtype="<f4")):
            path = self._path(key)
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(embedding.tobytes())
                os.replace(tmp, path)
                written += 1
            except OSError as err:  # a full disk must not fail the job: the cache is an optimisation
                Path(tmp).unlink(missing_ok=True)
                log.warning("embedding cache: cannot write %s: %s", path, err)
                break
        return written

    def evict(self) -> int:
        """Remove least recently used files until the whole cache fits its budget; returns bytes freed.
        Leftover temporary files (a crash mid-write) are removed too."""
        if not self.root.exists():
            return 0
        entries: list[tuple[float, int, Path]] = []
        freed = 0
        for path in self.root.rglob("*"):
            try:
                if not path.is_file():
                    continue
                stat = path.stat()
            except OSError:
                continue
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)
                freed += stat.st_size
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        budget = max(self.max_bytes, 0)
        entries.sort()
        for _, size, path in entries:
            if total <= budget:
                break
            path.unlink(missing_ok=True)
            total -= size
            freed += size
        return freed

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob(f"*{SUFFIX}")) if self.root.exists() else 0
