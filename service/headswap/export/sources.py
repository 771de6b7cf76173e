"""Model sources on the TensorFlow side: `builtin:NAME`, `keras:APPLICATION`, `hub:HANDLE`.

Each source is built into one TensorFlow callable that maps normalised NHWC float32 images to
``{"embedding": [N, D], "probabilities": [N, 1000]}``, plus the preprocessing that produced its
input, written as per-channel mean/std and a channel order so that the server (numpy + Pillow
only) can reproduce it: ``normalised = (pixel_in_channel_order - mean) / std``.

Only the exporter and the trainer import this module; the serving path never does (TensorFlow).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from typing import TYPE_CHECKING

import keras
import numpy as np

if TYPE_CHECKING:  # TensorFlow is imported only where a hub: source needs it, so that the trainer
    import tensorflow as tf  # runs builtin:/keras: backbones on any Keras backend (JAX on a GPU node)

from headswap.errors import FailedPrecondition, InvalidInput
from headswap.models.imagenet import NUM_IMAGENET_CLASSES, imagenet_labels
from headswap.registry.registry import model_name_for_source

log = logging.getLogger(__name__)

KINDS = ("builtin", "keras", "hub")
BUILTINS = ("efficientnet-lite0",)
HUB_URL_SCHEMES = ("https://", "http://", "gs://")
HUB_DEFAULT_SIZE = 224
KERAS_DEFAULT_SIZE = 224

# keras.applications preprocess_input modes, expressed for the server as mean/std per channel.
# "tf": x / 127.5 - 1; "caffe": RGB->BGR then minus the ImageNet mean (BGR); "torch": x / 255 then
# ImageNet mean/std; "raw": the model rescales inside (EfficientNet, EfficientNetV2, ConvNeXt,
# MobileNetV3 carry a Rescaling/Normalization layer), so it takes 0..255 RGB as is.
PREPROCESSING_MODES: dict[str, dict[str, Any]] = {
    "tf": {"channel_order": "RGB", "mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5]},
    "caffe": {"channel_order": "BGR", "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0]},
    "torch": {"channel_order": "RGB", "mean": [0.485 * 255, 0.456 * 255, 0.406 * 255],
              "std": [0.229 * 255, 0.224 * 255, 0.225 * 255]},
    "raw": {"channel_order": "RGB", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
    # TF Hub image models take RGB floats in [0, 1].
    "hub": {"channel_order": "RGB", "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]},
    # EfficientNet-Lite: (x - 127) / 128.
    "efficientnet-lite": {"channel_order": "RGB", "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0]},
}

# keras.applications module (the part after keras.src.applications.) -> preprocessing mode.
KERAS_FAMILY_MODES: dict[str, str] = {
    "mobilenet": "tf",
    "mobilenet_v2": "tf",
    "inception_v3": "tf",
    "inception_resnet_v2": "tf",
    "xception": "tf",
    "resnet_v2": "tf",
    "nasnet": "tf",
    "resnet": "caffe",
    "vgg16": "caffe",
    "vgg19": "caffe",
    "densenet": "torch",
    "efficientnet": "raw",
    "efficientnet_v2": "raw",
    "convnext": "raw",
    "mobilenet_v3": "raw",
}


@dataclass(frozen=True)
class Source:
    """A parsed model source; `str(source)` gives the canonical text (stored in manifests)."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass
class BuiltModel:
    """A source ready to export (and to fine-tune, where it is a Keras model).

    `backbone` maps normalised NHWC float32 images to {"embedding", "probabilities"}: a Keras
    model for builtin/keras sources, a plain TensorFlow callable for hub sources.
    `keras_model` is the underlying Keras classifier whose top layers a phase-2 fine-tune may
    unfreeze (None for hub sources: a restored SavedModel is not a Keras model).
    """

    backbone: Callable[[Any], dict[str, Any]]
    input_size: tuple[int, int]
    preprocessing: dict[str, Any]
    labels: list[str]
    source: str
    weights: str | None
    keras_model: keras.Model | None


def preprocessing_spec(mode: str) -> dict[str, Any]:
    """The manifest's `preprocessing` block for one mode (center crop, then resize)."""
    return {"resize": "center_crop", "mode": mode, **PREPROCESSING_MODES[mode]}


