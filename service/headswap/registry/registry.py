"""The model registry: `<root>/<model>/<version>/{model.onnx, manifest.json}` plus an active pointer.

Layout, as TF Serving watches a base path:

    <root>/<model>/<version>/model.onnx
    <root>/<model>/<version>/model.fp32.onnx only in an int8 version: the fp32 file its near ties
                                             are re-checked on (`headswap.export.precision`)
    <root>/<model>/<version>/training_sha256.bin  a fine-tune's training images (sha256), for ranking
    <root>/<model>/<version>/manifest.json   written last: a version without it does not exist
    <root>/<model>/active.json               {"version": N, "history": [older actives...],
                                              "rollout": {candidate, mode, percent, rules...} while one
                                              runs, "last_rollout": the last that ended}

A version is published whole (see `Store.publish_dir`), "active" is one small object replaced
atomically and updated conditionally (`Store.update_bytes`: two activations at once never drop a
rollback entry), and `verified_model_path` (and `verified_extra_files`) check the sha256
recorded in the manifest before anyone serves a file. A model serves only once a version has been
activated: a first version published with activate=false stays dark. `prune` keeps the newest N
inactive versions (never the active one or its rollback target).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from headswap.config import Settings, env_name
from headswap.errors import CorruptModel, FailedPrecondition, InvalidInput, NotFound, shown_name
from headswap.registry.bounded import BoundedStore
from headswap.registry.store import MANIFEST, open_store
from headswap.registry.training_set import TRAINING_SET_FILE

MODEL_FILE = "model.onnx"
RECHECK_FILE = "model.fp32.onnx"  # an int8 version's fp32 file, for its re-check of near ties
# The only other files a version may carry (manifest `files`: name -> sha256); TRAINING_SET_FILE is
# a fine-tune's training images (`headswap.registry.training_set`).
EXTRA_FILES = (RECHECK_FILE, TRAINING_SET_FILE)
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}\Z")
ACTIVE_FILE = "active.json"
ROLLOUT = "rollout"  # active.json: the running rollout (headswap.inference.rollout), absent when none runs
LAST_ROLLOUT = "last_rollout"  # active.json: the last one that ended, with its outcome and figures
# The one model-name rule (every API checks it where a request enters, and the registry again):
# names are path segments and metric labels. `\Z`, not `$`: "$" also matches before a final "\n".
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
MANIFEST_FORMAT = 1


def check_model_name(name: str) -> str:
    """Model names become path segments and metric labels: keep them tame."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidInput(
            f"invalid model name {shown_name(str(name))}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def model_name_for_source(source: str) -> str:
    """The registry name a source is stored under by default: builtin:efficientnet-lite0 ->
    efficientnet-lite0, keras:MobileNetV2 -> mobilenetv2, hub:.../mobilenet_v2/classification/5 ->
    mobilenet_v2."""
    kind, _, value = source.partition(":")
    parts = [p for p in value.rstrip("/").split("/") if p]
    while len(parts) > 1 and (parts[-1].isdigit() or parts[-1] in ("classification", "feature_vector")):
        parts.pop()
    tail = parts[-1] if parts else kind
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in tail.lower()).strip("-._")
    return check_model_name(name[:63] or kind)


