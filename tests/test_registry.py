"""Registry on local disk: whole versions, atomic active pointer, rollback, integrity checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from headswap.errors import CorruptModel, FailedPrecondition, InvalidInput, NotFound
from headswap.registry.registry import Registry, check_model_name, model_name_for_source


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
    # Never activated: the newest version answers.
    assert registry.active_version("m") == 2


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
    publish(registry, tmp_path)
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


def test_readme_configuration_reference_is_current():
    from pathlib import Path

    from headswap.config import reference_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert reference_table() in readme, "README's configuration table is stale: regenerate it from config.py"
