"""Fine-tuning: features once, head many times; optional phase 2; publish backbone + head as ONNX.

Runs in the worker subprocess on any Keras 3 backend (`KERAS_BACKEND`: TensorFlow or JAX); only
the backend-independent Keras API is used. The steps:

1. Feature extraction. Each image's embedding is looked up in the content-addressed cache
   (`embedding_cache.py`: base version + sha256 of the image bytes); only the misses are
   decoded (at the base's input size, with the manifest's preprocessing) and run through the
   frozen backbone once: with ONNX Runtime on the base version's own ONNX file (its `embedding`
   output; the session stays open in a warm worker), or with the Keras backbone when the Keras
   backend has a GPU and ONNX Runtime has none (built once per warm worker, one batch shape).
2. Head training: Dropout -> [Dense(hidden_units, relu) -> Dropout] -> Dense softmax, trained
   for every epoch on the embeddings; an epoch over thousands of images takes milliseconds.
3. Head only: the head is appended to the base's ONNX graph after its `embedding` output
   (`compose.py`: the `onnx` package, no tf2onnx, no TensorFlow), parity-checked against the
   Keras head on the validation embeddings, and published.
4. Phase 2 (unfreeze_top_layers > 0, Keras backbones, TensorFlow backend): the backbone is cut
   below its top N layers, the activations at the cut are computed once, the top part + head
   train on them at a low learning rate with BatchNormalization frozen, and backbone + head go
   through tf2onnx with a parity check against TensorFlow.

Publishing is `Registry.publish` (atomic, not activated: the server decides about activation);
with precision bf16/int8 the checked fp32 file first goes through the precision tier
(`precision_tier`, the one place for it), gated on the job's validation images.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import keras
import numpy as np

from headswap.errors import FailedPrecondition, InvalidInput
from headswap.export.precision import BuiltTier, Tier
from headswap.float32 import exact_float32
from headswap.inference.images import Preprocessing, load_pixels
from headswap.inference.ood import OOD_OUTPUT
from headswap.registry.registry import Registry
from headswap.registry import training_set
from headswap.training import compose, evaluation
from headswap.training.dataset import StoredDataset
from headswap.training.embedding_cache import EmbeddingCache, image_key
from headswap.training.spec import FineTuneSpec
from headswap.training.store import Phase

log = logging.getLogger(__name__)

EXTRACT_BATCH = 32
GPU_EXTRACT_BATCH = 128
REPORT_INTERVAL_S = 0.5
HASH_CHUNK = 256
TIER_CALIBRATION_IMAGES = 64  # precision tiers: training images to calibrate on (int8 ranges, bf16 re-check)
TIER_HELDOUT_IMAGES = 512  # ...and validation images the accuracy gate measures
DEFAULT_CACHE_MB = 1024


class Stopped(Exception):
    """The job was cancelled or taken away (the store refused a progress write)."""


class Reporter(Protocol):
    def __call__(self, phase: str, **fields: Any) -> None:
        """Record a progress event; raises Stopped when the job is no longer this worker's."""


@dataclass
class TrainingJob:
    """A job's directory and its job.json."""

    directory: Path
    job_id: str
    spec: FineTuneSpec
    base: dict[str, Any]
    labels: list[str]
    runtime: dict[str, Any]

    @classmethod
    def load(cls, directory: Path, job: dict[str, Any]) -> "TrainingJob":
        return cls(directory, job["job_id"], FineTuneSpec.from_dict(job["spec"]), job["base"], job["labels"],
                   job["runtime"])


@dataclass
class Result:
    model: str
    version: int
    metrics: dict[str, Any]


# --- 1. features ---------------------------------------------------------------------------


