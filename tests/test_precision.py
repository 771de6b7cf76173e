"""The fast precision tiers (issue 10 part 2): bf16/int8 versions built from the real built-in
model, gated on real held-out photos, served by OpenVINO, refused by a server without it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import BUILTIN, BUILTIN_NAME, run_cli
from test_hot_swap import metric
from headswap.errors import CorruptModel
from headswap.export import precision
from headswap.export.calibration_images import photo_sets
from headswap.inference.images import Preprocessing
from headswap.inference.openvino_runtime import OpenVinoRuntime, compile_model, cpu_capabilities, needs_recheck
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.registry.registry import RECHECK_FILE, Registry, sha256_file

HAS_BF16 = "BF16" in cpu_capabilities()


def fp32_version(registry: Path) -> tuple[Path, dict]:
    directory = registry / BUILTIN_NAME / "1"
    return directory / "model.onnx", json.loads((directory / "manifest.json").read_text())


@pytest.fixture(scope="module")
def photo_inputs(exported_registry) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """Model inputs of the shipped calibration and held-out photos (as the export builds them)."""
    _, manifest = fp32_version(exported_registry)
    pre = Preprocessing.from_manifest(manifest)
    calibration, heldout = photo_sets(pre.height, pre.width)
    return pre.normalize(calibration.pixels), pre.normalize(heldout.pixels), calibration.sources, heldout.sources


@pytest.fixture(scope="module")
def bf16_registry(exported_registry, tmp_path_factory) -> Path:
    """The exported registry plus a bf16 version 2 made by `headswap export --precision bf16`, not activated."""
    if not HAS_BF16:
        pytest.skip("this CPU has no native bf16 (OpenVINO's CPU capabilities lack BF16); "
                    "test_tiers_are_refused_on_a_cpu_without_their_native_kernels covers such a machine")
    root = tmp_path_factory.mktemp("registry-bf16")
    shutil.copytree(exported_registry, root, dirs_exist_ok=True)
    result = run_cli("export", BUILTIN, "--model-dir", str(root), "--precision", "bf16", "--no-activate")
    assert "bf16 in openvino" in result.stdout, result.stdout
    return root


@pytest.fixture(scope="module")
def heldout_answers(bf16_registry, photo_inputs) -> tuple[np.ndarray, np.ndarray]:
    """fp32 (ONNX Runtime) and bf16 alone (OpenVINO) probabilities on the held-out photos, computed here."""
    _, heldout, _, _ = photo_inputs
    path, _ = fp32_version(bf16_registry)
    return (precision.ort_probabilities(precision.fp32_session(path, 2), heldout),
            precision.openvino_probabilities(compile_model(path, "bf16", 2), heldout))


def test_calibration_and_heldout_photos_are_real_and_disjoint():
    calibration, heldout = photo_sets(224, 224)
    assert calibration.pixels.dtype == np.uint8 and calibration.pixels.shape[1:] == (224, 224, 3)
    assert heldout.pixels.shape[1:] == (224, 224, 3)
    assert len(calibration.pixels) >= 200 and len(heldout.pixels) >= 200
    assert len(calibration.sources) == len(calibration.pixels)
    # split by source photo: no held-out crop comes from a calibration photo
    assert not set(calibration.sources) & set(heldout.sources)
    assert {"chelsea", "coffee"} <= set(calibration.sources) | set(heldout.sources)
    # real photos, not blank or constant crops
    assert min(float(crop.std()) for crop in heldout.pixels) > 1.0
    again, _ = photo_sets(224, 224)
    assert np.array_equal(again.pixels, calibration.pixels)  # deterministic: the gate is reproducible


def test_bf16_export_records_gated_accuracy(bf16_registry, photo_inputs, heldout_answers):
    manifest = Registry(str(bf16_registry)).manifest(BUILTIN_NAME, 2)
    assert manifest["precision"] == "bf16" and manifest["runtime"] == "openvino"
    accuracy, recheck = manifest["accuracy"], manifest["recheck"]
    assert accuracy["gate"] == {"min_agreement": 0.99}
    # the gate is literal: fp32's top-1 on at least 99% of every held-out photo, as served
    assert accuracy["top1_agreement"] >= 0.99 and accuracy["heldout_images"] >= precision.MIN_HELDOUT_IMAGES
    # bf16 alone flips near ties (this is why the tier re-checks them); the re-check is what closes the gap
    assert accuracy["tier_alone"]["top1_agreement"] < accuracy["top1_agreement"]
    assert recheck["margin"] > 0 and 0 < recheck["heldout_share"] < 1
    calibration, heldout, calibration_sources, heldout_sources = photo_inputs
    assert accuracy["heldout_photos"] == sorted(set(heldout_sources))
    assert recheck["calibration_photos"] == sorted(set(calibration_sources))
    # the recorded figures are what fp32 (ORT) and bf16 (OpenVINO) give on these photos under the rule
    _, fp32_manifest = fp32_version(bf16_registry)
    reference, tier = heldout_answers
    rechecked = needs_recheck(tier, recheck["margin"])
    served = np.where(rechecked[:, None], reference, tier)
    assert (served.argmax(1) == reference.argmax(1)).mean() == pytest.approx(accuracy["top1_agreement"], abs=0.01)
    assert rechecked.mean() == pytest.approx(recheck["heldout_share"], abs=0.02)
    assert "precision" not in fp32_manifest  # the fp32 version is untouched


def test_recheck_margin_covers_every_flip_seen_in_calibration():
    reference = np.array([[0.6, 0.4, 0.0], [0.2, 0.5, 0.3], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8]], np.float32)
    tier = np.array([[0.45, 0.55, 0.0], [0.2, 0.5, 0.3], [0.33, 0.34, 0.33], [0.1, 0.1, 0.8]], np.float32)
    margin = precision.recheck_margin(reference, tier)
    assert margin == pytest.approx(0.1)  # the widest lead among the two flips (0.55 - 0.45 and 0.34 - 0.33)
    assert needs_recheck(tier, margin).tolist() == [True, False, True, False]
    assert precision.recheck_margin(reference, reference) == 0.0  # nothing flipped: only exact ties
    assert not needs_recheck(tier, -1.0).any()


def test_bf16_tier_serves_in_openvino_with_the_fp32_answers(bf16_registry, server_factory, photos):
    server = server_factory(bf16_registry)
    stub = pb_grpc.InferenceStub(server.channel())
    images = [photos["chelsea"], photos["coffee"]]
    fp32 = stub.Classify(pb.ClassifyRequest(images=images, top_k=3, model=BUILTIN_NAME, version=1), timeout=60)
    bf16 = stub.Classify(pb.ClassifyRequest(images=images, top_k=3, model=BUILTIN_NAME, version=2), timeout=60)
    assert bf16.version == 2 and fp32.version == 1
    for a, b in zip(fp32.results, bf16.results):
        assert a.predictions[0].label == b.predictions[0].label
        assert abs(a.predictions[0].score - b.predictions[0].score) < 0.05
    assert bf16.results[1].predictions[0].label == "espresso"
    assert "loaded efficientnet-lite0 version 2" in server.log()


def test_server_without_openvino_refuses_the_tier_and_keeps_serving(bf16_registry, server_factory, photos, tmp_path):
    # A real server process whose Python cannot import openvino (a shadowing package that raises
    # ImportError, first on its path), as an inference image installed without the extra.
    shadow = tmp_path / "no-openvino"
    (shadow / "openvino").mkdir(parents=True)
    (shadow / "openvino" / "__init__.py").write_text("raise ImportError('No module named openvino')\n")
    registry = tmp_path / "registry"
    shutil.copytree(bf16_registry, registry)
    server = server_factory(registry, env={"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])})
    channel = server.channel()
    models = pb_grpc.ModelsStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        models.ActivateModel(pb.ActivateModelRequest(name=BUILTIN_NAME, version=2), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "headswap[openvino]" in info.value.details() and "version 2" in info.value.details()
    answer = pb_grpc.InferenceStub(channel).Classify(pb.ClassifyRequest(images=[photos["coffee"]], top_k=1),
                                                     timeout=60)
    assert answer.version == 1 and answer.results[0].predictions[0].label == "espresso"
    assert "refusing efficientnet-lite0 version 2" in server.log()
    assert "Traceback" not in server.log()
    assert Registry(str(registry)).active_version(BUILTIN_NAME) == 1


def answer_flips_like_fp32(server, heldout: np.ndarray, flipped: np.ndarray, reference: np.ndarray) -> None:
    """Each flipped held-out crop, sent over KServe V2 as the exact FP32 model input: version 2 (the tier)
    answers with version 1's (fp32) probabilities and fp32's top-1."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(server.target)
    for index in flipped:
        infer_input = triton.InferInput("image", [1, *heldout.shape[1:]], "FP32")
        infer_input.set_data_from_numpy(heldout[index:index + 1])
        answers = {version: client.infer(BUILTIN_NAME, [infer_input], model_version=version)
                   .as_numpy("probabilities")[0] for version in ("1", "2")}
        assert answers["2"].argmax() == answers["1"].argmax() == reference[index].argmax()
        np.testing.assert_allclose(answers["2"], answers["1"], atol=1e-5)


