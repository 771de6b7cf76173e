"""Where the registry's bytes live: a local directory, or object storage behind the same interface.

The registry only needs a handful of operations, and each store keeps two promises:
`write_bytes` replaces one object whole (readers see the old or the new content, never a mix),
and `publish_dir` makes a version appear complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Protocol

MANIFEST = "manifest.json"


class Store(Protocol):
    """The storage operations the registry is built on. Keys are '/'-separated, relative."""

    url: str

    def read_bytes(self, key: str) -> bytes:
        """Whole object; raises FileNotFoundError when absent."""

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically create or replace one small object."""

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate children 'directories' under prefix ('' = the root)."""

    def exists(self, key: str) -> bool: ...

    def publish_dir(self, local_dir: Path, key: str) -> None:
        """Copy a finished local directory to key so that it appears whole: manifest.json last.

        Raises FileExistsError when key already holds a published directory.
        """

    def local_path(self, key: str, cache_dir: Path) -> Path:
        """A local file with the object's content (the file itself for a local store)."""

    def delete_prefix(self, key: str) -> None: ...


class LocalStore:
    """A directory tree; versions are written under a temporary name and renamed into place."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"key {key!r} escapes the registry root")
        return path

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def publish_dir(self, local_dir: Path, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(local_dir, staging)
            for file in staging.iterdir():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
            # rename() of a directory onto an existing non-empty one fails: a taken version
            # number is never overwritten.
            try:
                os.rename(staging, target)
            except OSError as err:
                if target.exists():
                    raise FileExistsError(f"{key} already exists") from err
                raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def local_path(self, key: str, cache_dir: Path) -> Path:
        return self._path(key)

    def delete_prefix(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def open_store(url: str) -> Store:
    """A store for a registry URL: a plain path or file://PATH (local), or s3://BUCKET/PREFIX."""
    if url.startswith("file://"):
        return LocalStore(url[len("file://"):])
    if "://" in url:
        from headswap.registry.object_store import ObjectStore  # needs the optional s3 extra

        return ObjectStore(url)
    return LocalStore(url)