def pixel_batches(dataset: StoredDataset, positions: np.ndarray, pre: Preprocessing, max_pixels: int,
                  batch_size: int = EXTRACT_BATCH, threads: int = 2) -> Iterator[np.ndarray]:
    """Normalised float32 NHWC batches, decoded by a thread pool one batch ahead of the consumer."""
    ahead: queue.Queue = queue.Queue(maxsize=2)

    def decode_one(item: tuple[int, bytes]) -> np.ndarray:
        index, data = item
        return load_pixels(data, pre.height, pre.width, max_pixels, index)

    def produce() -> None:
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
                for start in range(0, len(positions), batch_size):
                    chunk = positions[start:start + batch_size]
                    encoded = dataset.read(chunk)
                    items = list(zip((int(dataset.upload_index[i]) for i in chunk), encoded))
                    ahead.put(pre.normalize(np.stack(list(pool.map(decode_one, items)))))
            ahead.put(None)
        except BaseException as err:  # hand the error to the consumer
            ahead.put(err)

    threading.Thread(target=produce, name="decode-batches", daemon=True).start()
    while True:
        item = ahead.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def run_batches(fn: Callable[[np.ndarray], np.ndarray], batches: Iterator[np.ndarray], total: int,
                report: Reporter, phase: str) -> np.ndarray:
    """Apply `fn` to every batch, reporting images/s and ETA about twice a second."""
    outputs = []
    done = 0
    started = last = time.monotonic()
    for batch in batches:
        outputs.append(np.asarray(fn(batch), dtype=np.float32))
        done += len(batch)
        now = time.monotonic()
        if now - last >= REPORT_INTERVAL_S or done == total:
            rate = done / max(now - started, 1e-9)
            report(phase, images_per_second=rate, eta_seconds=(total - done) / rate,
                   message=f"{done}/{total} images")
            last = now
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


_EMBEDDERS: dict[tuple[str, str, int], Callable[[np.ndarray], np.ndarray]] = {}


