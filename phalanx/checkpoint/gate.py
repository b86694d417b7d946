"""Admission to a keeper: the server half of the handshake (`wire.py`) for every new connection at once,
in one selector on the serving thread, so a peer that has not proved it holds the run's secret costs a
socket and a few bytes, never a thread.

At most `max_pending` connections are in the handshake at once: a new one beyond that closes the oldest
(a trainer's handshake takes milliseconds, an idle flood's never ends), and one older than `timeout_s`
is closed. A connection is handed over blocking, with nothing of its first request read.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from dataclasses import dataclass, field

from phalanx.checkpoint.wire import CLIENT_REPLY_BYTES, NONCE_BYTES, WireError, server_proof


@dataclass
class Pending:
    """One connection in its handshake."""

    sock: socket.socket
    nonce: bytes
    started: float
    outbox: bytes  # still to send: the nonce, later the proof
    reply: bytearray = field(default_factory=bytearray)
    proved: bool = False  # the client's reply checked out; only the proof is left to send
    closed: bool = False


def to_close(started: list[float], now: float, timeout_s: float, max_pending: int) -> int:
    """How many of the oldest pending connections (start times, oldest first) must close: those past
    `timeout_s`, and as many more as keep at most `max_pending`."""
    stale = sum(1 for t in started if now - t > timeout_s)
    return max(stale, len(started) - max_pending)


class HandshakeGate:
    """Accepts on `server` and runs every handshake without blocking; `poll` returns the connections
    that proved they hold the secret, blocking again, for a handler thread each."""

    def __init__(self, server: socket.socket, secret: bytes, max_pending: int, timeout_s: float):
        if max_pending < 1 or timeout_s <= 0:
            raise ValueError(f"max_pending={max_pending} and handshake_timeout_s={timeout_s} must be positive")
        self.server, self.secret = server, secret
        self.max_pending, self.timeout_s = max_pending, timeout_s
        self.pending: dict[int, Pending] = {}  # by file descriptor, oldest first
        self.selector = selectors.DefaultSelector()
        server.setblocking(False)
        self.selector.register(server, selectors.EVENT_READ, None)

    def poll(self, timeout: float) -> list[socket.socket]:
        """Wait up to `timeout` seconds (less when a handshake expires sooner); the connections admitted."""
        if self.pending:
            oldest = next(iter(self.pending.values())).started
            timeout = max(0.0, min(timeout, oldest + self.timeout_s - time.monotonic()))
        admitted = []
        for key, events in self.selector.select(timeout):
            if key.data is None:
                self._accept()
            elif not key.data.closed and self._advance(key.data, events):
                admitted.append(self._admit(key.data))
        now, entries = time.monotonic(), list(self.pending.values())
        for entry in entries[:to_close([e.started for e in entries], now, self.timeout_s, self.max_pending)]:
            self._close(entry)
        return admitted

    def close(self) -> None:
        for entry in list(self.pending.values()):
            self._close(entry)
        self.selector.close()

    def _accept(self) -> None:
        for _ in range(self.max_pending):  # bounded, so a flood cannot starve the handshakes in flight
            try:
                sock, _ = self.server.accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if self.pending:  # a descriptor for the next one
                        self._close(next(iter(self.pending.values())))
                    else:  # the listening socket stays readable: do not spin on it
                        time.sleep(0.05)
                return
            if len(self.pending) >= self.max_pending:
                self._close(next(iter(self.pending.values())))
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # the peer is already gone: its first read says so
                pass
            nonce = os.urandom(NONCE_BYTES)
            entry = Pending(sock, nonce, time.monotonic(), nonce)
            self.pending[sock.fileno()] = entry
            self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, entry)
            self._flush(entry)

    def _advance(self, entry: Pending, events: int) -> bool:
        """One step of `entry`'s handshake; True when it is done."""
        if events & selectors.EVENT_WRITE and not self._flush(entry):
            return False
        if events & selectors.EVENT_READ and not entry.proved:
            try:  # never more than the reply: the first request stays in the socket for the handler
                data = entry.sock.recv(CLIENT_REPLY_BYTES - len(entry.reply))
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                data = b""
            if not data:
                self._close(entry)
                return False
            entry.reply += data
            if len(entry.reply) == CLIENT_REPLY_BYTES:
                try:
                    entry.outbox += server_proof(self.secret, entry.nonce, bytes(entry.reply))
                except WireError:
                    self._close(entry)
                    return False
                entry.proved = True
                if not self._flush(entry):
                    return False
        return entry.proved and not entry.outbox

    def _flush(self, entry: Pending) -> bool:
        """Send what the kernel takes of `entry`'s outbox, and wait for what matters next; False if closed."""
        try:
            entry.outbox = entry.outbox[entry.sock.send(entry.outbox):] if entry.outbox else b""
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(entry)
            return False
        events = (0 if entry.proved else selectors.EVENT_READ) | (selectors.EVENT_WRITE if entry.outbox else 0)
        if events:  # none: admitted by the caller
            self.selector.modify(entry.sock, events, entry)
        return True

    def _admit(self, entry: Pending) -> socket.socket:
        self.selector.unregister(entry.sock)
        del self.pending[entry.sock.fileno()]
        entry.sock.setblocking(True)
        return entry.sock

    def _close(self, entry: Pending) -> None:
        entry.closed = True
        self.pending.pop(entry.sock.fileno(), None)
        try:
            self.selector.unregister(entry.sock)
        except (KeyError, ValueError):
            pass
        entry.sock.close()
