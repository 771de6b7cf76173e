"""The credentials file: who may call, with which scopes; re-read when it changes on disk.

The file (`--auth-tokens-file`) is a JSON list of objects:

    {"name": "web-frontend", "token_sha256": "<64 hex>", "scopes": ["classify"]}
    {"name": "ml-pipeline", "client_identity": "pipeline.ml.svc", "scopes": ["train"]}

Only hashes of bearer tokens are stored; a presented token is hashed and compared in constant
time against every entry. `client_identity` matches a mutual-TLS client certificate's subject
alternative name or common name. Nothing here imports gRPC: the interceptor in
`headswap.api.auth` hands in the token and the certificate names it found.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

CLASSIFY, TRAIN, ADMIN = "classify", "train", "admin"
SCOPES = (CLASSIFY, TRAIN, ADMIN)
# admin may do everything; train and classify are separate (a trainer need not classify).
IMPLIED = {ADMIN: frozenset(SCOPES), TRAIN: frozenset({TRAIN}), CLASSIFY: frozenset({CLASSIFY})}
RELOAD_CHECK_S = 1.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a name for logs and job ownership, and what it may do."""

    name: str
    scopes: frozenset[str]
    via: str  # "token", "certificate" or "none" (authentication off)

    def allows(self, scope: str) -> bool:
        return any(scope in IMPLIED[s] for s in self.scopes)

    @property
    def sees_all_jobs(self) -> bool:
        return self.allows(ADMIN)


ANONYMOUS_SCOPES = frozenset({ADMIN})


@dataclass(frozen=True)
class Credential:
    name: str
    scopes: frozenset[str]
    token_digest: bytes | None = None
    client_identity: str | None = None


def token_sha256(token: str) -> str:
    """What goes into the file for a token: `headswap token-hash` prints the same."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_credentials(text: str, source: str = "credentials file") -> list[Credential]:
    """Parse and check the whole file; a ValueError names the entry and field that are wrong."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{source} must hold a JSON list of credentials, got {type(entries).__name__}")
    credentials, names = [], set()
    # One token or certificate identity, one entry: listed twice (say under `classify` and `admin`), the
    # entry that wins would depend on the order of the file, so a reader of the file cannot tell
    # what the token may do. Refused like a duplicate name.
    owners: dict[bytes | str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{source} entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with name, token_sha256 or client_identity, scopes")
        unknown = set(entry) - {"name", "token_sha256", "client_identity", "scopes", "comment"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            raise ValueError(f"{where}: name must be a non-empty string of at most 128 characters")
        if name in names:
            raise ValueError(f"{where}: name {name!r} is used twice (names own jobs: keep them unique)")
        names.add(name)
        scopes = entry.get("scopes")
        if (not isinstance(scopes, list) or not scopes
                or not all(isinstance(s, str) and s in SCOPES for s in scopes)):
            raise ValueError(f"{where} ({name}): scopes must be a non-empty list of {', '.join(SCOPES)}")
        digest, identity = entry.get("token_sha256"), entry.get("client_identity")
        if (digest is None) == (identity is None):
            raise ValueError(f"{where} ({name}): give exactly one of token_sha256 and client_identity")
        if digest is not None:
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
                raise ValueError(f"{where} ({name}): token_sha256 must be 64 hex digits (sha256 of the token, "
                                 "never the token itself)")
            token_digest = bytes.fromhex(digest)
            if token_digest in owners:  # the hash itself is not shown: it identifies the token
                raise ValueError(f"{where} ({name}): its token_sha256 is already listed under "
                                 f"{owners[token_digest]!r}; list each token once, with all of its scopes")
            owners[token_digest] = name
            credentials.append(Credential(name, frozenset(scopes), token_digest=token_digest))
        else:
            if not isinstance(identity, str) or not identity.strip():
                raise ValueError(f"{where} ({name}): client_identity must be a certificate SAN or CN")
            if identity in owners:
                raise ValueError(f"{where} ({name}): client_identity {identity!r} is already listed under "
                                 f"{owners[identity]!r}; list each identity once, with all of its scopes")
            owners[identity] = name
            credentials.append(Credential(name, frozenset(scopes), client_identity=identity))
    return credentials


class CredentialStore:
    """The credentials of one file, re-read when the file changes (checked at most once a second).

    Kubernetes updates a mounted Secret by swapping a symlink, so the path is stat'ed (following
    links) rather than watched. A file that turns unreadable or invalid keeps the last good
    credentials in force and logs an error once per change.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature = self._stat()
        if self._signature is None:
            raise ValueError(f"--auth-tokens-file {self.path} does not exist or cannot be read")
        self._credentials = parse_credentials(self.path.read_text(), str(self.path))
        self._checked = time.monotonic()
        log.info("access control on: %d credentials from %s", len(self._credentials), self.path)

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def credentials(self) -> list[Credential]:
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_S:
            with self._lock:
                if now - self._checked >= RELOAD_CHECK_S:
                    self._checked = now
                    self._reload_if_changed()
        return self._credentials

    def _reload_if_changed(self) -> None:
        signature = self._stat()
        if signature is None or signature == self._signature:
            return  # a missing file mid-swap keeps the current credentials
        self._signature = signature
        try:
            credentials = parse_credentials(self.path.read_text(), str(self.path))
        except (OSError, ValueError) as err:
            log.error("credentials file changed but was not loaded, the previous credentials stay in force: %s",
                      err)
            return
        self._credentials = credentials
        log.info("credentials reloaded: %d entries from %s", len(credentials), self.path)

    def by_token(self, token: str) -> Principal | None:
        """The credential whose hash matches, compared in constant time against every entry."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for credential in self.credentials():
            if credential.token_digest is not None and hmac.compare_digest(credential.token_digest, digest):
                found = credential
        return Principal(found.name, found.scopes, "token") if found else None

    def by_identity(self, identities: Iterable[str]) -> Principal | None:
        """The credential naming one of a client certificate's SANs or its CN."""
        names = set(identities)
        for credential in self.credentials():
            if credential.client_identity is not None and credential.client_identity in names:
                return Principal(credential.name, credential.scopes, "certificate")
        return None

