"""What the command-line client commands share: where and how to connect, channels, error reporting.

`target_option` gives a command every connection option at once (--target, --tls-ca-file,
--tls-cert-file/--tls-key-file, --tls-server-name, --token) and hands it one `Connection`.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import grpc

DEFAULT_TARGET = "localhost:50051"
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

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file)


def target_option(command: Callable) -> Callable:
    """Add the connection options to a click command; it receives them as `target: Connection`."""

    @functools.wraps(command)
    def wrapper(*args: Any, target: str, tls_ca_file: str | None, tls_cert_file: str | None,
                tls_key_file: str | None, tls_server_name: str | None, token: str | None, **kwargs: Any) -> Any:
        if bool(tls_cert_file) != bool(tls_key_file):
            raise click.UsageError("--tls-cert-file and --tls-key-file go together (a client certificate and its key)")
        connection = Connection(target, tls_ca_file or "", tls_cert_file or "", tls_key_file or "",
                                tls_server_name or "", token or "")
        return command(*args, target=connection, **kwargs)

    path = click.Path(exists=True, dir_okay=False)
    options = [
        click.option("--target", default=DEFAULT_TARGET, envvar="HEADSWAP_TARGET", show_default=True,
                     help="Server address HOST:PORT."),
        click.option("--tls-ca-file", type=path, envvar="HEADSWAP_TLS_CA_FILE",
                     help="Use TLS, trusting the server certificate's CA in this PEM file [env HEADSWAP_TLS_CA_FILE]."),
        click.option("--tls-cert-file", type=path, envvar="HEADSWAP_CLIENT_CERT_FILE",
                     help="Mutual TLS: client certificate (PEM) [env HEADSWAP_CLIENT_CERT_FILE]."),
        click.option("--tls-key-file", type=path, envvar="HEADSWAP_CLIENT_KEY_FILE",
                     help="Mutual TLS: the client certificate's private key [env HEADSWAP_CLIENT_KEY_FILE]."),
        click.option("--tls-server-name", envvar="HEADSWAP_TLS_SERVER_NAME",
                     help="Name the server certificate must carry, when it differs from --target's host."),
        click.option("--token", envvar="HEADSWAP_TOKEN",
                     help="Bearer token, sent as 'authorization: Bearer ...' [env HEADSWAP_TOKEN]."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (also over plaintext, for loopback use)."""

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


def call(method: Callable, request: Any, timeout: float | None = None) -> Any:
    """Call and turn a gRPC error into a one-line message and a non-zero exit."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as err:
        raise click.ClickException(f"{err.code().name}: {err.details()}") from None