# --- parsing -------------------------------------------------------------------------------


def keras_application_names() -> list[str]:
    """The classifier constructors keras.applications offers (MobileNetV2, ResNet50, ...)."""
    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n)))


def _keras_application_name(value: str) -> str:
    """Canonical spelling of a keras.applications name, matched case-insensitively."""
    names = keras_application_names()
    by_lower = {n.lower(): n for n in names}
    name = by_lower.get(value.strip().lower())
    if name is None:
        raise InvalidInput(f"keras:{value} is not a keras.applications model; available: {', '.join(names)}")
    return name


def parse_source(text: str) -> Source:
    """Parse `KIND:VALUE`; anything that cannot be built is refused here with a clear message."""
    kind, sep, value = (text or "").strip().partition(":")
    kind, value = kind.strip().lower(), value.strip()
    if not sep or kind not in KINDS or not value:
        raise InvalidInput(
            f"model source {text!r} is not KIND:VALUE with KIND one of {', '.join(KINDS)}; e.g. "
            "builtin:efficientnet-lite0, keras:MobileNetV2, hub:https://tfhub.dev/google/imagenet/"
            "mobilenet_v2_100_224/classification/5 or hub:/path/to/saved_model_dir")
    if kind == "builtin":
        if value.lower() not in BUILTINS:
            raise InvalidInput(f"builtin:{value} is unknown; built-in models: {', '.join(BUILTINS)}")
        return Source("builtin", value.lower())
    if kind == "keras":
        return Source("keras", _keras_application_name(value))
    if value.lower().startswith(HUB_URL_SCHEMES):
        return Source("hub", value)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise InvalidInput(f"hub:{value} is neither a URL ({', '.join(HUB_URL_SCHEMES)}) nor an existing "
                           "SavedModel directory")
    if not (path / "saved_model.pb").exists():
        raise InvalidInput(f"hub:{value} is a directory without saved_model.pb: not a SavedModel")
    return Source("hub", str(path.resolve()))


def default_model_name(source: Source | str) -> str:
    """The registry name a source is stored under unless the caller names it."""
    return model_name_for_source(str(source))


# --- sample images -------------------------------------------------------------------------


def sample_pixels(input_size: tuple[int, int], count: int = 4) -> np.ndarray:
    """`count` real-looking uint8 RGB images [N, h, w, 3], center-cropped and resized as the
    server does; scikit-image's photos when installed, else deterministic smooth noise."""
    from PIL import Image

    height, width = input_size
    images: list[np.ndarray] = []
    try:
        from skimage import data

        images = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut()]
    except ImportError:
        rng = np.random.default_rng(0)
        for _ in range(count):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # blobs, not pixel noise
            images.append(np.asarray(Image.fromarray(coarse).resize((256, 256), Image.Resampling.BICUBIC)))
    out = []
    for i in range(count):
        rgb = Image.fromarray(np.ascontiguousarray(images[i % len(images)][..., :3]))
        w, h = rgb.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        resized = rgb.resize((width, height), Image.Resampling.BILINEAR, box=box)
        array = np.asarray(resized, dtype=np.uint8)
        out.append(array if i < len(images) else array[:, ::-1])  # mirror repeats so samples differ
    return np.stack(out)


