"""TensorFlow -> ONNX: convert a backbone with tf2onnx, check parity, publish to the registry.

Everything the server runs goes through here, so the guarantees live here: the ONNX graph takes
`image` (float32 NHWC, dynamic batch) and returns `probabilities` then `embedding`, and ONNX
Runtime agrees with TensorFlow on real sample images to 1e-4 before a version is published.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# tf2onnx converts a TensorFlow graph: an export runs Keras on TensorFlow whatever KERAS_BACKEND says
# (`KERAS_BACKEND=jax headswap export` refused before). Keras reads the variable once, on import; a
# process that imported it already (a phase 2 worker) runs TensorFlow anyway.
if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402

from headswap.errors import FailedPrecondition
from headswap.export import sources
from headswap.export.precision import BuiltTier, Tier
from headswap.float32 import exact_float32
from headswap.registry.registry import Registry, check_model_name
from headswap.registry.store import EXPORT_PREFIX, owner_tag

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "embedding")  # in this order: servers read output 0 as the scores
DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_SAMPLES = 4


class ExportError(FailedPrecondition):
    """A source that converts, but not faithfully (or not at all): nothing is published."""


Backbone = Callable[[Any], dict[str, Any]]


def _run(fn_or_model: Backbone, images: Any) -> dict[str, Any]:
    """Call a Keras model in inference mode (BatchNorm, Dropout) or a plain TF callable."""
    if isinstance(fn_or_model, keras.Model):
        outputs = fn_or_model(images, training=False)
    else:
        outputs = fn_or_model(images)
    if not isinstance(outputs, dict) or set(OUTPUT_NAMES) - set(outputs):
        raise ExportError(f"the backbone must return a dict with {', '.join(OUTPUT_NAMES)}; "
                          f"got {type(outputs).__name__}")
    return outputs


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename one tensor everywhere it appears in the graph."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def _inline_captured_constants(model: onnx.ModelProto, concrete: Any) -> None:
    """Turn captured constant tensors back into initializers.

    tf2onnx's `from_function` lists every non-resource capture of the traced function as a graph
    input (its `from_keras` filters them out). Keras 3 `Normalization` layers (EfficientNet,
    EfficientNetV2, ConvNeXt) keep their mean/variance as eager tensors, which the trace
    captures, so without this the graph would ask the caller for them.
    """
    import onnx.numpy_helper

    values: dict[str, np.ndarray] = {}
    for external, internal in concrete.graph.captures:
        if internal.dtype != tf.resource and hasattr(external, "numpy"):
            values[internal.name] = external.numpy()
            values[internal.name.split(":")[0]] = values[internal.name]
    graph = model.graph
    keep = []
    for value in graph.input:
        if value.name in values:
            graph.initializer.append(onnx.numpy_helper.from_array(values[value.name], value.name))
        else:
            keep.append(value)
    if len(keep) != len(graph.input):
        del graph.input[:]
        graph.input.extend(keep)


def _tidy_io(model: onnx.ModelProto) -> None:
    """Input `image`, outputs exactly (`probabilities`, `embedding`) in that order, batch named
    `batch`. tf2onnx names outputs after the dict keys, but TF flattens a dict in sorted key order
    (embedding first), and a different tf2onnx may name them `Identity:0`..."""
    graph = model.graph
    inputs = [value.name for value in graph.input]
    if len(inputs) != 1:
        raise ExportError(f"converted graph has inputs {inputs}; expected one image input")
    if inputs[0] != INPUT_NAME:
        _rename_value(graph, inputs[0], INPUT_NAME)
    names = [value.name for value in graph.output]
    if len(names) != len(OUTPUT_NAMES):
        raise ExportError(f"converted graph has outputs {names}; expected {list(OUTPUT_NAMES)}")
    if set(names) != set(OUTPUT_NAMES):
        # tf.function flattens the returned dict in sorted key order: embedding, probabilities.
        for old, new in zip(names, sorted(OUTPUT_NAMES)):
            _rename_value(graph, old, f"__{new}")
        for new in OUTPUT_NAMES:
            _rename_value(graph, f"__{new}", new)
    by_name = {value.name: value for value in graph.output}
    ordered = [onnx.ValueInfoProto() for _ in OUTPUT_NAMES]
    for target, name in zip(ordered, OUTPUT_NAMES):
        target.CopyFrom(by_name[name])
    del graph.output[:]
    graph.output.extend(ordered)
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"


def convert(fn_or_model: Backbone, input_size: tuple[int, int], output_path: str | Path,
            opset: int = DEFAULT_OPSET) -> None:
    """Convert a backbone (images -> {"probabilities", "embedding"}) to an ONNX file."""
    import tf2onnx

    height, width = input_size
    spec = tf.TensorSpec([None, height, width, 3], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = _run(fn_or_model, image)
        return {name: tf.identity(outputs[name], name=name) for name in OUTPUT_NAMES}

    try:
        model, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=opset)
    except Exception as err:  # tf2onnx raises anything from ValueError to its own types
        raise ExportError(f"tf2onnx could not convert the model: {type(err).__name__}: {err}") from err
    _inline_captured_constants(model, serve.get_concrete_function())
    _tidy_io(model)
    model.producer_name = "headswap"
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the converted ONNX graph is invalid: {err}") from err
    onnx.save(model, str(output_path))


def check_parity(fn_or_model: Backbone, onnx_path: str | Path, input_size: tuple[int, int], samples: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Max abs difference TF vs ONNX Runtime on `samples` (normalised NHWC); refuse above tolerance."""
    import onnxruntime as ort

    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if samples.ndim != 4 or samples.shape[1:3] != tuple(input_size):
        raise ExportError(f"parity samples have shape {samples.shape}; "
                          f"expected [N, {input_size[0]}, {input_size[1]}, 3]")
    with exact_float32():  # ONNX Runtime runs full float32: so must the reference (no TF32 on a GPU)
        expected = {name: np.asarray(value) for name, value in _run(fn_or_model, tf.constant(samples)).items()}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: samples})))
    for name in OUTPUT_NAMES:
        if got[name].shape != expected[name].shape:
            raise ExportError(f"ONNX output {name} has shape {got[name].shape}, TensorFlow {expected[name].shape}")
    diff = float(np.max(np.abs(got["probabilities"] - expected["probabilities"])))
    embedding_diff = float(np.max(np.abs(got["embedding"] - expected["embedding"])))
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportError(f"ONNX Runtime and TensorFlow disagree: max abs difference of probabilities "
                          f"{diff:.3g} over {len(samples)} samples (tolerance {tolerance:g}); not publishing")
    return {"max_abs_diff": diff, "embedding_max_abs_diff": embedding_diff, "samples": int(len(samples)),
            "num_classes": int(expected["probabilities"].shape[1]),
            "embedding_size": int(expected["embedding"].shape[1])}


