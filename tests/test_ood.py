"""Out-of-distribution scores on every prediction, and the job's full evaluation (issue 23).

A real fine-tune on scikit-image's LFW faces against background crops, through a real server;
then Classify over headswap.v1 and KServe V2 on held-out faces/backgrounds and on images of other
kinds the model never saw (scikit-learn's digits, scikit-image's textures).
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from conftest import BUILTIN_NAME, ServerProcess, encode, run_cli, start_server
from headswap.inference.images import Preprocessing, load_pixels
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.registry.registry import Registry
from headswap.training import compose
from test_finetune import digit_png, stream, watch

MODEL = "faces"


def _png(gray: np.ndarray) -> bytes:
    return encode((np.clip(gray, 0, 1) * 255).astype(np.uint8), "PNG")


@pytest.fixture(scope="module")
def faces() -> dict[str, list[tuple[bytes, str]]]:
    """LFW faces and background crops (scikit-image's lfw_subset, 100 each): 70 + 70 to train,
    30 + 30 held out; and images of other kinds: digits, and crops of three textures."""
    from skimage import data
    from sklearn.datasets import load_digits

    images = data.lfw_subset()
    order = np.random.default_rng(0).permutation(100)
    sets = {"train": [], "test": []}
    for offset, label in ((0, "face"), (100, "background")):
        for rank, i in enumerate(order):
            sets["train" if rank < 70 else "test"].append((_png(images[offset + i]), label))
    rng = np.random.default_rng(1)
    textures = []
    for texture in (data.brick(), data.grass(), data.gravel()):
        for r, c in zip(rng.integers(0, 384, 8), rng.integers(0, 384, 8)):
            textures.append((encode(np.ascontiguousarray(texture[r:r + 128, c:c + 128]), "PNG"), "texture"))
    digits = load_digits()
    sets["digits"] = [(digit_png(digits.images[i]), "digit") for i in range(24)]
    sets["textures"] = textures
    return sets


@pytest.fixture(scope="module")
def trained(faces, exported_registry, tmp_path_factory) -> Iterator[tuple[ServerProcess, Path, dict]]:
    """A server with `faces` v1 (activated) and v2 (same classes: compared with v1); yields the
    server, its registry and the two jobs."""
    work = tmp_path_factory.mktemp("ood")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    server = start_server(registry, work / "server")
    stub = pb_grpc.TrainingStub(server.channel())
    jobs = {}
    for version, epochs in ((1, 3), (2, 20)):
        job = stub.FineTune(stream(pb.FineTuneConfig(name=MODEL, epochs=epochs, activate=True, seed=version),
                                   faces["train"]), timeout=120)
        events = watch(server, job.job_id)
        assert events[-1].state == pb.JOB_STATE_SUCCEEDED, events[-1].message
        jobs[version] = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=30)
        assert jobs[version].version == version
    yield server, registry, jobs
    server.stop()


def _classify(server: ServerProcess, examples: list[tuple[bytes, str]], model: str = MODEL) -> pb.ClassifyResponse:
    return pb_grpc.InferenceStub(server.channel()).Classify(
        pb.ClassifyRequest(images=[image for image, _ in examples], model=model, top_k=2), timeout=120)


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(a foreign image scores higher than an in-distribution one), ties half."""
    diff = outside[:, None] - inside[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def test_classify_scores_foreign_images_higher_over_both_apis(trained, faces):
    server, _, _ = trained
    held = _classify(server, faces["test"])
    assert held.version == 2
    inside = np.array([r.ood_score for r in held.results])
    accepted = [r.in_distribution for r in held.results]
    assert all(r.HasField("in_distribution") for r in held.results)
    assert np.mean(accepted) >= 0.8, accepted  # the threshold accepts 95% of validation images
    for kind in ("digits", "textures"):
        response = _classify(server, faces[kind])
        outside = np.array([r.ood_score for r in response.results])
        assert _auroc(inside, outside) >= 0.9, (kind, inside, outside)
        assert np.mean([not r.in_distribution for r in response.results]) >= 0.7, (kind, outside)
        # the softmax over two classes alone says nothing: the foreign images get confident answers too
        assert np.mean([r.predictions[0].score for r in response.results]) > 0.5

    client = tc.InferenceServerClient(server.target)
    images = [image for image, _ in faces["test"][:4] + faces["digits"][:4]]
    tensor = tc.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = client.infer(MODEL, [tensor])
    scores = result.as_numpy("ood_score")
    expected = np.array([r.ood_score for r in _classify(server, faces["test"][:4] + faces["digits"][:4]).results])
    assert scores.shape == (8,) and np.allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert result.as_numpy("probabilities").shape == (8, 2)
    (ood_output,) = [o for o in result.get_response().outputs if o.name == "ood_score"]
    assert ood_output.parameters["ood_method"].string_param == "mahalanobis++"
    assert ood_output.parameters["ood_threshold"].double_param > 0
    only = client.infer(MODEL, [tensor], outputs=[tc.InferRequestedOutput("ood_score")])
    assert [o.name for o in only.get_response().outputs] == ["ood_score"]
    config = client.get_model_config(MODEL).config
    assert config.parameters["ood_method"].string_value == "mahalanobis++"
    for outputs, text in ((["ood_score", "ood_score"], "requested twice"),
                          (["ood_score", "probabilities", "logits"], "3 were requested"),
                          (["probabilities", "logits"], "unknown requested output 'logits'")):
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [tensor], outputs=[tc.InferRequestedOutput(name) for name in outputs])
        assert "StatusCode.INVALID_ARGUMENT" in str(err.value.status()) and text in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [tensor], outputs=[tc.InferRequestedOutput("ood_score", class_count=2)])
    assert "StatusCode.INVALID_ARGUMENT" in str(err.value.status()) and "one score per image" in err.value.message()


