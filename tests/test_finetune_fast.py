"""Fast fine-tunes (issue 11): the head composed into the base's ONNX graph, a warm worker, the
content-addressed embedding cache, hidden_units, and the head-only path on both Keras backends.

The composition and the cache are checked directly on the exported EfficientNet-Lite0 and real
photos; the rest through a real server (one per Keras backend) and real gRPC clients, on
scikit-learn's handwritten digits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import BUILTIN_NAME, ServerProcess, start_server
from headswap.errors import FailedPrecondition
from headswap.inference.images import Preprocessing, load_pixels
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.registry.registry import RECHECK_FILE, Registry
from headswap.training import compose
from headswap.training.embedding_cache import EmbeddingCache, image_key
from test_finetune import digit_png, held_out_accuracy, stream, wait_for, watch, worker_pids

DONE = pb.JOB_STATE_SUCCEEDED


# --- composing the head into the base graph (pure ONNX + numpy) -----------------------------


def _session(path_or_bytes) -> ort.InferenceSession:
    return ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])


def _dense(rng: np.random.Generator, inputs: int, outputs: int, activation: str) -> compose.DenseWeights:
    return compose.DenseWeights(rng.normal(0, 0.05, (inputs, outputs)).astype(np.float32),
                                rng.normal(0, 0.1, outputs).astype(np.float32), activation)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("hidden", [0, 16])
def test_composed_graph_is_the_base_embedding_followed_by_the_head(exported_registry, photos, tmp_path, hidden):
    """On real photos: the composed file's embedding is the base's, its probabilities are the
    head applied to that embedding (numpy reference), outputs keep their order, nothing of the
    ImageNet classifier is left, and the base file is untouched."""
    registry = Registry(exported_registry)
    base_path, manifest = registry.verified_model_path(BUILTIN_NAME, 1)
    before = base_path.read_bytes()
    rng = np.random.default_rng(hidden)
    layers = ([_dense(rng, 1280, hidden, "relu")] if hidden else []) + \
        [_dense(rng, hidden or 1280, 3, "softmax")]
    out = tmp_path / "composed.onnx"
    shape = compose.compose(base_path, layers, out)
    assert shape == {"num_classes": 3, "embedding_size": 1280}
    assert base_path.read_bytes() == before

    pre = Preprocessing.from_manifest(manifest)
    images = pre.normalize(np.stack([load_pixels(data, pre.height, pre.width, 10**8) for data in photos.values()]))
    base_embedding = _session(str(base_path)).run(["embedding"], {"image": images})[0]
    session = _session(str(out))
    assert [o.name for o in session.get_outputs()] == ["probabilities", "embedding"]
    probabilities, embedding = session.run(None, {"image": images})
    np.testing.assert_allclose(embedding, base_embedding, atol=1e-6)
    hidden_out = base_embedding
    for layer in layers[:-1]:
        hidden_out = np.maximum(hidden_out @ layer.kernel + layer.bias, 0)
    expected = _softmax(hidden_out @ layers[-1].kernel + layers[-1].bias)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    model = onnx.load(str(out))
    initializer_shapes = [tuple(t.dims) for t in model.graph.initializer]
    assert (1280, 1000) not in initializer_shapes and (1000,) not in initializer_shapes  # classifier gone
    assert os.path.getsize(out) < os.path.getsize(base_path)


def test_parity_refuses_a_head_that_disagrees(exported_registry, tmp_path):
    base_path, _ = Registry(exported_registry).verified_model_path(BUILTIN_NAME, 1)
    rng = np.random.default_rng(0)
    layer = _dense(rng, 1280, 4, "softmax")
    out = tmp_path / "composed.onnx"
    compose.compose(base_path, [layer], out)
    embeddings = rng.random((12, 1280), dtype=np.float32)
    expected = _softmax(embeddings @ layer.kernel + layer.bias)
    parity = compose.check_parity(out, embeddings, expected)
    assert parity["max_abs_diff"] <= 1e-5 and parity["samples"] == 12
    with pytest.raises(compose.CompositionError, match="disagree"):
        compose.check_parity(out, embeddings, expected + 2e-4)
    with pytest.raises(compose.CompositionError, match="1280"):
        compose.compose(base_path, [_dense(rng, 64, 2, "softmax")], tmp_path / "bad.onnx")
    with pytest.raises(FailedPrecondition, match="softmax"):
        compose.compose(base_path, [_dense(rng, 1280, 2, "relu")], tmp_path / "bad.onnx")


def test_keras_extractor_pads_short_batches_and_matches_the_onnx_embedding(exported_registry, photos):
    """The extractor a GPU node uses (the Keras backbone: the Keras backend sees a GPU, ONNX Runtime
    none), run here on the CPU. A short batch is padded to the one batch shape XLA compiles (on an
    H200 a new shape per job cost 10-25 s), and the embeddings are the base ONNX file's."""
    from headswap.export import sources
    from headswap.training import trainer

    base_path, manifest = Registry(exported_registry).verified_model_path(BUILTIN_NAME, 1)
    pre = Preprocessing.from_manifest(manifest)
    images = pre.normalize(np.stack([load_pixels(data, pre.height, pre.width, 10**8) for data in photos.values()]))
    assert len(images) >= 3
    expected = _session(str(base_path)).run(["embedding"], {"image": images})[0]
    backbone = sources.build(manifest["source"], None, for_export=False).backbone  # its packaged weights
    embed = trainer.keras_embedder(backbone, batch_size=len(images) + 5)
    short = embed(images[:3])
    assert short.shape == (3, 1280)
    np.testing.assert_allclose(short, expected[:3], atol=1e-4)
    whole = embed(images)  # the padding rows never reach a real row (BatchNorm in inference mode)
    np.testing.assert_allclose(whole[:3], short, atol=1e-6)


