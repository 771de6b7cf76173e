"""The Open Inference Protocol (KServe V2) without a transport: one set of rules and messages.

The gRPC servicer (`kserve_servicer`) and the REST app (`rest`) each turn their wire format into
the plain objects here (`InferRequest`, `InputTensor`, `RequestedOutput`), call `InferenceProtocol`,
and turn what it returns back into their wire format. Every check a caller can fail, and every
message it gets, lives here once.

A model is a registry model (`efficientnet-lite0`); its versions are registry versions as strings,
"" meaning the active one. Every model has one input and two outputs:

- input `image`, advertised by model metadata and config as UINT8 [-1, H, W, 3] (RGB pixels:
  every value a caller, or perf_analyzer's random data, can send is a valid image, and the caller
  needs no knowledge of the model's normalisation), and accepted on the same name in three
  datatypes, chosen by the tensor's `datatype`:
    * FP32  [N, H, W, 3]: already-preprocessed model input, fed to the model as is (values outside
      the manifest's normalised range by more than its width are refused: `Preprocessing.check_fp32`);
    * UINT8 [N, H, W, 3]: RGB pixels already cropped and resized to H x W; normalised here with
      the mean/std of the version's manifest;
    * BYTES [N] (or [N, 1]): encoded images (JPEG, PNG, WebP, BMP), decoded, center-cropped,
      resized and normalised here exactly as the headswap.v1 Classify call does.
  Data come either as raw bytes (gRPC `raw_input_contents`, REST binary data; BYTES elements each
  prefixed by their 4-byte little-endian length) or as typed values (gRPC `contents`, REST JSON `data`).
- output `probabilities`, FP32 [N, num_labels]. Requested with a `classification` parameter of k
  (tritonclient's `InferRequestedOutput(name, class_count=k)`), it is instead a BYTES [N, k] tensor
  of "score:index:label" strings, best first, as Triton's classification extension returns them.
- output `ood_score`, FP32 [N]: how unlike the version's training images each image is (higher is
  less alike; see docs/ood.md); its parameters `ood_method` and `ood_threshold` (absent when the
  version has none) say how to read it. Both outputs come back when none is requested, as in Triton.
- request parameter `timeout` (microseconds, 0 for none) tightens the transport's deadline. `timeout`
  and `classification` must be whole numbers: any other kind is refused, not ignored.

Descriptions (server and model metadata, Triton's model config and statistics) are built here as
dicts in the shape of Triton's REST JSON: the REST app sends them as they are, the gRPC servicer
parses them into its protobuf messages.
"""

from __future__ import annotations

import importlib.metadata
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from headswap.admission import SlotsPerKey
from headswap.api.names import known_model
from headswap.errors import InvalidInput, NotFound, ResourceExhausted, shown_name
from headswap.inference.classifier import Answer, Classifier, top_k_indices
from headswap.inference.manager import ModelManager
from headswap.inference.ood import OOD_OUTPUT, OodSpec
from headswap.inference.stats import Duration, StatsSnapshot
from headswap.registry.registry import NAME_PATTERN, Registry

SERVER_NAME = "headswap"
EXTENSIONS = ["classification", "model_repository", "statistics"]
PLATFORM = "onnxruntime_onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
OOD_OUTPUT_NAME = OOD_OUTPUT
OUTPUT_NAMES = (OUTPUT_NAME, OOD_OUTPUT_NAME)
PIXEL_DTYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
ACCEPTED_DATATYPES = "FP32 or UINT8 [N, H, W, 3] pixels, or BYTES [N] encoded images"
# Not FP32, the ONNX file's own input: FP32 with NaN or infinity is refused (a finite-input rule),
# and Triton's perf_analyzer fills an advertised FP32 input with random bytes, which hold NaN.
ADVERTISED_DATATYPE = "UINT8"
# The request `id` comes back in the response. A longer one is refused up front: echoed, a
# megabytes-long id could push a finished answer past --max-message-bytes, and the caller would get
# grpc's "Sent message larger than max" after the server had done all the work.
MAX_REQUEST_ID_LENGTH = 1024
UNSUPPORTED_TENSOR_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_LENGTH = struct.Struct("<I")

