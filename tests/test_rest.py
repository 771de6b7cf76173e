"""The Open Inference Protocol over REST (--http-port): real clients against a real server.

tritonclient.http (binary data, its default, and JSON), curl with JSON, Triton's perf_analyzer
-i http, the same model and answers as over gRPC, errors as {"error": ...} with the HTTP status of
the gRPC one, and the same TLS, tokens, audit and metrics. Hostile bodies are in test_hostile_rest.py.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc_grpc
import tritonclient.http as tc_http
from tritonclient.utils import InferenceServerException

from conftest import BUILTIN_NAME, start_server
from headswap.inference.images import Preprocessing, load_pixels
from test_security import TOKENS, pki, served_certificate, wait_secure_ready  # noqa: F401 (pki: a fixture)
from test_triton_tools import run_perf_analyzer

SIZE = 224
EGYPTIAN_CAT, ESPRESSO = 285, 967


def http_json(server, path: str, body: bytes | None = None, headers: dict | None = None,
              scheme: str = "http", context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{server.http_port}{path}", data=body,
                                     headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def pixels(exported_registry, photos) -> np.ndarray:
    """The chelsea photo as UINT8 [1, 224, 224, 3], cropped and resized as the server would."""
    manifest = json.loads((exported_registry / BUILTIN_NAME / "1" / "manifest.json").read_text())
    preprocessing = Preprocessing.from_manifest(manifest)
    return load_pixels(photos["chelsea"], preprocessing.height, preprocessing.width, 40_000_000)[None]


@pytest.fixture
def http_client(shared_server):
    client = tc_http.InferenceServerClient(url=shared_server.http_target)
    yield client
    client.close()


def grpc_probabilities(shared_server, pixels: np.ndarray) -> np.ndarray:
    client = tc_grpc.InferenceServerClient(url=shared_server.target)
    tensor = tc_grpc.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    try:
        return client.infer(BUILTIN_NAME, [tensor]).as_numpy("probabilities")
    finally:
        client.close()


def test_started_server_reports_its_rest_port(shared_server):
    assert shared_server.http_port and shared_server.http_port != shared_server.port
    assert re.search(r"REST on \d+", shared_server.log())


@pytest.mark.parametrize("binary", [True, False], ids=["binary-data", "json"])
def test_tritonclient_http_classifies_like_grpc(http_client, shared_server, pixels, binary):
    """tritonclient.http unchanged, with Triton's binary-data extension (its default) and with JSON
    tensors both ways: the same probabilities as gRPC for the same pixels."""
    tensor = tc_http.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    output = tc_http.InferRequestedOutput("probabilities", binary_data=binary)
    result = http_client.infer(BUILTIN_NAME, [tensor], outputs=[output], request_id="r-1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 1000) and int(probabilities[0].argmax()) == EGYPTIAN_CAT
    np.testing.assert_allclose(probabilities, grpc_probabilities(shared_server, pixels), atol=1e-5)
    response = result.get_response()
    assert response["model_name"] == BUILTIN_NAME and response["model_version"] == "1" and response["id"] == "r-1"
    top = http_client.infer(BUILTIN_NAME, [tensor], outputs=[
        tc_http.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]).as_numpy("probabilities")
    best = top[0][0].decode() if isinstance(top[0][0], bytes) else top[0][0]  # JSON BYTES come back as text
    assert top.shape == (1, 3) and best.split(":")[1:] == [str(EGYPTIAN_CAT), "Egyptian cat"]


def test_tritonclient_http_sends_encoded_images_as_bytes(http_client, photos):
    """BYTES [N] tensors of encoded images, exactly as over gRPC: two photos in one request."""
    images = np.array([photos["chelsea"], photos["coffee"]], dtype=np.object_)
    tensor = tc_http.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(images)
    probabilities = http_client.infer(BUILTIN_NAME, [tensor]).as_numpy("probabilities")
    assert [int(row.argmax()) for row in probabilities] == [EGYPTIAN_CAT, ESPRESSO]


def test_curl_classifies_a_jpeg_with_json(shared_server, photos, tmp_path):
    """The README's call: curl, a JSON body, the JPEG in base64, the top 3 classes back as JSON."""
    jpeg = tmp_path / "coffee.jpg"
    jpeg.write_bytes(photos["coffee"])
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(jpeg.read_bytes()).decode()]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    (tmp_path / "request.json").write_text(json.dumps(body))
    result = subprocess.run(["curl", "-sS", "--fail-with-body", "-H", "Content-Type: application/json",
                             "--data-binary", f"@{tmp_path / 'request.json'}",
                             f"http://{shared_server.http_target}/v2/models/{BUILTIN_NAME}/infer"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    (output,) = answer["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 3]
    assert output["data"][0].split(":")[1:] == [str(ESPRESSO), "espresso"]
    # nested JSON numbers work too (UINT8 pixels as [1][224][224][3])
    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    status, error = http_json(shared_server, f"/v2/models/{BUILTIN_NAME}/infer", json.dumps(
        {"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "UINT8", "data": pixels.tolist()}]}).encode())
    assert status == 400 and "224" in error["error"], error  # the model wants 224x224: a clear refusal


def test_health_metadata_config_and_statistics(shared_server, http_client):
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert http_client.is_model_ready(BUILTIN_NAME) and http_client.is_model_ready(BUILTIN_NAME, "1")
    assert not http_client.is_model_ready("no-such-model")
    server = http_client.get_server_metadata()
    assert server["name"] == "headswap" and "classification" in server["extensions"]
    metadata = http_client.get_model_metadata(BUILTIN_NAME, "1")
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}]
    config = http_client.get_model_config(BUILTIN_NAME)
    assert config["input"][0]["dims"] == [SIZE, SIZE, 3] and config["max_batch_size"] == 256
    stats = http_client.get_inference_statistics(BUILTIN_NAME)["model_stats"][0]
    assert stats["name"] == BUILTIN_NAME and isinstance(stats["inference_count"], int)
    status, body = http_json(shared_server, "/v2/models/stats")
    assert status == 200 and body["model_stats"]
    # errors: the gRPC status's HTTP counterpart and a message a person can act on
    for path, code, words in [("/v2/models/no-such-model", 404, "no-such-model"),
                              (f"/v2/models/{BUILTIN_NAME}/versions/x1", 400, "positive integer"),
                              (f"/v2/models/{BUILTIN_NAME}/versions/99", 404, "99"),
                              ("/v3/anything", 404, "/v2")]:
        status, body = http_json(shared_server, path)
        assert status == code and words in body["error"], (path, status, body)
    with pytest.raises(InferenceServerException, match="no-such-model"):
        http_client.get_model_metadata("no-such-model")


def test_errors_are_the_same_as_over_grpc(shared_server, http_client):
    """One set of rules: the same bad request gets the same message over both protocols."""
    wrong = np.zeros((1, 100, 100, 3), np.uint8)
    over_http = tc_http.InferInput("image", [1, 100, 100, 4], "UINT8")
    over_http.set_data_from_numpy(np.zeros((1, 100, 100, 4), np.uint8))
    over_grpc = tc_grpc.InferInput("image", [1, 100, 100, 4], "UINT8")
    over_grpc.set_data_from_numpy(np.zeros((1, 100, 100, 4), np.uint8))
    grpc_client = tc_grpc.InferenceServerClient(url=shared_server.target)
    try:
        with pytest.raises(InferenceServerException) as by_grpc:
            grpc_client.infer(BUILTIN_NAME, [over_grpc])
    finally:
        grpc_client.close()
    with pytest.raises(InferenceServerException) as by_http:
        http_client.infer(BUILTIN_NAME, [over_http])
    assert by_grpc.value.message() and by_grpc.value.message() in by_http.value.message()
    assert by_http.value.status() == "400"
    del wrong


def test_metrics_are_labelled_by_protocol(shared_server, http_client, pixels):
    tensor = tc_http.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    http_client.infer(BUILTIN_NAME, [tensor])
    assert http_client.is_server_live()
    grpc_probabilities(shared_server, pixels)
    with urllib.request.urlopen(f"http://127.0.0.1:{shared_server.metrics_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert re.search(r'headswap_requests_total\{code="OK",method="ModelInfer",model="efficientnet-lite0",'
                     r'protocol="http",version="1"\} [1-9]', text), text[:3000]
    assert re.search(r'headswap_requests_total\{code="OK",method="ModelInfer",model="efficientnet-lite0",'
                     r'protocol="grpc",version="1"\} [1-9]', text)
    assert re.search(r'headswap_requests_total\{code="OK",method="ServerLive",model="",protocol="http",version=""\} '
                     r'[1-9]', text)  # the open health endpoints are counted too
    assert "Traceback" not in shared_server.log()


def batch_threads(pid: int) -> list[int]:
    """The server's threads that run under Linux's SCHED_BATCH."""
    threads = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if os.sched_getscheduler(int(task.name)) == os.SCHED_BATCH:
                threads.append(int(task.name))
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return threads


def test_rest_request_threads_yield_to_inference(server_factory, registry_copy, pixels):
    """REST inference requests run in threads under SCHED_BATCH (they wait for a scheduling point
    rather than preempt an inference lane); gRPC's handler threads and every other thread keep the
    default policy. The answers are the same."""
    server = server_factory(registry_copy)
    pid = server.proc.pid
    expected = grpc_probabilities(server, pixels)
    for _ in range(3):
        grpc_probabilities(server, pixels)
    assert batch_threads(pid) == [], "gRPC calls leave every thread at the default policy"

    def infer(_: int) -> np.ndarray:
        client = tc_http.InferenceServerClient(url=server.http_target)
        try:
            tensor = tc_http.InferInput("image", list(pixels.shape), "UINT8")
            tensor.set_data_from_numpy(pixels)
            return client.infer(BUILTIN_NAME, [tensor]).as_numpy("probabilities")
        finally:
            client.close()

    with ThreadPoolExecutor(4) as pool:
        for probabilities in pool.map(infer, range(16)):
            np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    batch = batch_threads(pid)
    total = len(list(Path(f"/proc/{pid}/task").iterdir()))
    assert 1 <= len(batch) < total, (batch, total)
    assert pid not in batch  # the main thread keeps the default policy
    np.testing.assert_allclose(grpc_probabilities(server, pixels), expected, atol=1e-5)
    assert "Traceback" not in server.log()


def test_perf_analyzer_over_http(shared_server, tmp_path):
    """`perf_analyzer -i http`, shortened for CI as the gRPC test is: it reads the model config
    and statistics over REST and sends binary UINT8 data."""
    report = tmp_path / "report.csv"
    returncode, output = run_perf_analyzer("http", shared_server.http_target, report)
    assert returncode == 0, output
    assert "error" not in output.lower() and output.count("Server: ") == 2, output
    with report.open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(row["Concurrency"]) for row in rows) == [1, 4]
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)
    assert "Traceback" not in shared_server.log()


# --- the same trust: TLS with rotation, tokens and scopes, audit lines -----------------------------------


@pytest.fixture(scope="module")
def rest_tls_server(exported_registry, tmp_path_factory, pki):  # noqa: F811
    """TLS + bearer tokens from the same files as the gRPC port, JSON logs (audit lines)."""
    work = tmp_path_factory.mktemp("rest-tls")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    cert, key = work / "server.pem", work / "server.key"  # this module rotates them: its own copies
    shutil.copy(pki.cert_file, cert)
    shutil.copy(pki.key_file, key)
    server = start_server(registry, work, "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                          "--auth-tokens-file", str(pki.tokens_file), "--log-format", "json", "--health-port", "0",
                          "--handshake-timeout-s", "2", wait=False)
    try:
        wait_secure_ready(server)
        server.http_port = int(re.search(r"REST on (\d+)", server.log())[1])
        server.cert_file, server.key_file = cert, key
        yield server
    finally:
        server.stop()


def test_rest_tls_tokens_scopes_and_audit(rest_tls_server, pki, pixels):  # noqa: F811
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    server = rest_tls_server
    url = f"/v2/models/{BUILTIN_NAME}"
    # health is open; everything else needs a credential with the classify scope
    assert http_json(server, "/v2/health/live", scheme="https", context=context) == (200, {"live": True})
    assert http_json(server, "/v2/health/ready", scheme="https", context=context)[0] == 200
    status, body = http_json(server, url, scheme="https", context=context)
    assert status == 401 and "Bearer" in body["error"], body
    status, body = http_json(server, url, headers={"Authorization": "Bearer nope"}, scheme="https", context=context)
    assert status == 401 and "unknown bearer token" in body["error"]
    train_only = next(name for name, (_, scopes) in TOKENS.items() if "classify" not in scopes and "admin" not in scopes)
    status, body = http_json(server, url, headers={"Authorization": f"Bearer {TOKENS[train_only][0]}"},
                             scheme="https", context=context)
    assert status == 403 and "classify" in body["error"], body
    # tritonclient.http over TLS with a token classifies
    client = tc_http.InferenceServerClient(url=f"localhost:{server.http_port}", ssl=True,
                                           ssl_options={"ca_certs": str(pki.ca_file)})
    tensor = tc_http.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    token = TOKENS["web"][0]
    result = client.infer(BUILTIN_NAME, [tensor], headers={"Authorization": f"Bearer {token}"})
    assert int(result.as_numpy("probabilities")[0].argmax()) == EGYPTIAN_CAT
    client.close()
    # refusals leave audit lines, marked as REST
    audits = [json.loads(line) for line in server.log().splitlines() if '"audit ' in line]
    refused = [a for a in audits if a.get("protocol") == "http" and a.get("result") == "UNAUTHENTICATED"]
    assert refused and refused[0]["method"] == "ModelMetadata", audits[-5:]
    assert token not in server.log()


def test_a_silent_tls_client_is_closed_after_the_handshake_timeout(rest_tls_server):
    """A connection that never starts its TLS handshake is closed at --handshake-timeout-s (2 s here)."""
    import socket

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", rest_tls_server.http_port), timeout=30) as sock:
        assert sock.recv(1) == b""  # closed by the server, not by our timeout
    assert 1.5 < time.monotonic() - started < 10
    assert rest_tls_server.proc.poll() is None


def test_rest_certificate_rotation(rest_tls_server, pki):  # noqa: F811
    server = rest_tls_server
    assert served_certificate(server.http_port) == ssl.PEM_cert_to_DER_cert(server.cert_file.read_text())
    cert, key = pki.issue_server_cert()
    for path, data in ((server.key_file, key), (server.cert_file, cert)):
        temporary = path.with_suffix(".new")
        temporary.write_bytes(data)
        temporary.replace(path)
    new = ssl.PEM_cert_to_DER_cert(cert.decode())
    deadline = time.monotonic() + 20
    while served_certificate(server.http_port) != new:
        assert time.monotonic() < deadline, "the REST port never served the replaced certificate"
        time.sleep(0.3)
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    assert http_json(server, "/v2/health/live", scheme="https", context=context)[0] == 200


def test_rest_mutual_tls_names_the_caller_by_its_certificate(exported_registry, tmp_path, pki):  # noqa: F811
    """--tls-client-ca-file: a REST connection needs a client certificate from that CA, and one named
    in the credentials file (client_identity) is a credential with that entry's scopes."""
    registry = tmp_path / "registry"
    shutil.copytree(exported_registry, registry)
    server = start_server(registry, tmp_path / "work", "--tls-cert-file", str(pki.cert_file), "--tls-key-file",
                          str(pki.key_file), "--tls-client-ca-file", str(pki.ca_file), "--auth-tokens-file",
                          str(pki.tokens_file), "--health-port", "0", "--log-format", "json", wait=False)
    try:
        wait_secure_ready(server)
        server.http_port = int(re.search(r"REST on (\d+)", server.log())[1])
        with_cert = ssl.create_default_context(cafile=str(pki.ca_file))
        with_cert.load_cert_chain(pki.client_cert, pki.client_key)
        status, body = http_json(server, f"/v2/models/{BUILTIN_NAME}/ready", scheme="https", context=with_cert)
        assert status == 200 and body["ready"] is True, body
        foreign = ssl.create_default_context(cafile=str(pki.ca_file))
        foreign.load_cert_chain(pki.foreign_cert, pki.foreign_key)
        for context in (foreign, ssl.create_default_context(cafile=str(pki.ca_file))):  # wrong CA, or none
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                http_json(server, "/v2/health/live", scheme="https", context=context)
        assert "Traceback" not in server.log()
    finally:
        assert server.stop() == 0


# --- the kserve package's REST client ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def kserve_python() -> Path:
    """The interpreter of .venv-kserve, made by `python3 dev.py test` (kserve 0.21 pins protobuf 6 and
    grpcio-tools 1.81, so it cannot live in headswap's venv)."""
    python = Path(__file__).resolve().parents[1] / ".venv-kserve" / "bin" / "python"
    assert python.exists(), f"{python} is missing: `python3 dev.py test` installs the kserve package there"
    return python


def test_kserve_rest_client_unchanged(shared_server, kserve_python, pixels, tmp_path):
    """The kserve package's InferenceRESTClient (v2): health, model readiness, infer with JSON and with
    binary data, and an error it reports with the server's message."""
    np.save(tmp_path / "pixels.npy", pixels)
    result = subprocess.run([str(kserve_python), str(Path(__file__).with_name("kserve_rest_client.py")),
                             shared_server.http_target, str(tmp_path / "pixels.npy")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["ready"] and seen["live"] and seen["model_ready"], seen
    for kind in ("json", "binary"):
        assert seen[kind]["shape"] == [1, 1000] and seen[kind]["top"] == EGYPTIAN_CAT, seen
    assert abs(seen["json"]["max"] - seen["binary"]["max"]) < 1e-6
    assert "404" in seen["error"] and "unknown model 'no-such-model'" in seen["error"], seen
