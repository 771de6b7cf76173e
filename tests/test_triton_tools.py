"""Triton's own tools against headswap: ModelConfig, ModelStatistics, perf_analyzer, latency metrics.

The client side is Triton's: `tritonclient` parses the configuration and statistics with its own
copy of Triton's protobuf messages, and `perf_analyzer` (the binary in the tritonclient wheel)
measures the running server. As in test_kserve.py, this process never imports headswap's
kserve_v2_pb2 (it declares the same `inference.*` messages as tritonclient).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from conftest import BUILTIN_NAME, REPO
from headswap.inference.images import Preprocessing, load_pixels

SIZE = 224
CLASSES = 1000
HISTOGRAMS = {
    "total": "headswap_inference_request_duration_us",
    "queue": "headswap_inference_queue_duration_us",
    "decode": "headswap_inference_compute_input_duration_us",
    "infer": "headswap_inference_compute_infer_duration_us",
}


def load_dev():
    """dev.py, the project's own set-up script: it knows where perf_analyzer's libraries are."""
    spec = importlib.util.spec_from_file_location("headswap_dev", REPO / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_perf_analyzer(protocol: str, target: str, report: Path) -> tuple[int, str]:
    """perf_analyzer against `target`, shortened for CI (concurrency 1 and 4, 1 s windows, a loose
    stability bound), retried while a busy shared machine defeats even that; (exit status, output)."""
    dev = load_dev()
    dev.ensure_perf_analyzer_libs()
    binary = Path(sys.prefix) / "bin" / "perf_analyzer"
    assert binary.exists(), f"{binary} is missing: the tritonclient wheel ships it"
    command = [str(binary), "-i", protocol, "-u", target, "-m", BUILTIN_NAME,
               "--shape", f"image:{SIZE},{SIZE},3", "--concurrency-range", "1:4:3",
               "--measurement-interval", "1000", "--stability-percentage", "100", "--max-trials", "10",
               "-f", str(report)]
    for _attempt in range(3):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env=dev.perf_analyzer_env(Path(sys.executable)))
        output = result.stdout + result.stderr
        if "Failed to obtain stable measurement" not in output:
            break
    return result.returncode, output


@pytest.fixture(scope="module")
def photo_input(exported_registry, photos) -> np.ndarray:
    """The chelsea photo as the model's FP32 input [224, 224, 3], preprocessed as the manifest says."""
    manifest = json.loads((exported_registry / BUILTIN_NAME / "1" / "manifest.json").read_text())
    preprocessing = Preprocessing.from_manifest(manifest)
    pixels = load_pixels(photos["chelsea"], preprocessing.height, preprocessing.width, 40_000_000)
    return preprocessing.normalize(pixels[None])[0]


def infer(client: tc.InferenceServerClient, batch: np.ndarray) -> np.ndarray:
    tensor = tc.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return client.infer(BUILTIN_NAME, [tensor]).as_numpy("probabilities")


def statistics(client: tc.InferenceServerClient, name: str = BUILTIN_NAME, version: str = "") -> dict:
    return client.get_inference_statistics(name, version, as_json=True)


def model_stats(client: tc.InferenceServerClient) -> dict:
    (entry,) = statistics(client)["model_stats"]
    return entry


