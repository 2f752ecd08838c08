"""Fault tests: clients that misbehave at the socket level, and shutdown under load.

After each fault, the well-behaved clients must still be served.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from pigeon.server.limits import DEFAULT_MAX_CONNECTIONS, raise_open_files_limit
from pigeon.testing import LineClient, ServerProcess

Start = Callable[..., ServerProcess]


def _still_serving(connect: Callable[[], LineClient]) -> None:
    """A fresh subscriber and publisher exchange a message."""
    sub, pub = connect(), connect()
    sub.subscribe("health")
    pub.publish("health", "ok")
    assert sub.line() == b"MESSAGE health ok"


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_reset_mid_command(server: ServerProcess, connect: Callable[[], LineClient]) -> None:
    sub = connect()
    sub.subscribe("t")
    for partial in (b"PUBLISH c1 t hal", b"SUBSCR", b"CONNECT\nPUBLISH"):
        rude = server.client()
        rude.send(partial)
        _reset(rude.sock)
    pub = connect()
    pub.publish("t", "whole")
    assert sub.line() == b"MESSAGE t whole"
    _still_serving(connect)


def test_reset_with_output_pending(server: ServerProcess, connect: Callable[[], LineClient]) -> None:
    rude = connect()
    rude.subscribe("t")
    pub = connect()
    for i in range(200):
        pub.send(f"PUBLISH {pub.client_id} t {i}")
    _reset(rude.sock)
    assert pub.lines(200) == [b"PUBLISHED t"] * 200
    _still_serving(connect)


def test_half_close_gets_its_replies(server: ServerProcess) -> None:
    client = server.client()
    client.send("CONNECT\nPING\n")
    client.sock.shutdown(socket.SHUT_WR)
    assert client.line().startswith(b"CONNECTED ")
    assert client.line() == b"PONG"
    assert client.at_eof()


def test_connect_and_vanish(server: ServerProcess, connect: Callable[[], LineClient]) -> None:
    for _ in range(200):
        socket.create_connection((server.host, server.port)).close()
    for _ in range(50):
        _reset(socket.create_connection((server.host, server.port)))
    _still_serving(connect)


def _room_for_sockets(n: int) -> bool:
    """Raise this process's open-files limit to hold n more sockets, if the hard limit allows."""
    limit = raise_open_files_limit(n + 100)
    return limit is None or limit >= n + 100


def test_flood_of_ten_thousand_connections(start_server: Start) -> None:
    n = DEFAULT_MAX_CONNECTIONS
    if not _room_for_sockets(n):
        pytest.skip(f"the open-files hard limit is below {n + 100}")
    proc = start_server()
    keeper = proc.client()
    keeper.connect()
    flood: list[socket.socket] = []
    try:
        for _ in range(n):
            flood.append(socket.create_connection((proc.host, proc.port), timeout=30))
        # a round trip through the keeper: every connection before it was accepted
        assert keeper.ask("PING") == b"PONG"
        # with the keeper, the flood is one over the default --max-connections: its last one was refused
        flood[-1].settimeout(30)
        assert flood[-1].recv(100) == b"ERROR TOO_MANY_CONNECTIONS too many connections (limit %d)\n" % n
        assert flood[0].send(b"CONNECT\n") == 8
        flood[0].settimeout(30)
        assert flood[0].recv(100).startswith(b"CONNECTED ")
    finally:
        for sock in flood:
            sock.close()
    _still_serving(lambda: _connected(proc))
    assert keeper.ask("PING") == b"PONG"


def _connected(proc: ServerProcess) -> LineClient:
    client = proc.client()
    client.connect()
    return client


def test_hundred_mib_line(server: ServerProcess, connect: Callable[[], LineClient]) -> None:
    bystander = connect()
    big = server.client()
    chunk = b"x" * (1 << 20)
    with pytest.raises(OSError):
        for _ in range(100):
            big.sock.sendall(chunk)
        big.sock.sendall(b"\n")
        # the server closed the connection after the limit; what is left of the line is refused
        raise BrokenPipeError("all sent")
    assert big.line() == b"ERROR LINE_TOO_LONG line too long (limit 1048576 bytes)"
    assert bystander.ask("PING") == b"PONG"
    _still_serving(connect)


def test_sigterm_under_load_flushes_and_exits(start_server: Start) -> None:
    proc = start_server()
    subs = [_connected(proc) for _ in range(3)]
    for sub in subs:
        sub.subscribe("load")
    pubs = [_connected(proc) for _ in range(3)]
    acked = [0] * len(pubs)
    received = [0] * len(subs)
    bad: list[bytes] = []

    def publish(k: int) -> None:
        pub = pubs[k]
        try:
            while True:
                pub.send(f"PUBLISH {pub.client_id} load m\n" * 100)
                for _ in range(100):
                    line = pub.line()
                    if line != b"PUBLISHED load":
                        bad.append(line)
                    acked[k] += 1
        except (OSError, EOFError):
            pass

    def consume(k: int) -> None:
        try:
            while True:
                line = subs[k].line()
                if line != b"MESSAGE load m":
                    bad.append(line)
                received[k] += 1
        except (OSError, EOFError):
            pass

    threads = [threading.Thread(target=publish, args=(k,)) for k in range(len(pubs))]
    threads += [threading.Thread(target=consume, args=(k,)) for k in range(len(subs))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(received) < 3000:
        assert time.monotonic() < deadline, f"only {sum(received)} messages arrived in 60 s: {bad[:5]}"
        time.sleep(0.01)
    proc.proc.send_signal(signal.SIGTERM)
    # stop() waits at most 30 s for the exit
    assert proc.stop(timeout=30) == 0, "".join(proc.log)
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    # every line that reached a client was whole: nothing cut by the shutdown
    assert bad == []
    assert all(client.buf == b"" for client in subs + pubs)
    assert sum(received) <= sum(acked) + 100 * len(pubs)