def default_store_timeout_s() -> float:
    """--store-timeout-s for processes that get no Settings (training workers, `headswap export`):
    the server exports it to the environment, as it does the S3 endpoint."""
    raw = os.environ.get(env_name("store_timeout_s"), "").strip()
    try:
        value = float(raw) if raw else Settings.store_timeout_s
    except ValueError:
        value = Settings.store_timeout_s
    return value if value > 0 else Settings.store_timeout_s


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    """Versions and active pointers of every model under one store URL."""

    def __init__(self, url: str | Path, cache_dir: Path | None = None, keep_versions: int = 0,
                 store_timeout_s: float | None = None) -> None:
        timeout = store_timeout_s or default_store_timeout_s()
        # Every store call is bounded and fails as StoreUnavailable naming the store (bounded.py).
        self.store = BoundedStore(open_store(str(url), timeout), timeout)
        self.url = self.store.url
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "headswap" / "registry")
        self.keep_versions = keep_versions  # applied after each publish; 0 keeps every version
        self._verified: dict[tuple[str, int, int], str] = {}
        # Called with (name, version) right before a version is written; raising stops the publish
        # (a fine-tune's worker checks there that its job was not cancelled: training.worker).
        self.before_publish: Callable[[str, int], None] | None = None

    @property
    def on_store_wait(self) -> Callable[[str], None] | None:
        """Called with a one-line message when a store call has gone unanswered for a while
        (a training job reports it as a progress event)."""
        return self.store.on_wait

    @on_store_wait.setter
    def on_store_wait(self, callback: Callable[[str], None] | None) -> None:
        self.store.on_wait = callback

    # --- reading ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        return [name for name in self.store.list_dirs("") if NAME_PATTERN.match(name)]

    def versions(self, name: str) -> list[int]:
        """Complete versions only: those whose manifest.json has been written."""
        check_model_name(name)
        found = []
        for entry in self.store.list_dirs(name):
            if entry.isdigit() and self.store.exists(f"{name}/{entry}/{MANIFEST}"):
                found.append(int(entry))
        return sorted(found)

    def manifest(self, name: str, version: int) -> dict[str, Any]:
        check_model_name(name)
        try:
            raw = self.store.read_bytes(f"{name}/{version}/{MANIFEST}")
        except FileNotFoundError:
            raise NotFound(f"model {name!r} has no version {version}") from None
        try:
            return json.loads(raw)
        except ValueError as err:
            raise CorruptModel(f"{name} version {version}: manifest.json is not valid JSON: {err}") from err

    def active_state(self, name: str) -> dict[str, Any]:
        check_model_name(name)
        try:
            return json.loads(self.store.read_bytes(f"{name}/{ACTIVE_FILE}"))
        except FileNotFoundError:
            return {}

    def active_version(self, name: str) -> int | None:
        """The active version; None until one is activated (a version published with
        activate=false must not start answering just because it is the only one)."""
        version = self.active_state(name).get("version")
        return int(version) if version is not None else None

    def resolve(self, name: str, version: int = 0) -> int:
        """The concrete version a request for (name, version) means; 0 = the active one."""
        check_model_name(name)
        if version:
            if not self.store.exists(f"{name}/{version}/{MANIFEST}"):
                raise NotFound(f"model {name!r} has no version {version}; versions: {self.versions(name)}")
            return version
        active = self.active_version(name)
        if active is None:
            versions = self.versions(name)
            if versions:
                raise FailedPrecondition(
                    f"model {name!r} has versions {versions} but none is active yet; activate one first "
                    f"(`headswap activate {name} {versions[-1]}`) or ask for a version explicitly")
            known = ", ".join(self.models()) or "none"
            raise NotFound(f"unknown model {name!r}; models in the registry: {known}")
        return active

    def verified_model_path(self, name: str, version: int) -> tuple[Path, dict[str, Any]]:
        """The ONNX file and manifest of a version, refusing it if the sha256 does not match."""
        check_model_name(name)
        manifest = self.manifest(name, version)
        expected = manifest.get("sha256")
        if not expected:
            raise CorruptModel(f"{name} version {version}: manifest has no sha256")
        return self._verified_file(name, version, MODEL_FILE, expected), manifest

    def verified_extra_files(self, name: str, version: int, manifest: dict[str, Any]) -> dict[str, Path]:
        """The version's other files (manifest `files`, see EXTRA_FILES), each checked against its
        sha256 like the model file; {} for a version that has none."""
        files = manifest.get("files", {})
        if not isinstance(files, dict) or not all(
                file in EXTRA_FILES and isinstance(digest, str) and SHA256_PATTERN.match(digest)
                for file, digest in files.items()):
            raise CorruptModel(f"{name} version {version}: its manifest's files must map "
                               f"{', '.join(EXTRA_FILES)} to a sha256, got {shown_name(str(files))}")
        return {file: self._verified_file(name, version, file, expected) for file, expected in files.items()}

    def verified_fp32_path(self, name: str, version: int) -> tuple[Path, dict[str, Any]]:
        """The fp32 ONNX file of a version, for training on it: an int8 version's RECHECK_FILE, any
        other version's model file (a bf16 version's is the fp32 file). The returned manifest's
        sha256 is that file's, so embedding caches and the fine-tune's record name what was used."""
        path, manifest = self.verified_model_path(name, version)
        files = self.verified_extra_files(name, version, manifest)
        if RECHECK_FILE in files:
            return files[RECHECK_FILE], dict(manifest, sha256=manifest["files"][RECHECK_FILE])
        return path, manifest

    def _verified_file(self, name: str, version: int, file: str, expected: str) -> Path:
        """A local copy of one of the version's files, refused (CorruptModel) when missing or changed."""
        try:
            path = self.store.local_path(f"{name}/{version}/{file}", self.cache_dir)
        except FileNotFoundError:
            raise CorruptModel(f"{name} version {version}: {file} is missing") from None
        if not path.exists():
            raise CorruptModel(f"{name} version {version}: {file} is missing")
        actual = self._sha256(path)
        if actual != expected:
            raise CorruptModel(f"{name} version {version}: sha256 of {file} is {actual}, manifest says {expected}")
        return path

    def _sha256(self, path: Path) -> str:
        """sha256 of a file, remembered per (path, size, mtime): swapping back to a version
        verified moments ago should not re-read 20 MB while the server is busy."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._verified:
            self._verified[key] = sha256_file(path)
        return self._verified[key]

    # --- writing ---------------------------------------------------------------------------

    def publish(self, name: str, onnx_path: Path, manifest: dict[str, Any], activate: bool = False,
                extra_files: dict[str, Path] | None = None) -> int:
        """Store a new version (next free number) whole, and optionally make it active.
        `extra_files` (names from EXTRA_FILES) are stored beside the model, with their sha256."""
        check_model_name(name)
        extra_files = extra_files or {}
        unknown = sorted(set(extra_files) - set(EXTRA_FILES))
        if unknown:
            raise ValueError(f"a version cannot carry {unknown}; only {', '.join(EXTRA_FILES)}")
        staging = Path(onnx_path).parent / f".publish-{name}"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            model_copy = staging / MODEL_FILE
            if Path(onnx_path).resolve() != model_copy.resolve():
                model_copy.write_bytes(Path(onnx_path).read_bytes())
            manifest = {key: value for key, value in manifest.items() if key != "files"}  # only what is stored
            for file, source in sorted(extra_files.items()):
                (staging / file).write_bytes(Path(source).read_bytes())
                manifest.setdefault("files", {})[file] = sha256_file(staging / file)
            for _ in range(20):
                version = (max(self.versions_including_incomplete(name), default=0)) + 1
                full = dict(manifest, format=MANIFEST_FORMAT, name=name, version=version,
                            sha256=sha256_file(model_copy),
                            created=manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                (staging / MANIFEST).write_text(json.dumps(full, indent=2))
                if self.before_publish is not None:
                    self.before_publish(name, version)
                try:
                    self.store.publish_dir(staging, f"{name}/{version}")
                    break
                except FileExistsError:
                    continue  # another writer took this number: take the next one
            else:
                raise RuntimeError(f"could not allocate a version number for {name}")
        finally:
            for file in staging.iterdir():
                file.unlink()
            staging.rmdir()
        if activate:
            self.activate(name, version)
        if self.keep_versions:
            self.prune(name, self.keep_versions)
        return version

    def versions_including_incomplete(self, name: str) -> list[int]:
        check_model_name(name)
        return [int(entry) for entry in self.store.list_dirs(name) if entry.isdigit()]

    def activate(self, name: str, version: int) -> None:
        """Point `active` at a complete version; the previous one goes on the rollback history."""
        if not self.store.exists(f"{name}/{version}/{MANIFEST}"):
            raise NotFound(f"model {name!r} has no version {version}; versions: {self.versions(name)}")

        def change(state: dict[str, Any]) -> tuple[int, list[int]]:
            current = state.get("version")
            history = [int(v) for v in state.get("history", [])]
            if current is not None and int(current) != version:
                history.append(int(current))
            return version, history[-50:]

        self._update_active(name, change)

    def rollback(self, name: str) -> int:
        """Re-activate the version that was active before the current one."""

        def change(state: dict[str, Any]) -> tuple[int, list[int]]:
            history = [int(v) for v in state.get("history", []) if self.store.exists(f"{name}/{v}/{MANIFEST}")]
            if not history:
                if not self.versions(name):
                    raise NotFound(f"unknown model {name!r}")
                raise FailedPrecondition(f"model {name!r} has no earlier active version to roll back to")
            previous = history.pop()
            return previous, history

        return self._update_active(name, change)

    def start_rollout(self, name: str, candidate: int, make: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Put a rollout of `candidate` in the pointer: `make(stable)` gives its record. Refused
        (nothing written) without an active version, while another rollout runs, or for a version
        that is not stored or is the active one."""
        if not self.store.exists(f"{name}/{candidate}/{MANIFEST}"):
            raise NotFound(f"model {name!r} has no version {candidate}; versions: {self.versions(name)}")

        def change(state: dict[str, Any]) -> dict[str, Any]:
            stable = state.get("version")
            if stable is None:
                raise FailedPrecondition(f"model {name!r} has no active version to roll out against; activate "
                                         f"one first (`headswap activate {name} VERSION`)")
            running = state.get(ROLLOUT)
            if running:
                raise FailedPrecondition(f"model {name!r} already has a rollout of version "
                                         f"{running.get('candidate')} in progress; promote or abort it first")
            if int(stable) == candidate:
                raise InvalidInput(f"version {candidate} of {name!r} is already the active version; roll out "
                                   "another version")
            return dict(state, **{ROLLOUT: make(int(stable))})

        return self.update_state(name, change)[ROLLOUT]

    def end_rollout(self, name: str, promote: bool, outcome: str, event: dict[str, Any],
                    rollout_id: str | None = None) -> dict[str, Any]:
        """End the running rollout in one write: promoted, the candidate becomes the active version
        (stable goes on the rollback history); else the pointer keeps stable. `rollout_id`: only that
        rollout (an automatic decision of a rollout someone already ended changes nothing).
        Returns the ended rollout's record, as kept under LAST_ROLLOUT."""
        check_model_name(name)

        def change(state: dict[str, Any]) -> dict[str, Any]:
            running = state.get(ROLLOUT)
            if not running or (rollout_id is not None and running.get("id") != rollout_id):
                if state.get("version") is None and not self.versions(name):
                    raise NotFound(f"unknown model {name!r}; models in the registry: "
                                   f"{', '.join(self.models()) or 'none'}")
                raise FailedPrecondition(f"model {name!r} has no rollout in progress"
                                         + (" (it ended already)" if rollout_id is not None else ""))
            ended = dict(running, outcome=outcome, ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         events=[*running.get("events", []), event][-20:])
            state = {key: value for key, value in state.items() if key != ROLLOUT}
            state[LAST_ROLLOUT] = ended
            if promote:
                history = [int(v) for v in state.get("history", [])]
                if state.get("version") is not None and int(state["version"]) != int(running["candidate"]):
                    history.append(int(state["version"]))
                state.update(version=int(running["candidate"]), history=history[-50:])
            return state

        return self.update_state(name, change)[LAST_ROLLOUT]

    def _update_active(self, name: str, change: Any) -> int:
        """Conditional read-modify-write of active.json; `change(state) -> (version, history)`.
        Refused while a rollout runs: it ends by promote or abort, not by moving the pointer under it."""

        def update(state: dict[str, Any]) -> dict[str, Any]:
            if state.get(ROLLOUT):
                raise FailedPrecondition(
                    f"model {name!r} has a rollout of version {state[ROLLOUT].get('candidate')} in progress; "
                    f"promote or abort it first (`headswap rollout promote|abort {name}`)")
            version, history = change(state)
            return dict(state, version=version, history=history)

        return int(self.update_state(name, update)["version"])

    def update_state(self, name: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Conditional read-modify-write of the whole pointer (version, history, rollout): one atomic
        write, retried when another writer got there first; `change` raising writes nothing."""
        check_model_name(name)

        def update(old: bytes | None) -> bytes:
            state = change(json.loads(old) if old else {})
            state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            return json.dumps(state).encode()

        return json.loads(self.store.update_bytes(f"{name}/{ACTIVE_FILE}", update))

    # --- housekeeping ----------------------------------------------------------------------

    def prune(self, name: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` inactive versions; the active version and the rollback
        target (the last history entry) are never deleted. Returns the deleted versions."""
        if keep <= 0:
            return []
        state = self.active_state(name)
        protected = {int(v) for v in [state.get("version"), *state.get("history", [])[-1:],
                                      (state.get(ROLLOUT) or {}).get("candidate")] if v is not None}
        inactive = [v for v in self.versions(name) if v not in protected]
        doomed = inactive[:-keep] if len(inactive) > keep else []
        for version in doomed:
            # The manifest first: from then on the version does not exist for anyone.
            self.store.delete_prefix(f"{name}/{version}/{MANIFEST}")
            self.store.delete_prefix(f"{name}/{version}")
        return doomed

    def remove_abandoned(self, max_age_s: float) -> list[str]:
        """What writers that died midway left in the store (see `Store.remove_abandoned`)."""
        return self.store.remove_abandoned(max_age_s)

    def staging_dir(self, fallback: Path) -> Path:
        """Where exports are staged: inside a local registry (same file system, cleaned at
        start-up), else `fallback` (the work directory); never the system temp directory."""
        directory = self.store.staging_dir() or Path(fallback)
        directory.mkdir(parents=True, exist_ok=True)
        return directory