def metric_values(server) -> dict[tuple[str, str], float]:
    """(sample name, model) -> value from the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == BUILTIN_NAME and "le" not in sample.labels:
                values[(sample.name, sample.labels.get("version", ""))] = sample.value
    return values


def count_of(stat: dict, key: str) -> int:
    return int(stat.get(key, {}).get("count", 0))


def ns_of(stat: dict, key: str) -> int:
    return int(stat.get(key, {}).get("ns", 0))


# --- ModelConfig -----------------------------------------------------------------------------


def test_model_config_is_tritons_shape(client):
    config = client.get_model_config(BUILTIN_NAME, as_json=True)["config"]
    assert config["name"] == BUILTIN_NAME
    assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 256  # --max-images-per-request: the most one request may carry
    (model_input,) = config["input"]
    assert model_input["name"] == "image" and model_input["data_type"] == "TYPE_UINT8"  # as ModelMetadata says
    assert model_input["format"] == "FORMAT_NHWC"
    assert [int(d) for d in model_input["dims"]] == [SIZE, SIZE, 3]
    (output,) = config["output"]
    assert output["name"] == "probabilities" and output["data_type"] == "TYPE_FP32"
    assert [int(d) for d in output["dims"]] == [CLASSES]
    batching = config["dynamic_batching"]
    assert batching["preferred_batch_size"] == [8]  # --max-batch-size
    assert int(batching["max_queue_delay_microseconds"]) == 1000  # --batch-timeout-ms 1.0
    # the same version through its number
    assert client.get_model_config(BUILTIN_NAME, "1", as_json=True)["config"]["name"] == BUILTIN_NAME


def test_model_config_follows_batching_settings(server_factory, registry_copy):
    server = server_factory(registry_copy, "--max-batch-size", "4", "--batch-timeout-ms", "2.5",
                            "--max-images-per-request", "32")
    client = tc.InferenceServerClient(url=server.target)
    config = client.get_model_config(BUILTIN_NAME, as_json=True)["config"]
    client.close()
    assert config["max_batch_size"] == 32
    assert config["dynamic_batching"]["preferred_batch_size"] == [4]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 2500


def test_model_config_errors(client):
    with pytest.raises(InferenceServerException) as err:
        client.get_model_config("no-such-model")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "no-such-model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_config(BUILTIN_NAME, "99")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_config(BUILTIN_NAME, "latest")
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "version" in err.value.message()


# --- ModelStatistics and the latency histograms ------------------------------------------------


def test_statistics_count_requests_images_and_batches(client, shared_server, photo_input):
    before = model_stats(client)
    metrics_before = metric_values(shared_server)
    for _ in range(3):
        assert infer(client, photo_input[None]).argmax() in range(281, 286)  # a cat
    assert infer(client, np.stack([photo_input, photo_input])).shape == (2, CLASSES)
    with pytest.raises(InferenceServerException):  # reaches the model, fails there: counted as a failure
        infer(client, np.zeros((1, 100, 100, 3), np.float32))
    after = model_stats(client)

    assert after["name"] == BUILTIN_NAME and after["version"] == "1"
    assert int(after.get("inference_count", 0)) - int(before.get("inference_count", 0)) == 5  # images
    # sequential requests: one model execution each
    assert int(after.get("execution_count", 0)) - int(before.get("execution_count", 0)) == 4
    stats, old = after["inference_stats"], before.get("inference_stats", {})
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert count_of(stats, key) - count_of(old, key) == 4, key
    assert count_of(stats, "fail") - count_of(old, "fail") == 1
    assert ns_of(stats, "compute_infer") > ns_of(old, "compute_infer")
    parts = sum(ns_of(stats, k) - ns_of(old, k) for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert 0 < parts <= ns_of(stats, "success") - ns_of(old, "success")  # disjoint parts of each request
    assert int(after["last_inference"]) >= int(before.get("last_inference", 0)) and int(after["last_inference"]) > 0
    batch_counts = {int(b["batch_size"]): count_of(b, "compute_infer") for b in after["batch_stats"]}
    old_counts = {int(b["batch_size"]): count_of(b, "compute_infer") for b in before.get("batch_stats", [])}
    assert batch_counts.get(1, 0) - old_counts.get(1, 0) == 3 and batch_counts.get(2, 0) - old_counts.get(2, 0) == 1

    # The Prometheus histograms carry the same split, one observation per successful request.
    metrics_after = metric_values(shared_server)
    sums = {}
    for part, name in HISTOGRAMS.items():
        key_count, key_sum = (f"{name}_count", "1"), (f"{name}_sum", "1")
        assert metrics_after[key_count] - metrics_before.get(key_count, 0) == 4, name
        sums[part] = metrics_after[key_sum] - metrics_before.get(key_sum, 0)
        assert sums[part] > 0, name
    assert sums["queue"] + sums["decode"] + sums["infer"] <= sums["total"] * 1.0001


def test_statistics_of_every_model_and_errors(client, shared_server, photo_input):
    infer(client, photo_input[None])
    everything = statistics(client, name="")["model_stats"]
    assert [(s["name"], s["version"]) for s in everything] == [(BUILTIN_NAME, "1")]
    assert int(everything[0]["inference_count"]) >= 1
    assert statistics(client, version="1")["model_stats"][0]["version"] == "1"
    for name, version, status in [("no-such-model", "", "NOT_FOUND"), ("../etc", "", "NOT_FOUND"),
                                  (BUILTIN_NAME, "99", "NOT_FOUND"), (BUILTIN_NAME, "x", "INVALID_ARGUMENT"),
                                  ("", "1", "INVALID_ARGUMENT")]:
        with pytest.raises(InferenceServerException) as err:
            statistics(client, name, version)
        assert err.value.status() == f"StatusCode.{status}", (name, version, err.value.message())
    assert "Traceback" not in shared_server.log()


def test_statistics_of_an_unloaded_model_are_zero(server_factory, registry_copy, photo_input):
    server = server_factory(registry_copy)
    client = tc.InferenceServerClient(url=server.target)
    try:
        infer(client, photo_input[None])
        assert int(model_stats(client)["inference_count"]) == 1
        client.unload_model(BUILTIN_NAME)
        (entry,) = statistics(client)["model_stats"]
        assert entry["version"] == "1" and int(entry.get("inference_count", 0)) == 0
        assert statistics(client, name="").get("model_stats", []) == []  # nothing loaded
        infer(client, photo_input[None])  # loaded again on demand: counting starts afresh
        assert int(model_stats(client)["inference_count"]) == 1
    finally:
        client.close()


# --- perf_analyzer ----------------------------------------------------------------------------


def test_perf_analyzer_measures_headswap(shared_server, client, tmp_path):
    """The issue's command, `perf_analyzer -i grpc -m efficientnet-lite0 --shape image:224,224,3
    --concurrency-range 1:16`, unchanged but for the address and shortened for CI: concurrency 1
    and 4, 1 s windows and a loose stability bound (the CI machine is shared). Its input is
    perf_analyzer's default random data, in the datatype ModelMetadata advertises (UINT8 pixels)."""
    report = tmp_path / "report.csv"
    before = model_stats(client)
    returncode, output = run_perf_analyzer("grpc", shared_server.target, report)
    assert returncode == 0, output
    assert "failed to get model config" not in output and "error" not in output.lower(), output
    # perf_analyzer read ModelStatistics and printed the server-side split
    assert output.count("Server: ") == 2 and "compute infer" in output, output
    with report.open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(row["Concurrency"]) for row in rows) == [1, 4]  # rows come sorted by throughput
    for row in rows:
        assert float(row["Inferences/Second"]) > 0, row
        assert int(row["Server Compute Infer"]) > 0, row
    # every request perf_analyzer sent was answered: none failed on the server
    after = model_stats(client)
    old = before.get("inference_stats", {})
    assert count_of(after["inference_stats"], "fail") == count_of(old, "fail")
    assert count_of(after["inference_stats"], "success") - count_of(old, "success") > 0
    assert "Traceback" not in shared_server.log()
