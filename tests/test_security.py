"""Access control end to end: TLS, mutual TLS, scoped bearer tokens, the audit trail (issue 9).

Certificates are made here with `trustme` (a throwaway CA). Two real servers for the module:
one with TLS + bearer tokens (the table of every RPC x every credential, rotation, tritonclient,
audit), one with mutual TLS. Like test_kserve.py, this process never imports
headswap.protocol.kserve_v2_pb2: tritonclient declares the same `inference.*` messages.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.grpc import service_pb2 as triton_pb

from conftest import BUILTIN_NAME, REPO, ServerProcess, run_cli, start_server
from headswap.api.auth import METHOD_SCOPES, OPEN, scope_for
from headswap.api.tls import CertificateFiles
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.security.credentials import (ADMIN, CLASSIFY, TRAIN, CredentialStore, Principal, parse_credentials,
                                           token_sha256)

TOKENS = {"web": ("classify-token-7f3a", [CLASSIFY]), "pipeline": ("train-token-91c2", [TRAIN]),
          "other-team": ("train-token-other-55d0", [TRAIN]), "ops": ("admin-token-c0de", [ADMIN])}
SCOPE_OF = {"web": CLASSIFY, "pipeline": TRAIN, "ops": ADMIN}
AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
CLIENT_IDENTITY = "scorer.clients.example"


# --- certificates and credentials -------------------------------------------------------------------------


@dataclass
class Pki:
    directory: Path
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert: Path
    client_key: Path
    foreign_cert: Path  # a client certificate from another CA, same name
    foreign_key: Path
    tokens_file: Path

    def issue_server_cert(self) -> tuple[bytes, bytes]:
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        return cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes()


def _write_credentials(path: Path, entries: list[dict]) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text(json.dumps(entries))
    os.replace(temporary, path)  # what a Secret update looks like to a reader: one atomic change


def token_entries() -> list[dict]:
    return [{"name": name, "token_sha256": token_sha256(token), "scopes": scopes}
            for name, (token, scopes) in TOKENS.items()]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, foreign_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert(CLIENT_IDENTITY)
    foreign = foreign_ca.issue_cert(CLIENT_IDENTITY)
    files = {"ca.pem": ca.cert_pem.bytes(), "server.pem": server.cert_chain_pems[0].bytes(),
             "server.key": server.private_key_pem.bytes(), "client.pem": client.cert_chain_pems[0].bytes(),
             "client.key": client.private_key_pem.bytes(), "foreign.pem": foreign.cert_chain_pems[0].bytes(),
             "foreign.key": foreign.private_key_pem.bytes()}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    tokens = directory / "tokens.json"
    _write_credentials(tokens, token_entries() + [
        {"name": "scorer", "client_identity": CLIENT_IDENTITY, "scopes": [CLASSIFY]}])
    d = directory
    return Pki(d, ca, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "foreign.pem", d / "foreign.key", tokens)


def wait_secure_ready(server: ServerProcess, timeout: float = 300) -> int:
    """Wait on the plaintext health port (the TLS port needs a secure channel); returns that port."""
    deadline = time.monotonic() + timeout
    health_port = 0
    while not (server.port and health_port):
        log = server.log()
        if match := re.search(r"gRPC listening on port (\d+), metrics on (\d+|off)", log):
            server.port = int(match[1])
            server.metrics_port = int(match[2]) if match[2].isdigit() else 0
        if match := re.search(r"health port (\d+)", log):
            health_port = int(match[1])
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"server did not start:\n{log}")
        time.sleep(0.1)
    channel = grpc.insecure_channel(f"127.0.0.1:{health_port}")
    server.channels.append(channel)
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return health_port
        except grpc.RpcError:
            pass
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"server never became SERVING:\n{server.log()}")
        time.sleep(0.2)


def secure_channel(server: ServerProcess, pki: Pki, cert: Path | None = None, key: Path | None = None,
                   ca: Path | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca_file).read_bytes(), private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None)
    channel = grpc.secure_channel(server.target, credentials,
                                  options=[("grpc.ssl_target_name_override", "localhost")])
    server.channels.append(channel)
    return channel


@pytest.fixture(scope="module")
def tls_server(exported_registry, tmp_path_factory, pki) -> Iterator[ServerProcess]:
    """TLS + bearer tokens, JSON logs (the audit lines are parsed), TLS metrics, a health port."""
    work = tmp_path_factory.mktemp("tls-server")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    server = start_server(registry, work, "--tls-cert-file", str(pki.cert_file), "--tls-key-file", str(pki.key_file),
                          "--auth-tokens-file", str(pki.tokens_file), "--log-format", "json", "--health-port", "0",
                          "--metrics-tls-cert-file", str(pki.cert_file), "--metrics-tls-key-file",
                          str(pki.key_file), wait=False)
    try:
        server.health_port = wait_secure_ready(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mtls_server(exported_registry, tmp_path_factory, pki) -> Iterator[ServerProcess]:
    """Mutual TLS (client certificates from the test CA) + the same credentials file; no reflection."""
    work = tmp_path_factory.mktemp("mtls-server")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    server = start_server(registry, work, "--tls-cert-file", str(pki.cert_file),
                          "--tls-key-file", str(pki.key_file), "--tls-client-ca-file", str(pki.ca_file),
                          "--auth-tokens-file", str(pki.tokens_file), "--health-port", "0", "--no-reflection",
                          "--metrics-port", "-1", wait=False)
    try:
        wait_secure_ready(server)
        yield server
    finally:
        server.stop()


# --- every RPC of every service ---------------------------------------------------------------------------


def _kserve_methods() -> list[str]:
    """The KServe methods headswap serves, from its .proto (its generated module must stay out of here)."""
    text = (REPO / "protos/headswap/protocol/kserve_v2.proto").read_text()
    return re.findall(r"^\s*rpc (\w+)\(", text, flags=re.MULTILINE)


@dataclass(frozen=True)
class Rpc:
    method: str  # /package.Service/Method
    request: Any
    request_streaming: bool
    response_streaming: bool

    def __str__(self) -> str:
        return self.method.rsplit(".", 1)[-1]


def _rpcs(service, methods: list[str] | None = None) -> list[Rpc]:
    from google.protobuf.message_factory import GetMessageClass

    found = []
    for m in service.methods:
        if methods is None or m.name in methods:
            found.append(Rpc(f"/{service.full_name}/{m.name}", GetMessageClass(m.input_type)(),
                             m.client_streaming, m.server_streaming))
    return found


ALL_RPCS = [rpc for name in ("Inference", "Models", "Training") for rpc in _rpcs(pb.DESCRIPTOR.services_by_name[name])]
ALL_RPCS += _rpcs(triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], _kserve_methods())
ALL_RPCS += _rpcs(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
ALL_RPCS += _rpcs(health_pb2.DESCRIPTOR.services_by_name["Health"], ["Check", "List"])


def invoke(channel: grpc.Channel, rpc: Rpc, metadata: tuple = ()) -> grpc.StatusCode:
    """Call with an empty request (the call may fail for reasons of its own); returns the status code."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        (rpc.request_streaming, rpc.response_streaming)]
    call = kind(rpc.method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b)
    request = iter([rpc.request]) if rpc.request_streaming else rpc.request
    if "Training/FineTune" in rpc.method:
        request = iter([])  # an empty upload: INVALID_ARGUMENT once past authentication
    try:
        response = call(request, metadata=metadata, timeout=30)
        if rpc.response_streaming:
            next(iter(response), None)
            response.cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def bearer(name: str) -> tuple:
    return (("authorization", f"Bearer {TOKENS[name][0]}"),)


