"""The zero-shot service end to end: a real server subprocess, real gRPC clients, real photos."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import BUILTIN_NAME, encode, run_cli
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

CAT_CLASSES = set(range(281, 286))
ESPRESSO = 967


def classify(server, images, top_k=5, **kwargs) -> pb.ClassifyResponse:
    stub = pb_grpc.InferenceStub(server.channel())
    return stub.Classify(pb.ClassifyRequest(images=images, top_k=top_k, **kwargs), timeout=60)


def test_classifies_real_photos(shared_server, photos):
    response = classify(shared_server, [photos["chelsea"], photos["coffee"]], top_k=5)
    assert response.model == BUILTIN_NAME and response.version >= 1
    chelsea, coffee = response.results
    assert CAT_CLASSES & {p.index for p in chelsea.predictions}
    assert chelsea.predictions[0].index in (285, 282)  # Egyptian cat or tiger cat
    assert coffee.predictions[0].index == ESPRESSO and coffee.predictions[0].label == "espresso"
    assert coffee.predictions[0].score > 0.8
    scores = [p.score for p in chelsea.predictions]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5


def test_accepts_jpeg_png_webp_bmp(shared_server):
    from skimage import data

    pixels = data.coffee()
    images = [encode(pixels, fmt) for fmt in ("JPEG", "PNG", "WEBP", "BMP")]
    response = classify(shared_server, images, top_k=1)
    assert [r.predictions[0].index for r in response.results] == [ESPRESSO] * 4


def test_explicit_version_and_unknown_model(shared_server, photos):
    response = classify(shared_server, [photos["coffee"]], model=BUILTIN_NAME, version=1, top_k=1)
    assert response.version == 1
    with pytest.raises(grpc.RpcError) as err:
        classify(shared_server, [photos["coffee"]], model="no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        classify(shared_server, [photos["coffee"]], model=BUILTIN_NAME, version=99)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "version 99" in err.value.details()


@pytest.mark.parametrize("images, code, words", [
    ([], grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    ([b""], grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ([b"definitely not an image"], grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded"),
    ([b"GIF89a" + b"\x00" * 64], grpc.StatusCode.INVALID_ARGUMENT, "decoded"),
])
def test_bad_images_are_refused_clearly(shared_server, images, code, words):
    with pytest.raises(grpc.RpcError) as err:
        classify(shared_server, images)
    assert err.value.code() == code and words in err.value.details()


def test_unsupported_format_and_truncated_image(shared_server):
    from skimage import data

    tiff = encode(data.coffee(), "TIFF")
    with pytest.raises(grpc.RpcError) as err:
        classify(shared_server, [tiff])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "TIFF" in err.value.details()
    jpeg = encode(data.coffee(), "JPEG")
    with pytest.raises(grpc.RpcError) as err:
        classify(shared_server, [jpeg[: len(jpeg) // 3]])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 0" in err.value.details()


def test_decompression_bomb_is_refused(shared_server):
    # A 20000x20000 PNG compresses to a few hundred KB but would decode to 1.2 GB.
    bomb = encode(np.zeros((20000, 20000), dtype=np.uint8), "PNG", optimize=True)
    assert len(bomb) < 2_000_000
    with pytest.raises(grpc.RpcError) as err:
        classify(shared_server, [bomb])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "20000x20000" in err.value.details()


def test_top_k_range(shared_server, photos):
    for bad in (1001, 5000):
        with pytest.raises(grpc.RpcError) as err:
            classify(shared_server, [photos["coffee"]], top_k=bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.value.details()
    assert len(classify(shared_server, [photos["coffee"]], top_k=1000).results[0].predictions) == 1000


def test_message_over_size_limit(server_factory, registry_copy, photos):
    server = server_factory(registry_copy, "--max-message-bytes", "200000")
    with pytest.raises(grpc.RpcError) as err:
        classify(server, [b"\xff" * 300_000])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # ... and the server keeps serving.
    assert classify(server, [photos["coffee"]], top_k=1).results[0].predictions[0].index == ESPRESSO
    assert server.stop() == 0


def test_server_survives_bad_input(shared_server, photos):
    for junk in ([b""], [b"junk"], [photos["coffee"][:100]]):
        with pytest.raises(grpc.RpcError):
            classify(shared_server, junk)
    assert classify(shared_server, [photos["coffee"]], top_k=1).results[0].predictions[0].index == ESPRESSO


def test_models_list_and_get(shared_server):
    stub = pb_grpc.ModelsStub(shared_server.channel())
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    info = next(m for m in models if m.name == BUILTIN_NAME)
    assert info.num_labels == 1000 and (info.input_height, info.input_width) == (224, 224)
    assert info.source == "builtin:efficientnet-lite0" and info.ready and info.active_version == info.version
    manifest = json.loads(stub.GetModel(pb.GetModelRequest(name=BUILTIN_NAME), timeout=10).manifest_json)
    assert manifest["parity"]["max_abs_diff"] < 1e-4 and len(manifest["sha256"]) == 64
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(name="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_per_model_health(shared_server):
    stub = health_pb2_grpc.HealthStub(shared_server.channel())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == serving
    assert stub.Check(health_pb2.HealthCheckRequest(service=BUILTIN_NAME), timeout=5).status == serving
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="unknown-model"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_local_health_check_reads_the_port_from_the_settings(shared_server):
    """`headswap health --local` (the Dockerfile's HEALTHCHECK) without TLS: HEADSWAP_PORT."""
    port = shared_server.target.rsplit(":", 1)[1]
    result = run_cli("health", "--local", env={"HEADSWAP_PORT": port, "HEADSWAP_HEALTH_PORT": "-1"})
    assert result.stdout.strip() == "SERVING"


def test_reflection_lists_services(shared_server):
    stub = reflection_pb2_grpc.ServerReflectionStub(shared_server.channel())
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"headswap.v1.Inference", "headswap.v1.Models", "headswap.v1.Training",
            "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_serving_process_does_not_import_tensorflow(shared_server, photos):
    classify(shared_server, [photos["coffee"]])
    maps = Path(f"/proc/{shared_server.proc.pid}/maps").read_text()
    assert "onnxruntime" in maps  # the check can see shared libraries...
    assert "tensorflow" not in maps and "_pywrap_tensorflow" not in maps  # ...and TF is not among them


def test_cli_classify_json_and_text(shared_server, tmp_path, photos):
    coffee = tmp_path / "coffee.jpg"
    coffee.write_bytes(photos["coffee"])
    chelsea = tmp_path / "chelsea.png"
    chelsea.write_bytes(photos["chelsea"])
    out = run_cli("classify", "--target", shared_server.target, "--top-k", "3", "--json", str(coffee), str(chelsea))
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 2
    assert lines[0]["predictions"][0]["label"] == "espresso" and len(lines[0]["predictions"]) == 3
    assert lines[1]["predictions"][0]["index"] in CAT_CLASSES
    text = run_cli("classify", "--target", shared_server.target, "--top-k", "1", str(coffee)).stdout
    assert "espresso" in text


def test_cli_reports_server_errors(shared_server, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg")
    result = run_cli("classify", "--target", shared_server.target, str(junk), check=False)
    assert result.returncode != 0 and "INVALID_ARGUMENT" in result.stderr and "could not be decoded" in result.stderr
    result = run_cli("classify", "--target", shared_server.target, "--model", "ghost", str(junk), check=False)
    assert result.returncode != 0 and "NOT_FOUND" in result.stderr
    assert run_cli("health", "--target", shared_server.target).stdout.strip() == "SERVING"


def test_invalid_configuration_is_refused_at_start(tmp_path):
    result = run_cli("serve", "--port", "70000", "--model-dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "--port" in result.stderr
    result = run_cli("serve", "--model-dir", str(tmp_path), env={"HEADSWAP_MAX_BATCH_SIZE": "zero"}, check=False)
    assert result.returncode != 0 and "HEADSWAP_MAX_BATCH_SIZE" in result.stderr


def test_a_port_in_use_is_refused_naming_its_setting(shared_server, tmp_path):
    """Two servers on one host: the second says which port, not a grpc traceback."""
    for flags, setting in ((["--port", str(shared_server.port)], "--port"),
                           (["--port", "0", "--metrics-port", str(shared_server.metrics_port)], "--metrics-port")):
        result = run_cli("serve", "--host", "127.0.0.1", *flags, "--model-dir", str(tmp_path / "models"),
                         "--work-dir", str(tmp_path / setting), check=False)
        assert result.returncode != 0
        assert f"({setting}): " in result.stderr and "Choose another" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