def test_reference_predictions_run_in_full_float32():
    """On a GPU, JAX and TensorFlow multiply float32 in TF32 by default; the predictions a composed
    or exported ONNX file is checked against turn it off (on an H200 the Keras head and its ONNX
    composition differed by 1.03e-4 with TF32, over the 1e-4 tolerance, and the job was refused).
    This CPU cannot show the numbers, so this checks the switches, and that they are put back."""
    import jax
    import tensorflow as tf

    from headswap.float32 import exact_float32

    assert tf.config.experimental.tensor_float_32_execution_enabled()
    assert jax.config.jax_default_matmul_precision is None
    with exact_float32():
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
        assert jax.config.jax_default_matmul_precision == "float32"
    assert tf.config.experimental.tensor_float_32_execution_enabled()
    assert jax.config.jax_default_matmul_precision is None


# --- the embedding cache -------------------------------------------------------------------


def test_embedding_cache_round_trip_lru_eviction_and_torn_files(tmp_path):
    cache = EmbeddingCache(tmp_path, "base", 1, "ab" * 32, max_bytes=3 * 16)
    keys = [image_key(bytes([i]) * 10) for i in range(4)]
    vectors = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert cache.put_many(keys[:3], vectors[:3]) == 3
    found = cache.get_many(keys, size=4)
    assert sorted(found) == [0, 1, 2] and np.array_equal(found[1], vectors[1])
    # Key 0 is the least recently used once 1 and 2 are read again; a fourth entry evicts it.
    time.sleep(0.02)
    cache.get_many(keys[1:3], size=4)
    time.sleep(0.02)
    cache.put_many(keys[3:], vectors[3:])
    assert cache.evict() == 16
    assert sorted(cache.get_many(keys, size=4)) == [1, 2, 3] and cache.size_bytes() == 48
    # A torn write (wrong size) is a miss and goes away; a crashed temp file is swept.
    torn = cache.directory / keys[1][:2] / f"{keys[1]}.f32"
    torn.write_bytes(b"\0" * 6)
    (torn.parent / ".tmp-crashed").write_bytes(b"\0" * 8)
    assert 1 not in cache.get_many(keys, size=4) and not torn.exists()
    cache.evict()
    assert not (torn.parent / ".tmp-crashed").exists()
    # Another base version never sees these entries; a size of 0 disables the cache.
    assert EmbeddingCache(tmp_path, "base", 2, "cd" * 32, 1 << 20).get_many(keys, size=4) == {}
    off = EmbeddingCache(tmp_path / "off", "base", 1, "ab" * 32, 0)
    assert off.put_many(keys, vectors) == 0 and off.get_many(keys) == {}


