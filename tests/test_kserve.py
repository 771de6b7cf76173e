"""KServe V2 / Triton protocol end to end, with the unchanged `tritonclient` package as the client.

Every inference is checked against the headswap.v1 Classify answer for the same photo. This
process must never import headswap.protocol.kserve_v2_pb2: it declares the same `inference.*`
protobuf messages as tritonclient, and the two cannot share one descriptor pool.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import BUILTIN_NAME
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

SIZE = 224
CLASSES = 1000
ESPRESSO = 967
MAX_REQUEST_ID_LENGTH = 1024  # kserve_servicer's bound; that module cannot be imported here (see above)
CAT_CLASSES = set(range(281, 286))


def server_pixels(data: bytes) -> np.ndarray:
    """What the server makes of an encoded photo: center square crop, bilinear resize, uint8 RGB."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    resized = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(resized, dtype=np.uint8)


def classify_probabilities(server, images: list[bytes]) -> np.ndarray:
    """The headswap.v1 answer as full probability vectors [N, 1000]."""
    stub = pb_grpc.InferenceStub(server.channel())
    response = stub.Classify(pb.ClassifyRequest(images=images, top_k=CLASSES), timeout=60)
    result = np.zeros((len(images), CLASSES), dtype=np.float32)
    for row, classification in zip(result, response.results):
        for prediction in classification.predictions:
            row[prediction.index] = prediction.score
    return result


