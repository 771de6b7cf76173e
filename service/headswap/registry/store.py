"""Where the registry's bytes live: a local directory, or object storage behind the same interface.

The registry only needs a handful of operations, and each store keeps two promises:
`write_bytes` replaces one object whole (readers see the old or the new content, never a mix),
and `publish_dir` makes a version appear complete or not at all.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Protocol

MANIFEST = "manifest.json"
STAGING_DIR = ".staging"  # exports in progress (local registries), beside the models
EXPORT_PREFIX = "headswap-export-"
_HOST_SAFE = re.compile(r"[^A-Za-z0-9._]")
# `.tmp-<version>-<pid>-<random>@<host>`: who is writing a version, so that start-up clean-up can
# tell a live writer from a dead one. Export staging dirs: `headswap-export-<pid>@<host>-<random>`.
_TMP_VERSION = re.compile(r"^\.tmp-\d+-(\d+)-[0-9a-f]+@(.+)$")
_EXPORT_STAGING = re.compile(r"^" + EXPORT_PREFIX + r"(\d+)@(.*)-[A-Za-z0-9_]+$")


def host_tag() -> str:
    """This machine's name as it appears in staging names (no '-' so names stay parseable)."""
    return _HOST_SAFE.sub("_", socket.gethostname())[:64] or "host"


def owner_tag() -> str:
    return f"{os.getpid()}@{host_tag()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def abandoned_staging(path: Path, pattern: re.Pattern, max_age_s: float, now: float | None = None) -> bool:
    """True when a staging directory provably has no live writer: its owning process (on this
    host) is gone, or it has not changed for `max_age_s`."""
    match = pattern.match(path.name)
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > max_age_s:
        return True
    if match is None:
        return False
    pid, host = int(match.group(1)), match.group(2)
    return host == host_tag() and not pid_alive(pid)


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

    def size(self, key: str) -> int:
        """Bytes in one object; raises FileNotFoundError when absent."""

    def publish_dir(self, local_dir: Path, key: str, before_commit: Callable[[], None] | None = None) -> None:
        """Copy a finished local directory to key so that it appears whole: manifest.json last.

        Raises FileExistsError when key already holds a published directory. `before_commit` is
        called right before the step that makes the version appear; raising there stops it.
        """

    def local_path(self, key: str, cache_dir: Path) -> Path:
        """A local file with the object's content (the file itself for a local store)."""

    def delete_prefix(self, key: str) -> None: ...

    def update_bytes(self, key: str, update: Callable[[bytes | None], bytes]) -> bytes:
        """Conditional read-modify-write of one small object: `update(old or None)` -> new content;
        retried when another writer changed the object in between, so no update is lost."""

    def remove_abandoned(self, max_age_s: float) -> list[str]:
        """Remove what crashed writers left (staging of versions and exports); returns the keys."""

    def staging_dir(self) -> Path | None:
        """A local directory where exports are staged (None: the caller's work directory)."""


class LocalStore:
    """A directory tree; versions are written under a temporary name and renamed into place."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a ValueError: the server's start ends with one line, not a traceback
            what = "is a file, not a directory" if isinstance(err, FileExistsError) else \
                f"cannot be created: {err.strerror or err}"
            raise ValueError(f"the model registry {self.root} {what}; give --model-dir a directory") from None
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

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def publish_dir(self, local_dir: Path, key: str, before_commit: Callable[[], None] | None = None) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        pid, host = owner_tag().split("@", 1)
        staging = target.parent / f".tmp-{target.name}-{pid}-{uuid.uuid4().hex[:8]}@{host}"
        try:
            shutil.copytree(local_dir, staging)
            for file in staging.iterdir():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
            if before_commit is not None:
                before_commit()
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
            # Out of sight first (a rename), then removed: readers never see half a version.
            hidden = path.parent / f".tmp-deleting-{path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, hidden)
            shutil.rmtree(hidden, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def update_bytes(self, key: str, update: Callable[[bytes | None], bytes]) -> bytes:
        """An exclusive lock file beside the object (flock: works across processes, released
        when a holder dies), then read, write a temporary file and rename it into place."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                old = path.read_bytes() if path.exists() else None
                new = update(old)
                self.write_bytes(key, new)
                return new
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def remove_abandoned(self, max_age_s: float) -> list[str]:
        removed = []
        now = time.time()
        candidates = [(d, _TMP_VERSION) for model in self.root.iterdir() if model.is_dir()
                      and not model.name.startswith(".") for d in model.glob(".tmp-*") if d.is_dir()]
        candidates += [(d, _EXPORT_STAGING) for d in (self.root / STAGING_DIR).glob(f"{EXPORT_PREFIX}*") if d.is_dir()]
        for directory, pattern in candidates:
            deleting = directory.name.startswith(".tmp-deleting-")
            if deleting or abandoned_staging(directory, pattern, max_age_s, now):
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(str(directory.relative_to(self.root)))
        return removed

    def staging_dir(self) -> Path | None:
        return self.root / STAGING_DIR


def open_store(url: str, timeout_s: float | None = None) -> Store:
    """A store for a registry URL: a plain path or file://PATH (local), or s3://BUCKET/PREFIX.

    `timeout_s` (--store-timeout-s) sets an object store client's connect and read timeouts; the
    bound on whole calls is `bounded.BoundedStore`'s, which the registry wraps around this.
    """
    if url.startswith("file://"):
        return LocalStore(url[len("file://"):])
    if "://" in url:
        from headswap.registry.object_store import ObjectStore  # needs the optional s3 extra

        return ObjectStore(url, timeout_s=timeout_s)
    return LocalStore(url)
