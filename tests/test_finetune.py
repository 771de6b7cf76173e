"""FineTune through the running server, on real labelled images (scikit-learn's handwritten digits).

One module-scoped server does the real 10-epoch digits fine-tune once; the other tests reuse it
(progress events, jobs listing, a phase-2 run through the CLI, activation and rollback, cancel,
and last a crash + restart). Bad inputs run against a second server with small limits and never
start a worker.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import BUILTIN_NAME, ServerProcess, start_server
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.registry.registry import Registry

DONE = pb.JOB_STATE_SUCCEEDED
ESPRESSO = 967


# --- data ----------------------------------------------------------------------------------


def digit_png(image: np.ndarray) -> bytes:
    """An 8x8 digit as dark ink on white paper, 64x64 RGB PNG (48 px digit, 8 px margin)."""
    ink = Image.fromarray((image / 16.0 * 255).astype(np.uint8)).resize((48, 48), Image.Resampling.BICUBIC)
    page = ImageOps.invert(ImageOps.expand(ink, 8, 0)).convert("RGB")
    buffer = io.BytesIO()
    page.save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Digits:
    train: list[tuple[bytes, str]]
    test: list[tuple[bytes, str]]


@pytest.fixture(scope="module")
def digits() -> Digits:
    """load_digits: 1,797 real images, 10 classes; 20% held out (stratified) never sent to training."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train_idx, test_idx = train_test_split(np.arange(len(data.target)), test_size=0.2, random_state=0,
                                           stratify=data.target)
    pick = lambda idx: [(digit_png(data.images[i]), str(data.target[i])) for i in idx]  # noqa: E731
    return Digits(pick(train_idx), pick(test_idx))


def stream(config: pb.FineTuneConfig | None, examples: list[tuple[bytes, str]], batch: int = 128,
           validation: bool = False) -> Iterator[pb.FineTuneRequest]:
    if config is not None:
        yield pb.FineTuneRequest(config=config)
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        yield pb.FineTuneRequest(batch=pb.ExampleBatch(examples=[
            pb.Example(image=image, label=label, validation=validation) for image, label in chunk]))


def watch(server: ServerProcess, job_id: str, timeout: float = 600) -> list[pb.JobEvent]:
    stub = pb_grpc.TrainingStub(server.channel())
    return list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout))


def held_out_accuracy(server: ServerProcess, model: str,
                      examples: list[tuple[bytes, str]]) -> tuple[float, set[str], int]:
    """Top-1 accuracy through Classify, the labels answered, and the version that answered."""
    stub = pb_grpc.InferenceStub(server.channel())
    correct, labels, versions = 0, set(), set()
    for start in range(0, len(examples), 64):
        chunk = examples[start:start + 64]
        response = stub.Classify(pb.ClassifyRequest(images=[image for image, _ in chunk], model=model, top_k=1),
                                 timeout=120)
        versions.add(response.version)
        for result, (_, label) in zip(response.results, chunk):
            labels.add(result.predictions[0].label)
            correct += result.predictions[0].label == label
    assert len(versions) == 1
    return correct / len(examples), labels, versions.pop()