def test_bf16_tier_answers_near_ties_with_fp32(bf16_registry, server_factory, photo_inputs, heldout_answers):
    """Held-out crops on which bf16 alone changes fp32's top-1, sent as the exact model input over KServe
    V2: version 2 (bf16) answers each with fp32's probabilities, and the metrics count the re-checks."""
    _, heldout, _, _ = photo_inputs
    reference, tier = heldout_answers
    flipped = np.flatnonzero(tier.argmax(1) != reference.argmax(1))
    assert len(flipped) >= 2, "bf16 flips no held-out photo here: nothing to re-check"
    server = server_factory(bf16_registry)
    answer_flips_like_fp32(server, heldout, flipped, reference)
    # each answered in fp32: re-checked as a near tie, or in a batch run in fp32 straight because, with
    # every image a near tie, that measures cheaper than bf16 plus the re-check
    counted = {reason: metric(server, "headswap_tier_fp32_images_total", version="2", reason=reason)
               for reason in ("near tie", "whole batch")}
    assert counted["near tie"] >= 1 and sum(counted.values()) >= len(flipped), counted
    assert metric(server, "headswap_tier_fp32_images_total", version="1") == 0


@pytest.mark.parametrize("recheck", [{"margin": "wide"}, {"margin": float("nan")}, {"margin": 7}, ["margin"]])
def test_a_manifest_with_a_broken_recheck_is_refused_at_load(bf16_registry, recheck):
    path, manifest = fp32_version(bf16_registry)
    tier_manifest = {**Registry(str(bf16_registry)).manifest(BUILTIN_NAME, 2), "recheck": recheck}
    with pytest.raises(CorruptModel, match=r"recheck margin must be a number from -1 \(no re-check\) to 1"):
        OpenVinoRuntime(BUILTIN_NAME, 2, path, tier_manifest, 2)


