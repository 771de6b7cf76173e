"""What the commands that talk to a server share: the connection options, and a `Client` whose
failed calls become a one-line message and a non-zero exit.

`target_option` gives a command every connection option at once (--target, --tls-ca-file,
--tls-cert-file/--tls-key-file, --tls-server-name, --token) and hands it one `Connection`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import click

from headswap.client import Client, ClientError, Connection
from headswap.client.connection import DEFAULT_TARGET


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


@contextlib.contextmanager
def connect(target: Connection) -> Iterator[Client]:
    """A client for one command; a failed call prints `CODE: the server's message` and exits 1."""
    try:
        with Client(target) as client:
            yield client
    except ClientError as err:
        raise click.ClickException(str(err)) from None