def cached_ort_embedder(model_path: Path, sha256: str, output: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """`ort_embedder`, kept open in this (warm) worker between jobs: keyed by the file's content."""
    key = (sha256, output, threads)
    if key not in _EMBEDDERS:
        _EMBEDDERS.clear()  # one base at a time: a session holds the whole backbone in memory
        _EMBEDDERS[key] = ort_embedder(model_path, output, threads)
    return _EMBEDDERS[key]


# Apart from _EMBEDDERS: the warm worker re-opens the ORT session between jobs (worker.preload), and
# one shared cache let that evict the Keras backbone (H200: job 1's extraction 0.48 s -> 2.89 s).
_KERAS_EMBEDDERS: dict[tuple[str, str | None], Callable[[np.ndarray], np.ndarray]] = {}


def cached_keras_embedder(source: str, weights: str | None) -> Callable[[np.ndarray], np.ndarray]:
    """`keras_embedder` of the base's Keras backbone, built once in this (warm) worker: building it
    and compiling its one batch shape took 10-25 s per job on an H200 under JAX."""
    from headswap.export import sources

    key = (source, weights)
    if key not in _KERAS_EMBEDDERS:
        _KERAS_EMBEDDERS.clear()  # one base at a time
        _KERAS_EMBEDDERS[key] = keras_embedder(sources.build(source, weights, for_export=False).backbone,
                                               GPU_EXTRACT_BATCH)
    return _KERAS_EMBEDDERS[key]


def keras_embedder(backbone: Any, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The backbone's embedding in Keras, every batch padded to `batch_size` rows: XLA compiles one
    program per input shape, and a job's short last batch would otherwise compile another (seconds
    on a GPU). BatchNormalization runs in inference mode, so the padding does not touch real rows."""
    embed_model = feature_model_of(backbone) if isinstance(backbone, keras.Model) else None

    def embed(batch: np.ndarray) -> np.ndarray:
        count = len(batch)
        if count < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
        out = embed_model.predict_on_batch(batch) if embed_model is not None else _embedding(backbone, batch)
        return np.asarray(out)[:count]

    return embed


def ort_embedder(model_path: Path, output: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The base version's ONNX graph in ONNX Runtime, returning its embedding output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(model_path), options, providers=providers)
    input_name = session.get_inputs()[0].name
    return lambda batch: session.run([output], {input_name: batch})[0]


def keras_gpu() -> bool:
    """Whether the Keras backend sees a GPU (TensorFlow or JAX)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    return False


def ort_has_gpu() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def keras_extracts() -> bool:
    """Whether jobs here extract features with the Keras backbone: a GPU for Keras but not for ONNX
    Runtime. Elsewhere the base's ONNX graph in ONNX Runtime does."""
    return keras_gpu() and not ort_has_gpu()


def extract_features(dataset: StoredDataset, positions: np.ndarray, pre: Preprocessing, max_pixels: int,
                     embedder: Callable[[np.ndarray], np.ndarray], batch_size: int, threads: int,
                     report: Reporter, cache: EmbeddingCache, embedding_size: int | None) -> tuple[np.ndarray, int]:
    """Embeddings of the images at `positions` (in that order) and how many came from the cache.

    Only cache misses are decoded and run through the backbone; their embeddings are stored."""
    keys: list[str] = []
    for start in range(0, len(positions), HASH_CHUNK):
        keys += [image_key(data) for data in dataset.read(positions[start:start + HASH_CHUNK])]
    cached = cache.get_many(keys, embedding_size)
    missing = np.asarray([i for i in range(len(positions)) if i not in cached], dtype=np.int64)
    started = time.monotonic()
    if len(missing):
        if cached:
            report(Phase.EXTRACTING_FEATURES, message=f"{len(cached)} of {len(positions)} embeddings from the cache")
        new = run_batches(embedder, pixel_batches(dataset, positions[missing], pre, max_pixels, batch_size, threads),
                          len(missing), report, Phase.EXTRACTING_FEATURES)
        if cache.put_many([keys[i] for i in missing], new):
            cache.evict()  # back under --embedding-cache-mb, least recently used first
    else:
        new = np.zeros((0, embedding_size or 0), np.float32)
    size = new.shape[1] if len(missing) else len(next(iter(cached.values())))
    features = np.empty((len(positions), size), np.float32)
    if len(missing):
        features[missing] = new
    for i, embedding in cached.items():
        features[i] = embedding
    if not len(missing):
        rate = len(positions) / max(time.monotonic() - started, 1e-9)
        report(Phase.EXTRACTING_FEATURES, images_per_second=rate, eta_seconds=0.0,
               message=f"{len(positions)}/{len(positions)} images (all from the embedding cache)")
    return features, len(cached)


# --- 2. head -------------------------------------------------------------------------------


class ProgressCallback(keras.callbacks.Callback):
    """Keras epochs -> job events (loss, accuracy, validation accuracy, images/s, ETA)."""

    def __init__(self, report: Reporter, phase: str, epochs: int, samples: int) -> None:
        super().__init__()
        self.report, self.phase, self.epochs, self.samples = report, phase, epochs, samples
        self.started = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.started = time.monotonic()
        self.report(self.phase, epoch=0, total_epochs=self.epochs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        elapsed = time.monotonic() - self.started
        done = epoch + 1
        self.report(self.phase, epoch=done, total_epochs=self.epochs, loss=float(logs.get("loss", 0.0)),
                    accuracy=float(logs.get("accuracy", 0.0)), val_accuracy=float(logs.get("val_accuracy", 0.0)),
                    images_per_second=self.samples * done / max(elapsed, 1e-9),
                    eta_seconds=elapsed / done * (self.epochs - done))


def build_head(embedding_size: int, num_classes: int, dropout: float, hidden_units: int = 0) -> keras.Model:
    """Dropout -> [Dense(hidden_units, relu) -> Dropout] -> Dense softmax on the raw embedding.

    Only Dense and Dropout layers, so that `compose.py` can append it to the base's ONNX graph.
    No per-feature standardisation: measured on the digits, it amplified the near-constant
    embedding dimensions and cost 5-8 points of accuracy against the raw features.
    """
    inputs = keras.Input((embedding_size,), name="head_input")
    x = keras.layers.Dropout(dropout, name="head_dropout")(inputs) if dropout > 0 else inputs
    if hidden_units:
        x = keras.layers.Dense(hidden_units, activation="relu", name="head_hidden")(x)
        x = keras.layers.Dropout(dropout, name="head_hidden_dropout")(x) if dropout > 0 else x
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head_dense")(x)
    return keras.Model(inputs, outputs, name="head")


def class_weight_map(spec: FineTuneSpec, labels: list[str], y_train: np.ndarray) -> dict[int, float] | None:
    """Explicit weights by label (others 1.0), or inverse frequency when balancing."""
    if spec.class_weights:
        return {i: float(spec.class_weights.get(label, 1.0)) for i, label in enumerate(labels)}
    if spec.balance_classes:
        counts = np.bincount(y_train, minlength=len(labels)).astype(np.float64)
        return {i: float(len(y_train) / (len(labels) * c)) if c else 1.0 for i, c in enumerate(counts)}
    return None


def fit(model: keras.Model, x_train: Any, y_train: np.ndarray, x_val: Any, y_val: np.ndarray, spec: FineTuneSpec,
        learning_rate: float, epochs: int, phase: str, report: Reporter, labels: list[str]) -> dict[str, list[float]]:
    """Compile and fit with the job's loss, class weights, early stopping and progress events."""
    num_classes = len(labels)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=spec.label_smoothing),
                  metrics=["accuracy"])
    callbacks: list[keras.callbacks.Callback] = [ProgressCallback(report, phase, epochs, len(y_train))]
    if spec.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                                       patience=spec.early_stopping_patience,
                                                       restore_best_weights=True))
    history = model.fit(x_train, keras.utils.to_categorical(y_train, num_classes), epochs=epochs,
                        batch_size=spec.batch_size, shuffle=True,
                        validation_data=(x_val, keras.utils.to_categorical(y_val, num_classes)),
                        class_weight=class_weight_map(spec, labels, y_train), callbacks=callbacks, verbose=0)
    return {k: [float(v) for v in values] for k, values in history.history.items()}


