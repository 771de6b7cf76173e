"""Fine-tuning: features once, head many times; optional phase 2; export backbone + head to ONNX.

Runs in the worker subprocess (TensorFlow + Keras 3). The steps:

1. Feature extraction. Each image is decoded once (at the base's input size, with the
   manifest's preprocessing) and run through the frozen backbone once: with ONNX Runtime on the
   base version's own ONNX file (its `embedding` output), or with the Keras backbone when the
   Keras backend has a GPU and ONNX Runtime has none. On the 2-core CPU machine ORT is several
   times faster than Keras `predict` (see docs/training.md).
2. Head training: Dropout -> Dense softmax, trained for every epoch on the cached embeddings;
   an epoch over thousands of images takes milliseconds instead of a full backbone pass.
3. Phase 2 (unfreeze_top_layers > 0, Keras backbones only): the backbone is cut below its top N
   layers (moved down to the nearest point where one tensor flows), the activations at the cut
   are computed once and cached, and the top part + head train on them at a low learning rate
   with BatchNormalization frozen (inference mode).
4. Export: backbone + head as one function -> tf2onnx -> parity check against TensorFlow ->
   `Registry.publish` (atomic, not activated: the server decides about activation).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import keras
import numpy as np

from headswap.errors import FailedPrecondition, InvalidInput
from headswap.inference.images import Preprocessing, load_pixels
from headswap.registry.registry import Registry
from headswap.training.dataset import StoredDataset
from headswap.training.spec import FineTuneSpec
from headswap.training.store import Phase

log = logging.getLogger(__name__)

EXTRACT_BATCH = 32
GPU_EXTRACT_BATCH = 128
REPORT_INTERVAL_S = 0.5


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


def build_head(embedding_size: int, num_classes: int, dropout: float) -> keras.Model:
    """Dropout -> Dense softmax on the raw embedding.

    No per-feature standardisation: measured on the digits, it amplified the near-constant
    embedding dimensions and cost 5-8 points of accuracy against the raw features.
    """
    inputs = keras.Input((embedding_size,), name="head_input")
    x = keras.layers.Dropout(dropout, name="head_dropout")(inputs) if dropout > 0 else inputs
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
            "per_class": per_class, "confusion_matrix": confusion.tolist()}


# --- the job -------------------------------------------------------------------------------


def run(job: TrainingJob, report: Reporter) -> Result:
    """Train and publish; returns the stored version and its metrics."""
    from headswap.export import onnx_export, sources

    spec, runtime = job.spec, job.runtime
    timings: dict[str, float] = {}
    keras.utils.set_random_seed(spec.seed)
    registry = Registry(runtime["model_dir"], cache_dir=Path(runtime["cache_dir"]))
    base_name, base_version = job.base["name"], int(job.base["version"])
    base_path, base_manifest = registry.verified_model_path(base_name, base_version)
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

    started = time.monotonic()
    built = None
    use_keras = keras_gpu() and not ort_has_gpu()
    if use_keras:  # a GPU for Keras but not for ORT: the backbone runs in Keras
        built = sources.build(job.base["source"], job.base.get("weights") or None)
        embed_model = feature_model_of(built.backbone) if isinstance(built.backbone, keras.Model) else None
        embedder = (embed_model.predict_on_batch if embed_model is not None
                    else lambda batch: np.asarray(_embedding(built.backbone, batch)))
    else:
        embedder = ort_embedder(base_path, base_manifest["outputs"]["embedding"], threads)
    report(Phase.EXTRACTING_FEATURES, message=f"{len(order)} images through {base_name} "
           f"({'keras' if use_keras else 'onnxruntime'})")
    batch = GPU_EXTRACT_BATCH if use_keras else EXTRACT_BATCH  # a GPU wants bigger batches
    features = run_batches(embedder, pixel_batches(dataset, order, pre, max_pixels, batch, threads), len(order),
                           report, Phase.EXTRACTING_FEATURES)
    x_train, x_val = features[:len(train_pos)], features[len(train_pos):]
    timings["extract_seconds"] = time.monotonic() - started
    timings["extract_images_per_second"] = len(order) / max(timings["extract_seconds"], 1e-9)

    started = time.monotonic()
    head = build_head(x_train.shape[1], len(labels), spec.dropout)
    history = {"head": fit(head, x_train, y_train, x_val, y_val, spec, spec.learning_rate, spec.epochs,
                           Phase.TRAINING_HEAD, report, labels)}
    val_probabilities = np.asarray(head.predict(x_val, batch_size=256, verbose=0))
    timings["head_seconds"] = time.monotonic() - started

    if built is None:
        started = time.monotonic()
        report(Phase.EXPORTING if not spec.unfreeze_top_layers else Phase.FINE_TUNING,
               message=f"building the {job.base['source']} backbone in Keras")
        built = sources.build(job.base["source"], job.base.get("weights") or None)
        timings["build_seconds"] = time.monotonic() - started

    phase2: dict[str, Any] = {}
    if spec.unfreeze_top_layers:
        started = time.monotonic()
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
        val_probabilities = np.asarray(tuned.predict(cut_val, batch_size=64, verbose=0))
        phase2 = {"unfrozen_layers": unfrozen, "trainable_weights": trainable, "cut_layer": top.layers[1].name,
                  "cut_shape": list(cut.shape[1:])}
        timings["fine_tune_seconds"] = time.monotonic() - started
        backbone_fn: Any = features_model
    else:
        backbone_fn = built.backbone

    metrics = classification_metrics(val_probabilities, y_val, labels)
    metrics.update(num_train=int(len(train_pos)), num_val=int(len(val_pos)),
                   train_accuracy=round(history.get("fine_tune", history["head"])["accuracy"][-1], 6),
                   epochs_run=len(history["head"]["accuracy"]))

    started = time.monotonic()

    def classifier(images: Any) -> dict[str, Any]:
        embedding = _embedding(backbone_fn, images)
        return {"embedding": embedding, "probabilities": head(embedding, training=False)}

    manifest_base = {
        "kind": "fine-tune",
        "source": built.source,
        "weights": built.weights,
        "labels": labels,
        "preprocessing": base_manifest["preprocessing"],
        "base_model": {"name": base_name, "version": base_version, "source": job.base["source"]},
        "job_id": job.job_id,
        "training": {"config": spec.to_dict(), **metrics, "phase2": phase2, "history": history,
                     "feature_extractor": "keras" if use_keras else "onnxruntime",
                     "timings": {k: round(v, 3) for k, v in timings.items()}},
    }
    # The last progress write: a cancel after this point may still see the version published.
    report(Phase.EXPORTING, message="tf2onnx conversion, parity check, publish")
    version = onnx_export.export_keras_model(classifier, input_size, manifest_base, registry, job.spec.name,
                                             activate=False)
    timings["export_seconds"] = time.monotonic() - started
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    metrics["phase2"] = phase2
    log.info("job %s: stored %s version %d, validation accuracy %.4f, timings %s", job.job_id, job.spec.name,
             version, metrics["val_accuracy"], metrics["timings"])
    return Result(job.spec.name, version, metrics)


def _embedding(backbone: Any, images: Any) -> Any:
    """The embedding of a Keras features model, a Keras backbone (dict outputs) or a TF callable."""
    if isinstance(backbone, keras.Model):
        out = backbone(images, training=False)
    else:
        out = backbone(images)
    return out["embedding"] if isinstance(out, dict) else out