# A parameter's value as the transport decoded it: int (int64/uint64, a JSON integer), bool, str, float.
Parameters = Mapping[str, Any]


def server_version() -> str:
    try:
        return importlib.metadata.version("headswap")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# ASCII digits only ("²".isdigit() is true) and at most 18 of them: an int64 version, never a
# 5000-digit number that int() refuses.
_VERSION = re.compile(r"[1-9][0-9]{0,17}")


def parse_version(text: str) -> int:
    """A KServe version string -> registry version; "" is the active version (0)."""
    if not text:
        return 0
    if not _VERSION.fullmatch(text):
        raise InvalidInput(f"model version must be empty (the active version) or a positive integer "
                           f"of at most 18 digits, got {shown_name(text)}")
    return int(text)


# --- the request, as every transport hands it over ------------------------------------------------


@dataclass
class InputTensor:
    """One input tensor: `raw` bytes (Triton's layout) or typed `values`, never both.

    `values` is a numpy array for FP32/UINT8 (any numeric dtype: checked here) or a list of bytes
    for BYTES; None when the tensor carries no typed data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    values: np.ndarray | list[bytes] | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    inputs: Sequence[InputTensor] = ()
    outputs: Sequence[RequestedOutput] = ()
    parameters: Parameters = field(default_factory=dict)


@dataclass
class OutputTensor:
    """One output: FP32 `data` as a numpy array, or BYTES `data` as a list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    parameters: Parameters = field(default_factory=dict)  # how to read it (ood_score's method, threshold)

    def raw(self) -> bytes:
        """Triton's raw layout (gRPC raw_output_contents, REST binary data)."""
        if self.datatype == "BYTES":
            return serialize_bytes_tensor(self.data)  # type: ignore[arg-type]
        return np.ascontiguousarray(self.data, dtype=np.float32).tobytes()


@dataclass
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]


# --- pieces of the rules ---------------------------------------------------------------------------


def refuse_shared_memory(parameters: Parameters, what: str) -> None:
    for key in UNSUPPORTED_TENSOR_PARAMETERS:
        if key in parameters:
            raise InvalidInput(f"{what}: shared memory is not supported by headswap; send the data in the request")


def whole_number(value: Any, what: str, least: int, expected: str) -> int:
    """A whole-number parameter of at least `least`; any other kind or value is refused (a `timeout`
    sent as a string was ignored, so the call ran without the limit its caller set)."""
    if type(value) is not int or value < least:  # bool is an int subclass: refused too
        shown = shown_name(value) if isinstance(value, str) else repr(value)
        raise InvalidInput(f"{what} must be {expected}, got {shown}")
    return value