# --- 3. phase 2 ----------------------------------------------------------------------------


def feature_model_of(backbone: Any) -> keras.Model:
    """images -> embedding, as a Keras model sharing the backbone's layers."""
    if not isinstance(backbone, keras.Model):
        raise FailedPrecondition("phase 2 needs a Keras backbone; this base is not a Keras model")
    return keras.Model(backbone.input, backbone.output["embedding"], name="features")


def split_top(features: keras.Model, top_layers: int) -> tuple[keras.Model, keras.Model, int]:
    """(bottom, top, number of top layers): bottom maps images to the activations at the cut,
    top maps those to the embedding and holds at least `top_layers` layers."""
    layers = features.layers
    start = len(layers) - top_layers - 1
    if start < 1:
        raise InvalidInput(f"unfreeze_top_layers={top_layers}, but the backbone has only {len(layers) - 1} layers")
    for cut in range(start, 0, -1):  # walk down until the top part needs only the cut tensor
        tensor = layers[cut].output
        try:
            top = keras.Model(tensor, features.output, name="top")
        except ValueError:
            continue
        bottom = keras.Model(features.input, tensor, name="bottom")
        return bottom, top, len(layers) - 1 - cut
    raise InvalidInput(f"no single-tensor cut point below the top {top_layers} layers of the backbone")


def unfreeze(top: keras.Model) -> int:
    """Everything in the top part trains except BatchNormalization (kept in inference mode)."""
    top.trainable = True
    for layer in top.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return sum(int(np.prod(w.shape)) for w in top.trainable_weights)


# --- metrics -------------------------------------------------------------------------------


