"""KServe V2 / Triton gRPC inference protocol (`inference.GRPCInferenceService`): protobuf <-> domain.

Lets `tritonclient.grpc` (and any Open Inference Protocol client) call headswap unchanged.

A model is a registry model (`efficientnet-lite0`); its versions are registry versions as strings,
"" meaning the active one. Every model has one input and one output:

- input `image`, advertised by ModelMetadata and ModelConfig as UINT8 [-1, H, W, 3] (RGB pixels:
  every value a caller, or perf_analyzer's random data, can send is a valid image, and the caller
  needs no knowledge of the model's normalisation), and accepted on the same name in three
  datatypes, chosen by the tensor's `datatype`:
    * FP32  [N, H, W, 3]: already-preprocessed model input, fed to the model as is (values outside
      the manifest's normalised range by more than its width are refused: `Preprocessing.check_fp32`);
    * UINT8 [N, H, W, 3]: RGB pixels already cropped and resized to H x W; normalised here with
      the mean/std of the version's manifest;
    * BYTES [N] (or [N, 1]): encoded images (JPEG, PNG, WebP, BMP), decoded, center-cropped,
      resized and normalised here exactly as the headswap.v1 Classify call does.
  Data may come in `raw_input_contents` (tritonclient's default; BYTES elements each prefixed by
  their 4-byte little-endian length) or in `contents` (fp32_contents / uint_contents /
  bytes_contents).
- output `probabilities`, FP32 [N, num_labels], in `raw_output_contents`. Requested with a
  `classification` parameter of k (tritonclient's `InferRequestedOutput(name, class_count=k)`),
  it is instead a BYTES [N, k] tensor of "score:index:label" strings, best first, as Triton's
  classification extension returns them.
- output `ood_score`, FP32 [N] (issue 23): how unlike the version's training images each image is;
  its tensor parameters `ood_method` and `ood_threshold` (absent when the version has none) say
  how to read it. Both outputs come back when none is requested, as in Triton.
- request parameter `timeout` (microseconds, 0 for none) tightens the gRPC deadline. `timeout` and
  `classification` must be int64/uint64 parameters: any other kind is refused, not ignored.

Triton's ModelConfig and ModelStatistics (the statistics extension) are answered too, from the
manifest and settings and from the per-version counters the classifier and batcher keep
(`headswap.inference.stats`): that is what `perf_analyzer` reads to measure a server.

Repository control follows Triton's explicit mode, with one difference: an unloaded model is
loaded again on demand by the next inference request that names it (as headswap.v1 does).
"""

from __future__ import annotations

import importlib.metadata
import re
import struct
import time

import grpc
import numpy as np

from headswap.admission import SlotsPerKey
from headswap.api.auth import caller_key
from headswap.api.inference_servicer import deadline_of, stopped
from headswap.api.names import known_model
from headswap.api.status import rpc
from headswap.errors import InvalidInput, NotFound, ResourceExhausted, shown_name
from headswap.inference.classifier import Answer, Classifier, top_k_indices
from headswap.inference.manager import ModelManager
from headswap.inference.ood import OOD_OUTPUT, OodSpec
from headswap.inference.stats import Duration, StatsSnapshot
from headswap.protocol import kserve_v2_pb2 as kserve_pb
from headswap.protocol import kserve_v2_pb2_grpc as kserve_grpc
from headswap.registry.registry import NAME_PATTERN, Registry

SERVER_NAME = "headswap"
EXTENSIONS = ["classification", "model_repository", "statistics"]
PLATFORM = "onnxruntime_onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
OOD_OUTPUT_NAME = OOD_OUTPUT  # issue 23
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

InferOutput = kserve_pb.ModelInferResponse.InferOutputTensor
TensorMetadata = kserve_pb.ModelMetadataResponse.TensorMetadata


def _server_version() -> str:
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


def _refuse_shared_memory(parameters, what: str) -> None:
    for key in UNSUPPORTED_TENSOR_PARAMETERS:
        if key in parameters:
            raise InvalidInput(f"{what}: shared memory is not supported by headswap; send the data in the request")


def split_bytes_tensor(raw: bytes, count: int, name: str) -> list[bytes]:
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
        items.append(raw[offset:offset + length])
        offset += length
    if len(items) != count:
        raise InvalidInput(f"input {name!r}: shape says {count} BYTES elements, the data holds {len(items)}")
    return items


