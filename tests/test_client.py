"""The Python client (`headswap.Client`) against real servers: every method, and the typed errors.

One module-scoped server (role all) answers the classify, fine-tune, jobs, activate and rollback
tests; the fine-tunes train real heads on scikit-learn's handwritten digits. A second server with
TLS and bearer tokens checks the connection options and the authentication errors.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import trustme
from PIL import Image

from conftest import BUILTIN_NAME, ServerProcess, start_server
from headswap import Client
from headswap.client import (FINETUNE_OPTIONS, AlreadyExistsError, ClientError, FailedPreconditionError,
                             FineTuneOptions, InvalidArgumentError, Job, JobEvent, JobState, NotFoundError,
                             PermissionDeniedError, Prediction, UnauthenticatedError, UnavailableError)
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.security.credentials import ADMIN, CLASSIFY, token_sha256
from test_finetune import digit_png

ESPRESSO = 967
CATS = {"Egyptian cat", "tiger cat", "tabby"}
CLASSES = ("0", "1", "2")


# --- servers and data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(exported_registry, tmp_path_factory) -> Iterator[ServerProcess]:
    """A private server (role all): the fine-tunes here add versions to its registry."""
    work = tmp_path_factory.mktemp("client-server")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    process = start_server(registry, work / "server")
    yield process
    process.stop()


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.target, timeout=120) as connected:
        yield connected


@dataclasses.dataclass
class DigitSets:
    train: list[tuple[bytes, str]]
    test: list[tuple[bytes, str]]


@pytest.fixture(scope="module")
def digits() -> DigitSets:
    """Real handwritten digits 0, 1 and 2: 24 of each to train, the next 10 of each held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    train, test = [], []
    for label in CLASSES:
        indices = np.flatnonzero(data.target == int(label))
        train += [(digit_png(data.images[i]), label) for i in indices[:24]]
        test += [(digit_png(data.images[i]), label) for i in indices[24:34]]
    return DigitSets(train, test)


def accuracy(client: Client, model: str, examples: list[tuple[bytes, str]]) -> tuple[float, int]:
    answer = client.classify([image for image, _ in examples], model=model, top_k=1)
    correct = sum(predictions[0].label == label for predictions, (_, label) in zip(answer, examples))
    return correct / len(examples), answer.version


# --- classify --------------------------------------------------------------------------------------------


def test_classify_takes_bytes_paths_pil_images_and_arrays(client, photos, tmp_path):
    from skimage import data

    path = tmp_path / "chelsea.png"
    path.write_bytes(photos["chelsea"])
    pil = Image.open(io.BytesIO(photos["coffee"]))
    answer = client.classify([photos["coffee"], path, str(path), pil, data.coffee()], top_k=3)
    assert (answer.model, answer.version) == (BUILTIN_NAME, 1)
    assert len(answer) == 5 and all(len(predictions) == 3 for predictions in answer)
    for coffee in (answer[0], answer[3], answer[4]):  # bytes, a PIL image, a uint8 array: the same photo
        assert (coffee[0].label, coffee[0].index) == ("espresso", ESPRESSO) and coffee[0].score > 0.8
    assert answer[1] == answer[2] and answer[1][0].label in CATS
    assert all(p.score >= q.score for predictions in answer for p, q in zip(predictions, predictions[1:]))
    assert isinstance(answer[0][0], Prediction)
    with pytest.raises(dataclasses.FrozenInstanceError):
        answer[0][0].score = 1.0  # type: ignore[misc]

    [single] = client.classify(photos["rocket"], model=BUILTIN_NAME, version=1, top_k=1)  # one image, not a list
    assert len(single) == 1 and single[0].label == "missile"


