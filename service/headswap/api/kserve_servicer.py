"""KServe V2 / Triton gRPC inference protocol (`inference.GRPCInferenceService`): protobuf <-> domain.

Lets `tritonclient.grpc` (and any Open Inference Protocol client) call headswap unchanged. The
protocol's rules, messages and descriptions are `inference_protocol`'s (shared with the REST app);
this servicer only turns protobuf messages into its objects and back. What is gRPC's own:

- data may come in `raw_input_contents` (tritonclient's default) or in `contents`
  (fp32_contents / uint_contents / bytes_contents), not both;
- the gRPC deadline is the call's deadline (Triton's `timeout` parameter may tighten it).

Repository control follows Triton's explicit mode, with one difference: an unloaded model is
loaded again on demand by the next inference request that names it (as headswap.v1 does).
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from headswap.api.auth import caller_key, routing_key
from headswap.api.inference_protocol import (InferenceProtocol, InferRequest, InferResponse, InputTensor,
                                             OutputTensor, RequestedOutput)
from headswap.api.inference_servicer import deadline_of, stopped
from headswap.api.status import rpc
from headswap.errors import InvalidInput
from headswap.protocol import kserve_v2_pb2 as kserve_pb
from headswap.protocol import kserve_v2_pb2_grpc as kserve_grpc

InferOutput = kserve_pb.ModelInferResponse.InferOutputTensor


def parameter_values(parameters) -> dict[str, Any]:
    """InferParameter map -> plain values (int64/uint64 -> int, bool, str, double -> float)."""
    values = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, kind) if kind else None
    return values


def infer_request(request: kserve_pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the protocol's InferRequest (raw bytes stay views, no copy)."""
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raws)} entries for {len(request.inputs)} input"
                           f"{'s' if len(request.inputs) != 1 else ''}")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        raw = raws[i] if raws else None
        values: np.ndarray | list[bytes] | None = None
        if tensor.HasField("contents"):
            if raw is not None:
                raise InvalidInput(f"input {tensor.name!r} has data both in contents and in raw_input_contents")
            contents = tensor.contents
            if tensor.datatype == "BYTES":
                values = list(contents.bytes_contents)
            elif tensor.datatype == "UINT8":
                values = np.array(contents.uint_contents, dtype=np.uint32)
            else:
                values = np.array(contents.fp32_contents, dtype=np.float32)
        inputs.append(InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), raw, values,
                                  parameter_values(tensor.parameters) if tensor.parameters else {}))
    outputs = [RequestedOutput(o.name, parameter_values(o.parameters) if o.parameters else {})
               for o in request.outputs]
    return InferRequest(request.model_name, request.model_version, request.id, inputs, outputs,
                        parameter_values(request.parameters) if request.parameters else {})


def infer_response(response: InferResponse) -> kserve_pb.ModelInferResponse:
    return kserve_pb.ModelInferResponse(
        model_name=response.model, model_version=response.version, id=response.id,
        outputs=[infer_output(o) for o in response.outputs], raw_output_contents=[o.raw() for o in response.outputs])


def infer_output(output: OutputTensor) -> InferOutput:
    """An output's description; its parameters (ood_score's method and threshold) as typed values."""
    tensor = InferOutput(name=output.name, datatype=output.datatype, shape=output.shape)
    for key, value in output.parameters.items():
        if isinstance(value, str):
            tensor.parameters[key].string_param = value
        else:
            tensor.parameters[key].double_param = float(value)
    return tensor


class KServeServicer(kserve_grpc.GRPCInferenceServiceServicer):
    """The KServe V2 data plane and model repository extension over `InferenceProtocol`."""

    def __init__(self, protocol: InferenceProtocol) -> None:
        self.protocol = protocol

    # --- health and metadata ---------------------------------------------------------------

    @rpc("ServerLive")
    def ServerLive(self, request, context) -> kserve_pb.ServerLiveResponse:
        return kserve_pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    def ServerReady(self, request, context) -> kserve_pb.ServerReadyResponse:
        return kserve_pb.ServerReadyResponse(ready=self.protocol.server_ready())

    @rpc("ModelReady", lambda r: r.name)
    def ModelReady(self, request, context) -> kserve_pb.ModelReadyResponse:
        return kserve_pb.ModelReadyResponse(ready=self.protocol.model_ready(request.name, request.version))

    @rpc("ServerMetadata")
    def ServerMetadata(self, request, context) -> kserve_pb.ServerMetadataResponse:
        return json_format.ParseDict(self.protocol.server_metadata(), kserve_pb.ServerMetadataResponse())

    @rpc("ModelMetadata", lambda r: r.name)
    def ModelMetadata(self, request, context) -> kserve_pb.ModelMetadataResponse:
        return json_format.ParseDict(self.protocol.model_metadata(request.name, request.version),
                                     kserve_pb.ModelMetadataResponse())

    # --- inference -------------------------------------------------------------------------

    @rpc("ModelInfer", lambda r: r.model_name)
    def ModelInfer(self, request: kserve_pb.ModelInferRequest, context: grpc.ServicerContext
                   ) -> kserve_pb.ModelInferResponse:
        answer = self.protocol.infer(infer_request(request), caller_key(context), deadline_of(context),
                                     stopped(context), routing_key(context))
        return infer_response(answer)

    # --- model repository ------------------------------------------------------------------

    @rpc("RepositoryIndex")
    def RepositoryIndex(self, request, context) -> kserve_pb.RepositoryIndexResponse:
        return kserve_pb.RepositoryIndexResponse(models=[
            kserve_pb.RepositoryIndexResponse.ModelIndex(**entry)
            for entry in self.protocol.repository_index(request.ready)])

    @rpc("RepositoryModelLoad", lambda r: r.model_name)
    def RepositoryModelLoad(self, request, context) -> kserve_pb.RepositoryModelLoadResponse:
        self.protocol.load(request.model_name, dict(request.parameters))
        return kserve_pb.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload", lambda r: r.model_name)
    def RepositoryModelUnload(self, request, context) -> kserve_pb.RepositoryModelUnloadResponse:
        self.protocol.unload(request.model_name)
        return kserve_pb.RepositoryModelUnloadResponse()

    # --- Triton's configuration and statistics calls (what perf_analyzer reads) -------------

    @rpc("ModelConfig", lambda r: r.name)
    def ModelConfig(self, request, context) -> kserve_pb.ModelConfigResponse:
        config = self.protocol.model_config(request.name, request.version)
        return kserve_pb.ModelConfigResponse(config=json_format.ParseDict(config, kserve_pb.ModelConfig()))

    @rpc("ModelStatistics", lambda r: r.name)
    def ModelStatistics(self, request, context) -> kserve_pb.ModelStatisticsResponse:
        return json_format.ParseDict(self.protocol.model_statistics(request.name, request.version),
                                     kserve_pb.ModelStatisticsResponse())