def classification_metrics(probabilities: np.ndarray, y_true: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/support, confusion matrix (rows = true class)."""
    k = len(labels)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, predicted), 1)
    per_class = {}
    for i, label in enumerate(labels):
        tp = int(confusion[i, i])
        predicted_i = int(confusion[:, i].sum())
        actual_i = int(confusion[i].sum())
        per_class[label] = {"precision": round(tp / predicted_i, 6) if predicted_i else 0.0,
                            "recall": round(tp / actual_i, 6) if actual_i else 0.0, "support": actual_i}
    return {"val_accuracy": round(float((predicted == y_true).mean()), 6) if len(y_true) else 0.0,
            "per_class": per_class, "confusion_matrix": confusion.tolist(),
            "expected_calibration_error": round(evaluation.expected_calibration_error(probabilities, y_true), 6)}


# --- the job -------------------------------------------------------------------------------


def run(job: TrainingJob, report: Reporter) -> Result:
    """Train and publish; returns the stored version and its metrics."""
    spec, runtime = job.spec, job.runtime
    timings: dict[str, float] = {}
    backend = keras.backend.backend()
    if spec.unfreeze_top_layers and backend != "tensorflow":
        raise FailedPrecondition(f"phase 2 (unfreeze_top_layers={spec.unfreeze_top_layers}) is exported with "
                                 f"tf2onnx and needs the TensorFlow Keras backend; this trainer runs {backend!r}. "
                                 "Train the head only (unfreeze_top_layers=0), or run the server with "
                                 "--trainer-backend auto or tensorflow")
    if spec.precision != "fp32":  # refused before any work when this machine cannot build the tier
        from headswap.export import precision as tiers

        tiers.check_available(spec.precision)
    set_random_seed(spec.seed)
    registry = Registry(runtime["model_dir"], cache_dir=Path(runtime["cache_dir"]))
    base_name, base_version = job.base["name"], int(job.base["version"])
    base_path, base_manifest = registry.verified_fp32_path(base_name, base_version)  # int8: its fp32 file
    pre = Preprocessing.from_manifest(base_manifest)
    input_size = (pre.height, pre.width)
    dataset = StoredDataset.load(job.directory)
    labels = dataset.labels
    train_pos = np.flatnonzero(~dataset.is_validation)
    val_pos = np.flatnonzero(dataset.is_validation)
    order = np.concatenate([train_pos, val_pos])
    y_train, y_val = dataset.label_ids[train_pos], dataset.label_ids[val_pos]
    threads = int(runtime.get("threads") or 2)
    max_pixels = int(runtime.get("max_image_pixels") or 40_000_000)
    cache = EmbeddingCache(Path(runtime.get("embedding_cache_dir") or job.directory.parent.parent / "embedding-cache"),
                           base_name, base_version, str(base_manifest["sha256"]),
                           int(runtime.get("embedding_cache_bytes", DEFAULT_CACHE_MB << 20)))
    embedding_size = base_manifest.get("outputs", {}).get("embedding_size")

    started = time.monotonic()
    built = None
    use_keras = keras_extracts()
    if use_keras and spec.unfreeze_top_layers:  # phase 2 trains this backbone: a fresh one for the job
        from headswap.export import sources

        built = sources.build(job.base["source"], job.base.get("weights") or None, for_export=True)
        embedder = keras_embedder(built.backbone, GPU_EXTRACT_BATCH)
    elif use_keras:  # a GPU for Keras but not for ORT: the backbone runs in Keras
        embedder = cached_keras_embedder(job.base["source"], job.base.get("weights") or None)
    else:
        embedder = cached_ort_embedder(base_path, str(base_manifest["sha256"]),
                                       base_manifest["outputs"]["embedding"], threads)
    report(Phase.EXTRACTING_FEATURES, message=f"{len(order)} images through {base_name} "
           f"({'keras' if use_keras else 'onnxruntime'})")
    batch = GPU_EXTRACT_BATCH if use_keras else EXTRACT_BATCH  # a GPU wants bigger batches
    # Overlapping the head's compilation with extraction only pays where extraction leaves cores
    # idle: on 2 cores it slowed extraction 2x and job 1 lost 0.2 s (bench_finetune, one run).
    spare_cores = (os.cpu_count() or 1) > 2 * threads
    precompile = None if use_keras or not embedding_size or not spare_cores else \
        start_precompile(spec, int(embedding_size), y_train, y_val, labels)
    try:
        features, cache_hits = extract_features(dataset, order, pre, max_pixels, embedder, batch, threads, report,
                                                cache, embedding_size)
    except BaseException:
        if precompile is not None:  # a warm worker must not carry a fit into its next job
            precompile.join()
        raise
    x_train, x_val = features[:len(train_pos)], features[len(train_pos):]
    timings["extract_seconds"] = time.monotonic() - started
    timings["extract_images_per_second"] = len(order) / max(timings["extract_seconds"], 1e-9)

    started = time.monotonic()
    if precompile is not None:
        precompile.join()
        set_random_seed(spec.seed)  # the throwaway head drew from the same generators
    _COMPILED.add((x_train.shape[1], len(labels), spec.hidden_units, spec.dropout > 0, spec.label_smoothing,
                   bool(spec.class_weights or spec.balance_classes), spec.batch_size, len(y_train), len(y_val)))
    head = build_head(x_train.shape[1], len(labels), spec.dropout, spec.hidden_units)
    history = {"head": fit(head, x_train, y_train, x_val, y_val, spec, spec.learning_rate, spec.epochs,
                           Phase.TRAINING_HEAD, report, labels)}
    with exact_float32():  # the reference the ONNX head is checked against (no TF32 on a GPU)
        val_probabilities = np.asarray(head.predict(x_val, batch_size=256, verbose=0))
    timings["head_seconds"] = time.monotonic() - started

    phase2: dict[str, Any] = {}
    if spec.unfreeze_top_layers:
        from headswap.export import sources

        started = time.monotonic()
        if built is None:
            report(Phase.FINE_TUNING, message=f"building the {job.base['source']} backbone in Keras")
            built = sources.build(job.base["source"], job.base.get("weights") or None)
        features_model = feature_model_of(built.backbone)
        bottom, top, unfrozen = split_top(features_model, spec.unfreeze_top_layers)
        trainable = unfreeze(top)
        report(Phase.FINE_TUNING, message=f"caching activations at the cut below the top {unfrozen} layers "
               f"({trainable} trainable weights)")
        cut = run_batches(bottom.predict_on_batch,
                          pixel_batches(dataset, order, pre, max_pixels, batch, threads), len(order), report,
                          Phase.FINE_TUNING)
        cut_train, cut_val = cut[:len(train_pos)], cut[len(train_pos):]
        inputs = keras.Input(cut.shape[1:], name="cut")
        tuned = keras.Model(inputs, head(top(inputs)), name="phase2")
        history["fine_tune"] = fit(tuned, cut_train, y_train, cut_val, y_val, spec, spec.finetune_learning_rate,
                                   spec.finetune_epochs, Phase.FINE_TUNING, report, labels)
        with exact_float32():
            val_probabilities = np.asarray(tuned.predict(cut_val, batch_size=64, verbose=0))
        phase2 = {"unfrozen_layers": unfrozen, "trainable_weights": trainable, "cut_layer": top.layers[1].name,
                  "cut_shape": list(cut.shape[1:])}
        timings["fine_tune_seconds"] = time.monotonic() - started

    metrics = classification_metrics(val_probabilities, y_val, labels)
    # Out-of-distribution score (issue 23): fitted on the base's training embeddings for a head-only
    # job whose score goes into the composed graph; phase 2 changes the embedding and precision tiers
    # run elsewhere than ONNX Runtime, so those keep max-softmax, thresholded on the same split.
    in_graph = not spec.unfreeze_top_layers and spec.precision == "fp32"
    started = time.monotonic()
    ood_fit, ood_manifest = evaluation.fit_ood(head if in_graph else None, x_train, y_train, x_val, y_val,
                                               val_probabilities, len(labels))
    metrics["ood"] = ood_manifest
    metrics["comparison"] = evaluation.compare_with_active(
        registry, spec.name, labels, base_manifest, x_val, y_val, val_probabilities,
        lambda positions: np.concatenate(list(pixel_batches(dataset, positions, pre, max_pixels, EXTRACT_BATCH,
                                                            threads))), val_pos)
    timings["evaluation_seconds"] = time.monotonic() - started
    metrics.update(num_train=int(len(train_pos)), num_val=int(len(val_pos)),
                   train_accuracy=round(history.get("fine_tune", history["head"])["accuracy"][-1], 6),
                   epochs_run=len(history["head"]["accuracy"]), embedding_cache_hits=int(cache_hits),
                   embedding_cache_misses=int(len(order) - cache_hits), keras_backend=backend,
                   conflicting_duplicates=dataset.conflicting_duplicates)  # same bytes, two labels

    def tier_samples() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Calibration images (training) and held-out images with labels (validation), normalised."""
        def pixels(positions: np.ndarray) -> np.ndarray:
            return np.concatenate(list(pixel_batches(dataset, positions, pre, max_pixels, EXTRACT_BATCH, threads)))

        def spread(positions: np.ndarray, count: int) -> np.ndarray:
            """Evenly spaced picks: uploads often come class by class, and calibration needs every class."""
            if len(positions) <= count:
                return positions
            return positions[np.linspace(0, len(positions) - 1, count).round().astype(int)]

        held = spread(val_pos, TIER_HELDOUT_IMAGES)
        return pixels(spread(train_pos, TIER_CALIBRATION_IMAGES)), pixels(held), dataset.label_ids[held]

    tier = precision_tier(spec, tier_samples)
    started = time.monotonic()
    # Every image the user labelled (training and validation), so RankForLabelling marks them.
    training_set_path = job.directory / training_set.TRAINING_SET_FILE
    labelled = training_set.write(training_set_path, dataset.digests())
    training_files = {training_set.TRAINING_SET_FILE: training_set_path}
    manifest_base = {
        "kind": "fine-tune",
        "source": built.source if built is not None else base_manifest.get("source", job.base["source"]),
        "weights": built.weights if built is not None else base_manifest.get("weights"),
        "labels": labels,
        "preprocessing": base_manifest["preprocessing"],
        "base_model": {"name": base_name, "version": base_version, "source": job.base["source"]},
        "job_id": job.job_id,
        "ood": ood_manifest,
        "training_set": {"file": training_set.TRAINING_SET_FILE, "images": labelled},
        "training": {"config": spec.to_dict(), **metrics, "phase2": phase2, "history": history,
                     "feature_extractor": "keras" if use_keras else "onnxruntime",
                     "timings": {k: round(v, 3) for k, v in timings.items()}},
    }
    # A publish the model store does not answer says so in the job's events (and fails at the bound).
    registry.on_store_wait = lambda message: report(Phase.EXPORTING, message=message)
    # The job's store is told the version number before it is written: a cancel either comes first
    # (nothing is published) or is refused from then on (`JobStore.begin_publish`).
    registry.before_publish = getattr(report, "begin_publish", None)
    if spec.unfreeze_top_layers:
        report(Phase.EXPORTING, message="tf2onnx conversion, parity check, publish")
        version = export_phase2(features_model, head, input_size, manifest_base, registry, spec, tier,
                                training_files)
        metrics["export_method"] = "tf2onnx"
    else:
        report(Phase.EXPORTING, message="appending the head to the base's ONNX graph, parity check, publish")
        version = publish_composed(base_path, base_manifest, head, x_val, val_probabilities, manifest_base, registry,
                                   spec, tier, ood_fit, training_files)
        metrics["export_method"] = "composed"
    timings["export_seconds"] = time.monotonic() - started
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    metrics["phase2"] = phase2
    # Proof for the tests and the docs: a head-only job under JAX never loads TensorFlow.
    metrics["tensorflow_imported"] = "tensorflow" in sys.modules
    log.info("job %s: stored %s version %d, validation accuracy %.4f, cache hits %d/%d, timings %s", job.job_id,
             job.spec.name, version, metrics["val_accuracy"], cache_hits, len(order), metrics["timings"])
    return Result(job.spec.name, version, metrics)


COMPILATION_CACHE_BYTES = 256 << 20


def configure_backend(cache_dir: Path) -> None:
    """JAX: keep compiled XLA programs on disk (bounded, in the work directory).

    Every job builds a new head model, and JAX would compile its train step again (seconds on a
    small CPU); the programs depend only on the shapes, so a head of the same shape as an
    earlier one (the next job on the same images, a new learning rate) skips compilation.
    TensorFlow has no such cache and is left alone."""
    if keras.backend.backend() != "jax":
        return
    import jax

    cache_dir.mkdir(parents=True, exist_ok=True)
    # JAX's own size bound needs the `filelock` package; bounding it here at start is enough.
    files = sorted((p.stat().st_mtime, p.stat().st_size, p) for p in cache_dir.rglob("*") if p.is_file())
    total = sum(size for _, size, _ in files)
    for _, size, path in files:
        if total <= COMPILATION_CACHE_BYTES:
            break
        path.unlink(missing_ok=True)
        total -= size
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def warm_up() -> None:
    """Train and run a tiny head once, so that the first real job does not pay for the backend's
    one-time start (JAX: backend and tracing machinery; TensorFlow: its runtime)."""
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 16), dtype=np.float32), np.arange(8) % 2
    head = build_head(16, 2, 0.0)
    spec = FineTuneSpec(name="warm-up", epochs=1, batch_size=4)
    fit(head, x, y, x, y, spec, 1e-3, 1, Phase.TRAINING_HEAD, lambda phase, **fields: None, ["a", "b"])
    head.predict(x, batch_size=8, verbose=0)
    keras.backend.clear_session()