def tensor(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    infer_input = tc.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def status_of(err: pytest.ExceptionInfo) -> str:
    return err.value.status()


@pytest.fixture(scope="module")
def reference(shared_server, photos) -> dict[str, np.ndarray]:
    names = ["chelsea", "coffee", "rocket"]
    probabilities = classify_probabilities(shared_server, [photos[n] for n in names])
    return dict(zip(names, probabilities))


def assert_same_answer(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.float32
    assert np.array_equal(actual.argmax(-1), expected.argmax(-1))
    np.testing.assert_allclose(actual, expected, atol=1e-4)


# --- health and metadata ---------------------------------------------------------------------


def test_server_live_ready_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "headswap" and metadata.version
    assert {"classification", "model_repository"} <= set(metadata.extensions)


def test_model_ready(client):
    assert client.is_model_ready(BUILTIN_NAME)
    assert client.is_model_ready(BUILTIN_NAME, "1")
    # As Triton does: an unknown model (or version) is simply not ready.
    assert client.is_model_ready("no-such-model") is False
    assert client.is_model_ready(BUILTIN_NAME, "99") is False
    with pytest.raises(InferenceServerException) as err:
        client.is_model_ready(BUILTIN_NAME, "latest")
    assert status_of(err) == "StatusCode.INVALID_ARGUMENT"


def test_model_metadata(client):
    metadata = client.get_model_metadata(BUILTIN_NAME)
    assert metadata.name == BUILTIN_NAME and metadata.platform == "onnxruntime_onnx"
    assert list(metadata.versions) == ["1"]
    (image,) = metadata.inputs
    # advertised as pixels (FP32 model input and BYTES images are accepted too): a client that follows the
    # metadata needs no normalisation, and no value it can send is invalid
    assert (image.name, image.datatype, list(image.shape)) == ("image", "UINT8", [-1, SIZE, SIZE, 3])
    output, ood = metadata.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [-1, CLASSES])
    assert (ood.name, ood.datatype, list(ood.shape)) == ("ood_score", "FP32", [-1])  # issue 23
    assert client.get_model_metadata(BUILTIN_NAME, "1").name == BUILTIN_NAME
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-model")
    assert status_of(err) == "StatusCode.NOT_FOUND" and "no-such-model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata(BUILTIN_NAME, "99")
    assert status_of(err) == "StatusCode.NOT_FOUND"


def test_repository_index(client):
    index = client.get_model_repository_index()
    entries = {m.name: m for m in index.models}
    assert entries[BUILTIN_NAME].version == "1" and entries[BUILTIN_NAME].state == "READY"


# --- inference -------------------------------------------------------------------------------


def test_infer_uint8_pixels_matches_classify(client, photos, reference):
    pixels = np.stack([server_pixels(photos["chelsea"]), server_pixels(photos["coffee"])])
    result = client.infer(BUILTIN_NAME, [tensor("image", pixels, "UINT8")], request_id="uint8-1",
                          outputs=[tc.InferRequestedOutput("probabilities")])
    response = result.get_response()
    assert response.id == "uint8-1" and response.model_name == BUILTIN_NAME and response.model_version == "1"
    probabilities = result.as_numpy("probabilities")
    assert_same_answer(probabilities, np.stack([reference["chelsea"], reference["coffee"]]))
    assert probabilities[0].argmax() in CAT_CLASSES and probabilities[1].argmax() == ESPRESSO


def test_infer_fp32_preprocessed_matches_classify(client, photos, reference):
    pixels = server_pixels(photos["coffee"])[None]
    model_input = (pixels.astype(np.float32) - 127.0) / 128.0
    result = client.infer(BUILTIN_NAME, [tensor("image", model_input, "FP32")], model_version="1")
    assert_same_answer(result.as_numpy("probabilities"), reference["coffee"][None])


def test_infer_encoded_bytes_batch_matches_classify(client, photos, reference):
    names = ["chelsea", "coffee", "rocket"]
    images = np.array([photos[n] for n in names], dtype=np.object_)
    result = client.infer(BUILTIN_NAME, [tensor("image", images, "BYTES")])
    assert_same_answer(result.as_numpy("probabilities"), np.stack([reference[n] for n in names]))


def test_infer_from_typed_contents(shared_server, photos, reference):
    """Clients that fill `contents` instead of raw_input_contents (tritonclient's own messages)."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(shared_server.channel())
    pixels = server_pixels(photos["coffee"])[None]
    request = service_pb2.ModelInferRequest(model_name=BUILTIN_NAME, id="contents")
    uint8 = request.inputs.add(name="image", datatype="UINT8", shape=pixels.shape)
    uint8.contents.uint_contents.extend(pixels.ravel().tolist())
    response = stub.ModelInfer(request, timeout=60)
    assert response.id == "contents" and response.outputs[0].datatype == "FP32"
    probabilities = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(1, CLASSES)
    assert_same_answer(probabilities, reference["coffee"][None])

    request = service_pb2.ModelInferRequest(model_name=BUILTIN_NAME)
    encoded = request.inputs.add(name="image", datatype="BYTES", shape=[2])
    encoded.contents.bytes_contents.extend([photos["chelsea"], photos["coffee"]])
    response = stub.ModelInfer(request, timeout=60)
    probabilities = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, CLASSES)
    assert_same_answer(probabilities, np.stack([reference["chelsea"], reference["coffee"]]))


def test_classification_extension(client, photos, reference):
    images = np.array([photos["coffee"], photos["chelsea"]], dtype=np.object_)
    result = client.infer(BUILTIN_NAME, [tensor("image", images, "BYTES")],
                          outputs=[tc.InferRequestedOutput("probabilities", class_count=3)])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    response = result.get_response()
    assert response.outputs[0].datatype == "BYTES" and list(response.outputs[0].shape) == [2, 3]
    for row, name in zip(classes, ["coffee", "chelsea"]):
        parsed = [entry.decode().split(":", 2) for entry in row]
        scores = [float(score) for score, _, _ in parsed]
        indices = [int(index) for _, index, _ in parsed]
        assert scores == sorted(scores, reverse=True)
        expected = np.argsort(-reference[name], kind="stable")[:3]
        assert indices[0] == expected[0]
        np.testing.assert_allclose(scores, reference[name][indices], atol=1e-4)
    score, index, label = classes[0][0].decode().split(":", 2)
    assert (int(index), label) == (ESPRESSO, "espresso") and float(score) > 0.8
    assert indices[0] in CAT_CLASSES
    # More classes than the model has: all of them, as Triton does.
    result = client.infer(BUILTIN_NAME, [tensor("image", images[:1], "BYTES")],
                          outputs=[tc.InferRequestedOutput("probabilities", class_count=5000)])
    assert result.as_numpy("probabilities").shape == (1, CLASSES)


# --- errors ----------------------------------------------------------------------------------


def test_wrong_datatype_and_shape_are_invalid_argument(client, photos):
    pixels = server_pixels(photos["coffee"])[None]
    cases = [
        ([tensor("image", pixels.astype(np.int32), "INT32")], "INT32"),
        ([tensor("image", pixels[:, :200, :200], "UINT8")], "shape"),
        ([tensor("image", pixels.transpose(0, 3, 1, 2).copy(), "UINT8")], "[N, H, W, 3]"),
        ([tensor("image", pixels[0], "UINT8")], "[N, H, W, 3]"),
        ([tensor("pixels", pixels, "UINT8")], "unexpected input 'pixels'"),
        ([tensor("image", pixels, "UINT8"), tensor("image", pixels, "UINT8")], "exactly one input"),
        ([tensor("image", np.array([b"not an image"], dtype=np.object_), "BYTES")], "could not be decoded"),
        ([tensor("image", np.array([[photos["coffee"], photos["coffee"]]], dtype=np.object_), "BYTES")],
         "shape [N]"),
    ]
    for inputs, words in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(BUILTIN_NAME, inputs)
        assert status_of(err) == "StatusCode.INVALID_ARGUMENT", err.value.message()
        assert words in err.value.message()


def test_caller_strings_are_quoted_and_cut_in_messages(shared_server):
    """What a caller sends is echoed escaped and cut short. gRPC carries status details as metadata,
    and a client drops a stream whose metadata passes 16 KiB with an error that names nothing."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(shared_server.channel())
    pixels = np.zeros((1, 224, 224, 3), np.uint8).tobytes()

    def refusal(name: str, datatype: str, shape: list[int], output: str = "") -> str:
        request = service_pb2.ModelInferRequest(model_name=BUILTIN_NAME)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(pixels)
        if output:
            request.outputs.add(name=output)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        return err.value.details()

    message = refusal("image", "\x00\x1b[31m" + "X" * 5000, [1, 224, 224, 3])
    assert "'\\x00\\x1b[31m" in message and "\x00" not in message and "\x1b" not in message
    assert "(5006 characters)" in message and len(message) < 400
    message = refusal("N" * 20000, "UINT8", [1, 224, 224, 3])
    assert "unexpected input" in message and "(20000 characters)" in message and len(message) < 400
    message = refusal("image", "UINT8", [1, 224, 224, 3], output="P" * 20000)
    assert "unknown requested output" in message and "(20000 characters)" in message
    message = refusal("image", "UINT8", [1] * 30000)  # a message that would pass the limit is cut
    assert "must have shape [N, H, W, 3]" in message and "message cut from" in message
    assert len(message) < 2100


def test_byte_size_mismatch_and_unknown_output_are_invalid_argument(client, photos):
    pixels = server_pixels(photos["coffee"])[None]
    short = tensor("image", pixels, "UINT8").set_shape([2, SIZE, SIZE, 3])  # data for 1, shape says 2
    with pytest.raises(InferenceServerException) as err:
        client.infer(BUILTIN_NAME, [short])
    assert status_of(err) == "StatusCode.INVALID_ARGUMENT" and "needs 301056 bytes" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer(BUILTIN_NAME, [tensor("image", pixels, "UINT8")], outputs=[tc.InferRequestedOutput("logits")])
    assert status_of(err) == "StatusCode.INVALID_ARGUMENT" and "logits" in err.value.message()


def test_request_parameters_of_the_wrong_kind_are_invalid_argument(shared_server):
    """Triton's int64 `timeout` and `classification` parameters: a string, a bool, a double or a
    negative count is refused (a string timeout used to be ignored, so the call ran without it)."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(shared_server.channel())

    def infer(where: str, name: str, kind: str, value) -> tuple[grpc.StatusCode, str]:
        request = service_pb2.ModelInferRequest(model_name=BUILTIN_NAME)
        request.inputs.add(name="image", datatype="UINT8", shape=[1, SIZE, SIZE, 3])
        request.raw_input_contents.append(np.zeros((1, SIZE, SIZE, 3), np.uint8).tobytes())
        parameters = request.parameters if where == "request" else request.outputs.add(name="probabilities").parameters
        setattr(parameters[name], kind, value)
        try:
            stub.ModelInfer(request, timeout=60)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details()

    refused = [("request", "timeout", "string_param", "5000"), ("request", "timeout", "int64_param", -1),
               ("request", "timeout", "bool_param", True), ("request", "timeout", "double_param", 1e6),
               ("output", "classification", "string_param", "5"), ("output", "classification", "int64_param", 0),
               ("output", "classification", "double_param", 3.0)]
    for case in refused:
        code, details = infer(*case)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"the {case[1]} parameter must be" in details, (case, details)
    for case in [("request", "timeout", "int64_param", 0), ("request", "timeout", "uint64_param", 60_000_000),
                 ("output", "classification", "uint64_param", 3)]:
        assert infer(*case) == (grpc.StatusCode.OK, ""), case
    # a timeout the call cannot meet ends it, as the gRPC deadline would
    assert infer("request", "timeout", "int64_param", 1)[0] == grpc.StatusCode.DEADLINE_EXCEEDED


def test_request_id_is_echoed_up_to_its_bound(shared_server, photos):
    """The response echoes the request id. An id near --max-message-bytes made a finished answer
    fail at send with grpc's own message; a long id is now refused before any work, naming the bound."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(shared_server.channel())
    png = photos["coffee"]

    def infer(request_id: str) -> service_pb2.ModelInferResponse:
        request = service_pb2.ModelInferRequest(model_name=BUILTIN_NAME, id=request_id)
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(len(png).to_bytes(4, "little") + png)
        return stub.ModelInfer(request, timeout=60)

    assert infer("é" * MAX_REQUEST_ID_LENGTH).id == "é" * MAX_REQUEST_ID_LENGTH
    for length in (MAX_REQUEST_ID_LENGTH + 1, 16 * 1024 * 1024 - len(png) - 1000):
        with pytest.raises(grpc.RpcError) as err:
            infer("i" * length)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert f"the request id has {length} characters; at most {MAX_REQUEST_ID_LENGTH}" in err.value.details()


def test_unknown_model_and_version_are_not_found(client, photos):
    pixels = server_pixels(photos["coffee"])[None]
    with pytest.raises(InferenceServerException) as err:
        client.infer("no-such-model", [tensor("image", pixels, "UINT8")])
    assert status_of(err) == "StatusCode.NOT_FOUND" and "no-such-model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer(BUILTIN_NAME, [tensor("image", pixels, "UINT8")], model_version="99")
    assert status_of(err) == "StatusCode.NOT_FOUND" and "99" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("../etc", [tensor("image", pixels, "UINT8")])
    assert status_of(err) == "StatusCode.NOT_FOUND"


# --- model repository ------------------------------------------------------------------------


def test_repository_unload_then_load(server_factory, registry_copy, photos):
    server = server_factory(registry_copy)
    client = tc.InferenceServerClient(url=server.target)
    try:
        assert client.is_model_ready(BUILTIN_NAME)
        client.unload_model(BUILTIN_NAME)
        assert not client.is_model_ready(BUILTIN_NAME)
        (entry,) = [m for m in client.get_model_repository_index().models if m.name == BUILTIN_NAME]
        assert entry.state == "UNAVAILABLE"
        client.unload_model(BUILTIN_NAME)  # already unloaded: still fine, as in Triton
        with pytest.raises(InferenceServerException) as err:
            client.unload_model("no-such-model")
        assert status_of(err) == "StatusCode.NOT_FOUND"

        client.load_model(BUILTIN_NAME)
        assert client.is_model_ready(BUILTIN_NAME)
        (entry,) = [m for m in client.get_model_repository_index().models if m.name == BUILTIN_NAME]
        assert entry.state == "READY"
        pixels = server_pixels(photos["coffee"])[None]
        result = client.infer(BUILTIN_NAME, [tensor("image", pixels, "UINT8")])
        assert result.as_numpy("probabilities")[0].argmax() == ESPRESSO
        with pytest.raises(InferenceServerException) as err:
            client.load_model("no-such-model")
        assert status_of(err) == "StatusCode.NOT_FOUND"
    finally:
        client.close()
