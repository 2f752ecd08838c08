"""Fault tests: clients that misbehave at the socket level, and shutdown under load.

After each fault, the well-behaved clients must still be served.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from pigeon.server.limits import DEFAULT_MAX_CONNECTIONS, raise_open_files_limit
from pigeon.testing import LineClient, ServerProcess
from tests.clients import connected, small_window_client

Start = Callable[..., ServerProcess]
T = TypeVar("T")


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


def _fin(sock: socket.socket) -> None:
    sock.close()


def _half_close(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_WR)


ENDINGS = {"fin": _fin, "rst": _reset, "half-close": _half_close}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_burst_right_after_a_subscriber_ends_loses_nothing(
    server: ServerProcess, connect: Callable[[], LineClient], ending: str
) -> None:
    """Two subscribers share a topic; one ends (FIN, RST or half-close), then a burst is published.

    The server sees the end no later than the burst (it was sent first), so
    no message may be handed to the ended connection: the other subscriber
    gets every acknowledged message.
    """
    pub, stays = connect(), connect()
    stays.subscribe("burst")
    burst = 2000
    for trial in range(10):
        leaves = connect()
        leaves.subscribe("burst")
        ENDINGS[ending](leaves.sock)
        pub.send("".join(f"PUBLISH {pub.client_id} burst {trial}:{i}\n" for i in range(burst)))
        assert pub.lines(burst) == [b"PUBLISHED burst"] * burst
        # Routed to the ended connection in the pass that noticed its end, messages go back to
        # the head of the topic and follow: all arrive, not necessarily in order.
        got = stays.lines(burst)
        assert sorted(got) == sorted(f"MESSAGE burst {trial}:{i}".encode() for i in range(burst))
        if ending == "half-close":
            # it may still read: the server sends it nothing more and closes
            assert leaves.at_eof()
        leaves.close()
    figures = json.loads(pub.ask("STATS")[6:])
    assert figures["delivered"] == figures["published"] == 10 * burst
    assert figures["lost"] == 0


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
    _still_serving(lambda: connected(proc))
    assert keeper.ask("PING") == b"PONG"


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
    subs = [connected(proc) for _ in range(3)]
    for sub in subs:
        sub.subscribe("load")
    pubs = [connected(proc) for _ in range(3)]
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
    assert sum(received) >= 3000, received
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


def _connection(observer: LineClient, client_id: str) -> dict[str, Any] | None:
    """The STATS CONNECTIONS entry of a client id, or None when it is gone."""
    page = json.loads(observer.ask("STATS CONNECTIONS")[6:])
    return next((c for c in page["connections"] if c["client_id"] == client_id), None)


def _poll(check: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    """``check()`` until it returns something, with a deadline."""
    deadline = time.monotonic() + timeout
    while (found := check()) is None:
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)
    return found


def _send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """sendall in a thread (the server may stop reading for a while); an error ends it quietly."""

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _after_its_flush(observer: LineClient, client_id: str, bytes_in: int) -> dict[str, Any]:
    """The connection's STATS entry once the server has read ``bytes_in`` bytes of it and flushed."""
    _poll(
        lambda: True if (_connection(observer, client_id) or {}).get("bytes_in") == bytes_in else None, "read"
    )
    # the flush ran in the pass that read them: this later STATS sees what it left
    entry = _connection(observer, client_id)
    assert entry is not None
    return entry


@pytest.mark.parametrize("ending", ["DISCONNECT", "half-close"])
def test_a_closing_connection_whose_peer_does_not_read_is_aborted_after_the_write_timeout(
    start_server: Start, ending: str
) -> None:
    """The server closes a connection after its output (on DISCONNECT, or on the client's FIN); a peer
    that never reads that output would hold the socket for ever: --write-timeout aborts it."""
    proc = start_server("--write-timeout", "1")
    observer = connected(proc)
    observer.send("".join(f"PUBLISH {observer.client_id} topic-{i:04d} x\n" for i in range(1000)))
    assert observer.lines(1000) == [f"PUBLISHED topic-{i:04d}".encode() for i in range(1000)]
    sock, client_id = small_window_client(proc)
    # Pages of 1000 topics (about 100 KB each), five at a time, read by nobody: once the
    # kernel's buffers are full, the transport holds some of the output, well under the mark
    # (1 MiB) where the connection would be paused and no longer read.
    batch = b"STATS TOPICS 0 1000\n" * 5
    sent = len(b"CONNECT\n")
    while True:
        sock.sendall(batch)
        sent += len(batch)
        entry = _after_its_flush(observer, client_id, sent)
        assert not entry["paused"], entry
        if entry["pending_bytes"]:
            break
        assert sent < 1000 * len(batch), "the kernel took 500 MB?"
    if ending == "DISCONNECT":
        sock.sendall(b"DISCONNECT\n")
    else:
        sock.shutdown(socket.SHUT_WR)
    # the server ends the connection, cannot send what it holds, and gives up on it
    _poll(
        lambda: True if (_connection(observer, client_id) or {"closing": True})["closing"] else None, "close"
    )
    _poll(lambda: True if _connection(observer, client_id) is None else None, "abort")
    # what the kernel had taken still arrives; what the transport held is gone
    received = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(1 << 20):
            received += chunk
    pages = (sent - len(b"CONNECT\n")) // len(b"STATS TOPICS 0 1000\n")
    assert received.count(b"\nSTATS ") < pages
    assert not received.endswith(b"DISCONNECTED\n")
    sock.close()
    _still_serving(lambda: connected(proc))
    proc.stop()
    assert "output not taken within 1 s of closing, aborting" in "".join(proc.log)


def test_sigterm_closes_idle_connections_at_once_and_waits_for_unread_output(start_server: Start) -> None:
    proc = start_server()
    observer = connected(proc)
    idle = [connected(proc) for _ in range(5)]
    stuck, stuck_id = small_window_client(proc)
    _send_in_background(stuck, b"PING\n" * 2_000_000)
    # the stuck one's transport is full: it is paused, and not read any more
    _poll(lambda: True if (_connection(observer, stuck_id) or {}).get("paused") else None, "pause")
    proc.proc.send_signal(signal.SIGTERM)
    for client in [observer, *idle]:
        assert client.at_eof()
    # the idle ones are closed while the server still waits (up to 5 s) for the stuck one's output
    assert proc.proc.poll() is None
    assert proc.stop(timeout=30) == 0
    log = "".join(proc.log)
    assert "aborting 1 connection(s) that did not take their output within 5 s" in log, log
    stuck.close()