def test_tier_below_its_gate_is_refused_with_the_figures(exported_registry, photo_inputs, tmp_path):
    """The gate is the same for every tier; int8 runs on any CPU OpenVINO supports (bf16 needs native bf16)."""
    calibration, heldout, _, _ = photo_inputs
    source, _ = fp32_version(exported_registry)
    shutil.copy(source, tmp_path / "model.onnx")
    # every held-out image must agree: int8 changes some answers, more than its re-check of 16 photos' flips catches
    strict = precision.Gate(min_agreement=1.0)
    with pytest.raises(precision.PrecisionRefused) as info:
        precision.make_tier(tmp_path / "model.onnx", "int8", calibration[:16], heldout, gate=strict, threads=2)
    message = str(info.value)
    assert "misses its accuracy gate" in message and f"of {len(heldout)} held-out real images" in message
    assert "gate: >= 100.0%" in message and "Nothing published" in message


def test_int8_tier_is_calibrated_on_real_photos_and_rechecks_on_its_fp32_file(exported_registry, photo_inputs,
                                                                               tmp_path):
    calibration, heldout, _, _ = photo_inputs
    source, manifest = fp32_version(exported_registry)
    shutil.copy(source, tmp_path / "model.onnx")
    built = precision.make_tier(tmp_path / "model.onnx", "int8", calibration[:96], heldout,
                                gate=precision.Gate(min_agreement=0.0), threads=2)
    assert built.path.name == precision.INT8_FILE and built.path.stat().st_size < 0.5 * source.stat().st_size
    # the quantized file is not the fp32 file: the version carries the fp32 one for the re-check
    assert built.extra_files == {RECHECK_FILE: tmp_path / "model.onnx"}
    fields = built.fields
    assert fields["precision"] == "int8" and fields["runtime"] == "openvino"
    assert fields["quantization"]["calibration_images"] == 96
    assert fields["recheck"]["margin"] > 0 and RECHECK_FILE in fields["recheck"]["engine"]
    accuracy = fields["accuracy"]
    assert accuracy["heldout_images"] == len(heldout)
    assert accuracy["tier_alone"]["top1_agreement"] < accuracy["top1_agreement"] <= 1.0
    # the gate judges these same figures: the message carries them when they miss it
    refusal = precision.gate_failure("int8", fields, precision.Gate(min_agreement=1.0), fine_tune=False)
    if accuracy["top1_agreement"] < 1.0:
        assert f"{100 * accuracy['top1_agreement']:.1f}% of {len(heldout)}" in refusal and "int8 alone" in refusal
    # the int8 file runs in the serving runtime with its fp32 file, and answers with probabilities
    runtime = OpenVinoRuntime("m", 3, built.path, {**manifest, **fields}, 2, files=built.extra_files)
    runtime.warm_up()
    probabilities = runtime.infer(heldout[:4])
    assert probabilities.shape == (4, 1000) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)
    # without its fp32 file the int8 version cannot re-check: refused, never re-checked on the int8 file
    with pytest.raises(CorruptModel, match=f"has no fp32 file \\({RECHECK_FILE}\\) to re-check on"):
        OpenVinoRuntime("m", 3, built.path, {**manifest, **fields}, 2)


