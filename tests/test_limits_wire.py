"""Every limit flag, end to end: a real server process, real sockets."""

from __future__ import annotations

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
from tests.monitoring import stats_of as stats
from tests.monitoring import wait_for_held

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


# The most one socket read gives the core (READ_ROOM in pigeon/core/parser.pxd): what a held
# publisher sent after its waiting PUBLISH is kept, and may take memory past --max-memory.
READ_BYTES = 256 * 1024


# 2.5 MB of messages: more than MEMORY_LIMIT lets the broker hold; small enough that the backlog
# it allows fits in one batch of output (see
# test_a_subscriber_joining_a_backlog_of_several_batches_gets_all_of_it)
FLOOD_COUNT = 5000
MEMORY_LIMIT = 1024 * 1024


def flood_until_held(proc: ServerProcess) -> tuple[LineClient, LineClient, threading.Thread, dict[str, Any]]:
    """A publisher that sent FLOOD_COUNT messages to 't' (from a thread, never reading its replies)
    and now waits for memory; an observer; the sending thread; STATS while it waits."""
    pub, observer = connected(proc), connected(proc)
    flood = "".join(f"PUBLISH {pub.client_id} t {i:06d}{'x' * 500}\n" for i in range(FLOOD_COUNT))
    sender = threading.Thread(target=pub.send, args=(flood,), daemon=True)
    sender.start()
    return pub, observer, sender, wait_for_held(observer, 1)


def test_a_publisher_over_max_memory_waits_instead_of_being_refused(start_server: Start) -> None:
    proc = start_server("--max-memory", str(MEMORY_LIMIT))
    _, observer, _, held = flood_until_held(proc)
    # over the limit by at most the one read that came with the waiting PUBLISH
    assert held["backlog_bytes"] < MEMORY_LIMIT < held["memory_bytes"] <= MEMORY_LIMIT + READ_BYTES
    assert held["backlog_messages"] == held["published"] < FLOOD_COUNT
    assert (held["refused"], held["errors"]["memory_full"], held["publish_holds"]) == (0, 0, 1)
    conns = {c["client_id"]: c["held"] for c in stats(observer, "CONNECTIONS")["connections"]}
    assert sorted(conns.values()) == [False, True]


def test_a_publisher_held_for_memory_goes_on_once_a_subscriber_drains(start_server: Start) -> None:
    proc = start_server("--max-memory", str(MEMORY_LIMIT))
    pub, observer, sender, _ = flood_until_held(proc)
    sub = connected(proc)
    sub.subscribe("t")
    # nobody else sends anything now: the drained backlog alone must let the publisher go on
    sub.sock.settimeout(10)
    assert [int(line[10:16]) for line in sub.lines(FLOOD_COUNT)] == list(range(FLOOD_COUNT))
    sender.join(30)
    assert pub.lines(FLOOD_COUNT) == [b"PUBLISHED t"] * FLOOD_COUNT
    after = stats(observer)
    assert (after["publishers_held"], after["refused"], after["errors"]["memory_full"]) == (0, 0, 0)
    assert after["memory_bytes"] <= MEMORY_LIMIT


def test_a_publisher_to_a_full_backlog_waits_until_it_is_half_empty(start_server: Start) -> None:
    proc = start_server("--max-backlog", "4")
    pub, consumer = connected(proc), connected(proc)
    for i in range(4):
        pub.publish("t", f"m{i}")
    pub.send(f"PUBLISH {pub.client_id} t m4\nPING")
    held = wait_for_held(consumer, 1)
    assert (held["publish_holds"], held["refused"], held["backlog_messages"]) == (1, 0, 4)
    conns = {c["client_id"]: c for c in stats(consumer, "CONNECTIONS")["connections"]}
    assert conns[pub.client_id]["held"] and not conns[consumer.client_id]["held"]
    # one message taken leaves three of four: still held; two taken leave half: it goes on
    assert consumer.ask(f"SUBSCRIBE {consumer.client_id} t ACK PREFETCH 1") == b"SUBSCRIBED t"
    assert consumer.line() == b"DELIVER t 1 1 m0"
    assert stats(consumer)["publishers_held"] == 1
    consumer.send(f"ACK {consumer.client_id} 1")
    assert consumer.line() == b"DELIVER t 2 1 m1"
    assert pub.lines(2) == [b"PUBLISHED t", b"PONG"]
    after = stats(consumer)
    assert (after["publishers_held"], after["publish_holds"], after["backlog_messages"]) == (0, 1, 3)
    assert after["errors"]["backlog_full"] == 0


