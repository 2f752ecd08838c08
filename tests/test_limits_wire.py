"""Every limit flag, end to end: a real server process, real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from pigeon.testing import LineClient, ServerProcess

Start = Callable[..., ServerProcess]


def connected(proc: ServerProcess) -> LineClient:
    client = proc.client()
    client.connect()
    return client


def test_max_connections(start_server: Start) -> None:
    proc = start_server("--max-connections", "2")
    first, second = connected(proc), connected(proc)
    extra = proc.client()
    assert extra.line() == b"ERROR TOO_MANY_CONNECTIONS too many connections (limit 2)"
    assert extra.at_eof()
    assert first.ask("PING") == b"PONG"
    assert second.ask("PING") == b"PONG"
    second.ask("DISCONNECT")
    assert second.at_eof()
    # the freed place is taken by the next connection
    deadline = time.monotonic() + 10
    while True:
        late = proc.client()
        if late.ask("PING") == b"PONG" or time.monotonic() > deadline:
            break
        late.close()
    assert late.ask("CONNECT").startswith(b"CONNECTED ")
    proc.stop()
    assert "too many connections" in "".join(proc.log)


def test_max_memory(start_server: Start) -> None:
    proc = start_server("--max-memory", "10")
    pub = connected(proc)
    pub.publish("t", "123456")
    assert pub.ask(f"PUBLISH {pub.client_id} t 12345") == (
        b"ERROR MEMORY_FULL memory limit reached (6 bytes in backlogs) for topic 't'"
    )
    pub.publish("t", "1234")
    sub = connected(proc)
    sub.subscribe("t")
    assert sub.lines(2) == [b"MESSAGE t 123456", b"MESSAGE t 1234"]


def test_full_backlog(start_server: Start) -> None:
    proc = start_server("--max-backlog", "2")
    pub = connected(proc)
    pub.publish("t", "a")
    pub.publish("t", "b")
    assert pub.ask(f"PUBLISH {pub.client_id} t c") == b"ERROR BACKLOG_FULL backlog full (2 messages) for topic 't'"


def test_max_subscriptions_and_topics(start_server: Start) -> None:
    proc = start_server("--max-subscriptions", "2", "--max-topics", "3")
    a, b = connected(proc), connected(proc)
    a.subscribe("t1")
    a.subscribe("t2")
    assert a.ask(f"SUBSCRIBE {a.client_id} t3") == (
        b"ERROR TOO_MANY_SUBSCRIPTIONS too many subscriptions on this connection (limit 2)"
    )
    b.subscribe("t3")
    assert b.ask(f"SUBSCRIBE {b.client_id} t4") == b"ERROR TOO_MANY_TOPICS too many topics (limit 3)"
    assert b.ask(f"PUBLISH {b.client_id} t5 x") == b"ERROR TOO_MANY_TOPICS too many topics (limit 3)"
    b.publish("t1", "x")
    assert a.line() == b"MESSAGE t1 x"


def test_idle_timeout(start_server: Start) -> None:
    proc = start_server("--idle-timeout", "0.5")
    silent = connected(proc)
    talker = connected(proc)
    got: list[bytes] = []

    def wait_for_silent() -> None:
        got.append(silent.line())

    waiter = threading.Thread(target=wait_for_silent)
    waiter.start()
    # PING keeps the talker alive while the silent one times out
    while waiter.is_alive():
        assert talker.ask("PING") == b"PONG"
        waiter.join(0.1)
    assert got == [b"ERROR IDLE_TIMEOUT idle timeout"]
    assert silent.at_eof()
    assert talker.ask("PING") == b"PONG"


def test_publisher_that_never_reads_is_dropped(start_server: Start) -> None:
    proc = start_server("--max-pending", "65536")
    other = connected(proc)
    sock, _ = _small_window_client(proc)
    chunk = b"PING\n" * 20_000
    with pytest.raises(OSError):
        for _ in range(10_000):
            sock.sendall(chunk)
    sock.close()
    assert other.ask("PING") == b"PONG"
    proc.stop()
    assert "slow consumer" in "".join(proc.log)


def _small_window_client(proc: ServerProcess) -> tuple[socket.socket, str]:
    """A connected socket with a small receive window, so what the server sends it backs up fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((proc.host, proc.port))
    sock.settimeout(30)
    sock.sendall(b"CONNECT\n")
    return sock, sock.recv(100).split()[1].decode()


def test_subscriber_that_stops_reading_is_skipped_then_dropped(start_server: Start) -> None:
    proc = start_server("--max-pending", "65536")
    pub, ok = connected(proc), connected(proc)
    slow, slow_id = _small_window_client(proc)
    slow.sendall(f"SUBSCRIBE {slow_id} t\n".encode())
    assert slow.recv(100) == b"SUBSCRIBED t\n"
    ok.subscribe("t")
    seen: list[int] = []
    progress = threading.Condition()

    def read_ok() -> None:
        while (line := ok.line()) != b"MESSAGE t end":
            with progress:
                seen.append(int(line.split()[2].split(b".")[0]))
                progress.notify()

    reader = threading.Thread(target=read_ok, daemon=True)
    reader.start()
    pad = "." * 10_000
    # Rounds of 500 KB, each read by ok before the next: ok's unsent output
    # stays under the transport's 1 MiB high-water mark, so it never pauses,
    # while slow's piles up until it pauses and, being over 64 KiB, is dropped.
    rounds, per_round = 60, 50
    for r in range(rounds):
        pub.send("".join(f"PUBLISH {pub.client_id} t {r * per_round + i}{pad}\n" for i in range(per_round)))
        assert pub.lines(per_round) == [b"PUBLISHED t"] * per_round
        # of the round's last two messages, one at least is ok's turn
        round_done = (r + 1) * per_round - 2
        with progress:
            assert progress.wait_for(lambda: seen and seen[-1] >= round_done, timeout=30)  # noqa: B023
    pub.publish("t", "end")
    reader.join(30)
    assert not reader.is_alive()
    assert seen == sorted(seen)
    # ok took every turn once slow was gone
    assert seen[-per_round:] == list(range((rounds - 1) * per_round, rounds * per_round))
    with pytest.raises(OSError):
        while slow.recv(1 << 20):
            pass
        raise ConnectionResetError("closed")
    slow.close()
    proc.stop()
    assert "slow consumer" in "".join(proc.log)


def test_cli_refuses_bad_limits() -> None:
    for flags in (["--max-connections", "0"], ["--idle-timeout", "-1"], ["--max-pending", "x"]):
        command = [sys.executable, "-m", "pigeon", "--port", "0", *flags]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, flags
        assert flags[0] in result.stderr