def test_scope_table_covers_every_rpc_and_denies_unknown_methods():
    served = {rpc.method for rpc in ALL_RPCS} | {"/grpc.health.v1.Health/Watch"}
    assert served - set(METHOD_SCOPES) == set(), "an RPC without an entry in METHOD_SCOPES"
    assert scope_for("/headswap.v1.Models/DeleteEverything") == ADMIN
    assert {m for m, s in METHOD_SCOPES.items() if s == OPEN} == {
        "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List"}


CREDENTIALS = {"no credential": (), "bad token": (("authorization", "Bearer not-a-known-token"),),
               "not bearer": (("authorization", f"Basic {TOKENS['ops'][0]}"),),
               "classify": bearer("web"), "train": bearer("pipeline"), "admin": bearer("ops")}


def expected(rpc: Rpc, credential: str) -> grpc.StatusCode | None:
    """The exact code for a refused cell; None where the call passes access control."""
    scope = METHOD_SCOPES[rpc.method]
    if scope == OPEN:
        return None
    if credential in ("no credential", "bad token", "not bearer"):
        return grpc.StatusCode.UNAUTHENTICATED
    held = {"classify": {CLASSIFY}, "train": {TRAIN}, "admin": {CLASSIFY, TRAIN, ADMIN}}[credential]
    return None if scope in held else grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("credential", list(CREDENTIALS))