def _whole_number(parameter: kserve_pb.InferParameter, what: str, least: int, expected: str) -> int:
    """An int64/uint64 request parameter of at least `least`; any other kind or value is refused
    (a `timeout` sent as a string was ignored, so the call ran without the limit its caller set)."""
    kind = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, kind) if kind else None
    if kind not in ("int64_param", "uint64_param") or value < least:
        shown = shown_name(value) if isinstance(value, str) else repr(value)
        raise InvalidInput(f"{what} must be {expected}, got {shown}")
    return int(value)


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


def serialize_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


class KServeServicer(kserve_grpc.GRPCInferenceServiceServicer):
    """The KServe V2 data plane and model repository extension over the classifier and registry."""

    def __init__(self, classifier: Classifier, registry: Registry, manager: ModelManager, ready,
                 callers: SlotsPerKey) -> None:
        self.classifier = classifier
        self.callers = callers  # --max-inference-calls-per-caller, shared with headswap.v1 Classify
        self.registry = registry
        self.manager = manager
        self.ready = ready  # threading.Event, set once the server serves its default model
        self.version = _server_version()

    def _name(self, name: str) -> str:
        return known_model(name, self.classifier.default_model)

    # --- health and metadata ---------------------------------------------------------------

    @rpc("ServerLive")
    def ServerLive(self, request, context) -> kserve_pb.ServerLiveResponse:
        return kserve_pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    def ServerReady(self, request, context) -> kserve_pb.ServerReadyResponse:
        return kserve_pb.ServerReadyResponse(ready=self.ready.is_set())

    @rpc("ModelReady", lambda r: r.name)
    def ModelReady(self, request, context) -> kserve_pb.ModelReadyResponse:
        """Ready = that version (or the active one) is loaded and warmed up; unknown models are not ready,
        as in Triton."""
        version = parse_version(request.version)
        name = request.name or self.classifier.default_model
        ready = bool(NAME_PATTERN.match(name)) and self.manager.is_ready(name, version)
        return kserve_pb.ModelReadyResponse(ready=ready)

    @rpc("ServerMetadata")
    def ServerMetadata(self, request, context) -> kserve_pb.ServerMetadataResponse:
        return kserve_pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    def _described(self, requested: str, version_text: str) -> tuple[str, dict, tuple[int, int, int]]:
        """A model version's name, manifest and (height, width, classes), -1 where unknown."""
        name = self._name(requested)
        manifest = self.registry.manifest(name, self.registry.resolve(name, parse_version(version_text)))
        size = manifest.get("input") or {}
        classes = len(manifest.get("labels") or []) or -1
        return name, manifest, (int(size.get("height", -1)), int(size.get("width", -1)), classes)

    @rpc("ModelMetadata", lambda r: r.name)
    def ModelMetadata(self, request, context) -> kserve_pb.ModelMetadataResponse:
        """The input advertised is UINT8 pixels; preprocessed FP32 tensors and BYTES images are
        accepted on the same name (see the module docstring)."""
        name, manifest, (height, width, classes) = self._described(request.name, request.version)
        return kserve_pb.ModelMetadataResponse(
            name=name, versions=[str(v) for v in self.registry.versions(name)], platform=PLATFORM,
            inputs=[TensorMetadata(name=INPUT_NAME, datatype=ADVERTISED_DATATYPE, shape=[-1, height, width, 3])],
            outputs=[TensorMetadata(name=OUTPUT_NAME, datatype="FP32", shape=[-1, classes]),
                     TensorMetadata(name=OOD_OUTPUT_NAME, datatype="FP32", shape=[-1])])

    # --- inference -------------------------------------------------------------------------

    @rpc("ModelInfer", lambda r: r.model_name)
    def ModelInfer(self, request: kserve_pb.ModelInferRequest, context: grpc.ServicerContext
                   ) -> kserve_pb.ModelInferResponse:
        name = self._name(request.model_name)
        version = parse_version(request.model_version)
        if len(request.id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidInput(f"the request id has {len(request.id)} characters; at most {MAX_REQUEST_ID_LENGTH} "
                               "are accepted (it is echoed in the response)")
        class_count, outputs_wanted = self._requested_output(request)
        deadline = self._deadline(request, context)

        if len(request.inputs) != 1:
            raise InvalidInput(f"model {name!r} takes exactly one input, {INPUT_NAME!r}; the request has "
                               f"{len(request.inputs)}")
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME:
            raise InvalidInput(f"unexpected input {shown_name(tensor.name)} for model {name!r}: its input is "
                               f"{INPUT_NAME!r} ({ACCEPTED_DATATYPES})")
        if tensor.parameters:
            _refuse_shared_memory(tensor.parameters, f"input {tensor.name!r}")
        raws = request.raw_input_contents
        if raws and len(raws) != 1:
            raise InvalidInput(f"raw_input_contents has {len(raws)} entries for 1 input")
        raw = raws[0] if raws else None
        if raw is not None and tensor.HasField("contents"):
            raise InvalidInput(f"input {tensor.name!r} has data both in contents and in raw_input_contents")

        shape = tuple(tensor.shape)
        if not shape or any(d < 1 for d in shape):
            raise InvalidInput(f"input {tensor.name!r} has shape {list(shape)}; every dimension must be at least 1")
        count = shape[0]
        limit = self.classifier.settings.max_images_per_request
        if count > limit:
            raise ResourceExhausted(f"{count} images in one request; the limit is {limit}")

        datatype = tensor.datatype
        if datatype == "BYTES":
            if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
                raise InvalidInput(f"BYTES input {tensor.name!r} must have shape [N] (one encoded image per "
                                   f"element), got {list(shape)}")
            if raw is not None:
                images = split_bytes_tensor(raw, count, tensor.name)
            else:
                images = list(tensor.contents.bytes_contents)
                if len(images) != count:
                    raise InvalidInput(f"input {tensor.name!r}: shape says {count} BYTES elements, "
                                       f"bytes_contents holds {len(images)}")
            def infer() -> Answer:
                return self.classifier.infer_encoded(images, name, version, deadline, stopped(context))
        elif datatype in PIXEL_DTYPES:
            pixels = self._pixels(tensor, raw, PIXEL_DTYPES[datatype], shape)

            def infer() -> Answer:
                return self.classifier.infer_pixels(pixels, name, version, deadline, normalized=datatype == "FP32",
                                                    should_stop=stopped(context))
        else:
            raise InvalidInput(f"input {tensor.name!r} has datatype {shown_name(datatype)}; "
                               f"accepted: {ACCEPTED_DATATYPES}")
        with self.callers.take(caller_key(context)):  # checked once the request is known to be valid
            answer = infer()
        return self._response(request, answer, class_count, outputs_wanted)

    @staticmethod
    def _requested_output(request: kserve_pb.ModelInferRequest) -> tuple[int, tuple[str, ...]]:
        """Validate the requested outputs; the classification count asked for (0 for probabilities)
        and the outputs to send (both when none is named)."""
        outputs = request.outputs
        if not outputs:
            return 0, (OUTPUT_NAME, OOD_OUTPUT_NAME)
        names = [output.name for output in outputs]
        if len(outputs) > 2:
            raise InvalidInput(f"the model has two outputs, {OUTPUT_NAME!r} and {OOD_OUTPUT_NAME!r}; "
                               f"{len(outputs)} were requested")
        for output in outputs:
            if output.name not in (OUTPUT_NAME, OOD_OUTPUT_NAME):
                raise InvalidInput(f"unknown requested output {shown_name(output.name)}; the model's outputs are "
                                   f"{OUTPUT_NAME!r} and {OOD_OUTPUT_NAME!r}")
            if output.name == OOD_OUTPUT_NAME and output.parameters:
                _refuse_shared_memory(output.parameters, f"output {output.name!r}")
                if "classification" in output.parameters:
                    raise InvalidInput(f"the classification parameter applies to {OUTPUT_NAME!r}, not to "
                                       f"{OOD_OUTPUT_NAME!r} (one score per image)")
        if len(set(names)) != len(names):
            raise InvalidInput(f"output {shown_name(names[0])} was requested twice")
        wanted = tuple(names)
        if OUTPUT_NAME not in names:
            return 0, wanted
        output = next(o for o in outputs if o.name == OUTPUT_NAME)
        parameters = output.parameters
        if not parameters:
            return 0, wanted
        _refuse_shared_memory(parameters, f"output {output.name!r}")
        if "classification" not in parameters:
            return 0, wanted
        return _whole_number(parameters["classification"], "the classification parameter", 1,
                             "a positive integer (the number of classes to return)"), wanted

    @staticmethod
    def _deadline(request: kserve_pb.ModelInferRequest, context: grpc.ServicerContext) -> float | None:
        """The gRPC deadline, tightened by Triton's `timeout` request parameter (microseconds; 0 for
        none). Any other kind or a negative value is refused rather than ignored."""
        deadline = deadline_of(context)
        if request.parameters and "timeout" in request.parameters:
            timeout_us = _whole_number(request.parameters["timeout"], "the timeout parameter", 0,
                                       "a whole number of microseconds (0 for none)")
            if timeout_us > 0:
                limit = time.monotonic() + timeout_us / 1e6
                deadline = limit if deadline is None else min(deadline, limit)
        return deadline

    @staticmethod
    def _pixels(tensor, raw: bytes | None, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """NHWC pixels as a numpy view on the request's bytes (no copy) or built from `contents`."""
        if len(shape) != 4 or shape[3] != 3:
            raise InvalidInput(f"{tensor.datatype} input {tensor.name!r} must have shape [N, H, W, 3] (RGB, "
                               f"channels last), got {list(shape)}")
        elements = shape[0] * shape[1] * shape[2] * shape[3]
        if raw is not None:
            expected = elements * dtype.itemsize
            if len(raw) != expected:
                raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} {list(shape)} needs {expected} bytes "
                                   f"of data, raw_input_contents has {len(raw)}")
            return np.frombuffer(raw, dtype=dtype).reshape(shape)
        if dtype == np.uint8:
            values = tensor.contents.uint_contents
            array = np.array(values, dtype=np.uint32)
            if array.size and array.max() > 255:
                raise InvalidInput(f"input {tensor.name!r}: UINT8 values must be 0..255")
            array = array.astype(np.uint8)
        else:
            array = np.array(tensor.contents.fp32_contents, dtype=np.float32)
        if array.size != elements:
            raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} needs {elements} values, "
                               f"contents has {array.size}")
        return array.reshape(shape)

    @staticmethod
    def _response(request: kserve_pb.ModelInferRequest, answer: Answer, class_count: int,
                  wanted: tuple[str, ...] = (OUTPUT_NAME,)) -> kserve_pb.ModelInferResponse:
        probabilities = answer.probabilities
        if class_count:
            strings = classification_strings(probabilities, class_count, answer.labels)
            k = len(strings) // max(1, len(probabilities))
            output = InferOutput(name=OUTPUT_NAME, datatype="BYTES", shape=(len(probabilities), k))
            data = serialize_bytes_tensor(strings)
        else:
            output = InferOutput(name=OUTPUT_NAME, datatype="FP32", shape=probabilities.shape)
            data = np.ascontiguousarray(probabilities, dtype=np.float32).tobytes()
        tensors = {OUTPUT_NAME: (output, data)}
        if answer.ood_scores is not None:
            tensors[OOD_OUTPUT_NAME] = _ood_tensor(answer)
        sent = [tensors[name] for name in wanted if name in tensors]
        return kserve_pb.ModelInferResponse(model_name=answer.model, model_version=str(answer.version),
                                            id=request.id, outputs=[o for o, _ in sent],
                                            raw_output_contents=[d for _, d in sent])

    # --- model repository ------------------------------------------------------------------

    @rpc("RepositoryIndex")
    def RepositoryIndex(self, request, context) -> kserve_pb.RepositoryIndexResponse:
        """Every registry model with its active version; READY when that version is loaded."""
        index = []
        for name in self.registry.models():
            version = self.registry.active_version(name)
            if version is None:
                continue
            ready = self.manager.is_ready(name)
            if request.ready and not ready:
                continue
            index.append(kserve_pb.RepositoryIndexResponse.ModelIndex(
                name=name, version=str(version), state="READY" if ready else "UNAVAILABLE",
                reason="" if ready else "not loaded"))
        return kserve_pb.RepositoryIndexResponse(models=index)

    @rpc("RepositoryModelLoad", lambda r: r.model_name)
    def RepositoryModelLoad(self, request, context) -> kserve_pb.RepositoryModelLoadResponse:
        """Load and warm up the active version (a no-op when it is already serving)."""
        name = known_model(request.model_name)
        if request.parameters:
            raise InvalidInput("headswap loads models from its registry; load parameters (config, files) "
                               f"are not supported, got {sorted(request.parameters)}")
        self.manager.refresh(name)
        return kserve_pb.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload", lambda r: r.model_name)
    def RepositoryModelUnload(self, request, context) -> kserve_pb.RepositoryModelUnloadResponse:
        """Unload every resident version; unloading a model that is not loaded succeeds, as in Triton."""
        name = known_model(request.model_name)
        if self.registry.active_version(name) is None:
            raise NotFound(f"unknown model {name!r}; models in the registry: "
                           f"{', '.join(self.registry.models()) or 'none'}")
        try:
            self.manager.unload(name)
        except NotFound:
            pass  # known to the registry but not loaded: nothing to do
        return kserve_pb.RepositoryModelUnloadResponse()

    # --- Triton's configuration and statistics calls (what perf_analyzer reads) -------------

    @rpc("ModelConfig", lambda r: r.name)
    def ModelConfig(self, request, context) -> kserve_pb.ModelConfigResponse:
        """The model as Triton would describe it: ONNX on ONNX Runtime, NHWC UINT8 input (as ModelMetadata
        advertises it), dynamic batching.

        max_batch_size is the most images one request may carry; the batcher's own batch size is
        the preferred batch size, and its timeout the queue delay.
        """
        name, manifest, (height, width, classes) = self._described(request.name, request.version)
        settings = self.classifier.settings
        runtime = str(manifest.get("runtime") or "onnxruntime")  # precision tiers run in OpenVINO
        input_type = kserve_pb.DataType.Value(f"TYPE_{ADVERTISED_DATATYPE}")
        config = kserve_pb.ModelConfig(
            name=name, platform=PLATFORM, backend=runtime, max_batch_size=settings.max_images_per_request,
            input=[kserve_pb.ModelInput(name=INPUT_NAME, data_type=input_type,
                                        format=kserve_pb.ModelInput.FORMAT_NHWC, dims=[height, width, 3])],
            output=[kserve_pb.ModelOutput(name=OUTPUT_NAME, data_type=kserve_pb.TYPE_FP32, dims=[classes])],
            dynamic_batching=kserve_pb.ModelDynamicBatching(
                preferred_batch_size=[settings.max_batch_size],
                max_queue_delay_microseconds=round(settings.batch_timeout_ms * 1000)))
        ood = OodSpec.for_manifest(manifest)  # how to read the ood_score output (issue 23)
        config.parameters["ood_method"].string_value = ood.method
        if ood.threshold is not None:
            config.parameters["ood_threshold"].string_value = repr(ood.threshold)
        return kserve_pb.ModelConfigResponse(config=config)

    @rpc("ModelStatistics", lambda r: r.name)
    def ModelStatistics(self, request, context) -> kserve_pb.ModelStatisticsResponse:
        """Cumulative counts and durations per loaded version since it was loaded (Triton's shape).

        No name: every loaded version. A registry model with nothing loaded (or a version that is
        not loaded) answers zeros, as it has served nothing since it was last loaded.
        """
        version = parse_version(request.version)
        if not request.name:
            if version:
                raise InvalidInput("a model version was given without a model name; give the name too")
            return kserve_pb.ModelStatisticsResponse(
                model_stats=[_statistics(r.stats.snapshot()) for r in self.manager.resident()])
        name = known_model(request.name)
        if version:
            version = self.registry.resolve(name, version)  # NOT_FOUND for a version the registry lacks
        snapshots = [r.stats.snapshot() for r in self.manager.resident(name) if not version or r.version == version]
        if not snapshots:  # also refuses unknown models (NOT_FOUND) and models with no active version
            snapshots = [StatsSnapshot.empty(name, self.registry.resolve(name, version))]
        return kserve_pb.ModelStatisticsResponse(model_stats=[_statistics(s) for s in snapshots])


def _ood_tensor(answer: Answer) -> tuple[InferOutput, bytes]:
    """The `ood_score` output, with the method and threshold that say how to read it."""
    scores = np.ascontiguousarray(answer.ood_scores, dtype=np.float32)
    ood = answer.ood or OodSpec("max_softmax", None, None)
    output = InferOutput(name=OOD_OUTPUT_NAME, datatype="FP32", shape=scores.shape)
    output.parameters["ood_method"].string_param = ood.method
    if ood.threshold is not None:
        output.parameters["ood_threshold"].double_param = ood.threshold
    return output, scores.tobytes()


def _duration(value: Duration) -> kserve_pb.StatisticDuration:
    return kserve_pb.StatisticDuration(count=value.count, ns=value.ns)


def _statistics(stats: StatsSnapshot) -> kserve_pb.ModelStatistics:
    """Domain counters -> Triton's ModelStatistics (decoding is Triton's compute_input)."""
    return kserve_pb.ModelStatistics(
        name=stats.name, version=str(stats.version), last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=kserve_pb.InferStatistics(
            success=_duration(stats.success), fail=_duration(stats.fail), queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input), compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output)),
        batch_stats=[kserve_pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
                     for size, d in stats.batches.items()])
