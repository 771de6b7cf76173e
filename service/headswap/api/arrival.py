"""Single-request calls: their message's arrival bounded per client address and in time, and the
bytes of the requests being handled bounded in all.

grpc's sync server gives a unary call a pool thread as soon as its headers arrive, and the thread
then waits, with no timeout, for the request message. A caller that sends headers and nothing
else holds that thread: 300 such calls from one unauthenticated client (health Check will do)
took every thread, and health checks timed out until the connections were closed minutes later.

Two defences, with `server.pool_size`:
- the pool has a thread for every call gRPC admits (`--max-concurrent-calls`), so a waiting call
  never queues another call behind it;
- `RequestArrival` reads the one request message itself, so it can bound the wait. Each method
  with a single request becomes a client-streaming one at the transport, which its callers cannot
  tell (the bytes on the wire are the same). At most `--max-waiting-calls-per-client` calls from
  one address wait at once; a message that has not arrived within `--request-arrival-timeout-s`
  ends the call with DEADLINE_EXCEEDED and a message naming the setting.

The message is read only once its call is admitted here: with grpc's window probing off
(`server.connection_options`), a stream buffers no more than its initial window before that. Once
received, a request's bytes count against `--max-request-bytes-in-flight` until it is answered
(32 concurrent 60 MB requests had taken the server to 1.9 GB resident).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator

import grpc

from headswap.admission import ByteBudget, SlotsPerKey
from headswap.api.reset_guard import ResetGuard
from headswap.api.status import count_refused
from headswap.deadlines import Deadlines
from headswap.errors import ResourceExhausted

log = logging.getLogger(__name__)


def client_address(peer: str) -> str:
    """The address part of grpc's peer string: 'ipv4:10.0.0.7:5123' -> 'ipv4:10.0.0.7',
    'ipv6:[::1]:5123' -> 'ipv6:[::1]'; a Unix socket peer stays whole."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from a thread other than its handler's, with `code` and `details`.

    The public `context.cancel()` can only send a bare CANCELLED, which tells a slow caller
    nothing; the call object behind the sync server's context can send a status with a message.
    That object is grpc's internal, so it is used only where it is there (the suite checks the
    message), with `cancel()` as the fallback.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is not None:
        try:
            call.cancel(code.value[0], details)
            return
        except Exception:  # noqa: BLE001 - grpc changed its internals: fall back to the public API
            log.debug("ending a call with a status failed; cancelling it", exc_info=True)
    context.cancel()


class _Wait:
    """One call waiting for its message: arrives, or expires, whichever comes first."""

    def __init__(self, context: grpc.ServicerContext, method: str, details: str) -> None:
        self.context = context
        self.method, self.details = method, details
        self._lock = threading.Lock()
        self.state = "waiting"

    def settle(self, state: str) -> bool:
        """Move from waiting to `state`; False when the other outcome came first."""
        with self._lock:
            if self.state != "waiting":
                return False
            self.state = state
            return True

    def expire(self) -> None:
        """At the deadline: end the call unless its message came first."""
        if self.settle("expired"):
            log.info("ended a call from %s: %s", self.context.peer(), self.details,
                     extra={"throttle": "late request message"})
            end_call(self.context, grpc.StatusCode.DEADLINE_EXCEEDED, self.details)
            count_refused(self.method, grpc.StatusCode.DEADLINE_EXCEEDED)


def message_bytes(request: Any) -> int:
    """A received request's size: its wire size, or the size of a body that did not parse."""
    size = getattr(request, "ByteSize", None)
    return size() if size is not None else int(getattr(request, "size", 0))


class RequestArrival(grpc.ServerInterceptor):
    """Receive each single-request call's message under a per-address limit and a time limit, and
    handle it within a budget of request bytes in flight."""

    def __init__(self, timeout_s: float, per_client: int, bytes_in_flight: int,
                 resets: ResetGuard | None = None) -> None:
        self.timeout_s = timeout_s
        self.resets = resets or ResetGuard(0)
        self.waiting = SlotsPerKey("calls from your address are waiting for their request message",
                                   per_client, "--max-waiting-calls-per-client")
        self.in_flight = ByteBudget("request bytes being handled", bytes_in_flight,
                                    "--max-request-bytes-in-flight")
        self._deadlines = Deadlines("arrival-deadlines")

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # unknown methods are refused by grpc; streams bound their own waits
        method = handler_call_details.method
        if handler.response_streaming:
            behaviour = handler.unary_stream

            def stream_out(requests: Iterator, context: grpc.ServicerContext) -> Iterator:
                request = self.receive(requests, context, method)
                with self.held(request, context, method):
                    yield from behaviour(request, context)

            return grpc.stream_stream_rpc_method_handler(stream_out, handler.request_deserializer,
                                                         handler.response_serializer)
        unary = handler.unary_unary

        def unary_out(requests: Iterator, context: grpc.ServicerContext) -> Any:
            request = self.receive(requests, context, method)
            with self.held(request, context, method):
                return unary(request, context)

        return grpc.stream_unary_rpc_method_handler(unary_out, handler.request_deserializer,
                                                    handler.response_serializer)

    @contextlib.contextmanager
    def held(self, request: Any, context: grpc.ServicerContext, method: str) -> Iterator[None]:
        """Count the request's bytes against the budget while it is handled; refuse it when they do
        not fit. (The message is in memory already, but refusing drops it at once, and the
        handling is what takes long: decoding hundreds of images, waiting for inference.)"""
        try:
            taken = self.in_flight.take(message_bytes(request))
        except ResourceExhausted as err:
            count_refused(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        with taken:
            yield
        self.resets.completed(context.peer())

    def receive(self, requests: Iterator, context: grpc.ServicerContext, method: str) -> Any:
        """The call's one request message. A call that ended while waiting for it is aborted here,
        which grpc takes quietly (returning nothing would log a failed serialisation)."""
        try:
            with self.waiting.take(client_address(context.peer())):
                wait = _Wait(context, method, f"{method}: the request message did not arrive within "
                                      f"{self.timeout_s:g} s of the call's headers "
                                      "(--request-arrival-timeout-s); send it with the call")
                due = self._deadlines.at(time.monotonic() + self.timeout_s, wait.expire)
                try:
                    request = next(requests)
                except StopIteration:
                    request = None
                except grpc.RpcError:  # ended at its deadline, or by the caller (a reset stream)
                    if wait.settle("ended"):  # the caller's doing, not our deadline's
                        self.resets.reset(context.peer())
                    context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request message arrived")
                finally:
                    # Every way out drops the deadline entry at once: a reset call left in the heap
                    # kept its context (and grpc's call) alive for --request-arrival-timeout-s, and a
                    # rapid-reset flood piled up millions of them (1.75 GB).
                    self._deadlines.cancel(due)
                if not wait.settle("arrived"):  # its deadline ended it as the message came in
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, wait.details)
        except ResourceExhausted as err:  # only take() raises it
            count_refused(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{method} takes exactly one request message; the call closed without sending one")
        return request