def split_bytes_tensor(raw: bytes | memoryview, count: int, name: str) -> list[bytes]:
    """Triton's raw BYTES layout: each element is a 4-byte little-endian length, then its bytes."""
    items: list[bytes] = []
    offset, size = 0, len(raw)
    while offset < size:
        if offset + 4 > size:
            raise InvalidInput(f"input {name!r}: BYTES data ends inside an element's 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidInput(f"input {name!r}: BYTES element {len(items)} claims {length} bytes but only "
                               f"{size - offset} remain")
        items.append(bytes(raw[offset:offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInput(f"input {name!r}: shape says {count} BYTES elements, the data holds {len(items)}")
    return items


def serialize_bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def classification_strings(probabilities: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Top-k "score:index:label" per row, best first, formatted like Triton (C++ std::to_string)."""
    rows = []
    k = min(k, probabilities.shape[-1])
    for row in probabilities:
        for i in top_k_indices(row, k):
            text = f"{float(row[i]):f}:{int(i)}"
            if i < len(labels):
                text += f":{labels[i]}"
            rows.append(text.encode())
    return rows


def requested_outputs(outputs: Sequence[RequestedOutput]) -> tuple[int, tuple[str, ...]]:
    """Validate the requested outputs: the classification count asked for (0 for probabilities) and
    the outputs to send, in the order asked (both when none is named)."""
    if not outputs:
        return 0, OUTPUT_NAMES
    if len(outputs) > len(OUTPUT_NAMES):
        raise InvalidInput(f"the model has two outputs, {OUTPUT_NAME!r} and {OOD_OUTPUT_NAME!r}; "
                           f"{len(outputs)} were requested")
    names = [output.name for output in outputs]
    for output in outputs:
        if output.name not in OUTPUT_NAMES:
            raise InvalidInput(f"unknown requested output {shown_name(output.name)}; the model's outputs are "
                               f"{OUTPUT_NAME!r} and {OOD_OUTPUT_NAME!r}")
        if output.parameters:
            refuse_shared_memory(output.parameters, f"output {output.name!r}")
            if output.name == OOD_OUTPUT_NAME and "classification" in output.parameters:
                raise InvalidInput(f"the classification parameter applies to {OUTPUT_NAME!r}, not to "
                                   f"{OOD_OUTPUT_NAME!r} (one score per image)")
    if len(set(names)) != len(names):
        raise InvalidInput(f"output {shown_name(names[0])} was requested twice")
    probabilities = next((o for o in outputs if o.name == OUTPUT_NAME), None)
    if probabilities is None or "classification" not in probabilities.parameters:
        return 0, tuple(names)
    return whole_number(probabilities.parameters["classification"], "the classification parameter", 1,
                        "a positive integer (the number of classes to return)"), tuple(names)


def request_deadline(parameters: Parameters, deadline: float | None) -> float | None:
    """The transport's deadline, tightened by Triton's `timeout` request parameter (microseconds; 0
    for none). Any other kind or a negative value is refused rather than ignored."""
    if parameters and "timeout" in parameters:
        timeout_us = whole_number(parameters["timeout"], "the timeout parameter", 0,
                                  "a whole number of microseconds (0 for none)")
        if timeout_us > 0:
            limit = time.monotonic() + timeout_us / 1e6
            deadline = limit if deadline is None else min(deadline, limit)
    return deadline


def pixels(tensor: InputTensor, dtype: np.dtype) -> np.ndarray:
    """NHWC pixels as a numpy view on the request's bytes (no copy) or built from typed values."""
    shape = tensor.shape
    if len(shape) != 4 or shape[3] != 3:
        raise InvalidInput(f"{tensor.datatype} input {tensor.name!r} must have shape [N, H, W, 3] (RGB, "
                           f"channels last), got {list(shape)}")
    elements = shape[0] * shape[1] * shape[2] * shape[3]
    if tensor.raw is not None:
        expected = elements * dtype.itemsize
        if len(tensor.raw) != expected:
            raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} {list(shape)} needs {expected} bytes "
                               f"of data, the request has {len(tensor.raw)}")
        return np.frombuffer(tensor.raw, dtype=dtype).reshape(shape)
    array = np.asarray(tensor.values if tensor.values is not None else [])
    if array.size and array.dtype.kind not in ("u", "i", "f"):
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} data must be numbers")
    if dtype == np.uint8:
        if array.size and (array.dtype.kind == "f" or array.min() < 0 or array.max() > 255):
            raise InvalidInput(f"input {tensor.name!r}: UINT8 values must be 0..255")
        array = array.astype(np.uint8)
    else:
        array = array.astype(np.float32)
    if array.size != elements:
        raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} needs {elements} values, "
                           f"the data has {array.size}")
    return array.reshape(shape)


