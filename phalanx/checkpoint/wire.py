"""Keeper traffic: framed JSON headers with a raw payload, mutually authenticated by the run's secret.

Every connection starts with a challenge–response in both directions (HMAC-SHA256 of a fresh nonce
under the per-run secret), so a process without the secret can neither push a block into a keeper
nor read one out. Every payload carries a CRC32 the receiver checks before using it; a mismatch is
refused. Nothing is pickled: headers are JSON, payloads are bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import zlib
from typing import Any, Optional

from phalanx.errors import PhalanxError

MAGIC = b"PHX1"
_FRAME = struct.Struct("<4sIQ")  # magic, header length, payload length


class WireError(PhalanxError):
    """A keeper connection failed, timed out, or the peer is not part of this run."""


def _recv_exact(sock: socket.socket, n: int, into: Optional[memoryview] = None) -> memoryview:
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        chunk = sock.recv_into(buf[got:], n - got)
        if chunk == 0:
            raise WireError("keeper connection closed mid-message")
        got += chunk
    return buf


def send(sock: socket.socket, header: dict[str, Any], payload: Optional[memoryview] = None) -> None:
    if payload is not None:
        header = {**header, "crc": zlib.crc32(payload)}
    data = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_FRAME.pack(MAGIC, len(data), len(payload) if payload is not None else 0) + data)
    if payload is not None and len(payload):
        sock.sendall(payload)


def recv(sock: socket.socket, into: Optional[memoryview] = None) -> tuple[dict[str, Any], Optional[memoryview]]:
    """One message; the payload lands in `into` when given (it must be large enough)."""
    magic, hlen, plen = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if magic != MAGIC or hlen > 1 << 26:
        raise WireError("not a phalanx keeper message")
    header = json.loads(bytes(_recv_exact(sock, hlen)))
    payload = None
    if plen or "crc" in header:
        if into is not None and len(into) < plen:
            raise WireError(f"payload of {plen} bytes does not fit the {len(into)}-byte buffer")
        payload = _recv_exact(sock, plen, into[:plen] if into is not None else None)
        if zlib.crc32(payload) != header.get("crc"):
            raise WireError(f"payload checksum mismatch in '{header.get('op')}': refused")
    return header, payload


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def handshake_server(sock: socket.socket, secret: bytes) -> None:
    nonce = os.urandom(32)
    sock.sendall(nonce)
    reply = bytes(_recv_exact(sock, 64))
    if not hmac.compare_digest(reply[:32], _mac(secret, b"client", nonce)):
        raise WireError("a client without this run's secret was refused")
    sock.sendall(_mac(secret, b"server", reply[32:]))


def handshake_client(sock: socket.socket, secret: bytes) -> None:
    nonce = bytes(_recv_exact(sock, 32))
    mine = os.urandom(32)
    sock.sendall(_mac(secret, b"client", nonce) + mine)
    try:
        proof = bytes(_recv_exact(sock, 32))
    except WireError:
        raise WireError("the keeper closed the connection during authentication: this process does not hold "
                        "the run's secret (runs/NAME/.keeper-secret)") from None
    if not hmac.compare_digest(proof, _mac(secret, b"server", mine)):
        raise WireError("the keeper did not prove it holds this run's secret")


class KeeperClient:
    """One authenticated connection to a keeper; `call` sends a request and returns the reply."""

    def __init__(self, host: str, port: int, secret: bytes, timeout: float):
        self.address = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshake_client(self.sock, secret)
        except OSError as err:
            raise WireError(f"cannot reach the keeper at {self.address}: {err}") from err

    def call(self, op: str, payload: Optional[memoryview] = None, into: Optional[memoryview] = None,
             **fields: Any) -> tuple[dict[str, Any], Optional[memoryview]]:
        try:
            send(self.sock, {"op": op, **fields}, payload)
            header, data = recv(self.sock, into)
        except OSError as err:  # includes socket.timeout
            raise WireError(f"keeper {self.address} did not answer '{op}': {err}") from err
        if "error" in header:
            raise WireError(f"keeper {self.address} refused '{op}': {header['error']}")
        return header, data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
