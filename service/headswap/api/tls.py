"""TLS for the gRPC port: server credentials that follow certificate files rotated on disk.

gRPC asks `CertificateFiles.fetch` before each new TLS handshake; it returns a new configuration
only when a file changed (checked at most once a second) and the new key matches the new
certificate. Established connections keep their session; new ones get the new certificate, so a
rotation (cert-manager renewing a mounted Secret) needs no restart and drops no call.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from pathlib import Path

import grpc

from headswap.config import Settings

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


class CertificateFiles:
    """The certificate chain, key and (mutual TLS) client CA files, re-read when they change."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.paths = [Path(cert_file), Path(key_file)] + ([Path(client_ca_file)] if client_ca_file else [])
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._signature = self._stat()
        self._refused: tuple | None = None
        self.current = self._load()  # raises ValueError: refuse to start with broken files
        self.loads = 1

    def _stat(self) -> tuple:
        signature = []
        for path in self.paths:
            try:
                st = os.stat(path)  # follows symlinks: a Secret's ..data swap changes the target
                signature.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                signature.append(None)
        return tuple(signature)

    def _load(self) -> tuple[bytes, bytes, bytes | None]:
        """Read the files and check that the key belongs to the certificate."""
        try:
            cert, key = self.paths[0].read_bytes(), self.paths[1].read_bytes()
            client_ca = self.paths[2].read_bytes() if len(self.paths) > 2 else None
        except OSError as err:
            raise ValueError(f"cannot read TLS file: {err}") from None
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.paths[0], self.paths[1])
            if client_ca is not None:
                context.load_verify_locations(cafile=self.paths[2])
        except (ssl.SSLError, OSError) as err:
            raise ValueError(f"TLS files {', '.join(map(str, self.paths))} are not a usable certificate chain, "
                             f"matching private key{' and client CA' if client_ca else ''} (PEM): {err}") from None
        if (cert, key) != (self.paths[0].read_bytes(), self.paths[1].read_bytes()):
            raise ValueError("TLS files changed while being read")
        return cert, key, client_ca

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, client_ca = self.current
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None (keep the current)."""
        now = time.monotonic()
        if now - self._checked < CHECK_INTERVAL_S:
            return None
        with self._lock:
            self._checked = now
            signature = self._stat()
            if signature == self._signature or None in signature:
                return None  # unchanged, or mid-rotation (a file missing): try again later
            try:
                loaded = self._load()
            except (ValueError, OSError) as err:
                if signature != self._refused:  # once per change, not every second
                    self._refused = signature
                    log.warning("TLS files changed but are not usable yet; still serving the previous "
                                "certificate: %s", err)
                return None  # not recorded as loaded: checked again (a cert written before its key)
            self._signature = signature
            if loaded == self.current:
                return None
            self.current = loaded
            self.loads += 1
        log.info("TLS certificate reloaded from %s", self.paths[0])
        return self.configuration()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, None for plaintext (no --tls-cert-file)."""
    if not settings.tls_cert_file:
        return None
    files = CertificateFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(files.configuration(), files.fetch,
                                               require_client_authentication=bool(settings.tls_client_ca_file))


class RotatingSslContext:
    """The REST port's TLS: one `ssl.SSLContext` whose certificate follows the files on disk.

    `refresh()` (called about once a second by the HTTP server) loads a changed certificate and key
    into the same context, so new handshakes get the new certificate while established connections
    keep theirs, as on the gRPC port. With a client CA the context requires a client certificate
    that chains to it (mutual TLS); a rotated CA bundle is added to the trusted ones."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.files = CertificateFiles(cert_file, key_file, client_ca_file)  # ValueError: refuse broken files
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._load()
        if client_ca_file:
            self.context.verify_mode = ssl.CERT_REQUIRED

    def _load(self) -> None:
        self.context.load_cert_chain(self.files.paths[0], self.files.paths[1])
        if len(self.files.paths) > 2:
            self.context.load_verify_locations(cafile=self.files.paths[2])

    def refresh(self) -> None:
        if self.files.fetch() is None:  # unchanged, or not yet a matching certificate and key
            return
        try:
            self._load()
        except (OSError, ssl.SSLError) as err:  # changed again since the check: the next change retries
            log.warning("TLS files changed but could not be loaded for the REST port; still serving the "
                        "previous certificate: %s", err)


def http_ssl_context(settings: Settings) -> RotatingSslContext | None:
    """TLS for the REST port from the gRPC port's files, None for plaintext."""
    if not settings.tls_cert_file:
        return None
    return RotatingSslContext(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
