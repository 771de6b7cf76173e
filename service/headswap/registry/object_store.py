"""The registry on object storage (s3://BUCKET/PREFIX, or memory:// for tests) through fsspec.

Object stores have no rename, so a version cannot be written aside and moved into place as on
local disk. The same guarantee comes from three things S3 does give:

- a PUT (or a completed multipart upload) makes one object appear whole, or not at all;
- a conditional PUT (`If-None-Match: *`) creates an object only if it does not exist yet;
- reads and listings are strongly consistent (AWS S3 since 2020, MinIO, moto).

`publish_dir` first claims the version prefix by creating `<version>/.claim.json` exclusively
(a second writer gets FileExistsError and takes the next number, as with a taken directory on
disk), then uploads the files, then `manifest.json` last. Until the manifest exists the prefix is
a half-written version that the registry never lists or serves; a writer killed midway leaves
only such a prefix behind (removed by `remove_abandoned` once older than a grace period).
`active.json` is one PUT, replaced whole, and updated conditionally (`If-Match` on its ETag,
retried on conflict) so that two concurrent activations never lose one another's history.
"""

from __future__ import annotations

import calendar
import errno
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import fsspec
from fsspec.core import url_to_fs

from headswap.config import env_name
from headswap.registry.store import MANIFEST

# Settings.s3_endpoint_url; read from the environment so that every process using the registry
# (server, `headswap export`, training workers) sees the same endpoint.
ENDPOINT_ENV = env_name("s3_endpoint_url")
CLAIM = ".claim.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
UPDATE_ATTEMPTS = 20
# Client-side: each request is tried at most twice by botocore and by s3fs, so a thread left
# behind by a frozen store ends after a few read timeouts (the caller's bound is BoundedStore's).
CLIENT_ATTEMPTS = 2
DEFAULT_TIMEOUT_S = 10.0  # Settings.store_timeout_s's default, for callers that pass none
# What S3 answers when a conditional write lost a race: 412 PreconditionFailed (s3fs: EINVAL, or
# FileExistsError for If-None-Match) and 409 ConditionalRequestConflict (EBUSY).
_CONFLICT_ERRNOS = (errno.EINVAL, errno.EBUSY)
# Stores without conditional writes (memory://, used by tests) serialise updates in-process.
_LOCAL_UPDATES = threading.Lock()