def test_a_publisher_that_consumes_the_topic_is_refused_not_held(start_server: Start) -> None:
    """The no-deadlock rule: waiting for a backlog only its own acks can drain would never end."""
    proc = start_server("--max-backlog", "2", "--max-memory", str(1024 * 1024))
    worker = connected(proc)
    assert worker.ask(f"SUBSCRIBE {worker.client_id} t ACK PREFETCH 1") == b"SUBSCRIBED t"
    worker.send(f"PUBLISH {worker.client_id} t m0")
    assert worker.lines(2) == [b"PUBLISHED t", b"DELIVER t 1 1 m0"]
    worker.publish("t", "m1")
    worker.publish("t", "m2")
    assert worker.ask(f"PUBLISH {worker.client_id} t m3") == (
        b"ERROR BACKLOG_FULL backlog full (2 messages) for topic 't'"
    )
    # it is still read: its ack takes the next message
    worker.send(f"ACK {worker.client_id} 1")
    assert worker.line() == b"DELIVER t 2 1 m1"
    figures = stats(worker)
    assert (figures["publishers_held"], figures["publish_holds"], figures["refused"]) == (0, 0, 1)
    assert figures["errors"]["backlog_full"] == 1


def test_a_publisher_that_consumes_the_topic_is_refused_not_held_over_max_memory(
    start_server: Start,
) -> None:
    proc = start_server("--max-memory", str(MEMORY_LIMIT))
    worker = connected(proc)
    assert worker.ask(f"SUBSCRIBE {worker.client_id} t ACK PREFETCH 1") == b"SUBSCRIBED t"
    payload = "x" * 1000
    worker.send(f"PUBLISH {worker.client_id} t {0:06d}{payload}")
    assert worker.lines(2) == [b"PUBLISHED t", b"DELIVER t 1 1 000000" + payload.encode()]
    accepted = 1
    while (reply := worker.ask(f"PUBLISH {worker.client_id} t {accepted:06d}{payload}")) == b"PUBLISHED t":
        accepted += 1
        assert accepted < 2000, "a 1 MiB limit took more than 2 MB of messages"
    refusal = re.fullmatch(rb"ERROR MEMORY_FULL memory limit reached \((\d+) of (\d+) bytes held\)", reply)
    assert refusal is not None, reply
    assert int(refusal.group(2)) == MEMORY_LIMIT
    # still read: its ack takes the next message
    worker.send(f"ACK {worker.client_id} 1")
    assert worker.line() == b"DELIVER t 2 1 000001" + payload.encode()
    figures = stats(worker)
    assert (figures["publishers_held"], figures["publish_holds"], figures["refused"]) == (0, 0, 1)
    assert figures["backlog_messages"] == accepted - 2 and figures["errors"]["memory_full"] == 1


def test_a_message_over_a_quarter_of_max_memory_is_refused_not_held(start_server: Start) -> None:
    proc = start_server("--max-memory", "400000")
    pub, observer = connected(proc), connected(proc)
    # Waiting cannot help a message larger than a quarter of the budget. Over a socket its line
    # mostly arrives in several reads and meets the rule for unfinished input first (which closes
    # the connection); read whole, it gets the PUBLISH refusal. Either way: MEMORY_FULL, no wait.
    reply = pub.ask(f"PUBLISH {pub.client_id} q {'x' * 150_000}")
    assert re.fullmatch(
        rb"ERROR MEMORY_FULL memory limit reached( \(\d+ of 400000 bytes held\)"
        rb"|: cannot hold \d+ bytes of input)",
        reply,
    ), reply
    figures = stats(observer)
    assert (figures["publishers_held"], figures["publish_holds"], figures["errors"]["memory_full"]) == (
        0,
        0,
        1,
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