def test_manifest_threshold_and_graph_score_equal_numpy(trained, faces):
    """The manifest records method, threshold and validation figures; the published graph's
    ood_score is the Mahalanobis++ distance computed here in numpy from its own embedding output
    and initializers; in_distribution is score <= threshold."""
    server, registry_dir, jobs = trained
    registry = Registry(registry_dir)
    path, manifest = registry.verified_model_path(MODEL, 2)
    ood = manifest["ood"]
    assert ood["method"] == "mahalanobis++" and ood["output"] == "ood_score"
    assert ood["target_accepted_fraction"] == 0.95 and ood["validation"]["samples"] == manifest["training"]["num_val"]
    assert ood["validation"]["accepted_fraction"] >= 0.9 and ood["fitted_on"]["training_images"] > 100
    assert manifest["outputs"]["ood_score"] == "ood_score" and manifest["parity"]["ood_relative_diff"] < 1e-3

    pre = Preprocessing.from_manifest(manifest)
    examples = faces["test"][:6] + faces["textures"][:6]
    pixels = pre.normalize(np.stack([load_pixels(image, pre.height, pre.width, 10**8) for image, _ in examples]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph_score, embedding = session.run(["ood_score", "embedding"], {"image": pixels})
    weights = {t.name: t for t in onnx.load(str(path)).graph.initializer}

    if "headswap_ood/precision" in weights:
        precision = numpy_helper.to_array(weights["headswap_ood/precision"]).astype(np.float64)
    else:  # fewer training images than half the dimensions: (I - X'W) / b, stored as its factors
        basis_t, factor, inverse_b = (numpy_helper.to_array(weights[f"headswap_ood/{name}"]).astype(np.float64)
                                      for name in ("basis_t", "weights", "inverse_b"))
        precision = (np.eye(len(basis_t)) - basis_t @ factor) * inverse_b
    means = numpy_helper.to_array(weights["headswap_ood/means_t"]).T.astype(np.float64)
    z = embedding.astype(np.float64) / np.linalg.norm(embedding.astype(np.float64), axis=1, keepdims=True)
    reference = np.array([min((v - m) @ precision @ (v - m) for m in means) for v in z])
    np.testing.assert_allclose(graph_score, reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())

    served = _classify(server, examples)
    for result, score in zip(served.results, graph_score):
        assert result.ood_score == pytest.approx(float(score), rel=1e-3, abs=1e-3)
        assert result.in_distribution == (result.ood_score <= ood["threshold"])
    info = pb_grpc.ModelsStub(server.channel()).GetModel(pb.GetModelRequest(name=MODEL), timeout=30)
    assert info.ood_method == "mahalanobis++" and info.ood_threshold == pytest.approx(ood["threshold"], rel=1e-6)


def test_zero_shot_model_reports_max_softmax_and_says_so(trained, photos):
    server, _, _ = trained
    response = _classify(server, [(photos["coffee"], ""), (photos["chelsea"], "")], model=BUILTIN_NAME)
    for result in response.results:
        assert result.ood_score == pytest.approx(1.0 - result.predictions[0].score, abs=1e-6)
        assert not result.HasField("in_distribution")  # no validation images: no threshold
    info = pb_grpc.ModelsStub(server.channel()).GetModel(pb.GetModelRequest(name=BUILTIN_NAME), timeout=30)
    assert info.ood_method == "max_softmax" and not info.HasField("ood_threshold")
    client = tc.InferenceServerClient(server.target)
    assert client.get_model_config(BUILTIN_NAME).config.parameters["ood_method"].string_value == "max_softmax"
    pixels = np.zeros((1, 224, 224, 3), np.uint8)
    tensor = tc.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(BUILTIN_NAME, [tensor])
    assert result.as_numpy("ood_score")[0] == pytest.approx(1.0 - result.as_numpy("probabilities")[0].max(), abs=1e-6)
    text = run_cli("classify", "--target", server.target, "--top-k", "1", "--model", BUILTIN_NAME,
                   str(_write(photos["coffee"], server.log_path.parent / "coffee.jpg"))).stdout
    assert "ood score" in text and "no threshold for this model" in text


def _write(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


def test_version_published_before_scores_still_serves(trained, faces):
    """A version whose graph and manifest have no OOD score (as published before issue 23) serves
    as before, with max-softmax and no threshold."""
    server, registry_dir, _ = trained
    registry = Registry(registry_dir)
    path, manifest = registry.verified_model_path(MODEL, 1)
    model = onnx.load(str(path))
    kernel = next(t for t in model.graph.initializer if t.name == "headswap_head/dense0/kernel")
    bias = next(t for t in model.graph.initializer if t.name == "headswap_head/dense0/bias")
    layers = [compose.DenseWeights(numpy_helper.to_array(kernel), numpy_helper.to_array(bias), "softmax")]
    base_path, _ = registry.verified_model_path(BUILTIN_NAME, 1)
    old_file = server.log_path.parent / "legacy.onnx"
    compose.compose(base_path, layers, old_file)  # no score: the graph of a version published before
    old = {k: v for k, v in manifest.items() if k not in ("ood", "sha256", "created", "version", "name")}
    old["outputs"] = {k: v for k, v in manifest["outputs"].items() if k != "ood_score"}
    registry.publish("legacy", old_file, old, activate=True)
    response = _classify(server, faces["test"][:4], model="legacy")
    same_head = pb_grpc.InferenceStub(server.channel()).Classify(pb.ClassifyRequest(
        images=[image for image, _ in faces["test"][:4]], model=MODEL, version=1, top_k=2), timeout=120)
    assert response.version == 1
    for old_result, new_result in zip(response.results, same_head.results):  # the same head answers the same
        assert old_result.predictions[0].label == new_result.predictions[0].label
        assert old_result.predictions[0].score == pytest.approx(new_result.predictions[0].score, abs=1e-5)
    for result in response.results:
        assert result.ood_score == pytest.approx(1.0 - result.predictions[0].score, abs=1e-6)
        assert not result.HasField("in_distribution")
    info = pb_grpc.ModelsStub(server.channel()).GetModel(pb.GetModelRequest(name="legacy"), timeout=30)
    assert info.ood_method == "max_softmax"


def test_evaluation_has_calibration_ood_figures_and_the_comparison(trained):
    server, _, jobs = trained
    first, second = (json.loads(jobs[v].metrics_json) for v in (1, 2))
    for metrics in (first, second):
        assert 0.0 <= metrics["expected_calibration_error"] <= 1.0
        assert metrics["ood"]["method"] == "mahalanobis++" and metrics["ood"]["validation"]["samples"] > 0
    assert first["comparison"]["available"] is False and "no active version" in first["comparison"]["reason"]
    comparison = second["comparison"]
    assert comparison["available"] is True and comparison["active_version"] == 1
    assert comparison["samples"] == second["num_val"] and comparison["how"] == "its head on the same embeddings"
    assert comparison["new"]["accuracy"] == pytest.approx(second["val_accuracy"], abs=1e-6)
    assert comparison["active"]["accuracy"] == pytest.approx(first["val_accuracy"], abs=0.2)
    assert comparison["fixed"] - comparison["broken"] == round(
        (comparison["new"]["accuracy"] - comparison["active"]["accuracy"]) * comparison["samples"])

    text = run_cli("jobs", "--target", server.target, jobs[2].job_id).stdout
    for heading in ("expected calibration error", "per class", "confusion matrix",
                    "out-of-distribution score: mahalanobis++", "against the active version 1"):
        assert heading in text, text
    row = next(line for line in text.splitlines() if line.strip().startswith("active (v1)"))
    assert f"{comparison['active']['accuracy']:.4f}" in row


@pytest.mark.parametrize("count", [40, 500])
def test_shrunk_precision_is_sklearns_ledoit_wolf(count):
    """The Mahalanobis++ precision matrix (Woodbury with fewer images than dimensions, a direct
    inverse otherwise) equals scikit-learn's LedoitWolf on real data: digits' 64 pixels."""
    from sklearn.covariance import LedoitWolf
    from sklearn.datasets import load_digits

    from headswap.training import ood

    digits = load_digits()
    x, y = digits.data[:count], digits.target[:count]
    means = np.stack([x[y == c].mean(axis=0) for c in range(10)])
    centred = x - means[y]
    expected = LedoitWolf(assume_centered=True).fit(centred).precision_
    np.testing.assert_allclose(ood.shrunk_precision(centred), expected, rtol=1e-6,
                               atol=1e-9 * np.abs(expected).max())
    few = centred[:20] - centred[:20].mean(axis=0)  # 20 rows, 64 dimensions: the low-rank form
    factors = ood.precision_factors(few)
    low_rank = (np.eye(64) - factors["basis_t"] @ factors["weights"]) * factors["inverse_b"]
    full = LedoitWolf(assume_centered=True).fit(few).precision_
    np.testing.assert_allclose(low_rank, full, rtol=1e-6, atol=1e-9 * np.abs(full).max())
    assert "precision" in ood.precision_factors(centred)  # as many rows as dimensions or more: the matrix


def test_python_client_and_cli_show_the_score(trained, faces):
    """The Python client's results carry ood_score/in_distribution and the model's method and
    threshold; `headswap classify` prints the verdict (and --json the fields)."""
    from headswap import Client

    server, _, _ = trained
    examples = faces["test"][:2] + faces["textures"][:2]
    with Client(server.target, timeout=120) as client:
        answer = client.classify([image for image, _ in examples], model=MODEL, top_k=1)
        info = client.model(MODEL)
    served = _classify(server, examples)
    for predictions, result in zip(answer, served.results):
        assert predictions.ood_score == pytest.approx(result.ood_score, rel=1e-6)
        assert predictions.in_distribution is result.in_distribution
        assert predictions[0].label == result.predictions[0].label
    assert info.ood_method == "mahalanobis++" and info.ood_threshold == pytest.approx(served_threshold(info), rel=1e-6)

    # the most typical held-out face (in: most are) and the most foreign texture (out: most are)
    typical = min(zip(_classify(server, faces["test"]).results, faces["test"]), key=lambda p: p[0].ood_score)[1]
    foreign = max(zip(_classify(server, faces["textures"]).results, faces["textures"]),
                  key=lambda p: p[0].ood_score)[1]
    texture = _write(foreign[0], server.log_path.parent / "texture.png")
    face = _write(typical[0], server.log_path.parent / "face.png")
    verdicts = [r.in_distribution for r in _classify(server, [foreign, typical]).results]
    assert verdicts == [False, True]  # the CLI must show both
    text = run_cli("classify", "--target", server.target, "--model", MODEL, str(texture), str(face)).stdout
    assert "OUT OF DISTRIBUTION" in text.split(str(face))[0] and "in distribution" in text.split(str(face))[1]
    lines = [json.loads(line) for line in run_cli("classify", "--target", server.target, "--model", MODEL, "--json",
                                                  str(texture), str(face)).stdout.splitlines()]
    assert [line["in_distribution"] for line in lines] == [False, True] and lines[0]["ood_score"] > lines[1]["ood_score"]


def served_threshold(info) -> float:
    return float(info.manifest["ood"]["threshold"])


def test_comparison_runs_a_whole_active_version_that_was_not_composed(trained, faces):
    """When the active version is not the head composed on the same base (a phase-2 or older
    export), the comparison runs that whole version on the validation images."""
    server, registry_dir, jobs = trained
    registry = Registry(registry_dir)
    path, manifest = registry.verified_model_path(MODEL, 1)
    older = {k: v for k, v in manifest.items() if k not in ("ood", "export", "sha256", "created", "version", "name")}
    registry.publish("faces-exported", path, older, activate=True)
    stub = pb_grpc.TrainingStub(server.channel())
    requests = itertools.chain(stream(pb.FineTuneConfig(name="faces-exported", epochs=5, seed=3), faces["train"]),
                               stream(None, faces["test"], validation=True))  # validation: the held-out images
    job = stub.FineTune(requests, timeout=120)
    assert watch(server, job.job_id)[-1].state == pb.JOB_STATE_SUCCEEDED
    metrics = json.loads(stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=30).metrics_json)
    comparison = metrics["comparison"]
    assert comparison["available"] is True and comparison["active_version"] == 1
    assert comparison["how"] == "the whole version on the validation images"
    assert comparison["samples"] == metrics["num_val"]
    assert metrics["num_val"] == len(faces["test"])
    # the active version itself, through Classify, on the same validation images
    served = pb_grpc.InferenceStub(server.channel()).Classify(pb.ClassifyRequest(
        images=[image for image, _ in faces["test"]], model="faces-exported", version=1, top_k=1), timeout=120)
    accuracy = np.mean([r.predictions[0].label == label for r, (_, label) in zip(served.results, faces["test"])])
    assert comparison["active"]["accuracy"] == pytest.approx(accuracy, abs=1.01 / len(faces["test"]))
