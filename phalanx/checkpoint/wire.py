"""Keeper traffic: framed JSON headers with a raw payload, mutually authenticated by the run's secret.

Every connection starts with a challenge–response in both directions (HMAC-SHA256 of a fresh nonce
under the per-run secret), so a process without the secret can neither push a block into a keeper
nor read one out. Every payload carries a CRC32 the receiver checks before using it; a mismatch is
refused. Nothing is pickled: headers are JSON, payloads are bytes.

Bounds: a header is at most `MAX_HEADER_BYTES`; a payload larger than the receiver's `limit` (the
keeper: the largest block registered with it; a client: the block it asked for; else
`SMALL_PAYLOAD_BYTES`) is refused before a byte of it is allocated. Header fields are checked against
typed `Field`s, so a malformed request is an error reply, never a crash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Optional

from phalanx.errors import PhalanxError

MAGIC = b"PHX1"
_FRAME = struct.Struct("<4sIQ")  # magic, header length, payload length
MAX_HEADER_BYTES = 64 << 20  # an inventory of thousands of ranks fits many times over
SMALL_PAYLOAD_BYTES = 1 << 20  # what a receiver accepts before it knows any block size
NONCE_BYTES = 32
CLIENT_REPLY_BYTES = 64  # the client's proof, then its own nonce


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


def recv(sock: socket.socket, into: Optional[memoryview] = None,
         limit: Optional[int] = None) -> tuple[dict[str, Any], Optional[memoryview]]:
    """One message; the payload lands in `into` when given. A payload longer than `limit` (default: the
    length of `into`, else `SMALL_PAYLOAD_BYTES`) is refused before anything is allocated for it."""
    magic, hlen, plen = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if magic != MAGIC:
        raise WireError("not a phalanx keeper message")
    if hlen > MAX_HEADER_BYTES:
        raise WireError(f"keeper message header of {hlen} bytes exceeds the {MAX_HEADER_BYTES}-byte cap: refused")
    if limit is None:
        limit = len(into) if into is not None else SMALL_PAYLOAD_BYTES
    elif into is not None:
        limit = min(limit, len(into))
    if plen > limit:
        raise WireError(f"keeper message payload of {plen} bytes exceeds the {limit}-byte limit: refused")
    try:
        header = json.loads(bytes(_recv_exact(sock, hlen)))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise WireError(f"keeper message header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise WireError(f"keeper message header is a JSON {type(header).__name__}, not an object")
    payload = None
    if plen or "crc" in header:
        payload = _recv_exact(sock, plen, into[:plen] if into is not None else None)
        if zlib.crc32(payload) != header.get("crc"):
            raise WireError(f"payload checksum mismatch in '{header.get('op')}': refused")
    return header, payload


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def server_proof(secret: bytes, nonce: bytes, reply: bytes) -> bytes:
    """The server's half of the handshake, after it sent `nonce` and read the client's 64-byte `reply`:
    the proof to send back; raises WireError when the client does not hold the secret."""
    if len(reply) != CLIENT_REPLY_BYTES or not hmac.compare_digest(reply[:32], _mac(secret, b"client", nonce)):
        raise WireError("a client without this run's secret was refused")
    return _mac(secret, b"server", reply[32:])


def handshake_server(sock: socket.socket, secret: bytes) -> None:
    nonce = os.urandom(NONCE_BYTES)
    sock.sendall(nonce)
    sock.sendall(server_proof(secret, nonce, bytes(_recv_exact(sock, CLIENT_REPLY_BYTES))))


def handshake_client(sock: socket.socket, secret: bytes) -> None:
    nonce = bytes(_recv_exact(sock, NONCE_BYTES))
    mine = os.urandom(32)
    sock.sendall(_mac(secret, b"client", nonce) + mine)
    try:
        proof = bytes(_recv_exact(sock, 32))
    except WireError:
        raise WireError("the keeper closed the connection during authentication: this process does not hold "
                        "the run's secret (runs/NAME/.keeper-secret)") from None
    if not hmac.compare_digest(proof, _mac(secret, b"server", mine)):
        raise WireError("the keeper did not prove it holds this run's secret")


@dataclass(frozen=True)
class Field:
    """A typed header field: `kind` is int (a non-negative integer below `upper`), number, str, bool,
    dict, or ints (a non-empty list of such integers, at most `count` long)."""

    kind: str
    upper: int = 1 << 62
    count: int = 256
    optional: bool = False

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` does not fit, or None. bool is not an integer here, though Python says it is."""
        if self.kind == "int":
            return self._int(value)
        if self.kind == "ints":
            if type(value) is not list or not 0 < len(value) <= self.count:
                return f"must be a list of 1 to {self.count} integers"
            return next((f"item {why}" for why in map(self._int, value) if why), None)
        if self.kind == "number":
            ok = type(value) in (int, float) and 0 <= value < self.upper
            return None if ok else f"must be a non-negative number below {self.upper}"
        expected = {"str": str, "bool": bool, "dict": dict}[self.kind]
        return None if type(value) is expected else f"must be a {self.kind}"

    def _int(self, value: Any) -> Optional[str]:
        if type(value) is not int:
            return "must be an integer"
        return None if 0 <= value < self.upper else f"must be in 0..{self.upper - 1}"


def field_problem(op: str, header: dict[str, Any], fields: dict[str, Field]) -> Optional[str]:
    """One line naming the op and the first field of `header` that is missing or malformed, or None."""
    for name, spec in fields.items():
        if name not in header:
            if not spec.optional:
                return f"'{op}' needs the field '{name}' ({spec.kind})"
            continue
        why = spec.problem(header[name])
        if why:
            shown = repr(header[name])
            return f"'{op}' field '{name}' {why}, not {shown[:40] + '...' if len(shown) > 40 else shown}"
    return None


class KeeperClient:
    """One authenticated connection to a keeper; `call` sends a request and returns the reply."""

    def __init__(self, host: str, port: int, secret: bytes, timeout: float):
        self.address = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except (OSError, ValueError) as err:  # ValueError: a host name the resolver cannot encode
            raise WireError(f"cannot reach the keeper at {self.address}: {err}") from err
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshake_client(self.sock, secret)
        except (OSError, WireError) as err:
            self.sock.close()  # a refused handshake leaves no open socket behind
            raise err if isinstance(err, WireError) else WireError(f"cannot reach the keeper at {self.address}: "
                                                                   f"{err}") from err

    def call(self, op: str, payload: Optional[memoryview] = None, into: Optional[memoryview] = None,
             limit: Optional[int] = None, **fields: Any) -> tuple[dict[str, Any], Optional[memoryview]]:
        """`limit`: the longest reply payload accepted (`recv`); a fetch passes the block length it expects."""
        try:
            send(self.sock, {"op": op, **fields}, payload)
            header, data = recv(self.sock, into, limit)
        except OSError as err:  # includes socket.timeout
            raise WireError(f"keeper {self.address} did not answer '{op}': {err}") from err
        except WireError:  # a refused reply is left unread: nothing after it on this connection can be trusted
            self.close()
            raise
        if "error" in header:
            raise WireError(f"keeper {self.address} refused '{op}': {header['error']}")
        return header, data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
