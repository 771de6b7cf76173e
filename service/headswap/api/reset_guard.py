"""Rapid reset (CVE-2023-44487): a connection that opens calls and resets them far faster than
it completes any is told to go away.

One connection sending HEADERS + RST_STREAM pairs made grpc start a call, and us a handler, for
every pair (2.3 M in 90 s); HTTP/2's limit on concurrent streams does not help, since each stream
is gone at once. grpc core (1.85) has no per-connection reset limit and grpcio no API to close one
connection, so this module counts, per connection (grpc's peer string names the client's address
and port), the calls that ended before their request message arrived and the calls answered. When
a connection has reset `max_resets` calls within `window_s` and more than `ratio` times as many
as it completed, it is closed: on a plaintext port a GOAWAY (ENHANCE_YOUR_CALM, "too many reset
streams") is written first, then the socket is shut down (grpc then tears the transport down and
ends its calls); on a TLS port it is shut down only (a frame cannot be written into the TLS
stream from outside). The socket is found through Linux's /proc (the connection's inode), so
elsewhere the guard only counts and logs. Other connections are not touched.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
import urllib.parse
from pathlib import Path

from headswap import metrics

log = logging.getLogger(__name__)

GOAWAY, ENHANCE_YOUR_CALM = 0x7, 0xB
REASON = b"too many reset streams"
MAX_TRACKED = 4096  # connections tracked at once (more than --max-connections is never needed)


class _Counts:
    __slots__ = ("window_start", "resets", "completed", "closed")

    def __init__(self, now: float) -> None:
        self.window_start, self.resets, self.completed, self.closed = now, 0, 0, False


class ResetGuard:
    """Counts resets and completions per connection and closes the ones that only reset."""

    def __init__(self, max_resets: int, window_s: float = 10.0, ratio: float = 10.0, plaintext: bool = True) -> None:
        self.max_resets, self.window_s, self.ratio, self.plaintext = max_resets, window_s, ratio, plaintext
        self._lock = threading.Lock()
        self._peers: collections.OrderedDict[str, _Counts] = collections.OrderedDict()

    def _counts(self, peer: str, now: float) -> _Counts:
        counts = self._peers.get(peer)
        if counts is None or now - counts.window_start > self.window_s:
            counts = self._peers[peer] = _Counts(now)
            if len(self._peers) > MAX_TRACKED:
                self._peers.popitem(last=False)
        self._peers.move_to_end(peer)
        return counts

    def completed(self, peer: str) -> None:
        """A call answered. Counted only for a connection that has reset calls in this window:
        the connections that never reset (nearly all) cost a dictionary lookup, no entry."""
        if self.max_resets <= 0 or peer not in self._peers:
            return
        with self._lock:
            self._counts(peer, time.monotonic()).completed += 1

    def reset(self, peer: str) -> None:
        """A call from `peer` ended before its request arrived; close the connection past the limit."""
        if self.max_resets <= 0:
            return
        with self._lock:
            counts = self._counts(peer, time.monotonic())
            counts.resets += 1
            trip = (not counts.closed and counts.resets >= self.max_resets
                    and counts.resets > self.ratio * counts.completed)
            if trip:
                counts.closed = True
        if trip:
            metrics.CONNECTIONS_CLOSED.labels("rapid_reset").inc()
            try:
                closed = close_connection(peer, self.plaintext)
            except OSError as err:  # /proc unreadable, a socket gone meanwhile: count and log only
                log.debug("closing %s failed: %s", peer, err)
                closed = False
            log.warning("connection %s reset %d calls and completed %d within %.0f s (--max-resets-per-connection "
                        "%d): %s", peer, counts.resets, counts.completed, self.window_s, self.max_resets,
                        "sent GOAWAY and closed it" if closed and self.plaintext else
                        "closed it" if closed else "could not find its socket to close it",
                        extra={"throttle": "rapid reset"})


def goaway_frame(reason: bytes = REASON) -> bytes:
    """An HTTP/2 GOAWAY frame on stream 0: last stream id 2^31-1 (as a graceful GOAWAY: whatever
    the client still has open may finish as far as the connection lets it), error
    ENHANCE_YOUR_CALM, `reason` as debug data."""
    payload = struct.pack(">II", 0x7FFFFFFF, ENHANCE_YOUR_CALM) + reason
    return struct.pack(">I", len(payload))[1:] + bytes([GOAWAY, 0]) + struct.pack(">I", 0) + payload


def _peer_address(peer: str) -> tuple[str, int] | None:
    """grpc's 'ipv4:10.0.0.7:5123' / 'ipv6:%5B::1%5D:5123' (brackets URL-encoded) -> (address, port);
    None for anything else (a Unix socket)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return None
    host, _, port = urllib.parse.unquote(rest).rpartition(":")
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%")[0])), int(port)
    except ValueError:
        return None


def _socket_inode(host: str, port: int) -> int | None:
    """The inode of this process's TCP socket connected to host:port (/proc/net/tcp and tcp6)."""
    wanted = ipaddress.ip_address(host)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_hex, remote_port = fields[2].split(":")
            if int(remote_port, 16) != port:
                continue
            raw = bytes.fromhex(remote_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(words)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if address == wanted or (isinstance(wanted, ipaddress.IPv6Address) and wanted.ipv4_mapped == address):
                return int(fields[9])
    return None


def close_connection(peer: str, plaintext: bool) -> bool:
    """Shut down this process's socket for `peer` (GOAWAY first on plaintext); False if not found."""
    address = _peer_address(peer)
    inode = _socket_inode(*address) if address else None
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != target:
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if plaintext:
                try:
                    sock.send(goaway_frame(), socket.MSG_DONTWAIT)
                except OSError:
                    pass
            sock.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            sock.close()  # our duplicate only: grpc closes its own descriptor
    return False