@pytest.fixture(scope="module")
def int8_registry(exported_registry, tmp_path_factory) -> Path:
    """The exported registry plus an int8 version 2 made by `headswap export --precision int8` with the
    default gate, not activated."""
    root = tmp_path_factory.mktemp("registry-int8")
    shutil.copytree(exported_registry, root, dirs_exist_ok=True)
    result = run_cli("export", BUILTIN, "--model-dir", str(root), "--precision", "int8", "--no-activate")
    assert "int8 in openvino" in result.stdout, result.stdout
    return root


def test_int8_export_passes_the_default_gate_with_its_recheck(int8_registry, photo_inputs):
    registry = Registry(str(int8_registry))
    manifest = registry.manifest(BUILTIN_NAME, 2)
    accuracy, recheck = manifest["accuracy"], manifest["recheck"]
    assert manifest["precision"] == "int8" and accuracy["gate"] == {"min_agreement": 0.99}
    assert accuracy["top1_agreement"] >= 0.99 and accuracy["heldout_images"] >= precision.MIN_HELDOUT_IMAGES
    # int8 alone misses the gate by far; the re-check of near ties in fp32 is what passes it
    assert accuracy["tier_alone"]["top1_agreement"] < 0.95 and 0 < recheck["heldout_share"] < 1
    # stored: the quantized model.onnx, and the fp32 file beside it with its sha256 in the manifest
    directory = int8_registry / BUILTIN_NAME / "2"
    fp32_file = directory / RECHECK_FILE
    assert manifest["files"] == {RECHECK_FILE: sha256_file(fp32_file)}
    assert (directory / "model.onnx").stat().st_size < 0.5 * fp32_file.stat().st_size
    path, _ = registry.verified_model_path(BUILTIN_NAME, 2)
    assert registry.verified_extra_files(BUILTIN_NAME, 2, manifest) == {RECHECK_FILE: fp32_file}
    # the recorded figures are what fp32 and the stored int8 file give on the held-out photos under the rule
    _, heldout, _, _ = photo_inputs
    reference = precision.ort_probabilities(precision.fp32_session(fp32_file, 2), heldout)
    tier = precision.openvino_probabilities(compile_model(path, "int8", 2), heldout)
    rechecked = needs_recheck(tier, recheck["margin"])
    served = np.where(rechecked[:, None], reference, tier)
    assert (served.argmax(1) == reference.argmax(1)).mean() == pytest.approx(accuracy["top1_agreement"], abs=0.01)
    assert rechecked.mean() == pytest.approx(recheck["heldout_share"], abs=0.02)