_COMPILED: set[tuple] = set()


def start_precompile(spec: FineTuneSpec, embedding_size: int, y_train: np.ndarray, y_val: np.ndarray,
                     labels: list[str]) -> threading.Thread | None:
    """JAX: compile the head's train/eval programs while the backbone extracts features.

    The programs depend only on shapes and constants (sizes, classes, hidden units, batch size,
    label smoothing, class weights), all known before the first embedding: a throwaway head fit
    on zeros of those shapes puts them in the compilation cache, and the real fit finds them
    there. Skipped when this worker already compiled the same signature."""
    if keras.backend.backend() != "jax":
        return None
    signature = (embedding_size, len(labels), spec.hidden_units, spec.dropout > 0, spec.label_smoothing,
                 bool(spec.class_weights or spec.balance_classes), spec.batch_size, len(y_train), len(y_val))
    if signature in _COMPILED:
        return None

    def compile_head() -> None:
        try:
            head = build_head(embedding_size, len(labels), spec.dropout, spec.hidden_units)
            dummy = FineTuneSpec(**{**spec.to_dict(), "epochs": 1, "early_stopping_patience": 0})
            fit(head, np.zeros((len(y_train), embedding_size), np.float32), y_train,
                np.zeros((len(y_val), embedding_size), np.float32), y_val, dummy, spec.learning_rate, 1,
                Phase.TRAINING_HEAD, lambda phase, **fields: None, labels)
            head.predict(np.zeros((len(y_val), embedding_size), np.float32), batch_size=256, verbose=0)
            _COMPILED.add(signature)
        except Exception:  # only an optimisation: the real fit compiles for itself
            log.exception("precompiling the head failed")

    thread = threading.Thread(target=compile_head, name="precompile-head", daemon=True)
    thread.start()
    return thread


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed`, without importing TensorFlow under another backend.

    Keras also seeds TensorFlow whenever it is installed (for tf.data), which imports it: a
    JAX head-only job would then carry TensorFlow's memory and start-up for nothing."""
    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # `import tensorflow` fails: not seeded
    try:
        keras.utils.set_random_seed(seed)
    finally:
        if sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]


def publish_composed(base_path: Path, base_manifest: dict[str, Any], head: keras.Model, x_val: np.ndarray,
                     val_probabilities: np.ndarray, manifest_base: dict[str, Any], registry: Registry,
                     spec: FineTuneSpec, tier: Tier | None = None, ood_fit: "evaluation.OodScore | None" = None,
                     files: dict[str, Path] | None = None) -> int:
    """Head-only: base ONNX graph + head as ONNX nodes (and the out-of-distribution score), parity on
    the validation embeddings, publish. `files`: other files the version carries (its training set)."""
    import onnx

    from headswap.registry.store import EXPORT_PREFIX, owner_tag

    started = time.monotonic()
    staging = registry.staging_dir(registry.cache_dir.parent / "staging")
    with tempfile.TemporaryDirectory(prefix=f"{EXPORT_PREFIX}{owner_tag()}-", dir=staging) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        layers = compose.dense_layers_of(head)
        shape = compose.compose(base_path, layers, onnx_path, ood_fit)
        composed = time.monotonic()
        parity = compose.check_parity(onnx_path, x_val, val_probabilities)
        if ood_fit is not None:
            parity["ood_relative_diff"] = compose.check_ood_parity(
                onnx_path, x_val, ood_fit.score(x_val, evaluation.head_logits(layers, x_val)))
        manifest = {
            **manifest_base,
            "input": base_manifest["input"],
            "outputs": {"probabilities": compose.PROBABILITIES, "embedding": compose.EMBEDDING,
                        "embedding_size": shape["embedding_size"],
                        **({"ood_score": OOD_OUTPUT} if ood_fit is not None else {})},
            "parity": {"max_abs_diff": parity["max_abs_diff"], "samples": parity["samples"],
                       "ood_relative_diff": parity.get("ood_relative_diff"),
                       "against": "keras head on the validation embeddings",
                       "base_parity": base_manifest.get("parity", {})},
            "export": {"method": "composed", "base_sha256": base_manifest["sha256"],
                       "compose_seconds": round(composed - started, 3),
                       "parity_seconds": round(time.monotonic() - composed, 3),
                       "keras": keras.__version__, "keras_backend": keras.backend.backend(),
                       "onnx": onnx.__version__},
        }
        extra_files: dict[str, Path] = dict(files or {})
        if tier is not None:
            built = tier(onnx_path, manifest)
            onnx_path = built.path
            extra_files.update(built.extra_files)
            manifest.update(built.fields)
        return registry.publish(spec.name, onnx_path, manifest, activate=False, extra_files=extra_files)


def precision_tier(spec: FineTuneSpec,
                   samples: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Tier | None:
    """The one place where a fine-tune's published file becomes a precision tier (issue 10).

    fp32 (the default): None, the checked file is published as it is. bf16/int8: the tier is built
    from the checked fp32 file and gated on the job's own validation images (accuracy drop, see
    `headswap.export.precision`); a tier that misses its gate fails the job, nothing is published.
    """
    if spec.precision == "fp32":
        return None
    from headswap.export import precision as tiers

    def tier(onnx_path: Path, manifest: dict[str, Any]) -> BuiltTier:
        calibration, heldout, labels = samples()
        return tiers.make_tier(onnx_path, spec.precision, calibration, heldout, labels)

    return tier


def export_phase2(features_model: keras.Model, head: keras.Model, input_size: tuple[int, int],
                  manifest_base: dict[str, Any], registry: Registry, spec: FineTuneSpec, tier: Tier | None,
                  files: dict[str, Path] | None = None) -> int:
    """Phase 2 changed the backbone: backbone + head through tf2onnx, parity against TensorFlow."""
    from headswap.export import onnx_export

    def classifier(images: Any) -> dict[str, Any]:
        embedding = _embedding(features_model, images)
        return {"embedding": embedding, "probabilities": head(embedding, training=False)}

    return onnx_export.export_keras_model(classifier, input_size, manifest_base, registry, spec.name, activate=False,
                                          tier=tier, files=files)


def _embedding(backbone: Any, images: Any) -> Any:
    """The embedding of a Keras features model, a Keras backbone (dict outputs) or a TF callable."""
    if isinstance(backbone, keras.Model):
        out = backbone(images, training=False)
    else:
        out = backbone(images)
    return out["embedding"] if isinstance(out, dict) else out
