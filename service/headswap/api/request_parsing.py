"""Requests whose bytes are not a valid protobuf message get INVALID_ARGUMENT, not INTERNAL.

grpc parses a request before any servicer code runs; when parsing fails it logs a traceback and
answers INTERNAL ("Exception deserializing request!"). This interceptor wraps every method's
parser so a malformed body becomes a marker the method answers with INVALID_ARGUMENT, naming the
message type expected.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import grpc

from headswap.api.status import count_refused
from headswap.errors import InvalidInput

log = logging.getLogger("headswap.api")


class Malformed:
    """Stands for a request body that did not parse."""

    def __init__(self, size: int, error: Exception) -> None:
        self.size = size
        self.error = error

    def message(self, method: str) -> str:
        return (f"{method}: the request body ({self.size} bytes) is not a valid protobuf message "
                f"for this method ({type(self.error).__name__}); check the client's generated code")


def _safe_parser(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None

    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as err:  # protobuf raises DecodeError, and others on invalid UTF-8
            return Malformed(len(data), err)

    return parse_or_mark


def _unary(behavior: Callable, method: str) -> Callable:
    def handle(request, context: grpc.ServicerContext):
        if isinstance(request, Malformed):
            log.info("%s refused: %s", method, request.message(method), extra={"throttle": f"{method} malformed"})
            count_refused(method, grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
        return behavior(request, context)

    return handle


class MalformedMessage(InvalidInput):
    """A malformed message inside a request stream (INVALID_ARGUMENT through CallScope)."""


def _checked(requests: Iterator, method: str) -> Iterator:
    for request in requests:
        if isinstance(request, Malformed):
            raise MalformedMessage(request.message(method))  # the servicer's CallScope answers it
        yield request


def _streaming(behavior: Callable, method: str, response_streaming: bool) -> Callable:
    """Servicers with a CallScope answer MalformedMessage themselves; for the others (reflection)
    it reaches this wrapper, which answers INVALID_ARGUMENT instead of grpc's UNKNOWN + traceback."""

    def handle(requests, context: grpc.ServicerContext):
        try:
            result = behavior(_checked(requests, method), context)
        except MalformedMessage as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if not response_streaming:
            return result
        return _responses(result, context)

    return handle


def _responses(responses: Iterator, context: grpc.ServicerContext) -> Iterator:
    try:
        yield from responses
    except MalformedMessage as err:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Wraps each method handler's request parser (see the module docstring)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not hasattr(handler, "_replace"):
            return handler
        method = handler_call_details.method
        changes: dict[str, Any] = {"request_deserializer": _safe_parser(handler.request_deserializer)}
        if handler.unary_unary is not None:
            changes["unary_unary"] = _unary(handler.unary_unary, method)
        if handler.unary_stream is not None:
            changes["unary_stream"] = _unary(handler.unary_stream, method)
        if handler.stream_unary is not None:
            changes["stream_unary"] = _streaming(handler.stream_unary, method, response_streaming=False)
        if handler.stream_stream is not None:
            changes["stream_stream"] = _streaming(handler.stream_stream, method, response_streaming=True)
        return handler._replace(**changes)
