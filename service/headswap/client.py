"""What the command-line client commands share: the --target option, channels, error reporting."""

from __future__ import annotations

from typing import Any, Callable

import click
import grpc

DEFAULT_TARGET = "localhost:50051"
MESSAGE_LIMIT = 256 * 1024 * 1024

target_option = click.option("--target", default=DEFAULT_TARGET, envvar="HEADSWAP_TARGET", show_default=True,
                             help="Server address HOST:PORT.")


def channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", MESSAGE_LIMIT),
                                                  ("grpc.max_receive_message_length", MESSAGE_LIMIT)])


def call(method: Callable, request: Any, timeout: float | None = None) -> Any:
    """Call and turn a gRPC error into a one-line message and a non-zero exit."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as err:
        raise click.ClickException(f"{err.code().name}: {err.details()}") from None
