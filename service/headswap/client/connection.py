"""Where the server is and how to reach it: the channel every client call goes through.

TLS when a CA or client certificate is given, and a bearer token on every call when one is
given (also over plaintext, for loopback use). The CLI builds the same `Connection` from its flags.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_TARGET = "localhost:50051"
# The server's own message limit is configurable (--max-message-bytes); the client never refuses first.
MESSAGE_LIMIT = 256 * 1024 * 1024


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to prove who we are to it."""

    target: str = DEFAULT_TARGET
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_server_name: str = ""
    token: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("a client certificate and its key go together: give both tls_cert_file and "
                             "tls_key_file, or neither")

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self.header],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    """grpc's documented way to pass changed call details on (see its interceptor examples)."""


def channel(target: Connection | str) -> grpc.Channel:
    """A channel to the server: TLS when a CA or client certificate is given, the token on every call."""
    connection = target if isinstance(target, Connection) else Connection(target)
    options = [("grpc.max_send_message_length", MESSAGE_LIMIT), ("grpc.max_receive_message_length", MESSAGE_LIMIT)]
    if connection.tls_server_name:
        options.append(("grpc.ssl_target_name_override", connection.tls_server_name))
    if connection.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(connection.tls_ca_file),
            private_key=_read(connection.tls_key_file), certificate_chain=_read(connection.tls_cert_file))
        result = grpc.secure_channel(connection.target, credentials, options=options)
    else:
        result = grpc.insecure_channel(connection.target, options=options)
    if connection.token:
        return grpc.intercept_channel(result, _BearerToken(connection.token))
    return result


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None
