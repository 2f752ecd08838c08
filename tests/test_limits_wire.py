"""Every limit flag, end to end: a real server process, real sockets."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pigeon.testing import LineClient, ServerProcess
from tests.clients import connected, small_window_client

Start = Callable[..., ServerProcess]


def test_max_connections(start_server: Start) -> None:
    proc = start_server("--max-connections", "2")
    first, second = connected(proc), connected(proc)
    extra = proc.client()
    assert extra.line() == b"ERROR TOO_MANY_CONNECTIONS too many connections (limit 2)"
    assert extra.at_eof()
    assert first.ask("PING") == b"PONG"
    assert second.ask("PING") == b"PONG"
    handles = {c["handle"] for c in stats(first, "CONNECTIONS")["connections"]}
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
    # the rejected connection is logged with the handle it had, not -1
    rejected = re.findall(
        r"closing connection (-?\d+) from 127\.0\.0\.1:\d+: too many connections \(limit 2\)",
        "".join(proc.log),
    )
    assert rejected, "".join(proc.log)
    assert int(rejected[0]) >= 0 and int(rejected[0]) not in handles


def stats(client: LineClient, section: str = "") -> Any:
    """The JSON of a STATS reply."""
    reply = client.ask(f"STATS {section}".strip())
    assert reply.startswith(b"STATS "), reply
    return json.loads(reply[6:])


def test_max_memory_bounds_what_the_broker_holds(start_server: Start) -> None:
    # small enough that the backlog it allows fits in one batch of output (see
    # test_a_subscriber_joining_a_backlog_of_several_batches_gets_all_of_it)
    limit = 1024 * 1024
    proc = start_server("--max-memory", str(limit))
    pub = connected(proc)
    payload = "x" * 500
    accepted = 0
    while True:
        reply = pub.ask(f"PUBLISH {pub.client_id} t {accepted:06d}{payload}")
        if reply != b"PUBLISHED t":
            break
        accepted += 1
        assert accepted < 10_000, "a 1 MiB limit took more than 5 MB of messages"
    refusal = re.fullmatch(rb"ERROR MEMORY_FULL memory limit reached \((\d+) of (\d+) bytes held\)", reply)
    assert refusal is not None, reply
    held, said_limit = map(int, refusal.groups())
    assert said_limit == limit and held <= limit
    figures = stats(pub)
    # each message costs more than its payload, and everything is counted: the core's own tables too
    assert figures["backlog_bytes"] < figures["memory_bytes"] <= figures["memory_limit_bytes"] == limit
    assert figures["backlog_messages"] == accepted > 100
    assert figures["refused"] == 1 and figures["errors"]["memory_full"] == 1
    sub = connected(proc)
    sub.subscribe("t")
    assert [int(line[10:16]) for line in sub.lines(accepted)] == list(range(accepted))
    # drained: room again
    pub.publish("t", "again")
    assert sub.line() == b"MESSAGE t again"


def test_full_backlog(start_server: Start) -> None:
    proc = start_server("--max-backlog", "2")
    pub = connected(proc)
    pub.publish("t", "a")
    pub.publish("t", "b")
    assert (
        pub.ask(f"PUBLISH {pub.client_id} t c")
        == b"ERROR BACKLOG_FULL backlog full (2 messages) for topic 't'"
    )


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


def _reading_paused(observer: LineClient, want: int) -> dict[str, Any]:
    """STATS once ``want`` connections are not being read (polled, with a deadline)."""
    deadline = time.monotonic() + 30
    while True:
        figures: dict[str, Any] = stats(observer)
        if figures["reading_paused"] == want or time.monotonic() > deadline:
            return figures
        time.sleep(0.05)


def _send_until_blocked(sock: socket.socket, chunk: bytes) -> tuple[int, bytes]:
    """Send chunk after chunk until the socket takes no more: bytes taken, and what is left of a chunk."""
    sock.setblocking(False)
    sent = 0
    rest = b""
    stalls = 0
    while stalls < 20:
        data = rest or chunk
        try:
            n = sock.send(data)
        except BlockingIOError:
            # the server may still be reading: give it a moment before calling the socket full
            stalls += 1
            time.sleep(0.05)
            continue
        sent += n
        rest = data[n:]
        stalls = 0
    return sent, rest


def test_a_client_that_sends_but_never_reads_stops_being_read(start_server: Start) -> None:
    proc = start_server("--write-timeout", "0")
    other = connected(proc)
    sock, _ = small_window_client(proc)
    sent, rest = _send_until_blocked(sock, b"PING\n" * 20_000)
    figures = _reading_paused(other, 1)
    assert figures["reading_paused"] == 1 and figures["read_pauses"] >= 1
    assert other.ask("PING") == b"PONG"
    # reading its output again, it gets a PONG for every whole PING it sent, and is read again
    sock.setblocking(True)
    sock.settimeout(30)
    received = b""
    whole = sent // 5 * 5
    while len(received) < whole:
        data = sock.recv(1 << 20)
        assert data, "closed"
        received += data
    assert received == b"PONG\n" * (whole // 5)
    assert _reading_paused(other, 0)["reading_paused"] == 0
    # the PING cut at the end of the sending is still there, waiting for its end
    sock.sendall(rest[: (5 - sent % 5) % 5] + b"PING\n")
    expected = b"PONG\n" * (2 if sent % 5 else 1)
    received = b""
    while len(received) < len(expected):
        data = sock.recv(100)
        assert data, "closed"
        received += data
    assert received == expected
    sock.close()


def test_a_client_that_sends_but_never_reads_is_closed_by_the_write_timeout(start_server: Start) -> None:
    proc = start_server("--write-timeout", "1")
    other = connected(proc)
    sock, _ = small_window_client(proc)
    chunk = b"PING\n" * 20_000
    # the server stops reading it, then aborts it: sending ends in a reset
    with pytest.raises(OSError):
        for _ in range(10_000):
            sock.sendall(chunk)
    sock.close()
    figures = stats(other)
    assert figures["write_timeouts"] == 1 and figures["slow_consumers"] == 0
    assert figures["read_pauses"] >= 1 and figures["connections"] == 1
    proc.stop()
    assert "write timeout: output not taken for 1 s" in "".join(proc.log)


def test_subscriber_that_stops_reading_is_skipped_then_dropped(start_server: Start) -> None:
    proc = start_server("--max-pending", "65536")
    pub, ok = connected(proc), connected(proc)
    slow, slow_id = small_window_client(proc)
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


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-connections", "0"],
        ["--idle-timeout", "-1"],
        ["--write-timeout", "-1"],
        ["--write-timeout", "inf"],
        ["--max-pending", "x"],
        ["--max-backlog", "5000000000"],
        ["--max-backlog", "-1"],
        ["--max-line", "10"],
        ["--max-memory", str(1 << 63)],
        ["--max-subscriptions", str(1 << 31)],
        ["--metrics-topics", "-1"],
    ],
)
def test_cli_refuses_bad_limits(flags: list[str]) -> None:
    command = [sys.executable, "-m", "pigeon", "--port", "0", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, flags
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pigeon: error: argument {flags[0]}: "), result.stderr
