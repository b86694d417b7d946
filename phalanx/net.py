"""Sockets bound to one address: a loopback run never listens on another interface, even briefly.
Standard library only, so a Ray worker probes a port without importing torch."""

from __future__ import annotations

import socket


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host` (a name or an IPv4/IPv6 address) and `port` (0: any free one) only."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