def normalise(pixels: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """uint8 RGB NHWC -> model input, by the manifest's rule (the server does the same)."""
    batch = pixels.astype(np.float32)
    if preprocessing.get("channel_order", "RGB").upper() == "BGR":
        batch = batch[..., ::-1]
    mean = np.asarray(preprocessing["mean"], dtype=np.float32)
    std = np.asarray(preprocessing["std"], dtype=np.float32)
    return np.ascontiguousarray((batch - mean) / std, dtype=np.float32)


def sample_inputs(input_size: tuple[int, int], preprocessing: dict[str, Any], count: int = 4) -> np.ndarray:
    return normalise(sample_pixels(input_size, count), preprocessing)


# --- building ------------------------------------------------------------------------------


def build(source: Source | str, weights: str | None = None, for_export: bool = True) -> BuiltModel:
    """Build a source into an exportable backbone (see `BuiltModel`).

    `for_export=False`: the trainer only runs a builtin:/keras: backbone (on any Keras backend)."""
    if isinstance(source, str):
        source = parse_source(source)
    needs_tf = for_export or source.kind == "hub"
    if needs_tf and keras.backend.backend() != "tensorflow":
        raise FailedPrecondition(f"exporting needs the TensorFlow Keras backend, not {keras.backend.backend()!r} "
                                 "(unset KERAS_BACKEND)")
    if source.kind == "builtin":
        return _build_builtin(source, weights)
    if source.kind == "keras":
        return _build_keras(source, weights)
    return _build_hub(source, weights)


def _existing_file(weights: str, source: Source) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise InvalidInput(f"weights file {weights} for {source} does not exist")
    return path


def _build_builtin(source: Source, weights: str | None) -> BuiltModel:
    from headswap.models import efficientnet_lite
    from headswap.models.torch_weights import load_state_dict, weights_file

    if weights:
        path = _existing_file(weights, source)
    else:
        try:
            path = weights_file()
        except FileNotFoundError as err:
            raise FailedPrecondition(str(err)) from None
    try:
        state = load_state_dict(path)
        model = efficientnet_lite.build_efficientnet_lite0(state)
    except ValueError as err:
        raise InvalidInput(f"{path.name} is not an EfficientNet-Lite0 state dict: {err}") from None
    size = efficientnet_lite.INPUT_SIZE
    return BuiltModel(backbone=model, input_size=(size, size), preprocessing=preprocessing_spec("efficientnet-lite"),
                      labels=imagenet_labels(), source=str(source), weights=path.name, keras_model=model)


def _classifier_layer(model: keras.Model) -> keras.layers.Layer:
    """The final Dense (or 1x1 Conv2D in MobileNet v1/v3) producing the class scores."""
    with_kernel = [layer for layer in model.layers if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))]
    if not with_kernel:
        raise FailedPrecondition(f"{model.name} has no Dense or Conv2D classifier layer")
    return with_kernel[-1]


def keras_family(application: str) -> str:
    """keras.applications module of an application: MobileNetV2 -> mobilenet_v2."""
    return getattr(keras.applications, application).__module__.rsplit(".", 1)[-1]


def _build_keras(source: Source, weights: str | None) -> BuiltModel:
    constructor = getattr(keras.applications, source.value)
    family = keras_family(source.value)
    mode = KERAS_FAMILY_MODES.get(family)
    if mode is None:
        raise FailedPrecondition(f"keras:{source.value} ({family}): its preprocessing is not known to headswap yet")
    weights = weights or "imagenet"
    if weights == "imagenet":
        try:
            model = constructor(weights="imagenet")
        except Exception as err:  # keras' download raises plain Exception on a fetch failure
            raise FailedPrecondition(
                f"could not get the ImageNet weights of keras:{source.value} ({err}); on a machine without "
                "internet access pass a local weights file (.weights.h5 or .h5)") from None
        weights_name = "imagenet"
    else:
        path = _existing_file(weights, source)
        if path.suffix != ".h5":
            raise InvalidInput(f"weights file {path.name} for {source}: expected a Keras .weights.h5 or .h5 file")
        model = constructor(weights=None)
        try:
            model.load_weights(str(path))
        except Exception as err:  # h5py / keras raise many types for a file that does not fit
            raise InvalidInput(f"weights file {path.name} does not fit {source}: {err}") from None
        weights_name = path.name
    _, height, width, channels = model.input_shape
    height, width = height or KERAS_DEFAULT_SIZE, width or KERAS_DEFAULT_SIZE  # MobileNetV3 takes any size
    if channels != 3:
        raise FailedPrecondition(f"{source} expects {channels} channels (image_data_format must be channels_last)")
    classifier = _classifier_layer(model)
    embedding = classifier.input
    if len(embedding.shape) != 2:  # [N, 1, 1, C] before a 1x1 conv classifier
        embedding = keras.layers.Flatten(name="embedding_flatten")(embedding)
    backbone = keras.Model(model.input, {"embedding": embedding, "probabilities": model.output},
                           name=f"{model.name}_export")
    return BuiltModel(backbone=backbone, input_size=(int(height), int(width)), preprocessing=preprocessing_spec(mode),
                      labels=imagenet_labels(), source=str(source), weights=weights_name, keras_model=model)


