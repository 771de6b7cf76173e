"""Bounded open streams for methods whose servicers are not ours (gRPC reflection).

grpc's sync server holds a pool thread for as long as a stream is open. Our own streaming
methods take an `admission.Slots` slot in their servicers; reflection's servicer comes from
grpcio-reflection, so its streams are admitted here: at most N open at once, the next one
refused with RESOURCE_EXHAUSTED naming the setting. Without it, 300 idle reflection streams
took every thread and health checks timed out.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import grpc

from headswap.admission import Slots
from headswap.errors import ResourceExhausted

REFLECTION_METHODS = frozenset({"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"})


class StreamLimit(grpc.ServerInterceptor):
    """Admit the stream-stream `methods` through one set of slots."""

    def __init__(self, methods: frozenset[str], slots: Slots) -> None:
        self.methods, self.slots = methods, slots

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.methods or handler.stream_stream is None:
            return handler
        behaviour, slots = handler.stream_stream, self.slots

        def admitted(requests: Iterator, context: grpc.ServicerContext) -> Iterator:
            try:
                with slots.take():  # raises ResourceExhausted when every slot is taken
                    yield from behaviour(requests, context)
            except ResourceExhausted as err:  # only take() raises it: the servicer is grpcio's
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))

        return grpc.stream_stream_rpc_method_handler(admitted, handler.request_deserializer,
                                                     handler.response_serializer)