def test_classify_errors_are_typed(client, photos):
    with pytest.raises(NotFoundError) as info:
        client.classify(photos["coffee"], model="no-such-model")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "no-such-model" in info.value.details
    assert str(info.value).startswith("NOT_FOUND: ") and isinstance(info.value, ClientError)
    with pytest.raises(NotFoundError):
        client.classify(photos["coffee"], model=BUILTIN_NAME, version=99)
    with pytest.raises(InvalidArgumentError) as info:
        client.classify(photos["coffee"], top_k=100_000)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in info.value.details
    with pytest.raises(InvalidArgumentError) as info:
        client.classify([photos["coffee"], b"not an image"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # What cannot be sent at all is refused before any call.
    for bad in ({"top_k": 0}, {"top_k": -1}, {"version": -1}):
        with pytest.raises(ValueError):
            client.classify(photos["coffee"], **bad)
    with pytest.raises(ValueError):
        client.classify([])
    with pytest.raises(TypeError, match="an image must be bytes, a path"):
        client.classify([12345])


# --- fine-tune, jobs, activate, rollback -----------------------------------------------------------------


@pytest.fixture(scope="module")
def from_folder(server, digits, tmp_path_factory) -> tuple[Job, list[JobEvent]]:
    """`finetune` from a folder DATA/<class>/<files>: model "digits" version 1, activated."""
    folder = tmp_path_factory.mktemp("digits-folder")
    for i, (image, label) in enumerate(digits.train):
        (folder / label).mkdir(exist_ok=True)
        (folder / label / f"{i}.png").write_bytes(image)
    events: list[JobEvent] = []
    uploaded: list[int] = []
    with Client(server.target) as client:
        job = client.finetune(folder, name="digits", epochs=8, seed=0, on_progress=events.append,
                              on_upload=uploaded.append)
    assert uploaded and uploaded[-1] == len(digits.train)
    return job, events


def test_finetune_from_a_folder_reports_progress_and_answers(from_folder, client, digits, server):
    job, events = from_folder
    assert job.succeeded, f"{job.error}\n{server.log()[-3000:]}"
    assert job.state == JobState.SUCCEEDED and (job.model, job.version) == ("digits", 1) and job.activated
    assert job.config["epochs"] == 8 and job.config["name"] == "digits" and job.metrics["val_accuracy"] > 0.5
    assert set(job.metrics["per_class"]) == set(CLASSES)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    phases = list(dict.fromkeys(e.phase for e in events))
    assert [p for p in phases if p in ("receiving", "training_head", "done")] == ["receiving", "training_head", "done"]
    epochs = [e.epoch for e in events if e.phase == "training_head" and e.epoch > 0]
    assert epochs == list(range(1, 9)) and all(e.job_id == job.job_id for e in events)
    assert events[-1].state == JobState.SUCCEEDED and (events[-1].model, events[-1].version) == ("digits", 1)
    held_out, version = accuracy(client, "digits", digits.test)
    assert version == 1 and held_out >= 0.8, held_out


def test_finetune_from_pairs_then_activate_and_rollback(from_folder, client, digits):
    """Pairs of PIL images and int labels, an explicit validation set, not activated; then
    activate() and rollback() switch the answering version while the server runs."""
    assert from_folder[0].succeeded
    pairs = [(Image.open(io.BytesIO(image)), int(label)) for image, label in digits.train]
    validation = [(image, label) for image, label in digits.test[::2]]
    events: list[JobEvent] = []
    job = client.finetune(iter(pairs), name="digits", validation_data=validation, epochs=5, hidden_units=16,
                          activate=False, on_progress=events.append)
    assert job.succeeded, job.error
    assert (job.model, job.version) == ("digits", 2) and not job.activated
    assert job.config["hidden_units"] == 16 and job.metrics["num_val"] == len(validation)
    assert events and events[0].phase == "receiving" and events[-1].state == JobState.SUCCEEDED
    assert accuracy(client, "digits", digits.test)[1] == 1  # still version 1

    info = client.activate("digits", 2)
    assert (info.name, info.active_version) == ("digits", 2) and info.versions == (1, 2)
    assert accuracy(client, "digits", digits.test)[1] == 2
    info = client.rollback("digits")
    assert info.active_version == 1
    held_out, version = accuracy(client, "digits", digits.test)
    assert version == 1 and held_out >= 0.8
    assert client.model("digits").active_version == 1
    assert {m.name: m.active_version for m in client.models()}["digits"] == 1

    jobs = {j.job_id: j for j in client.jobs()}
    assert jobs[from_folder[0].job_id].state == JobState.SUCCEEDED and jobs[from_folder[0].job_id].version == 1
    assert jobs[job.job_id].version == 2 and not jobs[job.job_id].activated
    assert client.job(job.job_id).last_event.phase == "done"


def test_models_jobs_and_training_errors_are_typed(from_folder, client, digits, tmp_path):
    with pytest.raises(NotFoundError) as info:
        client.activate("no-such-model", 1)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError):
        client.activate(BUILTIN_NAME, 99)
    with pytest.raises(FailedPreconditionError) as info:
        client.rollback(BUILTIN_NAME)  # one version only: nothing to go back to
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "roll back" in info.value.details
    with pytest.raises(NotFoundError):
        client.job("no-such-job")
    with pytest.raises(NotFoundError):
        client.watch("no-such-job")
    with pytest.raises(FailedPreconditionError):
        client.cancel(from_folder[0].job_id)  # finished already

    small = digits.train[:3] + digits.train[24:27] + digits.train[48:51]
    with pytest.raises(InvalidArgumentError) as info:
        client.finetune(small, name="bad-config", dropout=1.5)
    assert "dropout" in info.value.details
    with pytest.raises(InvalidArgumentError) as info:
        client.finetune([(image, "0") for image, _ in small], name="one-class")
    assert "at least 2 classes" in info.value.details
    with pytest.raises(NotFoundError) as info:
        client.finetune(small, name="other-base", base_model="no-such-model")
    assert "no-such-model" in info.value.details
    with pytest.raises(AlreadyExistsError):
        client.finetune(small, name=BUILTIN_NAME)

    # Refused before any call: an unknown option names the valid ones; a value of the wrong type.
    with pytest.raises(TypeError) as info:
        client.finetune(small, name="typo", epoch=3)  # type: ignore[call-arg]
    assert "epoch" in str(info.value) and "epochs" in str(info.value) and "learning_rate" in str(info.value)
    with pytest.raises(TypeError, match="invalid fine-tune option value"):
        client.finetune(small, name="typo", epochs="three")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no class folders"):
        client.finetune(tmp_path, name="empty-folder")
    # A local failure during the upload (a file that is not there) is raised as itself.
    with pytest.raises(FileNotFoundError):
        client.finetune(small + [(tmp_path / "missing.png", "1")], name="missing-file")
    assert {j.name for j in client.jobs()} <= {"digits"}  # none of these made a job


def test_finetune_options_match_the_proto():
    """The typed options (FineTuneOptions) and the accepted keys are the proto's fields, but `name`."""
    fields = {f.name for f in pb.FineTuneConfig.DESCRIPTOR.fields} - {"name"}
    assert set(FINETUNE_OPTIONS) == fields == set(FineTuneOptions.__annotations__)


# --- connection options and authentication ---------------------------------------------------------------

TOKENS = {"web": ("client-test-classify-3a1", [CLASSIFY]), "ops": ("client-test-admin-9f0", [ADMIN])}


@pytest.fixture(scope="module")
def secure(exported_registry, tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    """An inference server with TLS (a throwaway CA) and bearer tokens; yields it and the CA file."""
    work = tmp_path_factory.mktemp("client-secure")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    (work / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (work / "server.pem").write_bytes(cert.cert_chain_pems[0].bytes())
    (work / "server.key").write_bytes(cert.private_key_pem.bytes())
    (work / "tokens.json").write_text(json.dumps([{"name": name, "token_sha256": token_sha256(token), "scopes": scopes}
                                                  for name, (token, scopes) in TOKENS.items()]))
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    process = start_server(registry, work / "server", "--role", "inference", "--metrics-port", "-1",
                           "--tls-cert-file", str(work / "server.pem"), "--tls-key-file", str(work / "server.key"),
                           "--auth-tokens-file", str(work / "tokens.json"), wait=False)
    try:
        deadline = time.monotonic() + 300
        while not (match := re.search(r"gRPC listening on port (\d+)", process.log())):
            assert process.proc.poll() is None and time.monotonic() < deadline, process.log()
            time.sleep(0.1)
        process.port = int(match[1])
        with Client(f"localhost:{process.port}", tls_ca_file=str(work / "ca.pem"), timeout=5) as probe:
            while True:  # health needs no token
                try:
                    if probe.health() == "SERVING":
                        break
                except ClientError:
                    pass
                assert process.proc.poll() is None and time.monotonic() < deadline, process.log()
                time.sleep(0.2)
        yield process, work / "ca.pem"
    finally:
        process.stop()


def test_tls_and_tokens(secure, photos):
    server, ca_file = secure
    target = f"localhost:{server.port}"
    with Client(target, tls_ca_file=ca_file, token=TOKENS["web"][0]) as client:
        [predictions] = client.classify(photos["coffee"], top_k=1)
        assert predictions[0].label == "espresso"
        with pytest.raises(PermissionDeniedError) as info:  # a classify token may not activate
            client.activate(BUILTIN_NAME, 1)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "admin" in info.value.details
    with Client(target, tls_ca_file=str(ca_file), token=TOKENS["ops"][0]) as client:
        assert client.activate(BUILTIN_NAME, 1).active_version == 1
    for token in ("wrong-token", None):
        with Client(target, tls_ca_file=ca_file, token=token) as client:
            with pytest.raises(UnauthenticatedError) as info:
                client.classify(photos["coffee"])
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert client.health() == "SERVING"
    with Client(server.target, token=TOKENS["web"][0], timeout=10) as plaintext:  # TLS port, no TLS
        with pytest.raises(UnavailableError) as info:
            plaintext.classify(photos["coffee"])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_needs_its_key():
    with pytest.raises(ValueError, match="tls_key_file"):
        Client("localhost:1", tls_cert_file="client.pem")


def test_importing_headswap_loads_no_client_until_asked():
    """The package root stays light (the server and workers import it): grpc and the client load
    only when `headswap.Client` is first used."""
    code = ("import sys, headswap\n"
            "assert 'grpc' not in sys.modules and 'headswap.client' not in sys.modules\n"
            "from headswap import Client, NotFoundError\n"
            "assert Client.__module__ == 'headswap.client.client' and 'grpc' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    import headswap
    import headswap.client

    assert headswap.__all__ == headswap.client.__all__
    assert all(getattr(headswap, name) is getattr(headswap.client, name) for name in headswap.__all__)
