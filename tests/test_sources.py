"""Model sources -> ONNX -> registry, for real: Keras applications, a TF Hub SavedModel, the
built-in EfficientNet-Lite0. Offline and without mocks: weights are written to tmp_path (keras,
hub) or ship with a package (builtin); photos come from scikit-image.

What is checked is what the server relies on: the manifest's preprocessing reproduces each
family's own `preprocess_input`, and ONNX Runtime fed by the server's own image code gives what
TensorFlow gives.
"""

from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest
import skimage.data as skdata
import tensorflow as tf

try:  # a modest thread count for the 2-core CI machine (only possible before TF starts)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:
    pass

import onnxruntime as ort  # noqa: E402
from headswap.errors import InvalidInput  # noqa: E402
from headswap.export import sources  # noqa: E402
from headswap.export.onnx_export import ExportError, export_keras_model, export_source  # noqa: E402
from headswap.inference.images import Preprocessing, to_pixels  # noqa: E402
from headswap.registry.registry import Registry  # noqa: E402
from PIL import Image  # noqa: E402

ESPRESSO = 967


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def server_input(image: np.ndarray, manifest: dict) -> np.ndarray:
    """An RGB photo prepared exactly as the server prepares it from this manifest."""
    prep = Preprocessing.from_manifest(manifest)
    return prep.normalize(to_pixels(Image.fromarray(image), prep.height, prep.width)[None])


def check_common_manifest(manifest: dict, source: str) -> None:
    assert manifest["kind"] == "zero-shot" and manifest["source"] == source
    assert len(manifest["sha256"]) == 64
    assert len(manifest["labels"]) == 1000 and manifest["labels"][ESPRESSO] == "espresso"
    assert manifest["input"]["name"] == "image" and manifest["input"]["layout"] == "NHWC"
    assert manifest["outputs"]["probabilities"] == "probabilities"
    assert manifest["outputs"]["embedding"] == "embedding"
    assert manifest["parity"]["max_abs_diff"] < 1e-4
    assert manifest["parity"]["samples"] >= 4 and manifest["parity"]["opset"] == 17


def check_onnx_io(sess: ort.InferenceSession, height: int, width: int) -> None:
    """One input `image` with a dynamic batch; outputs probabilities then embedding."""
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and isinstance(inp.shape[0], str) and inp.shape[1:] == [height, width, 3]
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "embedding"]


# --- preprocessing table -----------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(sources.KERAS_FAMILY_MODES))
def test_family_preprocessing_matches_keras(family):
    """mean/std/channel order reproduce each keras.applications family's preprocess_input."""
    module = importlib.import_module(f"keras.applications.{family}")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    expected = np.asarray(module.preprocess_input(pixels.copy()))
    spec = sources.preprocessing_spec(sources.KERAS_FAMILY_MODES[family])
    np.testing.assert_allclose(sources.normalise(pixels.astype(np.uint8), spec), expected, rtol=1e-5, atol=1e-4)


def test_every_keras_application_has_a_preprocessing_mode():
    for name in sources.keras_application_names():
        assert sources.keras_family(name) in sources.KERAS_FAMILY_MODES, name


# --- keras ---------------------------------------------------------------------------------------


def calibrated_mobilenet_v2() -> keras.Model:
    """A real MobileNetV2 with untrained weights whose BatchNorm statistics come from real photos.

    Freshly initialised, its activations shrink to ~1e-12 by the last block and every image gets
    the uniform 0.001: a parity check on that proves nothing. One training-mode pass with BN
    momentum 0 sets every moving mean/variance to the batch statistics, and a scaled classifier
    kernel makes the softmax confident, so outputs vary as a trained model's do.
    """
    model = keras.applications.MobileNetV2(weights=None)
    photos = [skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.astronaut(), skdata.hubble_deep_field()]
    batch = np.stack([to_pixels(Image.fromarray(p), 224, 224) for p in photos]).astype(np.float32)
    batch = keras.applications.mobilenet_v2.preprocess_input(batch)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(batch, training=True)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.99
    classifier = model.get_layer("predictions")
    classifier.kernel.assign(classifier.kernel * 20.0)
    return model


