"""The wire protocol end to end: real sockets against a real ``pigeon`` process, on each event loop."""

from __future__ import annotations

import json
import os
import platform
import selectors
import socket
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigeon.bench.load import Options, run
from pigeon.testing import LineClient, ServerProcess

Connect = Callable[[], LineClient]


def _until_gone(observer: LineClient, client_id: str, timeout: float = 10.0) -> None:
    """Wait until the server no longer lists the connection of ``client_id``: it read its EOF.

    ``observer`` is a connected client that receives no messages meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        page = json.loads(observer.ask("STATS CONNECTIONS 0 1000").split(b" ", 1)[1])
        if all(entry["client_id"] != client_id for entry in page["connections"]):
            return
        assert time.monotonic() < deadline, f"the server still lists {client_id} after {timeout} s"
        time.sleep(0.01)


@pytest.mark.smoke
def test_every_command_and_its_reply(server: ServerProcess) -> None:
    c = server.client()
    cid = c.connect()
    assert cid
    assert c.ask("PING") == b"PONG"
    assert c.ask("HELLO").startswith(b'HELLO {"protocol":1,')
    assert c.ask(f"SUBSCRIBE {cid} news") == b"SUBSCRIBED news"
    assert c.ask(f"PUBLISH {cid} news hello there, world") == b"PUBLISHED news"
    assert c.line() == b"MESSAGE news hello there, world"
    assert c.ask(f"UNSUBSCRIBE {cid} news") == b"UNSUBSCRIBED news"
    assert c.ask("DISCONNECT") == b"DISCONNECTED"
    assert c.at_eof()


def test_telnet_style_crlf_and_lowercase(server: ServerProcess) -> None:
    c = server.client()
    c.send(b"connect\r\n")
    cid = c.line().split()[1].decode()
    c.send(f"subscribe {cid} t\r\npublish {cid} t hi\r\n".encode())
    assert c.lines(3) == [b"SUBSCRIBED t", b"PUBLISHED t", b"MESSAGE t hi"]


def test_ids_are_unique_and_cannot_be_borrowed(connect: Connect) -> None:
    a, b = connect(), connect()
    assert a.client_id != b.client_id
    assert a.ask(f"SUBSCRIBE {b.client_id} t").startswith(b"ERROR WRONG_CLIENT_ID client id does not belong")
    assert a.ask(f"PUBLISH {b.client_id} t m").startswith(b"ERROR WRONG_CLIENT_ID client id does not belong")
    assert a.ask(f"UNSUBSCRIBE {b.client_id} t").startswith(
        b"ERROR WRONG_CLIENT_ID client id does not belong"
    )
    assert a.ask("CONNECT") == f"ERROR ALREADY_CONNECTED already connected as '{a.client_id}'".encode()
    b.subscribe("t")
    a.publish("t", "only-one")
    assert b.line() == b"MESSAGE t only-one"


def test_commands_before_connect_get_an_error(server: ServerProcess) -> None:
    c = server.client()
    for command in ("SUBSCRIBE c1 t", "PUBLISH c1 t m", "UNSUBSCRIBE c1 t"):
        assert c.ask(command) == b"ERROR NOT_CONNECTED not connected: send CONNECT first"
    assert c.ask("PING") == b"PONG"


@pytest.mark.smoke
def test_round_robin_with_joins_and_leaves(connect: Connect) -> None:
    pub = connect()
    a, b, c = connect(), connect(), connect()
    for s in (a, b, c):
        s.subscribe("jobs")
    for i in range(6):
        pub.publish("jobs", f"m{i}")
    assert a.lines(2) == [b"MESSAGE jobs m0", b"MESSAGE jobs m3"]
    assert b.lines(2) == [b"MESSAGE jobs m1", b"MESSAGE jobs m4"]
    assert c.lines(2) == [b"MESSAGE jobs m2", b"MESSAGE jobs m5"]
    # b leaves politely, c vanishes, d joins: c was served last, and d subscribed after c,
    # so d's turn comes before a's; nobody skips or repeats
    assert b.ask(f"UNSUBSCRIBE {b.client_id} jobs") == b"UNSUBSCRIBED jobs"
    c.close()
    _until_gone(pub, c.client_id)
    d = connect()
    d.subscribe("jobs")
    for i in range(6, 10):
        pub.publish("jobs", f"m{i}")
    assert d.lines(2) == [b"MESSAGE jobs m6", b"MESSAGE jobs m8"]
    assert a.lines(2) == [b"MESSAGE jobs m7", b"MESSAGE jobs m9"]
    assert b.quiet()


def test_subscribing_twice_is_one_turn_and_the_publisher_may_subscribe(connect: Connect) -> None:
    a, b = connect(), connect()
    a.subscribe("t")
    a.subscribe("t")
    b.subscribe("t")
    a.send(f"PUBLISH {a.client_id} t 1\nPUBLISH {a.client_id} t 2\nPUBLISH {a.client_id} t 3\n")
    assert a.lines(5) == [b"PUBLISHED t", b"MESSAGE t 1", b"PUBLISHED t", b"PUBLISHED t", b"MESSAGE t 3"]
    assert b.line() == b"MESSAGE t 2"


@pytest.mark.smoke
def test_backlog_waits_for_the_first_subscriber_in_order(connect: Connect) -> None:
    pub = connect()
    for i in range(50):
        pub.publish("later", f"m{i}")
    sub = connect()
    sub.subscribe("later")
    assert sub.lines(50) == [f"MESSAGE later m{i}".encode() for i in range(50)]


def test_a_subscriber_joining_a_backlog_of_several_batches_gets_all_of_it(connect: Connect) -> None:
    pub = connect()
    count = 3000
    pub.send("".join(f"PUBLISH {pub.client_id} deep {i:06d}{'.' * 1000}\n" for i in range(count)))
    assert pub.lines(count) == [b"PUBLISHED deep"] * count
    sub = connect()
    sub.sock.settimeout(5)
    sub.subscribe("deep")
    assert [line[13:19] for line in sub.lines(count)] == [f"{i:06d}".encode() for i in range(count)]


def test_a_full_backlog_holds_the_publisher_until_a_subscriber_drains_it() -> None:
    server = ServerProcess("--max-backlog", "3")
    try:
        pub = server.client()
        pub.connect()
        for i in range(3):
            pub.publish("full", f"m{i}")
        pub.send(f"PUBLISH {pub.client_id} full m3\nPING")
        assert pub.quiet(0.5)  # the fourth waits, and so does the PING behind it
        sub = server.client()
        sub.connect()
        sub.subscribe("full")
        assert sub.lines(4) == [b"MESSAGE full m%d" % i for i in range(4)]
        assert pub.lines(2) == [b"PUBLISHED full", b"PONG"]
        assert sub.quiet()
    finally:
        assert server.stop() == 0


def test_a_subscriber_that_goes_away_takes_no_more_turns(connect: Connect) -> None:
    pub, a, b = connect(), connect(), connect()
    a.subscribe("t")
    b.subscribe("t")
    a.close()
    _until_gone(pub, a.client_id)
    for i in range(4):
        pub.publish("t", str(i))
    assert b.lines(4) == [f"MESSAGE t {i}".encode() for i in range(4)]


@pytest.mark.smoke
def test_bad_input_gets_errors_and_disturbs_nobody(connect: Connect) -> None:
    pub, sub, bad = connect(), connect(), connect()
    sub.subscribe("t")
    garbage = [
        b"GREETINGS",
        b"\x00\x01\x02",
        b"\xff\xfe\xfd PUBLISH",
        f"SUBSCRIBE {bad.client_id} bad\x07topic".encode(),
        f"PUBLISH {bad.client_id} {'x' * 300} m".encode(),
        f"SUBSCRIBE {bad.client_id}".encode(),
    ]
    for line in garbage:
        bad.send(line + b"\n")
        pub.publish("t", "still here")
        assert sub.line() == b"MESSAGE t still here"
    replies = bad.lines(len(garbage))
    assert all(r.startswith(b"ERROR ") for r in replies), replies
    assert bad.ask("PING") == b"PONG"


@pytest.mark.smoke
def test_a_line_over_max_line_closes_only_that_connection() -> None:
    server = ServerProcess("--max-line", "1000")
    try:
        good = server.client()
        good.connect()
        good.subscribe("t")
        bad = server.client()
        bad.connect()
        bad.send(b"PUBLISH " + b"x" * 5000)
        assert bad.line() == b"ERROR LINE_TOO_LONG line too long (limit 1000 bytes)"
        assert bad.at_eof()
        good.publish("t", "fine")
        assert good.line() == b"MESSAGE t fine"
    finally:
        assert server.stop() == 0


def test_commands_split_byte_by_byte(server: ServerProcess) -> None:
    c = server.client()
    cid = c.connect()
    stream = f"SUBSCRIBE {cid} t\r\nPUBLISH {cid} t split up\nPING\n".encode()
    for i in range(len(stream)):
        c.send(stream[i : i + 1])
        time.sleep(0.001)
    assert c.lines(4) == [b"SUBSCRIBED t", b"PUBLISHED t", b"MESSAGE t split up", b"PONG"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=30), max_size=40))
def test_any_split_over_a_socket_gives_the_same_replies(server: ServerProcess, cuts: list[int]) -> None:
    c = server.client()
    cid = c.connect()
    stream = (
        f"SUBSCRIBE {cid} s\nPUBLISH {cid} s one two\r\nBOGUS\nping\n\n"
        f"PUBLISH {cid} s  x \nUNSUBSCRIBE {cid} s\n"
    ).encode()
    pos = 0
    for cut in cuts:
        c.send(stream[pos : pos + cut])
        pos += cut
    c.send(stream[pos:])
    assert c.lines(8) == [
        b"SUBSCRIBED s",
        b"PUBLISHED s",
        b"MESSAGE s one two",
        b"ERROR UNKNOWN_COMMAND unknown command 'BOGUS'",
        b"PONG",
        b"PUBLISHED s",
        b"MESSAGE s  x ",
        b"UNSUBSCRIBED s",
    ]
    assert c.ask("PING") == b"PONG"
    c.close()


def _read_lines(client: LineClient, count: int, into: list[bytes]) -> None:
    while len(into) < count:
        chunk = client.sock.recv(1 << 20)
        if not chunk:
            return
        client.buf += chunk
        *lines, client.buf = client.buf.split(b"\n")
        into.extend(lines)


def test_pipelining_100000_publishes(connect: Connect) -> None:
    pub, sub = connect(), connect()
    sub.subscribe("bulk")
    count = 100_000
    payload = b"".join(f"PUBLISH {pub.client_id} bulk {i:08d}\n".encode() for i in range(count))
    replies: list[bytes] = []
    messages: list[bytes] = []
    readers = [
        threading.Thread(target=_read_lines, args=(pub, count, replies)),
        threading.Thread(target=_read_lines, args=(sub, count, messages)),
    ]
    for t in readers:
        t.start()
    pub.sock.sendall(payload)
    for t in readers:
        t.join(60)
    assert replies == [b"PUBLISHED bulk"] * count
    assert messages == [f"MESSAGE bulk {i:08d}".encode() for i in range(count)]


def _small_receive_buffer_client(server: ServerProcess) -> LineClient:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((server.host, server.port))
    client = LineClient.over(sock)
    sock.settimeout(30)
    client.connect()
    return client


def _publish_in_background(
    pub: LineClient, topic: str, count: int, size: int
) -> tuple[threading.Thread, list[bytes]]:
    replies: list[bytes] = []
    reader = threading.Thread(target=_read_lines, args=(pub, count, replies))
    reader.start()
    body = b"".join(
        f"PUBLISH {pub.client_id} {topic} {i:06d}".encode() + b"." * size + b"\n" for i in range(count)
    )
    pub.sock.sendall(body)
    return reader, replies


def _read_until_stopped(client: LineClient, into: list[bytes], stop: threading.Event) -> None:
    client.sock.settimeout(0.2)
    while True:
        try:
            chunk = client.sock.recv(1 << 20)
        except TimeoutError:
            if stop.is_set():
                return
            continue
        client.buf += chunk
        *lines, client.buf = client.buf.split(b"\n")
        into.extend(lines)


def _read_all(clients: list[LineClient], into: list[list[bytes]], total: int, timeout: float = 60) -> None:
    """Read from several clients at once until ``total`` lines arrived between them."""
    selector = selectors.DefaultSelector()
    for i, client in enumerate(clients):
        client.sock.setblocking(False)
        selector.register(client.sock, selectors.EVENT_READ, i)
    deadline = time.monotonic() + timeout
    while sum(map(len, into)) < total and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            client = clients[key.data]
            client.buf += client.sock.recv(1 << 20)
            *lines, client.buf = client.buf.split(b"\n")
            into[key.data].extend(lines)
    selector.close()


def test_a_subscriber_that_stops_reading_is_skipped(server: ServerProcess, connect: Connect) -> None:
    pub, fast = connect(), connect()
    slow = _small_receive_buffer_client(server)
    slow.subscribe("flow")
    fast.subscribe("flow")
    count, size = 1000, 16 * 1024
    got_fast: list[bytes] = []
    got_slow: list[bytes] = []
    stop = threading.Event()
    fast_reader = threading.Thread(target=_read_until_stopped, args=(fast, got_fast, stop))
    fast_reader.start()
    reader, replies = _publish_in_background(pub, "flow", count, size)
    reader.join(60)
    stop.set()
    fast_reader.join(30)
    assert replies == [b"PUBLISHED flow"] * count
    # the slow one starts reading only now: every message arrives exactly once between the two
    _read_all([fast, slow], [got_fast, got_slow], count)
    ids = sorted(m[13:19] for m in got_fast + got_slow)
    assert ids == [f"{i:06d}".encode() for i in range(count)]
    assert len(got_slow) < count // 2 < len(got_fast)


def test_when_every_subscriber_is_paused_the_backlog_holds_messages_in_order(server: ServerProcess) -> None:
    pub = server.client()
    pub.connect()
    slow = _small_receive_buffer_client(server)
    slow.subscribe("held")
    count, size = 600, 16 * 1024
    reader, replies = _publish_in_background(pub, "held", count, size)
    reader.join(60)
    assert replies == [b"PUBLISHED held"] * count
    got: list[bytes] = []
    _read_lines(slow, count, got)
    assert [m[13:19] for m in got] == [f"{i:06d}".encode() for i in range(count)]


def test_eof_after_commands_flushes_replies_then_closes(server: ServerProcess) -> None:
    c = server.client()
    c.send(b"CONNECT\nPING\nPING\n")
    c.sock.shutdown(socket.SHUT_WR)
    assert c.line().startswith(b"CONNECTED ")
    assert c.lines(2) == [b"PONG", b"PONG"]
    assert c.at_eof()


@pytest.mark.smoke
def test_many_clients_at_once(connect: Connect) -> None:
    subs = [connect() for _ in range(50)]
    for s in subs:
        s.subscribe("wide")
    pub = connect()
    for i in range(100):
        pub.publish("wide", str(i))
    for n, s in enumerate(subs):
        assert s.lines(2) == [f"MESSAGE wide {n}".encode(), f"MESSAGE wide {n + 50}".encode()]


def _minor_faults(pid: int) -> int:
    """The process's minor page faults so far (field 10 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/stat"), reason="glibc on Linux"
)
def test_piping_messages_does_not_fault_pages_per_batch() -> None:
    """Output batches are kept on the heap (pigeon._core.keep_heap): with glibc's defaults every
    flush's batch came from fresh pages, about 5 minor faults per 1,000 messages piped."""
    server = ServerProcess()
    try:
        probe = server.client()
        probe.connect()

        def delivered() -> int:
            return int(json.loads(probe.ask("STATS")[len("STATS ") :])["delivered"])

        run(Options(port=server.port, duration=0.5, warmup=0.2, progress=False), ["pipe"])
        before, faults = delivered(), _minor_faults(server.proc.pid)
        run(Options(port=server.port, duration=1.5, warmup=0.0, progress=False), ["pipe"])
        piped = delivered() - before
        faults = _minor_faults(server.proc.pid) - faults
    finally:
        server.stop()
    assert piped > 100_000
    assert faults * 1000 / piped < 1.0, (faults, piped)