def test_int8_tier_answers_near_ties_with_fp32(int8_registry, server_factory, photo_inputs, photos):
    """Held-out crops that int8 alone answers differently from fp32, sent over KServe V2 as the exact model
    input: version 2 (int8) answers each with version 1's (fp32) probabilities."""
    _, heldout, _, _ = photo_inputs
    directory = int8_registry / BUILTIN_NAME / "2"
    reference = precision.ort_probabilities(precision.fp32_session(directory / RECHECK_FILE, 2), heldout)
    tier = precision.openvino_probabilities(compile_model(directory / "model.onnx", "int8", 2), heldout)
    flipped = np.flatnonzero(tier.argmax(1) != reference.argmax(1))[:12]
    assert len(flipped) >= 2, "int8 flips no held-out photo here: nothing to re-check"
    server = server_factory(int8_registry)
    answer_flips_like_fp32(server, heldout, flipped, reference)
    counted = sum(metric(server, "headswap_tier_fp32_images_total", version="2", reason=reason)
                  for reason in ("near tie", "whole batch"))
    assert counted >= len(flipped)
    # and a whole photo through Classify: version 2 answers it, with fp32's label
    stub = pb_grpc.InferenceStub(server.channel())
    answer = stub.Classify(pb.ClassifyRequest(images=[photos["coffee"]], top_k=1, model=BUILTIN_NAME, version=2),
                           timeout=60)
    assert answer.version == 2 and answer.results[0].predictions[0].label == "espresso"
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("damage, message", [
    ("missing", f"{RECHECK_FILE} is missing"),
    ("changed", f"sha256 of {RECHECK_FILE} is"),
    ("unlisted", "has no fp32 file"),
    ("unknown file", "manifest's files must map"),
    ("not a sha", "manifest's files must map"),
])
def test_an_int8_version_with_a_damaged_fp32_file_is_refused_and_the_active_one_keeps_serving(
        int8_registry, server_factory, photos, tmp_path, damage, message):
    registry = tmp_path / "registry"
    shutil.copytree(int8_registry, registry)
    directory = registry / BUILTIN_NAME / "2"
    manifest = json.loads((directory / "manifest.json").read_text())
    if damage == "missing":
        (directory / RECHECK_FILE).unlink()
    elif damage == "changed":
        with open(directory / RECHECK_FILE, "r+b") as handle:
            handle.seek(4096)
            handle.write(b"\0" * 64)
    elif damage == "unlisted":
        del manifest["files"]
    elif damage == "unknown file":
        manifest["files"] = {"../../active.json": manifest["files"][RECHECK_FILE]}
    else:
        manifest["files"] = {RECHECK_FILE: "not a sha"}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    server = server_factory(registry)
    channel = server.channel()
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.ModelsStub(channel).ActivateModel(pb.ActivateModelRequest(name=BUILTIN_NAME, version=2), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert message in info.value.details() and "version 2" in info.value.details()
    answer = pb_grpc.InferenceStub(channel).Classify(pb.ClassifyRequest(images=[photos["coffee"]], top_k=1),
                                                     timeout=60)
    assert answer.version == 1 and answer.results[0].predictions[0].label == "espresso"
    assert Registry(str(registry)).active_version(BUILTIN_NAME) == 1
    assert "Traceback" not in server.log()


def test_fine_tune_gate_is_the_validation_accuracy_drop():
    reference = np.eye(4, dtype=np.float32)[[0, 1, 2, 3] * 50]  # fp32: 200 images, all right
    tier = reference.copy()
    tier[0] = np.eye(4, dtype=np.float32)[1]  # the tier gets one image wrong: -0.5 points
    labels = np.array([0, 1, 2, 3] * 50)
    gate = precision.Gate()
    figures = precision.measure(reference, tier, labels)
    assert figures["fp32_accuracy"] == 1.0 and figures["accuracy_drop"] == pytest.approx(0.005)
    assert precision.gate_failure("int8", {"accuracy": figures}, gate, fine_tune=True) == ""
    tier[1] = np.eye(4, dtype=np.float32)[0]  # two wrong: -1 point, over the 0.5-point gate
    figures = precision.measure(reference, tier, labels)
    message = precision.gate_failure("int8", {"accuracy": figures}, gate, fine_tune=True)
    assert "loses 1.00 points" in message and "100.00% fp32 -> 99.00% int8" in message and "200 validation" in message


def test_export_precision_options_are_checked(tmp_path):
    result = run_cli("export", BUILTIN, "--model-dir", str(tmp_path), "--precision", "fp16", check=False)
    assert result.returncode == 2 and "fp32" in result.stderr and "bf16" in result.stderr
    result = run_cli("export", BUILTIN, "--model-dir", str(tmp_path), "--precision", "int8", "--min-agreement", "1.5",
                     check=False)
    assert result.returncode == 2 and "--min-agreement" in result.stderr
    with pytest.raises(Exception, match="precision must be one of fp32, bf16, int8"):
        precision.check_precision("fp8")
    with pytest.raises(Exception, match="min_agreement must be between 0 and 1"):
        precision.Gate(min_agreement=2.0).check()
    assert not list(tmp_path.iterdir())  # nothing was built or stored


def test_tiers_are_refused_on_a_cpu_without_their_native_kernels():
    """On a CPU without AVX-512 BF16 (or VNNI) a tier would run no faster than fp32: refused up front.
    The capability list is given here, so this runs whatever this CPU has."""
    with pytest.raises(precision.PrecisionRefused, match="no native bf16"):
        precision.check_available("bf16", capabilities=["FP32", "INT8"])
    with pytest.raises(precision.PrecisionRefused, match="no native int8"):
        precision.check_available("int8", capabilities=["FP32", "BF16"])
    precision.check_available("bf16", capabilities=["FP32", "BF16"])  # accepted
    precision.check_available("fp32", capabilities=[])  # fp32 needs nothing


def test_finetune_cli_sends_its_precision():
    result = run_cli("finetune", "--help")
    assert "--precision [fp32|bf16|int8]" in result.stdout
    result = run_cli("finetune", ".", "--name", "x", "--precision", "fp16", check=False)
    assert result.returncode == 2 and "fp16" in result.stderr


def test_a_finetune_on_an_int8_base_trains_on_its_fp32_file(int8_registry, server_factory, tmp_path):
    """An active int8 version is served quantized, but a FineTune on it extracts and composes on the fp32
    file stored beside it: the new version records that file's sha256 and has no quantized node."""
    import onnx
    from sklearn.datasets import load_digits

    from test_finetune import digit_png, stream, watch

    registry_dir = tmp_path / "registry"
    shutil.copytree(int8_registry, registry_dir)
    registry = Registry(str(registry_dir))
    registry.activate(BUILTIN_NAME, 2)
    int8 = registry.manifest(BUILTIN_NAME, 2)
    server = server_factory(registry_dir, env={"KERAS_BACKEND": "jax"})
    digits = load_digits()
    examples = [(digit_png(digits.images[i]), str(digits.target[i])) for i in range(100)]
    job = pb_grpc.TrainingStub(server.channel()).FineTune(
        stream(pb.FineTuneConfig(name="digits-on-int8", epochs=2), examples), timeout=300)
    final = watch(server, job.job_id)[-1]
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.message
    manifest = registry.manifest("digits-on-int8", 1)
    assert manifest["base_model"]["name"] == BUILTIN_NAME and manifest["base_model"]["version"] == 2
    assert manifest["export"]["base_sha256"] == int8["files"][RECHECK_FILE] != int8["sha256"]
    assert "precision" not in manifest and RECHECK_FILE not in manifest.get("files", {})
    graph = onnx.load(str(registry_dir / "digits-on-int8" / "1" / "model.onnx")).graph
    assert not [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert "Traceback" not in server.log()