def test_every_rpc_with_every_credential(tls_server, pki, credential):
    channel = secure_channel(tls_server, pki)
    failures = []
    for rpc in ALL_RPCS:
        code = invoke(channel, rpc, CREDENTIALS[credential])
        want = expected(rpc, credential)
        if (want is None and code in AUTH_CODES) or (want is not None and code != want):
            failures.append(f"{rpc}: {code.name}, expected {want.name if want else 'past access control'}")
    assert not failures, f"{credential}:\n" + "\n".join(failures)


def test_refusals_say_what_is_missing(tls_server, pki):
    channel = secure_channel(tls_server, pki)
    activate = channel.unary_unary("/headswap.v1.Models/ActivateModel",
                                        request_serializer=lambda m: m.SerializeToString())
    with pytest.raises(grpc.RpcError) as err:
        activate(pb.ActivateModelRequest(name=BUILTIN_NAME, version=1), metadata=bearer("web"), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'admin' scope" in err.value.details() and "'web'" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        activate(pb.ActivateModelRequest(name=BUILTIN_NAME, version=1), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in err.value.details()


@pytest.mark.parametrize("client", ["no client certificate", "certificate from another CA", "mapped certificate",
                                    "mapped certificate + admin token"])
def test_mutual_tls_every_rpc(mtls_server, pki, client):
    cert, key = {"no client certificate": (None, None),
                 "certificate from another CA": (pki.foreign_cert, pki.foreign_key),
                 "mapped certificate": (pki.client_cert, pki.client_key),
                 "mapped certificate + admin token": (pki.client_cert, pki.client_key)}[client]
    channel = secure_channel(mtls_server, pki, cert, key)
    metadata = bearer("ops") if "admin" in client else ()
    failures = []
    for rpc in ALL_RPCS:
        code = invoke(channel, rpc, metadata)
        if cert is None or cert == pki.foreign_cert:
            want = grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails
        elif "admin" in client or METHOD_SCOPES[rpc.method] in (OPEN, CLASSIFY):
            want = None  # the certificate maps to "scorer" with scope classify; the token adds admin
        else:
            want = grpc.StatusCode.PERMISSION_DENIED
        refused = code in AUTH_CODES + (grpc.StatusCode.UNAVAILABLE,)
        if (want is None and refused) or (want is not None and code != want):
            failures.append(f"{rpc}: {code.name}, expected {want.name if want else 'past access control'}")
    assert not failures, f"{client}:\n" + "\n".join(failures)


def test_mutual_tls_caller_is_named_after_the_certificate_and_reflection_is_off(mtls_server, pki):
    channel = secure_channel(mtls_server, pki, pki.client_cert, pki.client_key)
    activate = channel.unary_unary("/headswap.v1.Models/ActivateModel",
                                   request_serializer=lambda m: m.SerializeToString())
    with pytest.raises(grpc.RpcError) as err:
        activate(pb.ActivateModelRequest(name=BUILTIN_NAME, version=1), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'scorer'" in err.value.details()
    reflection = [r for r in ALL_RPCS if "ServerReflection" in r.method][0]
    assert invoke(channel, reflection, bearer("ops")) == grpc.StatusCode.UNIMPLEMENTED


# --- transport ----------------------------------------------------------------------------------------------


def test_plaintext_client_cannot_talk_to_the_tls_port(tls_server):
    channel = grpc.insecure_channel(tls_server.target)
    tls_server.channels.append(channel)
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_list_is_not_served_to_anyone(tls_server, pki):
    """Health is open to all: listing every model name there would bypass the credentials."""
    health_list = [r for r in ALL_RPCS if r.method.endswith("Health/List")][0]
    assert invoke(secure_channel(tls_server, pki), health_list, bearer("ops")) == grpc.StatusCode.UNIMPLEMENTED


def test_health_port_is_plaintext_and_serves_health_only(tls_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}")
    tls_server.channels.append(channel)
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    for rpc in ALL_RPCS:
        if "Health" not in rpc.method:
            assert invoke(channel, rpc, bearer("ops")) == grpc.StatusCode.UNIMPLEMENTED, rpc


def test_local_health_check_uses_the_health_port_when_tls_is_on(tls_server, pki):
    """The Dockerfile's HEALTHCHECK, `headswap health --local`, reads the container's settings."""
    env = {"HEADSWAP_TLS_CERT_FILE": str(pki.cert_file), "HEADSWAP_TLS_KEY_FILE": str(pki.key_file),
           "HEADSWAP_PORT": tls_server.target.rsplit(":", 1)[1]}
    result = run_cli("health", "--local", env={**env, "HEADSWAP_HEALTH_PORT": str(tls_server.health_port)})
    assert result.stdout.strip() == "SERVING"
    # TLS on and no health port: a plaintext check cannot work, and the message says what to set
    refused = run_cli("health", "--local", env=env, check=False)
    assert refused.returncode != 0 and "HEADSWAP_HEALTH_PORT" in refused.stderr, refused.stderr


def test_metrics_port_serves_https_only(tls_server, pki):
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    with urllib.request.urlopen(f"https://localhost:{tls_server.metrics_port}/metrics", context=context,
                                timeout=10) as response:
        assert b"headswap_requests_total" in response.read()
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.metrics_port}/metrics", timeout=10).read()


def test_a_silent_tls_client_does_not_stop_the_metrics_port(tls_server, pki):
    """prometheus_client's server does the TLS handshake in its accepting thread: one silent client
    stopped every scrape. Now each connection's thread does its own, within --metrics-timeout-s."""
    silent = [socket.create_connection(("127.0.0.1", tls_server.metrics_port)) for _ in range(2)]
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    started = time.monotonic()
    with urllib.request.urlopen(f"https://localhost:{tls_server.metrics_port}/metrics", context=context,
                                timeout=5) as response:
        assert b"headswap_requests_total" in response.read()
    assert time.monotonic() - started < 5
    for sock in silent:
        sock.close()


def served_certificate(port: int) -> bytes:
    """The certificate a new TLS connection to the port is given (DER)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def test_rotated_certificate_is_served_to_new_connections_without_restart(tls_server, pki):
    classify = lambda channel: channel.unary_unary(  # noqa: E731
        "/headswap.v1.Models/ListModels", request_serializer=lambda m: m.SerializeToString())(
        pb.ListModelsRequest(), metadata=bearer("web"), timeout=30)
    before = secure_channel(tls_server, pki)
    classify(before)
    old = served_certificate(tls_server.port)
    assert old == ssl.PEM_cert_to_DER_cert(pki.cert_file.read_text())
    cert, key = pki.issue_server_cert()
    for path, data in ((pki.key_file, key), (pki.cert_file, cert)):  # a new key, then its certificate
        temporary = path.with_suffix(".new")
        temporary.write_bytes(data)
        os.replace(temporary, path)
    new = ssl.PEM_cert_to_DER_cert(cert.decode())
    deadline = time.monotonic() + 20
    while served_certificate(tls_server.port) != new:
        assert time.monotonic() < deadline, "the replaced certificate was never served"
        time.sleep(0.3)
    classify(before)  # the connection opened before the rotation still works
    classify(secure_channel(tls_server, pki))  # and a new one verifies against the same CA
    # The metrics port (the same files here) follows the rotation too.
    while served_certificate(tls_server.metrics_port) != new:
        assert time.monotonic() < deadline, "the metrics port never served the replaced certificate"
        time.sleep(0.3)
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    with urllib.request.urlopen(f"https://localhost:{tls_server.metrics_port}/metrics", context=context,
                                timeout=10) as response:
        assert b"headswap_requests_total" in response.read()
    assert tls_server.proc.poll() is None


# --- clients -----------------------------------------------------------------------------------------------


def test_cli_connects_with_tls_token_and_client_certificate(tls_server, mtls_server, pki, photos, tmp_path):
    from conftest import run_cli

    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(photos["coffee"])
    tls = ["--target", f"localhost:{tls_server.port}", "--tls-ca-file", str(pki.ca_file)]
    result = run_cli("classify", *tls, "--json", str(photo), env={"HEADSWAP_TOKEN": TOKENS["web"][0]})
    assert json.loads(result.stdout)["predictions"][0]["label"] == "espresso"
    refused = run_cli("classify", *tls, str(photo), check=False)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
    refused = run_cli("activate", *tls, "--token", TOKENS["web"][0], BUILTIN_NAME, "1", check=False)
    assert refused.returncode != 0 and "PERMISSION_DENIED" in refused.stderr and "'admin'" in refused.stderr
    assert run_cli("jobs", *tls, "--token", TOKENS["ops"][0]).returncode == 0
    assert run_cli("health", *tls).stdout.strip() == "SERVING"  # health needs no token
    plaintext = run_cli("health", "--target", tls_server.target, "--timeout", "5", check=False)
    assert plaintext.returncode != 0 and "UNAVAILABLE" in plaintext.stderr

    mtls = ["--target", mtls_server.target, "--tls-server-name", "localhost", "--tls-ca-file", str(pki.ca_file)]
    assert "efficientnet-lite0" in run_cli("models", *mtls, "--tls-cert-file", str(pki.client_cert),
                                           "--tls-key-file", str(pki.client_key)).stdout
    half = run_cli("models", *mtls, "--tls-cert-file", str(pki.client_cert), check=False)
    assert half.returncode != 0 and "--tls-key-file" in half.stderr


# --- tritonclient ------------------------------------------------------------------------------------------


def test_tritonclient_with_ssl_and_a_token_classifies_a_photo(tls_server, pki, photos):
    import io

    import tritonclient.grpc as tc
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url=f"localhost:{tls_server.port}", ssl=True,
                                      root_certificates=str(pki.ca_file))
    try:
        image = np.asarray(Image.open(io.BytesIO(photos["coffee"])).convert("RGB").resize((224, 224)), np.uint8)
        infer_input = tc.InferInput("image", [1, 224, 224, 3], "UINT8")
        infer_input.set_data_from_numpy(image[None])
        result = client.infer(BUILTIN_NAME, [infer_input], outputs=[tc.InferRequestedOutput("probabilities")],
                              headers={"authorization": f"Bearer {TOKENS['web'][0]}"})
        probabilities = result.as_numpy("probabilities")
        assert int(np.argmax(probabilities)) == 967  # espresso
        with pytest.raises(InferenceServerException) as err:
            client.infer(BUILTIN_NAME, [infer_input])
        assert "UNAUTHENTICATED" in err.value.status()
    finally:
        client.close()


# --- audit trail, job ownership -----------------------------------------------------------------------------


def audit_lines(server: ServerProcess) -> list[dict]:
    lines = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("name") == "headswap.audit":
                lines.append(record)
    return lines


def _digits(count_per_class: int = 6) -> list[tuple[bytes, str]]:
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    examples = []
    for label in (0, 1):
        for image in data.images[data.target == label][:count_per_class]:
            buffer = io.BytesIO()
            Image.fromarray((255 - image / 16 * 255).astype(np.uint8)).resize((64, 64)).convert("RGB").save(
                buffer, "PNG")
            examples.append((buffer.getvalue(), str(label)))
    return examples


def test_audit_trail_and_job_ownership(tls_server, pki):
    from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

    channel = secure_channel(tls_server, pki)
    training, models = pb_grpc.TrainingStub(channel), pb_grpc.ModelsStub(channel)
    examples = _digits()
    requests = [pb.FineTuneRequest(config=pb.FineTuneConfig(name="audited", epochs=1000, activate=False)),
                pb.FineTuneRequest(batch=pb.ExampleBatch(examples=[pb.Example(image=i, label=l) for i, l in examples]))]
    job = training.FineTune(iter(requests), metadata=bearer("pipeline"), timeout=120).job_id

    # A train caller sees its own jobs only; admin sees every job and who submitted it.
    assert [j.job_id for j in training.ListJobs(pb.ListJobsRequest(), metadata=bearer("pipeline"), timeout=30).jobs] \
        == [job]
    assert training.ListJobs(pb.ListJobsRequest(), metadata=bearer("other-team"), timeout=30).jobs == []
    for call, request in ((training.GetJob, pb.GetJobRequest(job_id=job)),
                          (training.CancelJob, pb.CancelJobRequest(job_id=job))):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=bearer("other-team"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(training.WatchJob(pb.WatchJobRequest(job_id=job), metadata=bearer("other-team"), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = {j.job_id: j for j in training.ListJobs(pb.ListJobsRequest(), metadata=bearer("ops"), timeout=30).jobs}
    assert listed[job].submitter == "pipeline"
    assert training.CancelJob(pb.CancelJobRequest(job_id=job), metadata=bearer("pipeline"), timeout=60).state == 5

    models.ActivateModel(pb.ActivateModelRequest(name=BUILTIN_NAME, version=1), metadata=bearer("ops"), timeout=60)
    try:  # one version only: nothing to roll back to, and the attempt is audited all the same
        models.RollbackModel(pb.RollbackModelRequest(name=BUILTIN_NAME), metadata=bearer("ops"), timeout=60)
        rollback = "OK"
    except grpc.RpcError as err:
        rollback = err.code().name
    with pytest.raises(grpc.RpcError):
        models.ActivateModel(pb.ActivateModelRequest(name=BUILTIN_NAME, version=1), metadata=bearer("web"), timeout=60)
    unload = channel.unary_unary("/inference.GRPCInferenceService/RepositoryModelUnload",
                                 request_serializer=lambda m: m.SerializeToString())
    try:
        unload(triton_pb.RepositoryModelUnloadRequest(model_name=BUILTIN_NAME), metadata=bearer("ops"), timeout=120)
        unloaded = "OK"
    except grpc.RpcError as err:
        unloaded = err.code().name
    load = channel.unary_unary("/inference.GRPCInferenceService/RepositoryModelLoad",
                               request_serializer=lambda m: m.SerializeToString())
    load(triton_pb.RepositoryModelLoadRequest(model_name=BUILTIN_NAME), metadata=bearer("ops"), timeout=120)

    with pytest.raises(grpc.RpcError):
        channel.unary_unary("/headswap.v1.Inference/Classify", request_serializer=lambda m: m.SerializeToString())(
            pb.ClassifyRequest(), timeout=30)
    time.sleep(0.5)
    lines = audit_lines(tls_server)
    def find(method: str, who: str, result: str) -> dict:  # noqa: E306
        found = [r for r in lines if r["method"] == method and r["who"] == who and r["result"] == result]
        assert found, f"no audit line for {method} by {who} -> {result}: {lines[-10:]}"
        return found[-1]

    assert find("FineTune", "pipeline", "OK")["job_id"] == job
    assert find("FineTune", "pipeline", "OK")["model"] == "audited"
    assert find("CancelJob", "pipeline", "OK")["job_id"] == job
    assert find("CancelJob", "other-team", "NOT_FOUND")["job_id"] == job
    activated = find("ActivateModel", "ops", "OK")
    assert (activated["model"], activated["version"]) == (BUILTIN_NAME, 1)
    assert find("RollbackModel", "ops", rollback)["model"] == BUILTIN_NAME
    assert "'admin' scope" in find("ActivateModel", "web", "PERMISSION_DENIED")["reason"]
    assert find("RepositoryModelUnload", "ops", unloaded)["model"] == BUILTIN_NAME
    assert find("RepositoryModelLoad", "ops", "OK")["model"] == BUILTIN_NAME
    assert find("Classify", "unauthenticated", "UNAUTHENTICATED")  # refusals are audited too
    log = tls_server.log()
    for token, _ in TOKENS.values():
        assert token not in log and token_sha256(token) not in log, "a token reached the log"
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 1500):log.find("Traceback") + 3000]


def test_audit_lines_quote_and_cut_the_names_callers_send(tls_server, pki):
    """A name with a newline must not forge an audit line of its own, nor a megabyte one fill the log."""
    from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

    models = pb_grpc.ModelsStub(secure_channel(tls_server, pki))
    forged = "x\naudit who=ops via=token method=ActivateModel result=OK model=prod" + "y" * 5000
    with pytest.raises(grpc.RpcError) as err:
        models.ActivateModel(pb.ActivateModelRequest(name=forged, version=1), metadata=bearer("ops"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.5)
    line = [r for r in audit_lines(tls_server) if r["method"] == "ActivateModel" and r["result"] == "INVALID_ARGUMENT"][-1]
    assert "\n" not in line["message"] and len(line["message"]) < 400, line["message"]
    assert line["model"].startswith("'x\\naudit who=ops") and line["model"].endswith(f"({len(forged)} characters)")


# --- credentials file ---------------------------------------------------------------------------------------


def test_tokens_file_changes_are_picked_up(tls_server, pki):
    channel = secure_channel(tls_server, pki)
    list_models = channel.unary_unary("/headswap.v1.Models/ListModels",
                                      request_serializer=lambda m: m.SerializeToString())

    def code(token: str) -> grpc.StatusCode:
        try:
            list_models(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()

    def eventually(token: str, want: grpc.StatusCode) -> None:
        deadline = time.monotonic() + 15
        while code(token) != want:
            assert time.monotonic() < deadline, f"credentials change not picked up: still not {want.name}"
            time.sleep(0.2)

    original = pki.tokens_file.read_text()
    entries = json.loads(original)
    try:
        _write_credentials(pki.tokens_file, entries + [
            {"name": "new-client", "token_sha256": token_sha256("fresh-token-1"), "scopes": [CLASSIFY]}])
        eventually("fresh-token-1", grpc.StatusCode.OK)
        # Revoke web's token; an invalid file afterwards keeps the last good credentials in force.
        _write_credentials(pki.tokens_file, [e for e in entries if e["name"] != "web"])
        eventually(TOKENS["web"][0], grpc.StatusCode.UNAUTHENTICATED)
        pki.tokens_file.write_text("[{not json")
        time.sleep(2.5)
        assert code(TOKENS["ops"][0]) == grpc.StatusCode.OK
        assert "credentials file changed but was not loaded" in tls_server.log()
    finally:
        _write_credentials(pki.tokens_file, json.loads(original))
        eventually(TOKENS["web"][0], grpc.StatusCode.OK)


BAD_FILES = [
    ("{}", "JSON list"),
    ("[1]", "must be an object"),
    ('[{"name": "a", "scopes": ["classify"]}]', "exactly one of token_sha256 and client_identity"),
    ('[{"name": "a", "token_sha256": "plain-token", "scopes": ["classify"]}]', "64 hex digits"),
    (f'[{{"name": "a", "token_sha256": "{"0" * 64}", "scopes": ["root"]}}]', "scopes must be a non-empty list"),
    (f'[{{"name": "a", "token_sha256": "{"0" * 64}", "scopes": []}}]', "scopes must be a non-empty list"),
    (f'[{{"name": "", "token_sha256": "{"0" * 64}", "scopes": ["admin"]}}]', "name must be"),
    (f'[{{"name": "a", "token": "x", "token_sha256": "{"0" * 64}", "scopes": ["admin"]}}]', "unknown fields"),
    (f'[{{"name": "a", "token_sha256": "{"0" * 64}", "scopes": ["admin"]}}, '
     f'{{"name": "a", "client_identity": "b", "scopes": ["admin"]}}]', "used twice"),
    ("[{", "not valid JSON"),
]


@pytest.mark.parametrize("text,message", BAD_FILES)
def test_invalid_credentials_files_are_refused_naming_the_problem(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_credentials(text)


def test_tokens_match_by_hash_and_scopes_imply(tmp_path):
    path = tmp_path / "tokens.json"
    _write_credentials(path, token_entries())
    store = CredentialStore(path)
    assert store.by_token(TOKENS["web"][0]) == Principal("web", frozenset({CLASSIFY}), "token")
    assert store.by_token(TOKENS["web"][0] + "x") is None
    assert store.by_token(token_sha256(TOKENS["web"][0])) is None  # the hash itself is no credential
    admin = store.by_token(TOKENS["ops"][0])
    assert admin.allows(CLASSIFY) and admin.allows(TRAIN) and admin.sees_all_jobs
    trainer = store.by_token(TOKENS["pipeline"][0])
    assert trainer.allows(TRAIN) and not trainer.allows(CLASSIFY) and not trainer.sees_all_jobs


def test_new_token_prints_a_token_and_its_entry(tmp_path):
    from conftest import run_cli

    out = run_cli("new-token", "web-frontend", "--scope", "classify", "--scope", "train").stdout
    token = re.search(r"keep it secret\): (\S+)", out)[1]
    entry = json.loads(out.split("entry for the credentials file: ", 1)[1])
    assert len(token) >= 40 and token not in json.dumps(entry)
    path = tmp_path / "tokens.json"
    _write_credentials(path, [entry])
    assert CredentialStore(path).by_token(token) == Principal("web-frontend", frozenset({CLASSIFY, TRAIN}), "token")


def test_mismatched_tls_key_is_refused(pki, tmp_path):
    other = pki.ca.issue_cert("localhost")
    key = tmp_path / "other.key"
    key.write_bytes(other.private_key_pem.bytes())
    with pytest.raises(ValueError, match="not a usable certificate chain"):
        CertificateFiles(str(pki.cert_file), str(key))


def test_start_refuses_broken_credentials_and_warns_when_open(exported_registry, tmp_path):
    broken = tmp_path / "tokens.json"
    broken.write_text('[{"name": "a", "token_sha256": "abc", "scopes": ["admin"]}]')
    result = subprocess.run([sys.executable, "-m", "headswap.cli", "serve", "--port", "0", "--metrics-port", "-1",
                             "--model-dir", str(exported_registry), "--work-dir", str(tmp_path / "w"),
                             "--auth-tokens-file", str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "64 hex digits" in result.stderr and "Traceback" not in result.stderr
    not_a_key = tmp_path / "metrics.key"
    not_a_key.write_text("not a key")
    result = subprocess.run([sys.executable, "-m", "headswap.cli", "serve", "--port", "0", "--metrics-port", "0",
                             "--model-dir", str(exported_registry), "--work-dir", str(tmp_path / "m"),
                             "--metrics-tls-cert-file", str(not_a_key), "--metrics-tls-key-file", str(not_a_key)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--metrics-tls-cert-file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr

    server = start_server(exported_registry, tmp_path / "open", "--host", "0.0.0.0", "--role", "inference",
                          wait=False)
    try:
        deadline = time.monotonic() + 120
        while "gRPC listening on port" not in server.log():
            assert server.proc.poll() is None and time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert re.search(r"WARNING .*no TLS \(plaintext\) and no authentication", server.log())
    finally:
        server.stop()