def export_keras_model(model_or_fn: Backbone, input_size: tuple[int, int], manifest_base: dict[str, Any],
                       registry: Registry, name: str, activate: bool = True, opset: int = DEFAULT_OPSET,
                       tier: Tier | None = None, files: dict[str, Path] | None = None) -> int:
    """Convert, check parity on sample images and publish one version; returns its number.

    `manifest_base` carries at least `labels` and `preprocessing` (the exporter adds `input`,
    `outputs`, `parity`); the fine-tune trainer passes backbone + new head as one model.
    `tier` turns the checked fp32 file into a precision tier (`headswap.export.precision`): it
    returns the file to publish and the manifest fields to add, or refuses. `files`: other files
    the version carries (a fine-tune's training set, `headswap.registry.training_set`).
    """
    check_model_name(name)
    labels = list(manifest_base.get("labels") or [])
    preprocessing = manifest_base["preprocessing"]
    height, width = input_size
    # Staged beside the registry (or under the work directory), named after this process, so that
    # start-up clean-up can remove what a killed export left; never in the system temp directory.
    staging = registry.staging_dir(registry.cache_dir.parent / "staging")
    with tempfile.TemporaryDirectory(prefix=f"{EXPORT_PREFIX}{owner_tag()}-", dir=staging) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        started = time.monotonic()
        convert(model_or_fn, input_size, onnx_path, opset=opset)
        converted = time.monotonic()
        samples = sources.sample_inputs(input_size, preprocessing, PARITY_SAMPLES)
        parity = check_parity(model_or_fn, onnx_path, input_size, samples)
        if labels and parity["num_classes"] != len(labels):
            raise ExportError(f"the model has {parity['num_classes']} classes but {len(labels)} labels")
        manifest = {
            **manifest_base,
            "input": {"name": INPUT_NAME, "height": height, "width": width, "layout": "NHWC", "dtype": "float32"},
            "outputs": {"probabilities": "probabilities", "embedding": "embedding",
                        "embedding_size": parity["embedding_size"]},
            "parity": {"max_abs_diff": parity["max_abs_diff"],
                       "embedding_max_abs_diff": parity["embedding_max_abs_diff"],
                       "samples": parity["samples"], "opset": opset},
            "export": {"convert_seconds": round(converted - started, 2),
                       "parity_seconds": round(time.monotonic() - converted, 2),
                       "tensorflow": tf.__version__, "keras": keras.__version__, "onnx": onnx.__version__},
        }
        extra_files: dict[str, Path] = dict(files or {})
        if tier is not None:
            built = tier(onnx_path, manifest)
            onnx_path = built.path
            extra_files.update(built.extra_files)
            manifest.update(built.fields)
        version = registry.publish(name, onnx_path, manifest, activate=activate, extra_files=extra_files)
    log.info("exported %s version %d: convert %.1f s, parity max abs diff %.2e over %d samples",
             name, version, converted - started, parity["max_abs_diff"], parity["samples"])
    return version


def export_source(source: str, registry: Registry, name: str | None = None, weights: str | None = None,
                  activate: bool = True, precision: str = "fp32", gate: Any = None) -> tuple[str, int]:
    """Build a source (builtin:, keras:, hub:), export it to ONNX and publish it: (name, version).

    `precision` bf16/int8 publishes the fast tier instead of fp32, if it passes `gate`
    (a `precision.Gate`; default: >= 99% agreement with fp32 on held-out photos).
    """
    from headswap.export import precision as tiers

    precision = tiers.check_precision(precision)
    gate = gate or tiers.Gate()
    gate.check()
    tiers.check_available(precision)
    parsed = sources.parse_source(source)
    name = check_model_name(name or sources.default_model_name(parsed))
    started = time.monotonic()
    built = sources.build(parsed, weights)
    log.info("built %s in %.1f s", parsed, time.monotonic() - started)
    manifest_base = {"kind": "zero-shot", "source": built.source, "weights": built.weights,
                     "labels": built.labels, "preprocessing": built.preprocessing}
    tier = None
    if precision != "fp32":
        def tier(path: Path, manifest: dict[str, Any]) -> BuiltTier:
            return tiers.zero_shot_tier(path, precision, manifest, gate)
    version = export_keras_model(built.backbone, built.input_size, manifest_base, registry, name, activate=activate,
                                 tier=tier)
    return name, version
