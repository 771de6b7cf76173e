"""The REST port: uvicorn (httptools parser, asyncio) in its own thread, bounded like the gRPC port.

Chosen by measurement (docs/architecture.md): with 16 keep-alive clients posting a 150 KB binary
request, uvicorn + httptools spent 0.28 ms of server CPU per request, cheroot (threaded WSGI) 0.43-0.52
and uvicorn + h11 0.44. An idle or slow connection costs a socket and a few KB, not a thread.

uvicorn leaves some bounds to its user; `BoundedHttpProtocol` adds them where bytes arrive:
- connections: at most --max-connections open at once; more are closed on arrival; a TLS handshake
  not finished within --handshake-timeout-s closes the connection (asyncio's own bound is 60 s);
- request arrival: a request's line, headers and body must all arrive within
  --request-arrival-timeout-s of its first byte (a slowloris on headers or body gets 408 and the
  connection is closed); an idle keep-alive connection is closed after --connection-idle-timeout-s;
- headers: at most --http-max-headers fields and --http-max-header-bytes bytes (431, closed);
- malformed HTTP (and upgrades: websockets, h2c) gets 400 and the connection is closed.
Bodies (--max-message-bytes, --max-request-bytes-in-flight) are bounded by the app (`api.rest`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from headswap import metrics
from headswap.api.tls import RotatingSslContext

log = logging.getLogger(__name__)

IDENTITIES = "headswap.client_identities"  # ASGI scope key: the verified client certificate's names


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int
    arrival_timeout_s: float
    max_headers: int
    max_header_bytes: int


class _Refused(Exception):
    """Stops the parser after the connection was answered and closed."""


def certificate_identities(peercert: dict | None) -> list[str]:
    """A verified client certificate's subject alternative names, then its common name (the same
    names, in the same order, as the gRPC port takes from its auth context)."""
    if not peercert:
        return []
    names = [str(value) for _, value in peercert.get("subjectAltName", ())]
    for rdn in peercert.get("subject", ()):
        names += [str(value) for key, value in rdn if key == "commonName"]
    return names


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module docstring."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.limits: HttpLimits = self.config.headswap_limits  # type: ignore[attr-defined]
        self._refused = False
        self._arrival: asyncio.TimerHandle | None = None
        self._header_count = self._header_bytes = 0
        ssl_object = transport.get_extra_info("ssl_object")
        self._identities = certificate_identities(ssl_object.getpeercert()) if ssl_object is not None else []
        if len(self.connections) > self.limits.max_connections:
            metrics.CONNECTIONS_CLOSED.labels("http_max_connections").inc()
            self._refused = True
            transport.abort()
            return
        self._start_arrival()  # the first request's bytes are due too

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_arrival()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        self._start_arrival()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades (websockets, h2c) are not served on this port")
        except httptools.HttpParserError as err:
            if not self._refused:
                self._reject(400, f"malformed HTTP/1.1 request ({err}); the connection is closed")

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = self._header_bytes = 0
        self.scope[IDENTITIES] = self._identities  # type: ignore[literal-required]

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._reject(431, f"the request has more than {self.limits.max_headers} header fields "
                              "(--http-max-headers)")
            raise _Refused()
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        self._stop_arrival()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._stop_arrival()  # the next request's timer starts with its first byte

    # --- bounds ------------------------------------------------------------------------------

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            self._reject(431, f"the request line and headers pass {self.limits.max_header_bytes} bytes "
                              "(--http-max-header-bytes)")
            raise _Refused()

    def _start_arrival(self) -> None:
        if self._arrival is None and not self._refused:
            self._arrival = self.loop.call_later(self.limits.arrival_timeout_s, self._late)

    def _stop_arrival(self) -> None:
        if self._arrival is not None:
            self._arrival.cancel()
            self._arrival = None

    def _late(self) -> None:
        self._arrival = None
        if self.cycle is not None and self.cycle.response_started:  # answered early (413): just close
            self.transport.close()
            return
        self._reject(408, f"the request did not arrive within {self.limits.arrival_timeout_s:g} s of its first "
                          "byte (--request-arrival-timeout-s); send the headers and body without pauses")

    def _reject(self, status: int, message: str) -> None:
        """Answer `status` with a JSON error (when no response has started) and close the connection."""
        if self._refused:
            return
        self._refused = True
        self._stop_arrival()
        metrics.CONNECTIONS_CLOSED.labels(f"http_{status}").inc()
        cycle = self.cycle
        started = cycle is not None and cycle.response_started
        if cycle is not None:
            cycle.disconnected = True  # the app's next receive() sees a disconnect; its send() does nothing
            cycle.message_event.set()
        if not started and not self.transport.is_closing():
            body = json.dumps({"error": message}).encode()
            reason = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
            self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()


class _HandshakeBoundLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, with TLS handshakes bounded by --handshake-timeout-s (uvicorn passes no bound)."""

    def __init__(self, handshake_timeout_s: float) -> None:
        super().__init__()
        self.handshake_timeout_s = handshake_timeout_s

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.base_events.Server:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self.handshake_timeout_s)
        return await super().create_server(*args, **kwargs)


class HttpServer:
    """An ASGI app served by uvicorn on a socket bound up front (port errors surface at start)."""

    def __init__(self, app: Any, limits: HttpLimits, idle_timeout_s: float, handshake_timeout_s: float,
                 tls: RotatingSslContext | None) -> None:
        self.tls = tls
        self.handshake_timeout_s = handshake_timeout_s
        self.config = uvicorn.Config(app, http=BoundedHttpProtocol, loop="asyncio", lifespan="off", ws="none",
                                     log_config=None, access_log=False, server_header=False,
                                     timeout_keep_alive=max(1, round(idle_timeout_s)),
                                     callback_notify=self._refresh_tls, timeout_notify=1)
        self.config.headswap_limits = limits  # type: ignore[attr-defined]
        self.server = uvicorn.Server(self.config)
        self.socket: socket.socket | None = None
        self.thread: threading.Thread | None = None
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # caller-driven lines stay out of the log
            logging.getLogger(name).setLevel(logging.ERROR)

    async def _refresh_tls(self) -> None:
        if self.tls is not None:
            self.tls.refresh()

    def bind(self, host: str, port: int) -> int:
        """Bind and listen now (OSError for a port in use); the port bound."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without
        # it every response (headers and body are two writes) waited ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        return sock.getsockname()[1]

    def start(self) -> None:
        self.config.load()
        self.config.ssl = self.tls.context if self.tls is not None else None
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=lambda: _HandshakeBoundLoop(self.handshake_timeout_s)) as runner:
            runner.run(self.server.serve(sockets=[self.socket]))

    def stop(self, grace_s: float) -> None:
        """Stop listening, let requests in progress finish within `grace_s`, then end."""
        self.config.timeout_graceful_shutdown = max(0.1, grace_s)
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(grace_s + 1.0)
