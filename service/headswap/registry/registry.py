"""The model registry: `<root>/<model>/<version>/{model.onnx, manifest.json}` plus an active pointer.

Layout, as TF Serving watches a base path:

    <root>/<model>/<version>/model.onnx
    <root>/<model>/<version>/manifest.json   written last: a version without it does not exist
    <root>/<model>/active.json               {"version": N, "history": [older actives...]}

A version is published whole (see `Store.publish_dir`), "active" is one small object replaced
atomically, and `verified_model_path` checks the sha256 recorded in the manifest before anyone
serves the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from headswap.errors import CorruptModel, FailedPrecondition, InvalidInput, NotFound
from headswap.registry.store import MANIFEST, Store, open_store

MODEL_FILE = "model.onnx"
ACTIVE_FILE = "active.json"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MANIFEST_FORMAT = 1


def check_model_name(name: str) -> str:
    """Model names become path segments and metric labels: keep them tame."""
    if not NAME_PATTERN.match(name or ""):
        raise InvalidInput(
            f"invalid model name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    """Versions and active pointers of every model under one store URL."""

    def __init__(self, url: str | Path, cache_dir: Path | None = None) -> None:
        self.store: Store = open_store(str(url))
        self.url = self.store.url
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "headswap" / "registry")
        self._verified: dict[tuple[str, int, int], str] = {}

    # --- reading ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        return [name for name in self.store.list_dirs("") if NAME_PATTERN.match(name)]

    def versions(self, name: str) -> list[int]:
        """Complete versions only: those whose manifest.json has been written."""
        found = []
        for entry in self.store.list_dirs(name):
            if entry.isdigit() and self.store.exists(f"{name}/{entry}/{MANIFEST}"):
                found.append(int(entry))
        return sorted(found)

    def manifest(self, name: str, version: int) -> dict[str, Any]:
        try:
            raw = self.store.read_bytes(f"{name}/{version}/{MANIFEST}")
        except FileNotFoundError:
            raise NotFound(f"model {name!r} has no version {version}") from None
        try:
            return json.loads(raw)
        except ValueError as err:
            raise CorruptModel(f"{name} version {version}: manifest.json is not valid JSON: {err}") from err

    def active_state(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self.store.read_bytes(f"{name}/{ACTIVE_FILE}"))
        except FileNotFoundError:
            return {}

    def active_version(self, name: str) -> int | None:
        """The active version; a model never activated serves its newest version."""
        version = self.active_state(name).get("version")
        if version is not None:
            return int(version)
        versions = self.versions(name)
        return versions[-1] if versions else None

    def resolve(self, name: str, version: int = 0) -> int:
        """The concrete version a request for (name, version) means; 0 = the active one."""
        if version:
            if not self.store.exists(f"{name}/{version}/{MANIFEST}"):
                raise NotFound(f"model {name!r} has no version {version}; versions: {self.versions(name)}")
            return version
        active = self.active_version(name)
        if active is None:
            known = ", ".join(self.models()) or "none"
            raise NotFound(f"unknown model {name!r}; models in the registry: {known}")
        return active

    def verified_model_path(self, name: str, version: int) -> tuple[Path, dict[str, Any]]:
        """The ONNX file and manifest of a version, refusing it if the sha256 does not match."""
        manifest = self.manifest(name, version)
        expected = manifest.get("sha256")
        if not expected:
            raise CorruptModel(f"{name} version {version}: manifest has no sha256")
        try:
            path = self.store.local_path(f"{name}/{version}/{MODEL_FILE}", self.cache_dir)
        except FileNotFoundError:
            raise CorruptModel(f"{name} version {version}: {MODEL_FILE} is missing") from None
        if not path.exists():
            raise CorruptModel(f"{name} version {version}: {MODEL_FILE} is missing")
        actual = self._sha256(path)
        if actual != expected:
            raise CorruptModel(f"{name} version {version}: sha256 of {MODEL_FILE} is {actual}, "
                               f"manifest says {expected}")
        return path, manifest

    def _sha256(self, path: Path) -> str:
        """sha256 of a file, remembered per (path, size, mtime): swapping back to a version
        verified moments ago should not re-read 20 MB while the server is busy."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._verified:
            self._verified[key] = sha256_file(path)
        return self._verified[key]

    # --- writing ---------------------------------------------------------------------------

    def publish(self, name: str, onnx_path: Path, manifest: dict[str, Any], activate: bool = False) -> int:
        """Store a new version (next free number) whole, and optionally make it active."""
        check_model_name(name)
        staging = Path(onnx_path).parent / f".publish-{name}"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            model_copy = staging / MODEL_FILE
            if Path(onnx_path).resolve() != model_copy.resolve():
                model_copy.write_bytes(Path(onnx_path).read_bytes())
            for _ in range(20):
                version = (max(self.versions_including_incomplete(name), default=0)) + 1
                full = dict(manifest, format=MANIFEST_FORMAT, name=name, version=version,
                            sha256=sha256_file(model_copy),
                            created=manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                (staging / MANIFEST).write_text(json.dumps(full, indent=2))
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
        return version

    def versions_including_incomplete(self, name: str) -> list[int]:
        return [int(entry) for entry in self.store.list_dirs(name) if entry.isdigit()]

    def activate(self, name: str, version: int) -> None:
        """Point `active` at a complete version; the previous one goes on the rollback history."""
        if not self.store.exists(f"{name}/{version}/{MANIFEST}"):
            raise NotFound(f"model {name!r} has no version {version}; versions: {self.versions(name)}")
        state = self.active_state(name)
        current = state.get("version")
        history = list(state.get("history", []))
        if current is not None and int(current) != version:
            history.append(int(current))
        self._write_active(name, version, history[-50:])

    def rollback(self, name: str) -> int:
        """Re-activate the version that was active before the current one."""
        state = self.active_state(name)
        history = [v for v in state.get("history", []) if self.store.exists(f"{name}/{v}/{MANIFEST}")]
        if not history:
            if not self.versions(name):
                raise NotFound(f"unknown model {name!r}")
            raise FailedPrecondition(f"model {name!r} has no earlier active version to roll back to")
        previous = history.pop()
        self._write_active(name, previous, history)
        return previous

    def _write_active(self, name: str, version: int, history: list[int]) -> None:
        payload = {"version": version, "history": history,
                   "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.store.write_bytes(f"{name}/{ACTIVE_FILE}", json.dumps(payload).encode())