def storage_options(protocol: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """fsspec options for a protocol; s3 gets the endpoint from the environment and no listing cache.

    s3fs caches directory listings per instance by default: a poller would never see a new
    version. Credentials and region come from the usual AWS_* variables / profiles via botocore.
    Connect and read timeouts are `timeout_s` (--store-timeout-s) with few retries: botocore's
    defaults (60 s reads, several attempts, then s3fs' own 5) would keep a request to a frozen
    store going for many minutes.
    """
    if protocol not in ("s3", "s3a"):
        return {}
    options: dict[str, Any] = {
        "use_listings_cache": False,
        "config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                          "retries": {"total_max_attempts": CLIENT_ATTEMPTS, "mode": "standard"}},
    }
    endpoint = os.environ.get(ENDPOINT_ENV, "").strip()
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


class ObjectStore:
    """A `Store` over any fsspec filesystem URL; written for and tested on S3 and memory://."""

    def __init__(self, url: str, timeout_s: float | None = None) -> None:
        protocol = url.split("://", 1)[0].lower()
        if protocol in ("s3", "s3a"):
            try:
                import s3fs  # noqa: F401  (a clear message instead of fsspec's generic one)
            except ImportError as err:
                raise ImportError(f"{url}: object storage needs the s3 extra: pip install 'headswap[s3]'") from err
        self.fs: fsspec.AbstractFileSystem
        self.fs, root = url_to_fs(url, **storage_options(protocol, timeout_s or DEFAULT_TIMEOUT_S))
        if protocol in ("s3", "s3a"):
            self.fs.retries = CLIENT_ATTEMPTS  # s3fs' own retry loop, around botocore's
        self.root = root.rstrip("/")
        if protocol in ("s3", "s3a") and not self.root:
            raise ValueError(f"{url}: name a bucket, as in s3://BUCKET/PREFIX")
        self.protocol = protocol
        self.url = url.rstrip("/")

    def _path(self, key: str) -> str:
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"key {key!r} escapes the registry root")
        return "/".join([self.root, *parts]) if parts else self.root

    # --- reading ---------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def size(self, key: str) -> int:
        return int(self.fs.info(self._path(key)).get("size") or 0)

    def list_dirs(self, prefix: str) -> list[str]:
        """Immediate 'subdirectories' (common prefixes), always fresh from the server."""
        path = self._path(prefix)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        names = {entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries
                 if entry.get("type") == "directory"}
        return sorted(name for name in names if name and not name.startswith("."))

    def local_path(self, key: str, cache_dir: Path) -> Path:
        """Download once into cache_dir (temp file + rename), reused while the object is unchanged.

        The file name carries the object's size and ETag, so an object replaced under the same
        key is fetched again; the registry checks the sha256 of whatever this returns.
        """
        path = self._path(key)
        info = self.fs.info(path)
        size = int(info.get("size") or 0)
        tag = str(info.get("ETag") or info.get("etag") or info.get("created") or "")
        fingerprint = hashlib.sha256(f"{size}:{tag}".encode()).hexdigest()[:16]
        parent, _, name = key.strip("/").rpartition("/")
        folder = Path(cache_dir) / self._cache_id() / parent
        target = folder / f"{fingerprint}-{name}"
        if target.is_file() and target.stat().st_size == size:
            return target
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        os.close(fd)
        try:
            self.fs.get_file(path, tmp)
            if os.path.getsize(tmp) != size:
                raise OSError(f"{self.url}/{key}: downloaded {os.path.getsize(tmp)} bytes, expected {size}")
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        for stale in folder.glob(f"*-{name}"):  # earlier contents of the same key
            if stale != target:
                stale.unlink(missing_ok=True)
        return target

    def _cache_id(self) -> str:
        """A cache subfolder per store, so that two buckets never share cached files."""
        return "/".join(_SAFE.sub("_", part) for part in [self.protocol, *self.root.split("/")] if part)

    # --- writing ---------------------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> None:
        """One PUT: readers see the old object or the new one, never a mix."""
        self.fs.pipe_file(self._path(key), data)

    def publish_dir(self, local_dir: Path, key: str, before_commit: Callable[[], None] | None = None) -> None:
        """Claim key exclusively, upload every file, then manifest.json last (the commit)."""
        local_dir = Path(local_dir)
        if not (local_dir / MANIFEST).is_file():
            raise ValueError(f"{local_dir} has no {MANIFEST}")
        if self.exists(f"{key}/{MANIFEST}"):
            raise FileExistsError(f"{self.url}/{key} already exists")
        self._claim(key)
        for file in sorted(local_dir.iterdir()):
            if file.is_file() and file.name != MANIFEST:
                self.fs.put_file(str(file), self._path(f"{key}/{file.name}"))
        if before_commit is not None:
            before_commit()
        try:
            self.fs.pipe_file(self._path(f"{key}/{MANIFEST}"), (local_dir / MANIFEST).read_bytes(), mode="create")
        except FileExistsError:
            raise FileExistsError(f"{self.url}/{key} was published by another writer") from None

    def _claim(self, key: str) -> None:
        """Create key/.claim.json only if absent: the object-store stand-in for mkdir/rename.

        Reading the claim back also catches a store that ignores If-None-Match (it would let the
        last writer win the PUT: the earlier one then sees a claim that is not its own).
        """
        token = uuid.uuid4().hex
        claim = json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        path = self._path(f"{key}/{CLAIM}")
        for attempt in range(3):
            try:
                self.fs.pipe_file(path, claim, mode="create")
                break
            except FileExistsError:
                raise FileExistsError(f"{self.url}/{key} is taken (published, or being written)") from None
            except OSError:
                # AWS answers 409 ConditionalRequestConflict while a racing conditional PUT is in
                # flight: once the claim exists the read-back below tells whose it is.
                if self.fs.exists(path):
                    break
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))
        try:
            owner = json.loads(self.fs.cat_file(path)).get("token")
        except (FileNotFoundError, ValueError):
            owner = None
        if owner != token:
            raise FileExistsError(f"{self.url}/{key} was claimed by another writer")

    def update_bytes(self, key: str, update: Callable[[bytes | None], bytes]) -> bytes:
        """Read the object and its ETag, PUT the new content only if the ETag is unchanged
        (`If-Match`; `If-None-Match: *` when it did not exist), and start over on a conflict."""
        path = self._path(key)
        if self.protocol not in ("s3", "s3a"):
            with _LOCAL_UPDATES:
                try:
                    old = self.fs.cat_file(path)
                except FileNotFoundError:
                    old = None
                new = update(old)
                self.fs.pipe_file(path, new)
                return new
        bucket, object_key, _ = self.fs.split_path(path)
        for attempt in range(UPDATE_ATTEMPTS):
            try:  # the ETag first, then the body: a change in between makes the PUT fail, as it should
                etag = self.fs.call_s3("head_object", Bucket=bucket, Key=object_key)["ETag"]
                old = self.fs.cat_file(path)
            except FileNotFoundError:
                etag, old = None, None
            new = update(old)
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=object_key, Body=new, **condition)
                self.fs.invalidate_cache(path)
                return new
            except (FileExistsError, FileNotFoundError):
                pass  # created or deleted by someone else in between: start over
            except OSError as err:
                if err.errno not in _CONFLICT_ERRNOS:
                    raise  # the store failed (not a lost race): retrying here would only hide it
            time.sleep(0.05 * (attempt + 1))  # someone else wrote first
        raise OSError(f"{self.url}/{key}: {UPDATE_ATTEMPTS} conflicting updates in a row; try again")

    def remove_abandoned(self, max_age_s: float) -> list[str]:
        """Version prefixes claimed but without a manifest for longer than `max_age_s`: a writer
        that died midway. Younger ones may still be uploading (from any machine) and stay."""
        removed = []
        now = time.time()
        for model in self.list_dirs(""):
            for entry in self.list_dirs(model):
                key = f"{model}/{entry}"
                if not entry.isdigit() or self.exists(f"{key}/{MANIFEST}"):
                    continue
                started = self._claim_time(key)
                if started is not None and now - started > max_age_s:
                    self.delete_prefix(key)
                    removed.append(key)
        return removed

    def _claim_time(self, key: str) -> float | None:
        """When a version prefix was claimed (the claim's own time, else its newest object's)."""
        try:
            claimed = json.loads(self.read_bytes(f"{key}/{CLAIM}")).get("time", "")
            return float(calendar.timegm(time.strptime(claimed, "%Y-%m-%dT%H:%M:%SZ")))
        except (FileNotFoundError, ValueError, TypeError):
            pass
        try:
            entries = self.fs.ls(self._path(key), detail=True, refresh=True)
        except FileNotFoundError:
            return None
        times = [entry.get("LastModified") for entry in entries if entry.get("LastModified")]
        return max(t.timestamp() for t in times) if times else None

    def staging_dir(self) -> Path | None:
        return None

    def delete_prefix(self, key: str) -> None:
        try:
            self.fs.rm(self._path(key), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._path(key))