def test_keras_application_from_local_weights(tmp_path):
    model = calibrated_mobilenet_v2()
    weights = tmp_path / "mobilenet_v2.weights.h5"
    model.save_weights(weights)
    registry = Registry(tmp_path / "registry")

    name, version = export_source("keras:MobileNetV2", registry, weights=str(weights))

    assert (name, version) == ("mobilenetv2", 1) and registry.active_version(name) == 1
    path, manifest = registry.verified_model_path(name, version)  # checks the sha256 too
    check_common_manifest(manifest, "keras:MobileNetV2")
    assert manifest["weights"] == "mobilenet_v2.weights.h5"
    assert manifest["preprocessing"]["mode"] == "tf"
    assert manifest["preprocessing"]["mean"] == [127.5] * 3 and manifest["preprocessing"]["std"] == [127.5] * 3
    assert manifest["preprocessing"]["channel_order"] == "RGB"
    assert manifest["outputs"]["embedding_size"] == 1280
    sess = session(path)
    check_onnx_io(sess, 224, 224)

    # The server's image path + ONNX Runtime == Keras' own recipe on the same resized image.
    photo = skdata.coffee()
    probabilities, embedding = sess.run(None, {"image": server_input(photo, manifest)})
    resized = to_pixels(Image.fromarray(photo), 224, 224)[None].astype(np.float32)
    keras_input = keras.applications.mobilenet_v2.preprocess_input(resized)  # in place on float arrays
    expected = model.predict(keras_input, verbose=0)
    assert expected.max() > 0.05  # calibrated: not the uniform 0.001
    # The export's own parity (TF vs ORT on identical inputs) is held to 1e-4 in the manifest
    # check above; this comparison also spans two preprocessing formulas ((x-127.5)/127.5 here,
    # x/127.5-1 in Keras), whose rounding the 20x-scaled classifier amplifies to ~1e-4.
    np.testing.assert_allclose(probabilities, expected, atol=5e-4)
    assert int(probabilities.argmax()) == int(expected.argmax())
    pooled = keras.Model(model.input, model.get_layer("predictions").input)
    np.testing.assert_allclose(embedding, pooled.predict(keras_input, verbose=0), rtol=1e-3, atol=1e-4)

    # A second export is a new version; with activate=False the active one stays.
    assert export_source("keras:mobilenetv2", registry, weights=str(weights), activate=False) == (name, 2)
    assert registry.active_version(name) == 1


