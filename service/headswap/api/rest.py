"""The Open Inference Protocol over REST (KServe V2 / Triton HTTP): JSON and binary bodies <-> domain.

Endpoints (all under /v2): health live/ready (open to every caller), server metadata, model
metadata, model ready, infer, and Triton's model config and statistics, each for the active version
or `/versions/{v}`. Rules, messages and descriptions are `inference_protocol`'s, shared with the gRPC
servicer; who may call what is `auth`'s table (each endpoint counts as the KServe V2 gRPC method it
stands for); errors are `{"error": "..."}` with the HTTP status of the gRPC status the same request
gets over gRPC.

Request bodies: JSON, or Triton's binary-data extension: an `Inference-Header-Content-Length`
header says how many bytes of JSON come first, and each input with a `binary_data_size` parameter
takes that many bytes of what follows, in order. Outputs come back as binary data when the request
asks (`binary_data_output`, or `binary_data` per output: tritonclient's default), else as JSON.
BYTES elements in JSON are text, or base64 with the tensor parameter `content_type: "base64"`
(how a `curl` caller sends a JPEG).

Bounds: the body is at most --max-message-bytes (413, before it is read) and counts against
--max-request-bytes-in-flight while handled (429); JSON counts JSON_COST times its size there, as
Python holds about that much memory for its parsed numbers. Bodies that stall are cut by the server's
arrival timeout (`http_server`).

Threads: each inference request runs in a worker thread (parsing, then waiting for its batch) under
Linux's SCHED_BATCH (`_yield_to_inference`), so the HTTP side does not preempt inference lanes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable

import anyio
import grpc
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from headswap import errors
from headswap.admission import ByteBudget, SlotsPerKey
from headswap.api.auth import OPEN, ROUTING_KEY, Denied, admit, key_of, routing_key_of, scope_for
from headswap.api.http_server import IDENTITIES
from headswap.api.inference_protocol import (InferenceProtocol, InferRequest, InferResponse, InputTensor,
                                             RequestedOutput, whole_number)
from headswap.api.status import MAX_DETAILS, record, status_for
from headswap.errors import InvalidInput, ResourceExhausted, shown_name
from headswap.security.credentials import CredentialStore

log = logging.getLogger("headswap.api")

HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
JSON_COST = 8  # bytes of memory per byte of JSON while parsed (a list of Python floats)
HEADER_LENGTH = "inference-header-content-length"
_KSERVE = "/inference.GRPCInferenceService/"


class TooLarge(ResourceExhausted):
    """A body past --max-message-bytes: 413, and the connection is closed (its rest is never read)."""


def client_address(request: Request) -> str:
    """The caller's address as gRPC names it ('ipv4:10.0.0.7', 'ipv6:[::1]'): an unauthenticated
    caller has one per-caller count over both protocols."""
    host = request.client.host if request.client else "unknown"
    return f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}"


def error_response(status: int, message: str, close: bool = False) -> Response:
    if len(message) > MAX_DETAILS:
        message = f"{message[:MAX_DETAILS]}... (message cut from {len(message)} characters)"
    headers = {"connection": "close"} if close else None
    return Response(json.dumps({"error": message}), status, headers, media_type="application/json")


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, media_type="application/json")


# --- bodies <-> protocol objects ---------------------------------------------------------------------


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(entry: dict, what: str) -> dict:
    parameters = entry.get("parameters", {})
    return _object(parameters, f"{what} parameters") if parameters is not None else {}


def _text(entry: dict, key: str, what: str, required: bool = True) -> str:
    value = entry.get(key, None if required else "")
    if not isinstance(value, str):
        raise InvalidInput(f"{what} needs a string {key!r}" + ("" if value is None else
                                                               f", got {type(value).__name__}"))
    return value


def _shape(entry: dict, what: str) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidInput(f"{what} needs a 'shape': a list of integers")
    return tuple(shape)


def _flat(data: Any, what: str) -> list:
    """A JSON `data` array, flat or nested, as one flat list."""
    if not isinstance(data, list):
        raise InvalidInput(f"{what}: 'data' must be a JSON array, flat or nested")
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_values(data: Any, datatype: str, parameters: dict, what: str) -> np.ndarray | list[bytes]:
    """JSON `data` as typed values: numbers as a numpy array, BYTES as bytes (text, or base64)."""
    flat = _flat(data, what)
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in flat):
            raise InvalidInput(f"{what}: BYTES data must be strings")
        if parameters.get("content_type") == "base64":
            try:
                return [base64.b64decode(item, validate=True) for item in flat]
            except (binascii.Error, ValueError):
                raise InvalidInput(f"{what}: an element is not valid base64 (content_type 'base64')") from None
        return [item.encode() for item in flat]
    if not all(type(item) in (int, float) for item in flat):
        raise InvalidInput(f"{what}: {datatype} data must be numbers")
    try:
        return np.array(flat) if flat else np.zeros(0, np.float32)
    except (OverflowError, ValueError):
        raise InvalidInput(f"{what}: a number is out of range for {datatype}") from None


def parse_infer_body(body: bytes, header_length: int | None, model: str, version: str) -> tuple[InferRequest, bool, set[str]]:
    """The request; whether outputs go back as binary data by default, and the outputs named with
    binary_data true."""
    view = memoryview(body)
    text = view[:header_length] if header_length is not None else view
    try:
        document = json.loads(bytes(text))
    except RecursionError:
        raise InvalidInput("the JSON request is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidInput(f"the request is not valid JSON: {err}") from None
    document = _object(document, "the request")
    binary = view[header_length:] if header_length is not None else view[:0]
    offset = 0
    inputs = []
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInput("the request needs 'inputs': a list of input tensors")
    for i, entry in enumerate(raw_inputs):
        entry = _object(entry, f"input {i}")
        name = _text(entry, "name", f"input {i}")
        what = f"input {shown_name(name)}"
        datatype = _text(entry, "datatype", what)
        shape = _shape(entry, what)
        parameters = _parameters(entry, what)
        raw = values = None
        if "binary_data_size" in parameters:
            size = whole_number(parameters["binary_data_size"], f"{what}: binary_data_size", 0,
                                "a whole number of bytes")
            if "data" in entry:
                raise InvalidInput(f"{what} has both 'data' and binary_data_size; send one")
            if offset + size > len(binary):
                raise InvalidInput(f"{what}: binary_data_size {size} runs past the end of the body ({len(binary)} "
                                   f"bytes of binary data follow the JSON header, {len(binary) - offset} of them "
                                   "not yet taken)")
            raw = binary[offset:offset + size]
            offset += size
            parameters = {k: v for k, v in parameters.items() if k != "binary_data_size"}
        elif "data" in entry:
            values = _json_values(entry["data"], datatype, parameters, what)
        else:
            raise InvalidInput(f"{what} has no 'data' and no binary_data_size parameter")
        parameters = {k: v for k, v in parameters.items() if k != "content_type"}
        inputs.append(InputTensor(name, datatype, shape, raw, values, parameters))
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary) - offset} bytes after the JSON header that no input's "
                           "binary_data_size accounts for (Inference-Header-Content-Length or binary_data_size "
                           "is wrong)")
    request_parameters = _parameters(document, "the request")
    binary_default = request_parameters.get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise InvalidInput("the binary_data_output parameter must be true or false")
    outputs, binary_outputs = [], set()
    raw_outputs = document.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InvalidInput("'outputs' must be a list of requested outputs")
    for i, entry in enumerate(raw_outputs):
        entry = _object(entry, f"output {i}")
        name = _text(entry, "name", f"output {i}")
        parameters = _parameters(entry, f"output {shown_name(name)}")
        flag = parameters.get("binary_data", binary_default)
        if type(flag) is not bool:
            raise InvalidInput(f"output {shown_name(name)}: the binary_data parameter must be true or false")
        if flag:
            binary_outputs.add(name)
        outputs.append(RequestedOutput(name, {k: v for k, v in parameters.items() if k != "binary_data"}))
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("the request 'id' must be a string")
    request_parameters = {k: v for k, v in request_parameters.items() if k != "binary_data_output"}
    return (InferRequest(model, version, request_id, inputs, outputs, request_parameters),
            binary_default and not raw_outputs, binary_outputs)


def infer_body(response: InferResponse, binary_all: bool, binary_names: set[str]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follow it."""
    outputs, blobs = [], []
    for output in response.outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if output.parameters:
            entry["parameters"] = dict(output.parameters)
        if binary_all or output.name in binary_names:
            blob = output.raw()
            entry.setdefault("parameters", {})["binary_data_size"] = len(blob)
            blobs.append(blob)
        elif output.datatype == "BYTES":
            entry["data"] = [item.decode(errors="replace") for item in output.data]  # type: ignore[union-attr]
        else:
            entry["data"] = np.asarray(output.data).ravel().tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model, "model_version": response.version, "outputs": outputs}
    if response.id:
        document["id"] = response.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