def worker_pids() -> dict[int, str]:
    """pid -> command line of every running training worker."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "headswap.training.worker" in cmdline:
                found[int(proc.name)] = cmdline
    return found


def wait_for(predicate, timeout: float = 120, interval: float = 0.1, check: bool = True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    if check:
        raise AssertionError("condition not met in time")
    return None


# --- the trained model ---------------------------------------------------------------------


@dataclass
class Trained:
    holder: dict
    registry: Path
    work: Path
    job_id: str
    events: list[pb.JobEvent]
    response: pb.FineTuneResponse
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def server(self) -> ServerProcess:
        return self.holder["server"]


@pytest.fixture(scope="module")
def trained(exported_registry, tmp_path_factory, digits) -> Iterator[Trained]:
    """A private server (role all) and one real fine-tune: 10 epochs, head only, on 1,437 digits."""
    import shutil

    work = tmp_path_factory.mktemp("finetune")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    holder = {"server": start_server(registry, work / "server")}
    stub = pb_grpc.TrainingStub(holder["server"].channel())
    started = time.monotonic()
    config = pb.FineTuneConfig(name="digits", epochs=10, seed=0, activate=True, min_val_accuracy=0.5)
    response = stub.FineTune(stream(config, digits.train), timeout=300)
    events = watch(holder["server"], response.job_id)
    yield Trained(holder, registry, work / "server", response.job_id, events, response, time.monotonic() - started)
    for server in holder.get("all", []) + [holder["server"]]:
        if server.proc.poll() is None:
            server.stop()


def test_finetune_digits_reaches_held_out_accuracy(trained, digits):
    final = trained.events[-1]
    assert final.state == DONE, final.message + "\n" + trained.server.log()[-3000:]
    assert (final.model, final.version) == ("digits", 1)
    assert trained.response.num_images == len(digits.train) and trained.response.num_classes == 10
    accuracy, labels, version = held_out_accuracy(trained.server, "digits", digits.test)
    print(f"digits fine-tune: held-out accuracy {accuracy:.4f} on {len(digits.test)} images, "
          f"{trained.seconds:.1f} s from upload to done")
    assert accuracy >= 0.93
    assert labels <= {str(d) for d in range(10)} and version == 1
    metrics = json.loads(final.metrics_json)
    assert metrics["val_accuracy"] >= 0.9 and set(metrics["per_class"]) == {str(d) for d in range(10)}


def test_manifest_holds_labels_config_metrics_and_job(trained):
    info = pb_grpc.ModelsStub(trained.server.channel()).GetModel(pb.GetModelRequest(name="digits"))
    manifest = json.loads(info.manifest_json)
    assert manifest["labels"] == [str(d) for d in range(10)]
    assert manifest["job_id"] == trained.job_id and manifest["kind"] == "fine-tune"
    assert manifest["base_model"] == {"name": BUILTIN_NAME, "version": 1, "source": "builtin:efficientnet-lite0"}
    training = manifest["training"]
    assert training["config"]["epochs"] == 10 and training["config"]["name"] == "digits"
    assert 0.9 <= training["val_accuracy"] <= 1
    assert set(training["per_class"]["7"]) == {"precision", "recall", "support"}
    matrix = np.asarray(training["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == training["num_val"]
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    assert training["feature_extractor"] == "onnxruntime"


def test_progress_events_cover_every_phase(trained):
    events = trained.events
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    phases = [e.phase for e in events]
    order = ["receiving", "extracting_features", "training_head", "exporting", "done"]
    assert [p for p in dict.fromkeys(phases) if p in order] == order
    extracting = [e for e in events if e.phase == "extracting_features" and e.images_per_second > 0]
    assert extracting and extracting[-1].eta_seconds == 0 and "1437/1437" in extracting[-1].message
    epochs = [e for e in events if e.phase == "training_head" and e.epoch > 0]
    assert [e.epoch for e in epochs] == list(range(1, 11)) and all(e.total_epochs == 10 for e in epochs)
    assert epochs[-1].loss < epochs[0].loss and epochs[-1].val_accuracy > 0.85
    assert all(e.time > 0 for e in events) and events[-1].job_id == trained.job_id


def test_base_model_still_answers_imagenet_and_server_has_no_tensorflow(trained, photos):
    response = pb_grpc.InferenceStub(trained.server.channel()).Classify(
        pb.ClassifyRequest(images=[photos["coffee"]], top_k=1, model=BUILTIN_NAME))
    assert response.results[0].predictions[0].index == ESPRESSO
    assert response.results[0].predictions[0].label == "espresso"
    maps = Path(f"/proc/{trained.server.proc.pid}/maps").read_text()
    assert "tensorflow" not in maps.lower()


def test_jobs_are_listed_and_described(trained):
    stub = pb_grpc.TrainingStub(trained.server.channel())
    listed = {job.job_id: job for job in stub.ListJobs(pb.ListJobsRequest()).jobs}
    job = listed[trained.job_id]
    assert job.state == DONE and job.activated and (job.model, job.version) == ("digits", 1)
    assert job.base_model == BUILTIN_NAME and json.loads(job.config_json)["epochs"] == 10
    assert stub.GetJob(pb.GetJobRequest(job_id=trained.job_id)).last_event.phase == "done"
    out = subprocess.run([sys.executable, "-m", "headswap.cli", "jobs", "--target", trained.server.target],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and trained.job_id in out.stdout and "SUCCEEDED" in out.stdout


def test_phase2_through_cli_then_activate_and_rollback(trained, digits, tmp_path):
    """A small phase-2 run (top layers unfrozen) via `headswap finetune`, stored as digits v2
    without activation; then activation and rollback while the server runs."""
    data = tmp_path / "digits"
    for i, (image, label) in enumerate(digits.train[:300]):
        (data / label).mkdir(parents=True, exist_ok=True)
        (data / label / f"{i}.png").write_bytes(image)
    out = subprocess.run([sys.executable, "-m", "headswap.cli", "finetune", str(data), "--name", "digits", "--target",
                          trained.server.target, "--epochs", "3", "--unfreeze-top-layers", "5",
                          "--finetune-epochs", "1", "--no-activate"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stored digits version 2" in out.stdout and "fine tuning" in out.stderr
    registry = Registry(trained.registry)
    manifest = registry.manifest("digits", 2)
    assert manifest["training"]["phase2"]["unfrozen_layers"] >= 5
    assert manifest["training"]["phase2"]["trainable_weights"] > 0
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    # phase 2 changed the embedding: max-softmax, thresholded on its validation split (issue 23)
    assert manifest["ood"]["method"] == "max_softmax" and manifest["ood"]["threshold"] is not None
    assert "ood_score" not in manifest["outputs"] and manifest["training"]["comparison"]["active_version"] == 1
    assert registry.active_version("digits") == 1  # --no-activate

    models = pb_grpc.ModelsStub(trained.server.channel())
    sample = digits.test[:64]
    assert held_out_accuracy(trained.server, "digits", sample)[2] == 1
    models.ActivateModel(pb.ActivateModelRequest(name="digits", version=2))
    accuracy, labels, version = held_out_accuracy(trained.server, "digits", sample)
    assert version == 2 and labels <= {str(d) for d in range(10)} and accuracy > 0.5
    models.RollbackModel(pb.RollbackModelRequest(name="digits"))
    assert held_out_accuracy(trained.server, "digits", sample)[2] == 1


def test_cancel_running_job_skips_invalid_images_and_refuses_duplicates(trained, digits):
    stub = pb_grpc.TrainingStub(trained.server.channel())
    examples = list(digits.train[:200])
    examples[3] = (b"\x89PNG\r\n\x1a\nbroken", examples[3][1])
    examples[10] = (b"", examples[10][1])
    config = pb.FineTuneConfig(name="cancelled", epochs=1000, skip_invalid_images=True)
    response = stub.FineTune(stream(config, examples), timeout=120)
    assert list(response.skipped_indices) == [3, 10] and response.num_images == 198

    with pytest.raises(grpc.RpcError) as info:  # one job per name at a time
        stub.FineTune(stream(config, examples[:20]), timeout=60)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and response.job_id in info.value.details()

    wait_for(lambda: stub.GetJob(pb.GetJobRequest(job_id=response.job_id)).phase in
             ("extracting_features", "training_head"), timeout=180)
    # The job runs in the server's warm worker (its command line names the server, not the job).
    workers = [pid for pid, cmd in worker_pids().items() if f"--parent-pid {trained.server.proc.pid}" in cmd]
    assert workers
    job = stub.CancelJob(pb.CancelJobRequest(job_id=response.job_id), timeout=60)
    assert job.state == pb.JOB_STATE_CANCELLED
    events = watch(trained.server, response.job_id, timeout=30)
    assert events[-1].phase == "cancelled" and events[-1].state == pb.JOB_STATE_CANCELLED
    # The worker stopped the job (it stays warm for the next one when it stops in time) and never
    # publishes: the cancel is fenced in the job store.
    worker_log = trained.work / "jobs" / response.job_id / "worker.log"
    stopped = wait_for(lambda: re.search("stopped by its trainer|no longer running under attempt 1",
                                         worker_log.read_text())
                       or not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=30, check=False)
    assert stopped, f"{worker_log.read_text()[-3000:]}\n{trained.server.log()[-3000:]}"
    time.sleep(2)
    assert Registry(trained.registry).versions("cancelled") == []
    # the cancelled job's export staging (if it had begun) is gone at once, not at the next start
    assert not list((trained.registry / ".staging").glob("headswap-export-*"))

    with pytest.raises(grpc.RpcError) as info:
        stub.CancelJob(pb.CancelJobRequest(job_id=response.job_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        stub.CancelJob(pb.CancelJobRequest(job_id="no-such-job"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    out = subprocess.run([sys.executable, "-m", "headswap.cli", "cancel", "no-such-job", "--target", trained.server.target],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "NOT_FOUND" in out.stderr


def test_crash_requeues_the_running_job_and_restart_keeps_history(trained, digits):
    """Kill -9 the server mid-job: the worker dies with it, nothing is published, and the next
    server shows the finished jobs and runs the interrupted one again (attempt 2) from its staged
    upload. Runs last: it restarts."""
    server = trained.server
    stub = pb_grpc.TrainingStub(server.channel())
    config = pb.FineTuneConfig(name="digits", epochs=1000, activate=True)
    response = stub.FineTune(stream(config, digits.train[:200]), timeout=120)
    wait_for(lambda: stub.GetJob(pb.GetJobRequest(job_id=response.job_id)).phase in
             ("extracting_features", "training_head"), timeout=180)
    workers = [pid for pid, cmd in worker_pids().items() if f"--parent-pid {server.proc.pid}" in cmd]
    assert workers
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=30)

    restarted = start_server(trained.registry, trained.work)
    trained.holder.setdefault("all", []).append(server)
    trained.holder["server"] = restarted
    jobs = {job.job_id: job for job in
            pb_grpc.TrainingStub(restarted.channel()).ListJobs(pb.ListJobsRequest()).jobs}
    assert jobs[trained.job_id].state == DONE and jobs[trained.job_id].version == 1
    restarted_stub = pb_grpc.TrainingStub(restarted.channel())
    wait_for(lambda: restarted_stub.GetJob(pb.GetJobRequest(job_id=response.job_id)).phase in
             ("extracting_features", "training_head"), timeout=180)
    crashed = restarted_stub.GetJob(pb.GetJobRequest(job_id=response.job_id))
    assert crashed.state == pb.JOB_STATE_RUNNING
    assert restarted_stub.CancelJob(pb.CancelJobRequest(job_id=response.job_id), timeout=60).state == \
        pb.JOB_STATE_CANCELLED
    history = watch(restarted, response.job_id, timeout=30)
    assert any("(attempt 2" in e.message for e in history), [e.message for e in history]
    assert history[-1].state == pb.JOB_STATE_CANCELLED
    registry = Registry(trained.registry)
    assert registry.versions("digits") == [1, 2] and registry.active_version("digits") == 1
    assert not list((trained.work / "jobs").glob(".incoming-*"))


# --- bad input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(exported_registry, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server with tiny upload limits, and two extra registry models: a zero-shot one under
    another name, and one whose source is a TF Hub handle."""
    import shutil

    work = tmp_path_factory.mktemp("finetune-strict")
    registry_dir = work / "registry"
    shutil.copytree(exported_registry, registry_dir)
    registry = Registry(registry_dir)
    path, manifest = registry.verified_model_path(BUILTIN_NAME, 1)
    base = {k: v for k, v in manifest.items() if k not in ("name", "version", "sha256", "created")}
    for name, source in (("other-model", "builtin:efficientnet-lite0"),
                         ("hub-model", "hub:https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5")):
        copy = work / f"{name}.onnx"
        copy.write_bytes(path.read_bytes())
        registry.publish(name, copy, dict(base, source=source), activate=True)
    server = start_server(registry_dir, work / "server", "--max-train-images", "30", "--max-train-bytes",
                          "60000", "--max-label-length", "8")
    yield server
    server.stop()


