"""Registry on local disk: whole versions, atomic active pointer, rollback, integrity checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from headswap.errors import CorruptModel, FailedPrecondition, InvalidInput, NotFound
from headswap.registry.registry import Registry, check_model_name, model_name_for_source
from test_object_store import bucket_url, fake_model, s3_endpoint  # noqa: F401 (fixtures)


def publish(registry: Registry, tmp_path, name="m", payload=b"onnx-bytes", **kwargs) -> int:
    src = tmp_path / f"src-{os.urandom(4).hex()}.onnx"
    src.write_bytes(payload)
    return registry.publish(name, src, {"labels": ["a", "b"]}, **kwargs)


def test_publish_versions_and_manifest(tmp_path):
    registry = Registry(tmp_path / "reg")
    assert publish(registry, tmp_path) == 1
    assert publish(registry, tmp_path, payload=b"other") == 2
    assert registry.versions("m") == [1, 2] and registry.models() == ["m"]
    manifest = registry.manifest("m", 2)
    assert manifest["version"] == 2 and manifest["name"] == "m" and len(manifest["sha256"]) == 64
    path, _ = registry.verified_model_path("m", 2)
    assert path.read_bytes() == b"other"
    # Never activated: nothing answers until a version is activated (issue 8, item 11).
    assert registry.active_version("m") is None
    with pytest.raises(FailedPrecondition, match="none is active yet.*headswap activate m 2"):
        registry.resolve("m")
    assert registry.resolve("m", 1) == 1  # an explicit version still resolves


def test_activate_and_rollback(tmp_path):
    registry = Registry(tmp_path / "reg")
    for _ in range(3):
        publish(registry, tmp_path)
    registry.activate("m", 1)
    registry.activate("m", 3)
    registry.activate("m", 2)
    assert registry.active_version("m") == 2
    assert registry.rollback("m") == 3 and registry.active_version("m") == 3
    assert registry.rollback("m") == 1
    with pytest.raises(FailedPrecondition, match="no earlier active version"):
        registry.rollback("m")
    with pytest.raises(NotFound, match="no version 9"):
        registry.activate("m", 9)
    with pytest.raises(NotFound):
        registry.rollback("ghost")


def test_incomplete_version_is_invisible(tmp_path):
    registry = Registry(tmp_path / "reg")
    publish(registry, tmp_path, activate=True)
    # What a crash mid-write leaves: a directory without its manifest.
    (tmp_path / "reg" / "m" / "2").mkdir()
    (tmp_path / "reg" / "m" / "2" / "model.onnx").write_bytes(b"half")
    assert registry.versions("m") == [1]
    assert registry.active_version("m") == 1
    with pytest.raises(NotFound):
        registry.activate("m", 2)
    # The next publish skips the taken number rather than overwriting it.
    assert publish(registry, tmp_path) == 3


def test_sha256_mismatch_is_refused(tmp_path):
    registry = Registry(tmp_path / "reg")
    publish(registry, tmp_path)
    (tmp_path / "reg" / "m" / "1" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(CorruptModel, match="sha256"):
        registry.verified_model_path("m", 1)
    (tmp_path / "reg" / "m" / "1" / "model.onnx").unlink()
    with pytest.raises(CorruptModel, match="missing"):
        registry.verified_model_path("m", 1)


def test_active_pointer_is_replaced_atomically(tmp_path):
    """A reader polling while a writer flips the pointer never sees a partial file."""
    registry = Registry(tmp_path / "reg")
    publish(registry, tmp_path)
    publish(registry, tmp_path)
    registry.activate("m", 1)
    writer = subprocess.Popen([sys.executable, "-c", (
        "from headswap.registry.registry import Registry\n"
        f"r = Registry({str(tmp_path / 'reg')!r})\n"
        "for i in range(400): r.activate('m', 1 + i % 2)\n")])
    seen = set()
    while writer.poll() is None:
        raw = (tmp_path / "reg" / "m" / "active.json").read_bytes()
        seen.add(json.loads(raw)["version"])  # raises on a torn read
    assert writer.returncode == 0 and seen <= {1, 2}


def test_names(tmp_path):
    assert check_model_name("digits-v2") == "digits-v2"
    for bad in ("", "UPPER", "../escape", "a/b", "x" * 64):
        with pytest.raises(InvalidInput):
            check_model_name(bad)
    assert model_name_for_source("builtin:efficientnet-lite0") == "efficientnet-lite0"
    assert model_name_for_source("keras:MobileNetV2") == "mobilenetv2"
    assert model_name_for_source("hub:https://example.org/google/mobilenet_v2_100_224/classification/5") == \
        "mobilenet_v2_100_224"


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from config.py; it fails here as soon as the two drift."""
    from pathlib import Path

    from headswap.config import REFERENCE_DOC, reference_document

    doc = (Path(__file__).resolve().parents[1] / REFERENCE_DOC).read_text()
    assert doc == reference_document(), \
        f"{REFERENCE_DOC} is stale: regenerate it with `.venv/bin/python -m headswap.config > {REFERENCE_DOC}`"
    # ... and the command the file names to regenerate it prints exactly that.
    printed = subprocess.run([sys.executable, "-m", "headswap.config"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    assert printed == doc


# --- issue 8: races, retention, clean-up after crashes ------------------------------------


def _activate_all_at_once(make_registry, versions: list[int]) -> dict:
    """One thread per version, released together, each activating its version once."""
    import threading

    barrier = threading.Barrier(len(versions))
    failures = []

    def activate(version: int) -> None:
        registry = make_registry()
        barrier.wait()
        try:
            registry.activate("m", version)
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(err)

    threads = [threading.Thread(target=activate, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    return make_registry().active_state("m")


def test_concurrent_activations_never_drop_a_rollback_entry(tmp_path):
    """Read-modify-write of active.json lost entries when two activations raced (issue 8, item 11)."""
    registry = Registry(tmp_path / "reg")
    versions = [publish(registry, tmp_path) for _ in range(12)]
    for _ in range(4):
        (tmp_path / "reg" / "m" / "active.json").unlink(missing_ok=True)
        state = _activate_all_at_once(lambda: Registry(tmp_path / "reg"), versions)
        assert sorted([state["version"], *state["history"]]) == versions


def test_concurrent_activations_over_s3_are_conditional(bucket_url, tmp_path):
    registry = Registry(bucket_url, cache_dir=tmp_path / "cache")
    versions = [registry.publish("m", fake_model(tmp_path / f"{i}.onnx", seed=i), {"labels": ["0", "1"]})
                for i in range(6)]
    state = _activate_all_at_once(lambda: Registry(bucket_url, cache_dir=tmp_path / "cache"), versions)
    assert sorted([state["version"], *state["history"]]) == versions


def test_retention_keeps_newest_inactive_the_active_and_the_rollback_target(tmp_path):
    for _ in range(3):
        publish(Registry(tmp_path / "reg"), tmp_path)
    registry = Registry(tmp_path / "reg", keep_versions=2)
    registry.activate("m", 1)
    registry.activate("m", 2)  # rollback target: 1
    for _ in range(4):
        publish(registry, tmp_path)  # 4..7, pruned after each publish
    assert registry.versions("m") == [1, 2, 6, 7]
    assert sorted(p.name for p in (tmp_path / "reg" / "m").iterdir() if p.is_dir()) == ["1", "2", "6", "7"]
    assert registry.rollback("m") == 1
    assert Registry(tmp_path / "reg").prune("m", 0) == []  # 0 keeps everything


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_start_up_clean_up_removes_only_abandoned_staging(tmp_path):
    from headswap.registry.store import host_tag

    registry = Registry(tmp_path / "reg")
    publish(registry, tmp_path, activate=True)
    model = tmp_path / "reg" / "m"
    dead = model / f".tmp-2-{_dead_pid()}-0123abcd@{host_tag()}"
    live = model / f".tmp-3-{os.getpid()}-0123abcd@{host_tag()}"
    elsewhere = model / f".tmp-4-{_dead_pid()}-0123abcd@another_host"  # cannot tell: kept until old
    old = model / f".tmp-5-{os.getpid()}-0123abcd@another_host"
    export_dead = tmp_path / "reg" / ".staging" / f"headswap-export-{_dead_pid()}@{host_tag()}-x1y2"
    export_live = tmp_path / "reg" / ".staging" / f"headswap-export-{os.getpid()}@{host_tag()}-x1y2"
    for directory in (dead, live, elsewhere, old, export_dead, export_live):
        directory.mkdir(parents=True)
        (directory / "model.onnx").write_bytes(b"x" * 1000)
    os.utime(old, (0, 0))
    removed = registry.remove_abandoned(max_age_s=3600)
    assert sorted(removed) == sorted(str(p.relative_to(tmp_path / "reg")) for p in (dead, old, export_dead))
    assert live.exists() and elsewhere.exists() and export_live.exists() and not dead.exists()
    assert registry.versions("m") == [1] and registry.active_version("m") == 1


def test_abandoned_claims_on_s3_are_removed_after_the_grace_period(bucket_url, tmp_path):
    import time

    registry = Registry(bucket_url, cache_dir=tmp_path / "cache")
    registry.publish("m", fake_model(tmp_path / "a.onnx", seed=1), {"labels": ["0", "1"]}, activate=True)
    store = registry.store
    stale = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7200))
    fresh = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.write_bytes("m/2/.claim.json", json.dumps({"token": "t", "time": stale}).encode())
    store.write_bytes("m/2/model.onnx", b"half")
    store.write_bytes("m/3/.claim.json", json.dumps({"token": "t", "time": fresh}).encode())
    assert registry.remove_abandoned(max_age_s=3600) == ["m/2"]
    assert not store.exists("m/2/model.onnx") and store.exists("m/3/.claim.json")
    assert registry.versions("m") == [1]
    # The next writer takes number 4: 3 is still claimed by a live upload.
    assert registry.publish("m", fake_model(tmp_path / "b.onnx", seed=2), {"labels": ["0", "1"]}) == 4


def test_s3_update_starts_over_when_another_writer_got_in_between(bucket_url, tmp_path):
    """The If-Match PUT fails (412) when active.json changed after it was read; the update is redone
    on the new content instead of overwriting it."""
    store = Registry(bucket_url, cache_dir=tmp_path / "cache").store
    store.write_bytes("m/active.json", b"first")
    calls = []

    def update(old: bytes | None) -> bytes:
        calls.append(old)
        if len(calls) == 1:
            store.write_bytes("m/active.json", b"theirs")  # another writer, between read and write
        return (old or b"") + b"+mine"

    assert store.update_bytes("m/active.json", update) == b"theirs+mine"
    assert calls == [b"first", b"theirs"] and store.read_bytes("m/active.json") == b"theirs+mine"
