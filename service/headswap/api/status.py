"""Domain errors -> gRPC status codes, request ids and per-call metrics, in one wrapper."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from typing import Any, Callable

import grpc

from headswap import errors, metrics

log = logging.getLogger("headswap.api")

STATUS_BY_ERROR: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.CorruptModel, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
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
def _children(method: str, model: str, version: str, code: str) -> tuple[Any, Any]:
    """Prometheus label lookups cost microseconds per call: resolve each combination once."""
    return (metrics.REQUESTS.labels(method, model, version, code),
            metrics.REQUEST_LATENCY.labels(method, model))


def _record(method: str, model: str, version: str, code: str, seconds: float) -> None:
    counter, histogram = _children(method, model, version, code)
    counter.inc()
    histogram.observe(seconds)


def rpc(method: str, model_of: Callable[[Any], str] = lambda request: "") -> Callable:
    """Wrap a unary servicer method: map errors to status codes, count and time the call.

    `model_of` names the model a request is for, for metrics when the call fails early.
    """

    def decorate(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def wrapper(self, request, context: grpc.ServicerContext):
            started = time.perf_counter()
            model, version = model_of(request), ""
            code = grpc.StatusCode.OK
            try:
                response = handler(self, request, context)
                model = str(getattr(response, "model", "") or getattr(response, "model_name", "") or model)
                version = str(getattr(response, "version", "") or getattr(response, "model_version", ""))
                return response
            except errors.HeadswapError as err:
                code = status_for(err)
                log.info("%s failed: %s", method, err, extra={"request_id": request_id(context), "code": code.name})
                context.abort(code, str(err))
            except Exception as err:
                code = grpc.StatusCode.INTERNAL
                rid = request_id(context)
                log.exception("%s crashed", method, extra={"request_id": rid})
                context.abort(code, f"internal error ({type(err).__name__}); request id {rid}")
            finally:
                _record(method, model, version, code.name, time.perf_counter() - started)

        return wrapper

    return decorate
