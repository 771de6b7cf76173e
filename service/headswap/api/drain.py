"""The calls in progress, so that a drain can end the ones still running at its limit.

On SIGTERM grpc's `server.stop(grace)` cancels what is left at `grace` with a bare CANCELLED, and
the event it returns waits for every handler to return. A handler busy on the CPU (256 images to
decode and classify) does not notice a cancel until its work is done: under overload draining
took 15 s against a 10 s --grace-period-s, and the container was killed. Here every call is
known, and at the limit each one still running is ended with UNAVAILABLE and a message (from
this thread: `arrival.end_call`), which tells a client to send it again elsewhere; the server
then stops waiting for the handlers (server.py bounds every step after the limit).

New calls are refused here during the drain (UNAVAILABLE; health checks still answer, NOT_SERVING),
and grpc's own stop comes only after: a status sent from another thread once grpc's shutdown had
begun did not reach the client (the connection closed with "Stream removed" instead).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import grpc

from headswap.api.arrival import end_call

# The process exits within --grace-period-s plus this after SIGTERM, whatever is still running
# (tests/test_deploy.py checks that the manifests' stop timeouts leave a margin beyond it).
DRAIN_EXIT_MARGIN_S = 1.0

# Answered even while draining: probes must see NOT_SERVING, not an error.
ALWAYS_ANSWERED = frozenset({"/grpc.health.v1.Health/Check"})


class CallsInProgress(grpc.ServerInterceptor):
    """Tracks the context of every call while its handler runs; outermost interceptor."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._calls: dict[int, grpc.ServicerContext] = {}
        self._refusal: str | None = None  # set when draining: new calls get it with UNAVAILABLE

    def __len__(self) -> int:
        with self._lock:
            return len(self._calls)

    @contextlib.contextmanager
    def _tracked(self, context: grpc.ServicerContext, method: str) -> Iterator[None]:
        with self._lock:
            refusal = None if method in ALWAYS_ANSWERED else self._refusal
            if refusal is None:
                self._calls[id(context)] = context
        if refusal is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, refusal)
        try:
            yield
        finally:
            with self._lock:
                self._calls.pop(id(context), None)
                self._lock.notify_all()

    def refuse_new(self, details: str) -> None:
        """From now on, new calls (health checks aside) are refused with UNAVAILABLE and `details`."""
        with self._lock:
            self._refusal = details

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every call in progress to end; True when none is left."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._calls, max(0.0, timeout))

    def end_all(self, code: grpc.StatusCode, details: str) -> int:
        """End every call in progress with `code` and `details`; returns how many were ended."""
        with self._lock:
            calls = list(self._calls.values())
        for context in calls:
            end_call(context, code, details)
        return len(calls)

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        tracked = lambda context: self._tracked(context, method)  # noqa: E731
        if handler.response_streaming:
            behaviour = handler.stream_stream or handler.unary_stream

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator:
                with tracked(context):
                    yield from behaviour(request, context)

            make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                    else grpc.unary_stream_rpc_method_handler)
            return make(streaming, handler.request_deserializer, handler.response_serializer)
        behaviour = handler.stream_unary or handler.unary_unary

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            with tracked(context):
                return behaviour(request, context)

        make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
        return make(unary, handler.request_deserializer, handler.response_serializer)
