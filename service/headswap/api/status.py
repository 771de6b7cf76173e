"""Domain errors -> gRPC status codes, request ids and per-call metrics, in one wrapper."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from typing import Any, Callable

import grpc

from headswap import errors, metrics
from headswap.api.labels import model_label

log = logging.getLogger("headswap.api")

# gRPC sends status details as trailing metadata, and a client drops a stream whose metadata
# passes its limit (16 KiB hard, by default) with a confusing error of its own: cut it well below.
MAX_DETAILS = 2000

STATUS_BY_ERROR: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.CorruptModel, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
]


def status_for(err: Exception) -> grpc.StatusCode:
    for kind, code in STATUS_BY_ERROR:
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


def request_id(context: grpc.ServicerContext) -> str:
    """The caller's x-request-id metadata, or a new id, to tie log lines to a call."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)[:128]
    return uuid.uuid4().hex[:16]


@functools.lru_cache(maxsize=4096)
def _children(method: str, model: str, version: str, code: str, protocol: str = "grpc") -> tuple[Any, Any]:
    """Prometheus label lookups cost microseconds per call: resolve each combination once."""
    return (metrics.REQUESTS.labels(method, model, version, code, protocol),
            metrics.REQUEST_LATENCY.labels(method, model, protocol))


def record(method: str, model: str, version: str, code: grpc.StatusCode, seconds: float, protocol: str) -> None:
    """Count and time one finished call. Label values only from models the registry holds: callers
    choose the names they send."""
    label = model_label(model)
    counter, histogram = _children(method, label, version[:20] if label == model else "", code.name, protocol)
    counter.inc()
    histogram.observe(seconds)


def count_refused(method: str, code: grpc.StatusCode, protocol: str = "grpc") -> None:
    """Count a call refused before its servicer ran (no credential, a body that is not protobuf, a
    request message that never came): its log line may be throttled, the metric never is.
    `method` is the full name ('/headswap.v1.Inference/Classify'); only served methods get here."""
    _children(method.rsplit("/", 1)[-1], "", "", code.name, protocol)[0].inc()


class CallScope:
    """One call: time it, count it, and turn a domain error into its gRPC status and message.

    Used by the `rpc` decorator for unary methods and directly (`with CallScope(...)`) by
    streaming handlers, so every method maps errors the same way.
    """

    def __init__(self, method: str, context: grpc.ServicerContext, model: str = "") -> None:
        self.method, self.context, self.model, self.version = method, context, model, ""

    def __enter__(self) -> "CallScope":
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        if err is None:
            self._record(grpc.StatusCode.OK)
            return False
        if isinstance(err, grpc.RpcError) or not isinstance(err, Exception):
            # The client went away (a closed stream raises GeneratorExit): nothing to answer.
            self._record(grpc.StatusCode.CANCELLED)
            return False
        if isinstance(err, errors.HeadswapError):
            code, message = status_for(err), str(err)
            if len(message) > MAX_DETAILS:
                message = f"{message[:MAX_DETAILS]}... (message cut from {len(message)} characters)"
            log.info("%s failed: %s", self.method, message,
                     extra={"request_id": request_id(self.context), "code": code.name,
                            "throttle": f"{self.method} {code.name}"})
        else:
            code, rid = grpc.StatusCode.INTERNAL, request_id(self.context)
            log.error("%s crashed", self.method, exc_info=(kind, err, traceback), extra={"request_id": rid})
            message = f"internal error ({type(err).__name__}); request id {rid}"
        self._record(code)
        self.context.abort(code, message)  # raises: ends the call with this status
        return False

    def _record(self, code: grpc.StatusCode) -> None:
        record(self.method, self.model, self.version, code, time.perf_counter() - self.started, "grpc")


def rpc(method: str, model_of: Callable[[Any], str] = lambda request: "") -> Callable:
    """Wrap a unary servicer method in a CallScope; the response names the model and version.

    `model_of` names the model a request is for, for metrics when the call fails early.
    """

    def decorate(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def wrapper(self, request, context: grpc.ServicerContext):
            with CallScope(method, context, model_of(request)) as scope:
                response = handler(self, request, context)
                scope.model = str(getattr(response, "model", "") or getattr(response, "model_name", "")
                                  or scope.model)
                scope.version = str(getattr(response, "version", "") or getattr(response, "model_version", ""))
                return response

        return wrapper

    return decorate