def encoded_images(tensor: InputTensor, count: int) -> list[bytes]:
    """A BYTES tensor's elements: one encoded image each."""
    shape = tensor.shape
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"BYTES input {tensor.name!r} must have shape [N] (one encoded image per "
                           f"element), got {list(shape)}")
    if tensor.raw is not None:
        return split_bytes_tensor(tensor.raw, count, tensor.name)
    images = list(tensor.values) if tensor.values is not None else []
    if len(images) != count:
        raise InvalidInput(f"input {tensor.name!r}: shape says {count} BYTES elements, the data holds {len(images)}")
    return images  # type: ignore[return-value]


def outputs_of(answer: Answer, class_count: int, wanted: Sequence[str] = OUTPUT_NAMES) -> list[OutputTensor]:
    """The answer as the `wanted` output tensors: probabilities (or the top `class_count` classes as
    strings) and the out-of-distribution score with how to read it."""
    probabilities = answer.probabilities
    tensors: dict[str, OutputTensor] = {}
    if class_count:
        strings = classification_strings(probabilities, class_count, answer.labels)
        k = len(strings) // max(1, len(probabilities))
        tensors[OUTPUT_NAME] = OutputTensor(OUTPUT_NAME, "BYTES", [len(probabilities), k], strings)
    else:
        tensors[OUTPUT_NAME] = OutputTensor(OUTPUT_NAME, "FP32", list(probabilities.shape), probabilities)
    if answer.ood_scores is not None:
        scores = np.ascontiguousarray(answer.ood_scores, dtype=np.float32)
        ood = answer.ood or OodSpec("max_softmax", None, None)
        parameters: Parameters = {"ood_method": ood.method}
        if ood.threshold is not None:
            parameters["ood_threshold"] = float(ood.threshold)
        tensors[OOD_OUTPUT_NAME] = OutputTensor(OOD_OUTPUT_NAME, "FP32", list(scores.shape), scores, parameters)
    return [tensors[name] for name in wanted if name in tensors]


def ood_parameters(ood: OodSpec) -> dict[str, dict[str, str]]:
    """How to read the `ood_score` output, as Triton model-config parameters (string values)."""
    parameters = {"ood_method": {"string_value": ood.method}}
    if ood.threshold is not None:
        parameters["ood_threshold"] = {"string_value": repr(ood.threshold)}
    return parameters


# --- the calls -------------------------------------------------------------------------------------