# --- the app ------------------------------------------------------------------------------------------


_worker_state = threading.local()


def _yield_to_inference() -> None:
    """Run the calling request thread under Linux's SCHED_BATCH from now on (set once per thread).

    Under load the inference lanes keep every core busy. A request thread woken by a finished batch
    or a new request would preempt a lane in the middle of its batch; under SCHED_BATCH it waits for
    the next scheduling point instead (a few ms at most), and on an idle core it runs at once, so a
    lone caller waits no longer. Measured on 2 cores, 16 REST clients: 1.03-1.07x the images/s, the
    same p99; 1 and 4 clients unchanged (docs/performance.md). gRPC's handler threads measured no
    gain (1.01x), so they keep the default policy. Where there is no SCHED_BATCH this does nothing."""
    if getattr(_worker_state, "batch", False):
        return
    _worker_state.batch = True
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: this thread, on Linux


class RestApp:
    """The endpoints over `InferenceProtocol`, behind the same credentials and bounds as gRPC."""

    def __init__(self, protocol: InferenceProtocol, credentials: CredentialStore | None, mutual_tls: bool,
                 serving: Callable[[], bool], max_message_bytes: int, bytes_in_flight: int,
                 waiting_per_client: int, max_inference_calls: int) -> None:
        self.protocol = protocol
        self.credentials, self.mutual_tls = credentials, mutual_tls
        self.serving = serving  # ready and not draining
        self.max_message_bytes = max_message_bytes
        self.in_flight = ByteBudget("request bytes being handled", bytes_in_flight, "--max-request-bytes-in-flight")
        self.waiting = SlotsPerKey("requests from your address are waiting for their body", waiting_per_client,
                                   "--max-waiting-calls-per-client")
        self.threads = anyio.CapacityLimiter(max_inference_calls)
        version = "/versions/{version}"
        routes = [Route("/v2/health/live", self.live), Route("/v2/health/ready", self.ready),
                  Route("/v2", self.server_metadata), Route("/v2/models/stats", self.all_statistics)]
        for suffix in ("", version):
            base = "/v2/models/{model}" + suffix
            routes += [Route(base, self.model_metadata), Route(base + "/ready", self.model_ready),
                       Route(base + "/config", self.model_config), Route(base + "/stats", self.model_statistics),
                       Route(base + "/infer", self.infer, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                                Exception: self._crash})

    # --- one wrapper for every endpoint --------------------------------------------------------

    async def _call(self, request: Request, method: str, work: Callable[[], Any], model: str = "",
                    in_thread: bool = True, scope: str | None = None) -> Response:
        """Admit the caller, run `work` (a coroutine, or in a thread: registry reads may wait on a
        store), answer JSON or the error's status; count and time the call like gRPC's CallScope,
        with protocol=http."""
        started = time.perf_counter()
        code, version = grpc.StatusCode.OK, ""
        try:
            self._admit(request, method, scope)
            if asyncio.iscoroutinefunction(work):
                result = await work()
            else:
                result = await anyio.to_thread.run_sync(work, limiter=self.threads) if in_thread else work()
            response = result if isinstance(result, Response) else json_response(result)
            version = getattr(request.state, "version", "") or request.path_params.get("version", "")
        except Denied as denied:
            code, response = denied.code, error_response(HTTP_STATUS[denied.code], denied.message)
        except errors.HeadswapError as err:
            code = status_for(err)
            log.info("%s failed: %s", method, err, extra={"code": code.name, "throttle": f"http {method} {code.name}"})
            response = error_response(413 if isinstance(err, TooLarge) else HTTP_STATUS[code], str(err),
                                      close=isinstance(err, TooLarge))
        except ClientDisconnect:
            code, response = grpc.StatusCode.CANCELLED, error_response(499, "the client went away")
        except Exception as err:  # a bug: the trace in the log, a request id for the caller
            rid = uuid.uuid4().hex[:16]
            log.error("%s crashed", method, exc_info=err, extra={"request_id": rid})
            code = grpc.StatusCode.INTERNAL
            response = error_response(500, f"internal error ({type(err).__name__}); request id {rid}")
        record(method, model, version, code, time.perf_counter() - started, "http")
        return response

    def _admit(self, request: Request, method: str, scope: str | None) -> None:
        """The caller of a KServe method (`scope` None: the method's own scope from auth's table)."""
        scope = scope or scope_for(_KSERVE + method)
        identities = request.scope.get(IDENTITIES, []) if self.mutual_tls and scope != OPEN else []
        principal = admit(self.credentials, self.mutual_tls, _KSERVE + method, scope,
                          request.headers.get("authorization"), identities, protocol="http")
        request.state.caller = key_of(principal, client_address(request))
        request.state.principal = principal

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        message = {404: f"no such endpoint: {shown_name(request.url.path)} (the Open Inference Protocol's are "
                        "under /v2)", 405: f"{request.method} is not allowed on {shown_name(request.url.path)}"}
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)))

    async def _crash(self, request: Request, exc: Exception) -> Response:
        rid = uuid.uuid4().hex[:16]
        log.error("REST request crashed", exc_info=exc, extra={"request_id": rid})
        return error_response(500, f"internal error ({type(exc).__name__}); request id {rid}")

    # --- health and metadata -----------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return await self._call(request, "ServerLive", lambda: {"live": True}, in_thread=False, scope=OPEN)

    async def ready(self, request: Request) -> Response:
        ready = self.serving()
        return await self._call(request, "ServerReady", lambda: json_response({"ready": ready}, 200 if ready else 503),
                                in_thread=False, scope=OPEN)  # health is open, as grpc.health.v1 is

    async def server_metadata(self, request: Request) -> Response:
        return await self._call(request, "ServerMetadata", self.protocol.server_metadata, in_thread=False)

    async def model_metadata(self, request: Request) -> Response:
        model, version = request.path_params["model"], request.path_params.get("version", "")
        return await self._call(request, "ModelMetadata", lambda: self.protocol.model_metadata(model, version), model)

    async def model_ready(self, request: Request) -> Response:
        model, version = request.path_params["model"], request.path_params.get("version", "")

        def ready() -> Response:
            ok = self.protocol.model_ready(model, version)
            return json_response({"name": model, "ready": ok}, 200 if ok else 503)

        return await self._call(request, "ModelReady", ready, model)

    async def model_config(self, request: Request) -> Response:
        model, version = request.path_params["model"], request.path_params.get("version", "")
        return await self._call(request, "ModelConfig", lambda: self.protocol.model_config(model, version), model)

    async def model_statistics(self, request: Request) -> Response:
        model, version = request.path_params["model"], request.path_params.get("version", "")
        return await self._call(request, "ModelStatistics", lambda: self.protocol.model_statistics(model, version),
                                model)

    async def all_statistics(self, request: Request) -> Response:
        return await self._call(request, "ModelStatistics", lambda: self.protocol.model_statistics("", ""))

    # --- inference ---------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        model, version = request.path_params["model"], request.path_params.get("version", "")
        with contextlib.ExitStack() as held:  # what the request holds (its bytes in flight) until answered
            async def work_async() -> Response:
                header_length = self._header_length(request)
                routing_key = routing_key_of(request.headers.get(ROUTING_KEY), request.state.principal)
                body = await self._body(request, header_length, held)
                gone = threading.Event()
                watcher = asyncio.ensure_future(self._watch_disconnect(request, gone))
                try:
                    response, request.state.version = await anyio.to_thread.run_sync(
                        lambda: self._infer(body, header_length, model, version, request.state.caller, gone.is_set,
                                            routing_key),
                        limiter=self.threads)
                    return response
                finally:
                    watcher.cancel()

            return await self._call(request, "ModelInfer", work_async, model)

    def _header_length(self, request: Request) -> int | None:
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise InvalidInput(f"Content-Encoding {shown_name(encoding)} is not supported; send the body uncompressed")
        value = request.headers.get(HEADER_LENGTH)
        if value is None:
            return None
        if not value.isascii() or not value.isdigit() or len(value) > 12:
            raise InvalidInput(f"Inference-Header-Content-Length must be a whole number of bytes, got {shown_name(value)}")
        return int(value)

    async def _body(self, request: Request, header_length: int | None, held: contextlib.ExitStack) -> bytes:
        """Read the body within --max-message-bytes, its bytes held against the in-flight budget."""
        limit = self.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isascii() or not declared.isdigit():
                raise InvalidInput(f"Content-Length must be a whole number, got {shown_name(declared)}")
            size = int(declared)
            if size > limit:
                raise TooLarge(f"the request body has {size} bytes; the limit is {limit} (--max-message-bytes)")
            if header_length is not None and header_length > size:
                raise InvalidInput(f"Inference-Header-Content-Length ({header_length}) is larger than the body "
                                   f"({size} bytes)")
            json_part = size if header_length is None else header_length
            held.enter_context(self.in_flight.take(json_part * JSON_COST + size - json_part))
        chunks, received = [], 0
        with self.waiting.take(client_address(request)):  # only while the body arrives
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise TooLarge(f"the request body passed {limit} bytes (--max-message-bytes)")
                if declared is None:  # chunked: each piece is held as it comes
                    held.enter_context(self.in_flight.take(len(chunk) * JSON_COST))
                chunks.append(chunk)
        body = b"".join(chunks)
        if header_length is not None and header_length > len(body):
            raise InvalidInput(f"Inference-Header-Content-Length ({header_length}) is larger than the body "
                               f"({len(body)} bytes)")
        return body

    @staticmethod
    async def _watch_disconnect(request: Request, gone: threading.Event) -> None:
        """Set `gone` if the caller disconnects while its request is handled (its work then stops)."""
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()

    def _infer(self, body: bytes, header_length: int | None, model: str, version: str, caller: str,
               should_stop: Callable[[], bool], routing_key: str | None = None) -> tuple[Response, str]:
        """The response, and the version that answered (for the metrics)."""
        _yield_to_inference()
        infer_request, binary_all, binary_names = parse_infer_body(body, header_length, model, version)
        answer = self.protocol.infer(infer_request, caller, None, should_stop, routing_key)
        content, json_length = infer_body(answer, binary_all, binary_names)
        if json_length is None:
            return Response(content, media_type="application/json"), answer.version
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(json_length)}), answer.version