def _hub_signature_fn(loaded: Any) -> tuple[Callable[[tf.Tensor], tf.Tensor], list[tf.TensorSpec]]:
    """The callable of a restored SavedModel and its candidate input specs.

    TF2 SavedModels (TF Hub's current format) are callable; TF1 hub modules expose signatures
    that take keyword arguments and return a dict.
    """
    import tensorflow as tf

    if callable(loaded):
        specs = []
        for concrete in getattr(getattr(loaded, "__call__", None), "concrete_functions", []):
            args, _ = concrete.structured_input_signature
            specs += [s for s in args if isinstance(s, tf.TensorSpec)]
        return loaded, specs
    signatures = getattr(loaded, "signatures", {})
    for key in ("serving_default", "default"):
        if key in signatures:
            inputs = signatures[key].structured_input_signature[1]
            if len(inputs) != 1:
                raise InvalidInput(f"hub model signature {key!r} takes {len(inputs)} inputs; expected one image")
            (input_name, spec), = inputs.items()

            def call(images: tf.Tensor, key: str = key) -> tf.Tensor:
                # Through `loaded`: a signature alone does not keep the restored variables alive.
                outputs = loaded.signatures[key](**{input_name: images})
                for name in ("logits", "default", "probabilities", "predictions"):
                    if name in outputs:
                        return outputs[name]
                if len(outputs) == 1:
                    return next(iter(outputs.values()))
                raise InvalidInput(f"hub model signature {key!r} has outputs {sorted(outputs)}; cannot tell "
                                   "which holds the class scores")

            return call, [spec]
    raise InvalidInput("hub model is neither callable nor has a 'serving_default' or 'default' signature")


def _hub_input_size(specs: list[tf.TensorSpec]) -> tuple[int, int]:
    """Fixed height/width from the signature, else the common 224."""
    for spec in specs:
        shape = spec.shape
        if shape.rank == 4 and shape[1] is not None and shape[2] is not None:
            return int(shape[1]), int(shape[2])
    return HUB_DEFAULT_SIZE, HUB_DEFAULT_SIZE


def _build_hub(source: Source, weights: str | None) -> BuiltModel:
    if weights:
        raise InvalidInput(f"{source}: a hub model carries its own weights; do not pass a weights file")
    import tensorflow as tf
    import tensorflow_hub as hub

    try:
        loaded = hub.load(source.value)
    except Exception as err:  # network, format or version errors all end here
        raise FailedPrecondition(f"could not load TF Hub model {source.value}: {err}") from None
    fn, specs = _hub_signature_fn(loaded)
    input_size = _hub_input_size(specs)
    preprocessing = preprocessing_spec("hub")
    probe = np.asarray(fn(tf.constant(sample_inputs(input_size, preprocessing))))
    if probe.ndim != 2 or probe.shape[1] not in (NUM_IMAGENET_CLASSES, NUM_IMAGENET_CLASSES + 1):
        raise InvalidInput(f"{source} outputs shape {list(probe.shape)}; expected [N, 1000] or [N, 1001] "
                           "(an ImageNet image classification model, not a feature vector)")
    background = probe.shape[1] == NUM_IMAGENET_CLASSES + 1
    is_probabilities = bool(np.all(probe >= 0) and np.allclose(probe.sum(axis=1), 1.0, atol=1e-3))
    log.info("hub model %s: %d outputs (%s), input %dx%d", source.value, probe.shape[1],
             "probabilities" if is_probabilities else "logits", *input_size)

    def backbone(images: Any) -> dict[str, Any]:
        """Hub output -> ImageNet-1k probabilities. The embedding is the hub model's own output
        (its logits): fine-tuning a hub classifier trains the new head on those."""
        scores = fn(images)
        if is_probabilities:
            probabilities = scores[:, 1:] if background else scores
            probabilities = probabilities / tf.reduce_sum(probabilities, axis=1, keepdims=True)
        else:
            # softmax over 1001, drop background, renormalise == softmax over the 1000 logits.
            probabilities = tf.nn.softmax(scores[:, 1:] if background else scores, axis=-1)
        return {"embedding": scores, "probabilities": probabilities}

    return BuiltModel(backbone=backbone, input_size=input_size, preprocessing=preprocessing, labels=imagenet_labels(),
                      source=str(source), weights=None, keras_model=None)
