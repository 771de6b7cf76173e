"""Every model-store call held to a time bound (`--store-timeout-s`), failures as domain errors.

A frozen object store accepts TCP connections and never answers; a dead one refuses them. Either
way a caller must hear within the bound that the store (named by its URL, never credentials) is
unavailable, instead of running out its own deadline or getting a library's traceback. Each call
runs on a daemon thread that the caller stops waiting for at the bound; the S3 client's own
timeouts (`object_store.storage_options`) end that thread soon after.

A conditional update (active.json) that was abandoned before its new content was handed to the
store is stopped there, so "nothing was changed" is then a promise; once the write may have been
sent, the caller is told that the outcome is unknown and how to check it, because the store may
still apply it when it comes back.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from headswap.errors import HeadswapError, StoreOutcomeUnknown, StoreUnavailable
from headswap.registry.store import Store

log = logging.getLogger("headswap.registry")

TIMEOUT_FLAG = "--store-timeout-s"
# Bulk transfers (a model downloaded or a version uploaded) get the bound plus this much time per
# byte: a frozen store is still caught by the client's read timeout, a slow link is not cut off.
MIN_TRANSFER_BYTES_PER_S = 1 << 20
# Compound calls made of several requests (a publish: claim, files, manifest) get this many bounds.
COMPOUND_CALLS = 4
# Start-up housekeeping walks the whole store, one bounded request after another.
HOUSEKEEPING_CALLS = 30
MAX_THREADS = 32  # store calls in flight at once; more wait for a slot within their own bound
# Libraries whose errors mean "the store failed", not a bug of ours.
_STORE_LIBRARIES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3", "requests", "asyncio"}
_USERINFO = re.compile(r"(?<=//)[^/@\s]*@")
_QUERY = re.compile(r"\?[^\s\"']*")


def shown_url(url: str) -> str:
    """A store URL as logs and messages show it: no user:password@, no query (signed URLs)."""
    return _USERINFO.sub("", url).split("?", 1)[0]


class _Abandoned(Exception):
    """Raised inside an update whose caller gave up before the new content was handed over."""


class _Guard:
    """Between a caller that may give up and a store call about to make a change visible: the
    change is sent only if the caller still waits, and the caller learns whether it was sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._sent = False

    def send(self) -> None:
        """Called on the store's thread right before the write; raises once the caller gave up."""
        with self._lock:
            if self._abandoned:
                raise _Abandoned()
            self._sent = True

    def abandon(self) -> bool:
        """The caller gives up; True when the write had already been sent (outcome unknown)."""
        with self._lock:
            self._abandoned = True
            return self._sent


def _is_store_failure(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, FileExistsError, HeadswapError, _Abandoned)):
        return False  # answers, not failures (absent, taken) or already ours
    if isinstance(err, (OSError, TimeoutError)):
        return True
    return type(err).__module__.split(".", 1)[0] in _STORE_LIBRARIES