def _refused(server: ServerProcess, requests: Iterator[pb.FineTuneRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.TrainingStub(server.channel()).FineTune(requests, timeout=60)
    return info.value


@pytest.fixture(scope="module")
def small(digits) -> list[tuple[bytes, str]]:
    """9 images, classes 0, 1, 2, 0, 1, 2, ...: under every limit of strict_server."""
    by_label = {label: [ex for ex in digits.train if ex[1] == label] for label in ("0", "1", "2")}
    return [by_label[label][i] for i in range(3) for label in ("0", "1", "2")]


def cfg(**kwargs) -> pb.FineTuneConfig:
    return pb.FineTuneConfig(**{"name": "bad-input", **kwargs})


@pytest.mark.parametrize("case, code, text", [
    ("no-config", grpc.StatusCode.INVALID_ARGUMENT, "first FineTune message must carry the config"),
    ("empty-stream", grpc.StatusCode.INVALID_ARGUMENT, "first FineTune message must carry the config"),
    ("second-config", grpc.StatusCode.INVALID_ARGUMENT, "only the first FineTune message"),
    ("no-images", grpc.StatusCode.INVALID_ARGUMENT, "no images received"),
    ("one-class", grpc.StatusCode.INVALID_ARGUMENT, "at least 2 classes"),
    ("too-few-for-split", grpc.StatusCode.INVALID_ARGUMENT, "too few images for a validation split: '2' (1)"),
    ("undecodable", grpc.StatusCode.INVALID_ARGUMENT, "indices [1, 4]"),
    ("too-many-images", grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-train-images"),
    ("too-many-bytes", grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-train-bytes"),
    ("empty-label", grpc.StatusCode.INVALID_ARGUMENT, "image 2 has an empty label"),
    ("long-label", grpc.StatusCode.INVALID_ARGUMENT, "--max-label-length"),
    ("unknown-base", grpc.StatusCode.NOT_FOUND, "base model 'no-such-model' does not exist"),
    ("unexported-source", grpc.StatusCode.NOT_FOUND, "headswap export keras:MobileNetV2"),
    ("name-is-base", grpc.StatusCode.ALREADY_EXISTS, "cannot be named after its base"),
    ("name-taken", grpc.StatusCode.ALREADY_EXISTS, "'other-model' already exists"),
    ("bad-name", grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"),
    ("phase2-on-hub", grpc.StatusCode.FAILED_PRECONDITION, "phase 2"),
    ("bad-config", grpc.StatusCode.INVALID_ARGUMENT, "dropout must be in [0, 1)"),
    ("unknown-class-weight", grpc.StatusCode.INVALID_ARGUMENT, "class_weights names labels"),
    ("validation-unknown-label", grpc.StatusCode.INVALID_ARGUMENT, "validation images have labels"),
])
def test_bad_input_is_refused_with_a_clear_status(strict_server, small, case, code, text):
    big = (np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, "PNG")
    noisy = buffer.getvalue()  # ~43 KB: two of them pass the 60,000-byte limit
    requests = {
        "no-config": lambda: stream(None, small),
        "empty-stream": lambda: iter([]),
        "second-config": lambda: iter([pb.FineTuneRequest(config=cfg()), pb.FineTuneRequest(config=cfg())]),
        "no-images": lambda: stream(cfg(), []),
        "one-class": lambda: stream(cfg(), [(image, "0") for image, _ in small]),
        "too-few-for-split": lambda: stream(cfg(), [ex for ex in small if ex[1] != "2"] + [small[2]]),
        "undecodable": lambda: stream(cfg(), [small[0], (b"junk", "1"), small[2], small[3], (b"GIF89a..", "2")]),
        "too-many-images": lambda: stream(cfg(), small * 4),
        "too-many-bytes": lambda: stream(cfg(), [(noisy, "0"), (noisy, "1")] + small),
        "empty-label": lambda: stream(cfg(), small[:2] + [(small[2][0], "  ")] + small[3:]),
        "long-label": lambda: stream(cfg(), small[:2] + [(small[2][0], "x" * 9)] + small[3:]),
        "unknown-base": lambda: stream(cfg(base_model="no-such-model"), small),
        "unexported-source": lambda: stream(cfg(base_model="keras:MobileNetV2"), small),
        "name-is-base": lambda: stream(cfg(name=BUILTIN_NAME), small),
        "name-taken": lambda: stream(cfg(name="other-model"), small),
        "bad-name": lambda: stream(cfg(name="Not A Name!"), small),
        "phase2-on-hub": lambda: stream(cfg(base_model="hub-model", unfreeze_top_layers=3), small),
        "bad-config": lambda: stream(cfg(dropout=1.5), small),
        "unknown-class-weight": lambda: stream(cfg(class_weights={"7": 2.0}), small),
        "validation-unknown-label": lambda: iter(list(stream(cfg(), small)) +
                                                 list(stream(None, [(small[0][0], "9")], validation=True))),
    }[case]()
    err = _refused(strict_server, requests)
    assert err.code() == code, err.details()
    assert text in err.details(), err.details()


def test_bad_input_stores_nothing(strict_server, small):
    """Runs after the refusals above: no job, no upload left behind, no new model."""
    stub = pb_grpc.TrainingStub(strict_server.channel())
    assert list(stub.ListJobs(pb.ListJobsRequest()).jobs) == []
    jobs_dir = Path(re.search(r"--work-dir (\S+)", " ".join(strict_server.proc.args)).group(1)) / "jobs"
    assert list(jobs_dir.iterdir()) == []
    for call, request in ((stub.GetJob, pb.GetJobRequest(job_id="nope")),
                          (stub.CancelJob, pb.CancelJobRequest(job_id="nope"))):
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        list(stub.WatchJob(pb.WatchJobRequest(job_id="nope")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    models = {m.name for m in pb_grpc.ModelsStub(strict_server.channel()).ListModels(pb.ListModelsRequest()).models}
    assert models == {BUILTIN_NAME, "other-model", "hub-model"}


def test_cli_finetune_refuses_a_single_class_directory(strict_server, small, tmp_path):
    (tmp_path / "only").mkdir()
    for i, (image, _) in enumerate(small):
        (tmp_path / "only" / f"{i}.png").write_bytes(image)
    out = subprocess.run([sys.executable, "-m", "headswap.cli", "finetune", str(tmp_path), "--name", "one-class",
                          "--target", strict_server.target], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "at least 2 classes" in out.stderr


# The job store's own contract (claims, leases, fencing, cancels) is tested on both back ends in
# tests/test_job_store.py.