def test_export_keras_model_with_normalization_constants(tmp_path):
    """A trainer-style model (backbone + head, dict outputs) through `export_keras_model`.

    Its Normalization layer keeps mean/variance as eager tensors that the trace captures, as in
    EfficientNet, EfficientNetV2 and ConvNeXt; tf2onnx's from_function would make them graph
    inputs. The exported graph must take only `image` and still apply them.
    """
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[3600.0, 3000.0, 2500.0])(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    embedding = keras.layers.GlobalAveragePooling2D()(x)
    probabilities = keras.layers.Dense(3, activation="softmax")(embedding)
    model = keras.Model(inputs, {"embedding": embedding, "probabilities": probabilities})
    registry = Registry(tmp_path / "registry")
    manifest_base = {"kind": "fine-tuned", "labels": ["a", "b", "c"],
                     "preprocessing": sources.preprocessing_spec("raw")}

    version = export_keras_model(model, (32, 32), manifest_base, registry, "tiny", activate=True)

    path, manifest = registry.verified_model_path("tiny", version)
    assert manifest["kind"] == "fine-tuned" and manifest["labels"] == ["a", "b", "c"]
    assert manifest["outputs"]["embedding_size"] == 8 and manifest["parity"]["max_abs_diff"] < 1e-5
    sess = session(path)
    check_onnx_io(sess, 32, 32)
    pixels = sources.sample_pixels((32, 32), 4).astype(np.float32)
    probs, emb = sess.run(None, {"image": pixels})
    expected = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(probs, expected["probabilities"], atol=1e-5)
    np.testing.assert_allclose(emb, expected["embedding"], rtol=1e-4, atol=1e-5)
    assert probs.std() > 0.01  # the normalisation constants matter to the answer

    with pytest.raises(ExportError, match="4 labels"):
        export_keras_model(model, (32, 32), {**manifest_base, "labels": list("abcd")}, registry, "tiny")


# --- hub -----------------------------------------------------------------------------------------


class TinyHubClassifier(tf.Module):
    """A TF2 SavedModel shaped like TF Hub's classifiers: [0,1] images in, 1001 logits out
    (index 0 = background), with a fixed 96x96 input signature."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(1)
        self.kernel = tf.Variable(rng.normal(0, 0.5, (3, 3, 3, 16)).astype(np.float32))
        self.dense = tf.Variable(rng.normal(0, 2.0, (16, 1001)).astype(np.float32))
        self.bias = tf.Variable(rng.normal(0, 0.5, (1001,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 96, 96, 3], tf.float32)])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        x = tf.nn.relu(tf.nn.conv2d(images - 0.5, self.kernel, strides=2, padding="SAME"))
        return tf.matmul(tf.reduce_mean(x, axis=[1, 2]), self.dense) + self.bias


def test_hub_saved_model_directory(tmp_path):
    saved = tmp_path / "tiny_classifier" / "1"
    tf.saved_model.save(TinyHubClassifier(), str(saved))
    registry = Registry(tmp_path / "registry")

    name, version = export_source(f"hub:{saved}", registry)

    assert name == "tiny_classifier"
    path, manifest = registry.verified_model_path(name, version)
    check_common_manifest(manifest, f"hub:{saved.resolve()}")
    assert manifest["weights"] is None
    assert manifest["input"]["height"] == 96 and manifest["input"]["width"] == 96  # from the signature
    assert manifest["preprocessing"]["mean"] == [0.0] * 3 and manifest["preprocessing"]["std"] == [255.0] * 3
    assert manifest["outputs"]["embedding_size"] == 1001  # the hub model's own logits
    sess = session(path)
    check_onnx_io(sess, 96, 96)

    image = server_input(skdata.chelsea(), manifest)
    probabilities, embedding = sess.run(None, {"image": image})
    logits = tf.saved_model.load(str(saved))(tf.constant(image)).numpy()
    np.testing.assert_allclose(embedding, logits, rtol=1e-5, atol=1e-5)
    # softmax over 1001, background dropped, renormalised.
    full = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    expected = full[:, 1:] / full[:, 1:].sum()
    assert probabilities.shape == (1, 1000)
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(), 1.0, atol=1e-5)


# --- builtin -------------------------------------------------------------------------------------


def test_builtin_efficientnet_lite0(tmp_path):
    registry = Registry(tmp_path / "registry")

    name, version = export_source("builtin:efficientnet-lite0", registry)

    assert name == "efficientnet-lite0"
    path, manifest = registry.verified_model_path(name, version)
    check_common_manifest(manifest, "builtin:efficientnet-lite0")
    assert manifest["weights"] == "efficientnet-lite0-57934424.pth"
    assert manifest["preprocessing"]["mean"] == [127.0] * 3 and manifest["preprocessing"]["std"] == [128.0] * 3
    assert manifest["outputs"]["embedding_size"] == 1280
    sess = session(path)
    check_onnx_io(sess, 224, 224)

    probabilities, embedding = sess.run(None, {"image": server_input(skdata.coffee(), manifest)})
    assert int(probabilities[0].argmax()) == ESPRESSO
    assert manifest["labels"][int(probabilities[0].argmax())] == "espresso"
    assert probabilities[0, ESPRESSO] == pytest.approx(0.94, abs=0.02)  # the PyTorch reference
    assert embedding.shape == (1, 1280)


# --- bad sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("keras:NoSuchNet", "MobileNetV2"),  # lists what exists
    ("foo:bar", "builtin, keras, hub"),
    ("builtin:unknown", "efficientnet-lite0"),
    ("MobileNetV2", "KIND:VALUE"),
    ("keras:", "KIND:VALUE"),
    ("", "KIND:VALUE"),
    ("hub:/no/such/saved_model", "neither a URL"),
])
def test_bad_sources_are_refused(text, message):
    with pytest.raises(InvalidInput, match=message):
        sources.parse_source(text)


def test_bad_weights_and_names_are_refused(tmp_path):
    registry = Registry(tmp_path / "registry")
    with pytest.raises(InvalidInput, match="does not exist"):
        export_source("keras:MobileNetV2", registry, weights=str(tmp_path / "missing.weights.h5"))
    not_h5 = tmp_path / "weights.bin"
    not_h5.write_bytes(b"\0" * 16)
    with pytest.raises(InvalidInput, match=r"\.weights\.h5"):
        export_source("keras:MobileNetV2", registry, weights=str(not_h5))
    with pytest.raises(InvalidInput, match="not an EfficientNet-Lite0 state dict"):
        export_source("builtin:efficientnet-lite0", registry, weights=str(not_h5))
    with pytest.raises(InvalidInput, match="invalid model name"):
        export_source("builtin:efficientnet-lite0", registry, name="Bad Name")
    not_saved_model = tmp_path / "empty"
    not_saved_model.mkdir()
    with pytest.raises(InvalidInput, match="saved_model.pb"):
        sources.parse_source(f"hub:{not_saved_model}")
    assert registry.models() == []


def test_source_parsing_and_default_names(tmp_path):
    assert sources.parse_source("keras:mobilenetv2") == sources.Source("keras", "MobileNetV2")
    assert sources.parse_source(" Builtin:EfficientNet-Lite0 ") == sources.Source("builtin", "efficientnet-lite0")
    url = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5"
    assert sources.parse_source(f"hub:{url}") == sources.Source("hub", url)
    assert sources.default_model_name(sources.parse_source("builtin:efficientnet-lite0")) == "efficientnet-lite0"
    assert sources.default_model_name(sources.parse_source("keras:MobileNetV2")) == "mobilenetv2"
    assert sources.default_model_name(sources.parse_source(f"hub:{url}")) == "mobilenet_v2_100_224"
    saved = tmp_path / "My Model"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    assert sources.default_model_name(sources.parse_source(f"hub:{saved}")) == "my-model"