def test_job_features_come_from_the_cache_and_it_stays_in_its_budget(exported_registry, digit_sets, tmp_path):
    """The trainer's extraction on a stored upload, with the real ONNX Runtime embedder: misses are
    embedded and stored, the cache is cut back to its budget (LRU), and a repeat takes the
    survivors from the cache with the very same values."""
    from headswap.config import Settings
    from headswap.training import trainer
    from headswap.training.dataset import DatasetWriter, Example, StoredDataset
    from headswap.training.spec import FineTuneSpec

    train, _ = digit_sets
    writer = DatasetWriter(tmp_path / "job", Settings(), skip_invalid=False)
    two_per_class = [ex for digit in range(10) for ex in [e for e in train if e[1] == str(digit)][:2]]
    writer.add([Example(image, label) for image, label in two_per_class])
    writer.finish(FineTuneSpec(name="x"))
    dataset = StoredDataset.load(tmp_path / "job")
    path, manifest = Registry(exported_registry).verified_model_path(BUILTIN_NAME, 1)
    pre = Preprocessing.from_manifest(manifest)
    embedder = trainer.ort_embedder(path, "embedding", 2)
    positions = np.arange(len(dataset))
    cache = EmbeddingCache(tmp_path / "cache", BUILTIN_NAME, 1, manifest["sha256"], max_bytes=12 * 1280 * 4)
    events: list[dict] = []

    def report(phase: str, **fields) -> None:
        events.append(fields)

    first, hits = trainer.extract_features(dataset, positions, pre, 10**8, embedder, 8, 2, report, cache, 1280)
    assert hits == 0 and first.shape == (20, 1280)
    direct = np.concatenate([embedder(batch) for batch in trainer.pixel_batches(dataset, positions, pre, 10**8)])
    np.testing.assert_array_equal(first, direct)
    assert cache.size_bytes() == 12 * 1280 * 4  # 20 written, the 8 oldest evicted
    second, hits = trainer.extract_features(dataset, positions, pre, 10**8, embedder, 8, 2, report, cache, 1280)
    assert hits == 12
    np.testing.assert_array_equal(second, first)
    assert any("12 of 20 embeddings from the cache" in str(e.get("message")) for e in events)


# --- through the server, on each Keras backend ---------------------------------------------