class InferenceProtocol:
    """The Open Inference Protocol's calls over the classifier and registry, for any transport."""

    def __init__(self, classifier: Classifier, registry: Registry, manager: ModelManager, ready,
                 callers: SlotsPerKey) -> None:
        self.classifier = classifier
        self.callers = callers  # --max-inference-calls-per-caller, shared with headswap.v1 Classify
        self.registry = registry
        self.manager = manager
        self.ready = ready  # threading.Event, set once the server serves its default model
        self.version = server_version()

    def model_name(self, name: str) -> str:
        """The model a request names ("" = the default); NOT_FOUND outside the naming rule."""
        return known_model(name, self.classifier.default_model)

    # --- health and metadata ---------------------------------------------------------------

    def server_ready(self) -> bool:
        return self.ready.is_set()

    def model_ready(self, name: str, version_text: str) -> bool:
        """Ready = that version (or the active one) is loaded and warmed up; unknown models are not
        ready, as in Triton."""
        version = parse_version(version_text)
        name = name or self.classifier.default_model
        return bool(NAME_PATTERN.match(name)) and self.manager.is_ready(name, version)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": self.version, "extensions": list(EXTENSIONS)}

    def _described(self, requested: str, version_text: str) -> tuple[str, dict, tuple[int, int, int]]:
        """A model version's name, manifest and (height, width, classes), -1 where unknown."""
        name = self.model_name(requested)
        manifest = self.registry.manifest(name, self.registry.resolve(name, parse_version(version_text)))
        size = manifest.get("input") or {}
        classes = len(manifest.get("labels") or []) or -1
        return name, manifest, (int(size.get("height", -1)), int(size.get("width", -1)), classes)

    def model_metadata(self, requested: str, version_text: str) -> dict[str, Any]:
        """The input advertised is UINT8 pixels; preprocessed FP32 tensors and BYTES images are
        accepted on the same name (see the module docstring)."""
        name, _, (height, width, classes) = self._described(requested, version_text)
        return {"name": name, "versions": [str(v) for v in self.registry.versions(name)], "platform": PLATFORM,
                "inputs": [{"name": INPUT_NAME, "datatype": ADVERTISED_DATATYPE, "shape": [-1, height, width, 3]}],
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, classes]},
                            {"name": OOD_OUTPUT_NAME, "datatype": "FP32", "shape": [-1]}]}

    def model_config(self, requested: str, version_text: str) -> dict[str, Any]:
        """The model as Triton would describe it: ONNX on ONNX Runtime, NHWC UINT8 input (as the
        metadata advertises it), dynamic batching.

        max_batch_size is the most images one request may carry; the batcher's own batch size is
        the preferred batch size, and its timeout the queue delay.
        """
        name, manifest, (height, width, classes) = self._described(requested, version_text)
        settings = self.classifier.settings
        return {"name": name, "platform": PLATFORM,
                "backend": str(manifest.get("runtime") or "onnxruntime"),  # precision tiers run in OpenVINO
                "max_batch_size": settings.max_images_per_request,
                "input": [{"name": INPUT_NAME, "data_type": f"TYPE_{ADVERTISED_DATATYPE}", "format": "FORMAT_NHWC",
                           "dims": [height, width, 3]}],
                "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [classes]}],
                "dynamic_batching": {"preferred_batch_size": [settings.max_batch_size],
                                     "max_queue_delay_microseconds": round(settings.batch_timeout_ms * 1000)},
                "parameters": ood_parameters(OodSpec.for_manifest(manifest))}

    def model_statistics(self, requested: str, version_text: str) -> dict[str, Any]:
        """Cumulative counts and durations per loaded version since it was loaded (Triton's shape).

        No name: every loaded version. A registry model with nothing loaded (or a version that is
        not loaded) answers zeros, as it has served nothing since it was last loaded.
        """
        version = parse_version(version_text)
        if not requested:
            if version:
                raise InvalidInput("a model version was given without a model name; give the name too")
            return {"model_stats": [statistics(r.stats.snapshot()) for r in self.manager.resident()]}
        name = known_model(requested)
        if version:
            version = self.registry.resolve(name, version)  # NOT_FOUND for a version the registry lacks
        snapshots = [r.stats.snapshot() for r in self.manager.resident(name) if not version or r.version == version]
        if not snapshots:  # also refuses unknown models (NOT_FOUND) and models with no active version
            snapshots = [StatsSnapshot.empty(name, self.registry.resolve(name, version))]
        return {"model_stats": [statistics(s) for s in snapshots]}

    # --- repository (explicit model control) -----------------------------------------------

    def repository_index(self, ready_only: bool) -> list[dict[str, str]]:
        """Every registry model with its active version; READY when that version is loaded."""
        index = []
        for name in self.registry.models():
            version = self.registry.active_version(name)
            if version is None:
                continue
            ready = self.manager.is_ready(name)
            if ready_only and not ready:
                continue
            index.append({"name": name, "version": str(version), "state": "READY" if ready else "UNAVAILABLE",
                          "reason": "" if ready else "not loaded"})
        return index

    def load(self, requested: str, parameters: Parameters) -> None:
        """Load and warm up the active version (a no-op when it is already serving)."""
        name = known_model(requested)
        if parameters:
            raise InvalidInput("headswap loads models from its registry; load parameters (config, files) "
                               f"are not supported, got {sorted(parameters)}")
        self.manager.refresh(name)

    def unload(self, requested: str) -> None:
        """Unload every resident version; unloading a model that is not loaded succeeds, as in Triton."""
        name = known_model(requested)
        if self.registry.active_version(name) is None:
            raise NotFound(f"unknown model {name!r}; models in the registry: "
                           f"{', '.join(self.registry.models()) or 'none'}")
        try:
            self.manager.unload(name)
        except NotFound:
            pass  # known to the registry but not loaded: nothing to do

    # --- inference -------------------------------------------------------------------------

    def infer(self, request: InferRequest, caller: str, deadline: float | None,
              should_stop: Callable[[], bool], routing_key: str | None = None) -> InferResponse:
        """Check the request, classify under the caller's slot, answer the output tensors.

        `caller` keys --max-inference-calls-per-caller; `deadline` is the transport's (monotonic);
        `should_stop` turns true once the caller went away; `routing_key` is who asks, for a
        rollout's sticky split (headswap.inference.rollout)."""
        name = self.model_name(request.model)
        version = parse_version(request.version)
        if len(request.id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidInput(f"the request id has {len(request.id)} characters; at most {MAX_REQUEST_ID_LENGTH} "
                               "are accepted (it is echoed in the response)")
        class_count, wanted = requested_outputs(request.outputs)
        deadline = request_deadline(request.parameters, deadline)

        if len(request.inputs) != 1:
            raise InvalidInput(f"model {name!r} takes exactly one input, {INPUT_NAME!r}; the request has "
                               f"{len(request.inputs)}")
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME:
            raise InvalidInput(f"unexpected input {shown_name(tensor.name)} for model {name!r}: its input is "
                               f"{INPUT_NAME!r} ({ACCEPTED_DATATYPES})")
        if tensor.parameters:
            refuse_shared_memory(tensor.parameters, f"input {tensor.name!r}")
        shape = tensor.shape
        if not shape or any(d < 1 for d in shape):
            raise InvalidInput(f"input {tensor.name!r} has shape {list(shape)}; every dimension must be at least 1")
        count = shape[0]
        limit = self.classifier.settings.max_images_per_request
        if count > limit:
            raise ResourceExhausted(f"{count} images in one request; the limit is {limit}")

        datatype = tensor.datatype
        if datatype == "BYTES":
            images = encoded_images(tensor, count)

            def run() -> Answer:
                return self.classifier.infer_encoded(images, name, version, deadline, should_stop, routing_key)
        elif datatype in PIXEL_DTYPES:
            array = pixels(tensor, PIXEL_DTYPES[datatype])

            def run() -> Answer:
                return self.classifier.infer_pixels(array, name, version, deadline, normalized=datatype == "FP32",
                                                    should_stop=should_stop, routing_key=routing_key)
        else:
            raise InvalidInput(f"input {tensor.name!r} has datatype {shown_name(datatype)}; "
                               f"accepted: {ACCEPTED_DATATYPES}")
        with self.callers.take(caller):  # checked once the request is known to be valid
            answer = run()
        return InferResponse(answer.model, str(answer.version), request.id, outputs_of(answer, class_count, wanted))


def _duration(value: Duration) -> dict[str, int]:
    return {"count": value.count, "ns": value.ns}


def statistics(stats: StatsSnapshot) -> dict[str, Any]:
    """Domain counters -> Triton's model statistics (decoding is Triton's compute_input)."""
    return {"name": stats.name, "version": str(stats.version), "last_inference": stats.last_inference_ms,
            "inference_count": stats.inference_count, "execution_count": stats.execution_count,
            "inference_stats": {"success": _duration(stats.success), "fail": _duration(stats.fail),
                                "queue": _duration(stats.queue), "compute_input": _duration(stats.compute_input),
                                "compute_infer": _duration(stats.compute_infer),
                                "compute_output": _duration(stats.compute_output)},
            "batch_stats": [{"batch_size": size, "compute_infer": _duration(d)} for size, d in stats.batches.items()]}
