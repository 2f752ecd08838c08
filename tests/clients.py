"""Raw clients the wire tests share: connected ones, ones that read slowly, and an IPv6 probe."""

from __future__ import annotations

import socket

from pigeon.testing import LineClient, ServerProcess


def connected(proc: ServerProcess) -> LineClient:
    """A new client of ``proc`` that has sent CONNECT."""
    client = proc.client()
    client.connect()
    return client


def small_window_client(proc: ServerProcess) -> tuple[socket.socket, str]:
    """A connected socket (CONNECT sent) with a small receive window, so what the server sends it
    backs up fast; and its client id."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((proc.host, proc.port))
    sock.settimeout(30)
    sock.sendall(b"CONNECT\n")
    reply = sock.recv(100)
    assert reply.startswith(b"CONNECTED "), reply
    return sock, reply.split()[1].decode()


def ipv6_loopback() -> bool:
    """Whether this machine can listen on ::1."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