def _reason(err: BaseException) -> str:
    """One short line about a failure, without URLs' credentials."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = _QUERY.sub("", _USERINFO.sub("", text))  # endpoint URLs' queries: noise, and maybe signatures
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class BoundedStore:
    """A `Store` whose every call ends within its bound, raising StoreUnavailable otherwise."""

    def __init__(self, inner: Store, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"{TIMEOUT_FLAG} must be positive")
        self.inner = inner
        self.url = inner.url
        self.timeout_s = float(timeout_s)
        self.on_wait: Callable[[str], None] | None = None  # told once per call still unanswered
        self._slots = threading.BoundedSemaphore(MAX_THREADS)
        self._failing = False  # logged once when the store starts failing, once when it recovers
        self._state_lock = threading.Lock()

    # --- the Store interface -----------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        return self._call(f"reading {key}", self.inner.read_bytes, key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(f"writing {key}", self.inner.write_bytes, key, data)

    def list_dirs(self, prefix: str) -> list[str]:
        return self._call(f"listing {prefix or 'models'}", self.inner.list_dirs, prefix)

    def exists(self, key: str) -> bool:
        return self._call(f"looking up {key}", self.inner.exists, key)

    def publish_dir(self, local_dir: Path, key: str, before_commit: Callable[[], None] | None = None) -> None:
        """Bounded like an update: a publish abandoned before its commit step (the manifest, the
        rename) never appears later; one abandoned during it may have (StoreOutcomeUnknown)."""
        size = sum(f.stat().st_size for f in Path(local_dir).iterdir() if f.is_file())
        bound = COMPOUND_CALLS * self.timeout_s + size / MIN_TRANSFER_BYTES_PER_S
        guard = _Guard()

        def commit() -> None:
            if before_commit is not None:
                before_commit()
            guard.send()

        try:
            self._call(f"publishing {key}", self.inner.publish_dir, local_dir, key, commit, bound=bound)
        except StoreUnavailable as err:
            if not guard.abandon():
                raise StoreUnavailable(self._message(f"publishing {key}", getattr(err, "why", "failed"),
                                                     "nothing was published; retry later")) from None
            raise StoreOutcomeUnknown(
                f"model store {shown_url(self.url)} did not confirm publishing {key} within {bound:g} s "
                f"({TIMEOUT_FLAG}); the outcome is unknown: it may appear once the store is back") from None

    def local_path(self, key: str, cache_dir: Path) -> Path:
        size = self._call(f"looking up {key}", self.inner.size, key)
        bound = self.timeout_s + size / MIN_TRANSFER_BYTES_PER_S
        return self._call(f"downloading {key}", self.inner.local_path, key, cache_dir, bound=bound)

    def size(self, key: str) -> int:
        return self._call(f"looking up {key}", self.inner.size, key)

    def delete_prefix(self, key: str) -> None:
        self._call(f"deleting {key}", self.inner.delete_prefix, key, bound=COMPOUND_CALLS * self.timeout_s)

    def remove_abandoned(self, max_age_s: float) -> list[str]:
        return self._call("removing abandoned versions", self.inner.remove_abandoned, max_age_s,
                          bound=HOUSEKEEPING_CALLS * self.timeout_s)

    def staging_dir(self) -> Path | None:
        return self.inner.staging_dir()

    def update_bytes(self, key: str, update: Callable[[bytes | None], bytes]) -> bytes:
        """A conditional update, bounded; see the module docstring for what a caller is told.

        Raises StoreUnavailable when the new content was never handed to the store (and now never
        will be), StoreOutcomeUnknown when it may have been written.
        """
        guard = _Guard()

        def guarded(old: bytes | None) -> bytes:
            new = update(old)
            guard.send()
            return new

        what = f"updating {key}"
        try:
            return self._call(what, self.inner.update_bytes, key, guarded)
        except StoreUnavailable as err:
            if not guard.abandon():
                raise StoreUnavailable(self._message(what, getattr(err, "why", "failed"),
                                                     "nothing was changed; retry later")) from None
            raise StoreOutcomeUnknown(
                f"model store {shown_url(self.url)} did not confirm the change of {key} within "
                f"{self.timeout_s:g} s ({TIMEOUT_FLAG}); the outcome is unknown: check with `headswap models` "
                "or GetModel before retrying") from None

    # --- the bound ---------------------------------------------------------------------------

    def _call(self, what: str, function: Callable[..., Any], *args: Any, bound: float | None = None) -> Any:
        """Run `function(*args)` on a daemon thread; wait at most `bound` (default: the timeout)."""
        bound = self.timeout_s if bound is None else bound
        deadline = time.monotonic() + bound
        if not self._slots.acquire(timeout=bound):
            raise self._unavailable(what, f"{MAX_THREADS} earlier calls are still waiting for it")
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = function(*args)
            except BaseException as err:  # handed to the caller, who re-raises or maps it
                outcome["error"] = err
            finally:
                self._slots.release()
                done.set()

        threading.Thread(target=run, name="store-call", daemon=True).start()
        notice = min(2.0, self.timeout_s / 2)
        if self.on_wait is not None and not done.wait(notice):
            self._tell_waiting(what, bound)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise self._unavailable(what, f"did not answer within {bound:g} s ({TIMEOUT_FLAG})")
        error = outcome.get("error")
        if error is None:
            self._mark_ok()
            return outcome.get("value")
        if _is_store_failure(error):
            raise self._unavailable(what, f"failed: {_reason(error)}") from None
        if isinstance(error, (FileNotFoundError, FileExistsError)):
            self._mark_ok()  # the store answered
        raise error

    def _tell_waiting(self, what: str, bound: float) -> None:
        message = (f"waiting for the model store {shown_url(self.url)} ({what}); giving up after {bound:g} s "
                   f"({TIMEOUT_FLAG})")
        try:
            self.on_wait(message)  # type: ignore[misc]
        except Exception as err:  # a progress report must not change what the store call does
            log.debug("store wait notice not delivered: %s", err)

    def _message(self, what: str, why: str, advice: str = "retry later") -> str:
        return f"model store {shown_url(self.url)} unavailable: {what} {why}; {advice}"

    def _unavailable(self, what: str, why: str) -> StoreUnavailable:
        message = self._message(what, why)
        with self._state_lock:
            first, self._failing = not self._failing, True
        if first:  # one line when it starts failing; each failed call is logged by its caller
            log.warning("%s", message)
        err = StoreUnavailable(message)
        err.why = why  # type: ignore[attr-defined]  # for update_bytes' own wording
        return err

    def _mark_ok(self) -> None:
        if self._failing:
            with self._state_lock:
                recovered, self._failing = self._failing, False
            if recovered:
                log.info("model store %s answers again", shown_url(self.url))