@pytest.fixture(scope="module")
def digit_sets() -> tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]:
    """150 training digits (15 per class) and 200 held-out ones, as PNGs."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train, test = train_test_split(np.arange(len(data.target)), train_size=150, test_size=200, random_state=1,
                                   stratify=data.target)
    pick = lambda idx: [(digit_png(data.images[i]), str(data.target[i])) for i in idx]  # noqa: E731
    return pick(train), pick(test)


def warm_workers(server: ServerProcess) -> list[int]:
    return [pid for pid, cmd in worker_pids().items()
            if f"--parent-pid {server.proc.pid}" in cmd and "--warm" in cmd]


@pytest.fixture(scope="module", params=["tensorflow", "default"])
def backend_server(request, exported_registry, tmp_path_factory) -> Iterator[tuple[str, ServerProcess, Path]]:
    """A server whose trainer runs `--trainer-backend tensorflow`, or the defaults with no
    KERAS_BACKEND at all: head-only jobs then run on JAX (issue 24). Yields the backend expected."""
    import shutil

    work = tmp_path_factory.mktemp(f"fast-{request.param}")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    env = {} if request.param == "default" else {"HEADSWAP_TRAINER_BACKEND": request.param}
    saved = os.environ.pop("KERAS_BACKEND", None)  # ignored by the server anyway: proven by leaving it out
    try:
        server = start_server(registry, work / "server", env=env)
    finally:
        if saved is not None:
            os.environ["KERAS_BACKEND"] = saved
    yield "jax" if request.param == "default" else request.param, server, registry
    server.stop()


def test_head_only_finetune_composes_caches_and_stays_warm(backend_server, digit_sets):
    """Head only on 150 digits: composed (no tf2onnx; no TensorFlow at all under JAX), parity
    recorded, answers Classify; a second job on the same images with other hyper-parameters and a
    hidden layer takes every embedding from the cache and runs in the same warm worker."""
    backend, server, registry_dir = backend_server
    train, test = digit_sets
    stub = pb_grpc.TrainingStub(server.channel())
    first = stub.FineTune(stream(pb.FineTuneConfig(name="digits-fast", epochs=15, seed=0, activate=True), train),
                          timeout=300)
    events = watch(server, first.job_id)
    assert events[-1].state == DONE, events[-1].message + "\n" + server.log()[-3000:]
    metrics = json.loads(events[-1].metrics_json)
    assert metrics["keras_backend"] == backend and metrics["export_method"] == "composed"
    # the warm worker readied the base's extractor during the upload: ONNX Runtime on a node without a GPU
    warm_log = (server.log_path.parent / "warm-worker.log").read_text()
    assert f"{BUILTIN_NAME} version 1 ready (onnxruntime" in warm_log, warm_log[-2000:]
    assert metrics["embedding_cache_hits"] == 0 and metrics["embedding_cache_misses"] == 150
    if backend == "jax":
        assert metrics["tensorflow_imported"] is False
    phases = [e.phase for e in events]
    assert "exporting" in phases and any("appending the head" in e.message for e in events)
    accuracy, labels, version = held_out_accuracy(server, "digits-fast", test)
    print(f"{backend}: head-only fine-tune on 150 digits, held-out accuracy {accuracy:.3f}, "
          f"timings {metrics['timings']}")
    assert version == 1 and labels <= {str(d) for d in range(10)} and accuracy >= 0.8

    registry = Registry(registry_dir)
    manifest = registry.manifest("digits-fast", 1)
    assert manifest["export"]["method"] == "composed" and manifest["export"]["keras_backend"] == backend
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["samples"] == metrics["num_val"]
    assert "tensorflow" not in manifest["export"]
    assert manifest["base_model"]["name"] == BUILTIN_NAME
    base_path, _ = registry.verified_model_path(BUILTIN_NAME, 1)
    new_path, _ = registry.verified_model_path("digits-fast", 1)
    assert onnx.load(str(new_path)).producer_name == "headswap"
    assert os.path.getsize(new_path) < os.path.getsize(base_path)  # backbone reused, classifier dropped

    warm = wait_for(lambda: warm_workers(server), timeout=60)
    assert len(warm) == 1
    if backend == "jax":  # the worker process itself, not just the job's report
        assert "tensorflow" not in Path(f"/proc/{warm[0]}/maps").read_text().lower()
    assert "tensorflow" not in Path(f"/proc/{server.proc.pid}/maps").read_text().lower()

    config = pb.FineTuneConfig(name="digits-fast", epochs=8, learning_rate=0.01, hidden_units=32, seed=1,
                               activate=True)
    second = stub.FineTune(stream(config, train), timeout=300)
    events = watch(server, second.job_id)
    assert events[-1].state == DONE, events[-1].message + "\n" + server.log()[-3000:]
    metrics = json.loads(events[-1].metrics_json)
    assert metrics["embedding_cache_hits"] == 150 and metrics["embedding_cache_misses"] == 0
    assert any("all from the embedding cache" in e.message for e in events)
    assert warm_workers(server) == warm  # the same process ran both jobs
    manifest = registry.manifest("digits-fast", 2)
    assert manifest["training"]["config"]["hidden_units"] == 32
    assert [tuple(t.dims) for t in onnx.load(str(registry.verified_model_path("digits-fast", 2)[0])).graph.initializer
            if t.name.startswith(compose.PREFIX)] == [(1280, 32), (32,), (32, 10), (10,)]
    accuracy, _, version = held_out_accuracy(server, "digits-fast", test)
    assert version == 2 and accuracy >= 0.7


# The warm worker's life cycle and the publish step are shared by both backends: checked once, on JAX.
@pytest.mark.parametrize("backend_server", ["default"], indirect=True)
def test_cancel_stops_the_job_and_the_warm_worker_takes_the_next(backend_server, digit_sets):
    """A cancel stops the job in the worker (SIGTERM unwinds it) and the worker stays warm; one
    that does not stop in time is killed and a fresh one takes over. Either way the next job runs,
    and the embedding cache outlives the job (and any worker)."""
    backend, server, _ = backend_server
    train, _ = digit_sets
    stub = pb_grpc.TrainingStub(server.channel())
    job = stub.FineTune(stream(pb.FineTuneConfig(name="cancel-fast", epochs=1000), train[:60]), timeout=120)
    wait_for(lambda: stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).phase == "training_head", timeout=180)
    assert stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60).state == pb.JOB_STATE_CANCELLED
    wait_for(lambda: f"job {job.job_id}: CANCELLED (attempt 1 stopped)" in server.log(), timeout=10)
    after = wait_for(lambda: warm_workers(server), timeout=120)
    assert after  # the same worker, still warm, or a fresh one
    again = stub.FineTune(stream(pb.FineTuneConfig(name="cancel-fast", epochs=2), train), timeout=120)
    events = watch(server, again.job_id)
    assert events[-1].state == DONE, events[-1].message
    # the cache outlives the cancelled job (and any worker): at least its 60 images hit
    assert json.loads(events[-1].metrics_json)["embedding_cache_hits"] >= 60


@pytest.mark.parametrize("backend_server", ["default"], indirect=True)
@pytest.mark.parametrize("tier", ["int8", "bf16"])
def test_precision_tier_is_built_and_gated_on_the_jobs_validation_images(backend_server, digit_sets, tier):
    """precision=int8/bf16 goes through the precision tier (headswap.export.precision) at publish, gated
    on the job's validation images: on 30 digits one changed answer is 3.3 points, over the
    0.5-point gate. Either the tier keeps every answer and is stored with its figures, or the job
    fails with the measured figures (or earlier, where this CPU cannot run int8) and nothing is
    stored: both are checked, whichever this CPU's int8 arithmetic gives."""
    backend, server, registry_dir = backend_server
    train, _ = digit_sets
    stub = pb_grpc.TrainingStub(server.channel())
    name = f"digits-{tier}"
    job = stub.FineTune(stream(pb.FineTuneConfig(name=name, epochs=3, precision=tier), train), timeout=120)
    final = watch(server, job.job_id)[-1]
    record = stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    if final.state == DONE:
        manifest = Registry(registry_dir).manifest(name, 1)
        assert manifest["precision"] == tier and manifest["export"]["method"] == "composed"
        assert manifest["accuracy"]["gate"]["max_accuracy_drop"] == 0.005
        assert manifest["accuracy"]["accuracy_drop"] <= 0.005
        # the tier re-checks near ties in fp32, with a margin from the job's training images; int8 on
        # the fp32 file stored beside its own
        assert manifest["recheck"]["margin"] >= 0 and 0 <= manifest["recheck"]["heldout_share"] <= 1
        assert (RECHECK_FILE in manifest.get("files", {})) == (tier == "int8")
        return
    assert final.state == pb.JOB_STATE_FAILED, final.message
    assert tier in record.error and ("points of validation accuracy" in record.error or
                                     f"no native {tier}" in record.error or "OpenVINO" in record.error), record.error
    assert Registry(registry_dir).versions(name) == []


@pytest.mark.parametrize("value, text", [(-1, "hidden_units must be between 0 and 4096"),
                                         (5000, "hidden_units must be between 0 and 4096")])
def test_hidden_units_out_of_range_is_refused(backend_server, digit_sets, value, text):
    _, server, _ = backend_server
    train, _ = digit_sets
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.TrainingStub(server.channel()).FineTune(
            stream(pb.FineTuneConfig(name="bad-hidden", hidden_units=value), train[:20]), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details()


def test_cli_has_hidden_units():
    out = subprocess.run([sys.executable, "-m", "headswap.cli", "finetune", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--hidden-units" in out.stdout
    out = subprocess.run([sys.executable, "-m", "headswap.cli", "finetune", ".", "--name", "x", "--hidden-units",
                          "5000"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--hidden-units" in out.stderr
