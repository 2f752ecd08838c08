"""Raw clients the wire tests share: connected ones, ones that read slowly, and an IPv6 probe."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

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


def figures(server: ServerProcess) -> dict[str, Any]:
    """The server's STATS, asked on a connection of its own."""
    probe = server.client()
    probe.connect()
    reply = probe.ask("STATS")
    probe.close()
    stats: dict[str, Any] = json.loads(reply.split(b" ", 1)[1])
    return stats


def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fails after 20 s, naming ``what`` was awaited."""
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within 20 s: {what}")
        time.sleep(0.02)
