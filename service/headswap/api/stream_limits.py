"""Bounded open streams for methods whose servicers are not ours (gRPC reflection, health Watch).

grpc's sync server holds a pool thread for as long as a stream is open. Our own streaming
methods take an `admission.Slots` slot in their servicers; the reflection and health servicers
come from grpcio-reflection and grpcio-health-checking, so their streams are admitted here: at
most N open at once, the next one refused with RESOURCE_EXHAUSTED naming the setting. Without
it, 300 idle reflection streams, or 300 health Watch streams from an unauthenticated caller,
took every thread and health checks timed out.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import grpc

from headswap.admission import Slots
from headswap.errors import ResourceExhausted

REFLECTION_METHODS = frozenset({"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"})
HEALTH_WATCH = frozenset({"/grpc.health.v1.Health/Watch"})


class StreamLimit(grpc.ServerInterceptor):
    """Admit the response-streaming `methods` through one set of slots."""

    def __init__(self, methods: frozenset[str], slots: Slots) -> None:
        self.methods, self.slots = methods, slots

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.methods or not handler.response_streaming:
            return handler
        behaviour, slots = handler.stream_stream or handler.unary_stream, self.slots

        def admitted(request: Any, context: grpc.ServicerContext) -> Iterator:
            try:
                with slots.take():  # raises ResourceExhausted when every slot is taken
                    yield from behaviour(request, context)
            except ResourceExhausted as err:  # only take() raises it: the servicer is grpcio's
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(admitted, handler.request_deserializer,
                                                         handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(admitted, handler.request_deserializer,
                                                    handler.response_serializer)
