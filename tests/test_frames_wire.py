"""Binary-safe messages (protocol 2) over real sockets against a ``pigeon`` process.

The framed ``PUB <client_id> <topic> <nbytes>`` and ``HELLO 2`` with its
``MSG``/``DMSG`` deliveries, from raw sockets and from the client library:
every byte value, payload sizes around every buffer boundary, frames cut
into one-byte writes, text and framed commands pipelined, what a v1 (text)
subscriber gets, refusals (over ``--max-payload``, unreadable headers,
memory), backlogs, NACK, dead letters and restarts with ``--data-dir``.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pigeon import FeatureNotSupportedError
from pigeon._core import LIMIT_DEFAULTS
from pigeon.testing import LineClient, ServerProcess
from tests.faces import OpenClient
from tests.monitoring import get
from tests.test_client import _Address

StartServer = Callable[..., ServerProcess]

# the buffers a payload crosses: the core's read room, a pooled record's largest size class
# (POOL_CLASSES - 1 steps of 32 bytes, less the 32-byte record header), the default out_batch
# and the client's read size
READ_ROOM = 256 * 1024
POOLED_MAX = 16 * 32 - 32
OUT_BATCH = LIMIT_DEFAULTS["out_batch"]
MAX_LINE = 4096
MAX_PAYLOAD = 2 * 1024 * 1024
# binary payloads a text line cannot carry as they are, and what a v1 subscriber gets instead
V1_ALTERED = [
    (b"a\nb", b"a b"),
    (b"x\r", b"x "),
    (b"a\r\nb", b"a\r b"),
    (b"\n", b" "),
    (b"\r\r", b"\r "),
]
# nasty bytes: every line end, NUL, invalid UTF-8
NASTY = b"\r\n\x00\xff\xfe\n\r\x80 ok \r"


def _frame(cid: str, topic: bytes, payload: bytes, end: bytes = b"\n") -> bytes:
    return b"PUB %s %s %d%s%s%s" % (cid.encode(), topic, len(payload), end, payload, end)


def _framed(server: ServerProcess) -> LineClient:
    """A raw connection that sent HELLO 2 and CONNECT."""
    client = server.client()
    assert json.loads(client.ask("HELLO 2")[6:])["protocol"] == 2
    client.connect()
    return client


@pytest.fixture
def framed(server: ServerProcess) -> Iterator[Callable[[], LineClient]]:
    clients: list[LineClient] = []

    def make() -> LineClient:
        client = _framed(server)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _stats(client: LineClient) -> dict[str, object]:
    reply = client.ask("STATS")
    assert reply.startswith(b"STATS ")
    figures: dict[str, object] = json.loads(reply[6:])
    return figures


def test_hello_2_names_the_protocol_the_features_and_max_payload(server: ServerProcess) -> None:
    client = server.client()
    v1 = json.loads(client.ask("HELLO")[6:])
    assert v1["protocol"] == 1 and v1["max_payload"] == LIMIT_DEFAULTS["max_payload"]
    assert v1["features"] == ["ack", "binary", "groups", "wildcards", "request"]
    v2 = json.loads(client.ask("hello 2")[6:])
    assert v2 == {**v1, "protocol": 2}
    assert json.loads(client.ask("HELLO")[6:])["protocol"] == 2, "bare HELLO answers for the current protocol"
    assert client.ask("HELLO 3") == b"ERROR USAGE usage: HELLO [1|2]"
    assert json.loads(client.ask("HELLO 1")[6:])["protocol"] == 1


def test_features_follow_the_servers_flags(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("--data-dir", str(tmp_path), "--max-payload", "1000")
    hello = json.loads(server.client().ask("HELLO 2")[6:])
    assert (
        hello["features"] == ["ack", "binary", "groups", "wildcards", "request", "persistence"]
        and hello["max_payload"] == 1000
    )


def test_every_byte_value_round_trips(framed: Callable[[], LineClient]) -> None:
    sub, pub = framed(), framed()
    sub.subscribe("bytes")
    payloads = [bytes([value]) for value in range(256)] + [bytes(range(256)), bytes(range(255, -1, -1)), b""]
    pub.send(b"".join(_frame(pub.client_id, b"bytes", payload) for payload in payloads))
    assert pub.lines(len(payloads)) == [b"PUBLISHED bytes"] * len(payloads)
    for payload in payloads:
        assert sub.frame() == (b"MSG bytes %d" % len(payload), payload)


def test_a_frame_split_into_one_byte_writes_is_one_frame(framed: Callable[[], LineClient]) -> None:
    sub, pub = framed(), framed()
    sub.subscribe("slow")
    data = _frame(pub.client_id, b"slow", NASTY, b"\r\n") + b"PING\n"
    for i in range(len(data)):
        pub.send(data[i : i + 1])
        time.sleep(0.002)  # so that the server reads most bytes on their own
    assert pub.lines(2) == [b"PUBLISHED slow", b"PONG"]
    assert sub.frame() == (b"MSG slow %d" % len(NASTY), NASTY)


def _figure(client: LineClient, name: str) -> int:
    value = _stats(client)[name]
    assert isinstance(value, int)
    return value


def test_a_max_size_frame_in_64_kib_pieces_is_one_frame_held_once(framed: Callable[[], LineClient]) -> None:
    """A large frame's remainder is read straight into its own buffer: the partly received
    frame is held once (not also in a read buffer grown to its size), and each of its bytes
    is copied once, not again at every read."""
    sub, pub, watcher = framed(), framed(), framed()
    sub.subscribe("big")
    size = LIMIT_DEFAULTS["max_payload"]
    payload = bytes(i * 13 % 256 for i in range(size))
    data = _frame(pub.client_id, b"big", payload, b"\r\n") + b"PING\n"
    memory, read = _figure(watcher, "memory_bytes"), _figure(watcher, "bytes_in")
    piece = 64 * 1024
    sent = size - piece  # all but the end of the frame, 64 KiB at a time
    for start in range(0, sent, piece):
        pub.send(data[start : start + piece])
    deadline = time.monotonic() + 10
    while _figure(watcher, "bytes_in") - read < sent:
        assert time.monotonic() < deadline, "the server did not read the frame"
        time.sleep(0.01)
    # held in a read buffer grown to the frame as well, it would be about twice the frame
    assert _figure(watcher, "memory_bytes") - memory < size + size // 4
    pub.send(data[sent:])
    assert pub.lines(2) == [b"PUBLISHED big", b"PONG"]
    assert sub.frame() == (b"MSG big %d" % size, payload)
    # the next large frame reuses the buffer the first one left
    reversed_payload = payload[::-1]
    pub.send(_frame(pub.client_id, b"big", reversed_payload) + b"PING\n")
    assert pub.lines(2) == [b"PUBLISHED big", b"PONG"]
    assert sub.frame() == (b"MSG big %d" % size, reversed_payload)


@pytest.mark.slow
def test_a_frame_over_the_in_place_size_in_one_byte_pieces_is_one_frame(start_server: StartServer) -> None:
    size = READ_ROOM + 1000
    server = start_server("--max-payload", str(size))
    sub, pub = _framed(server), _framed(server)
    sub.subscribe("bytes")
    payload = bytes(i * 7 % 251 for i in range(size))
    data = _frame(pub.client_id, b"bytes", payload) + b"PING\n"
    for i in range(len(data)):
        pub.send(data[i : i + 1])
    assert pub.lines(2) == [b"PUBLISHED bytes", b"PONG"]
    assert sub.frame() == (b"MSG bytes %d" % size, payload)


def test_text_and_framed_commands_pipelined(framed: Callable[[], LineClient]) -> None:
    sub, pub = framed(), framed()
    cid = pub.client_id
    pub.send(
        f"SUBSCRIBE {cid} mine\nPUBLISH {cid} t1 plain text\n".encode()
        + _frame(cid, b"t1", b"PUBLISH x y\nPING\n")
        + b"PING\n"
        + _frame(cid, b"mine", b"")
        + f"publish {cid} mine two words\n".encode()
        + _frame(cid, b"t1", b"\r\n", b"\r\n")
        + b"HELLO 1\n"
        + _frame(cid, b"mine", b"back to\ntext")
    )
    assert pub.lines(5) == [b"SUBSCRIBED mine", b"PUBLISHED t1", b"PUBLISHED t1", b"PONG", b"PUBLISHED mine"]
    assert pub.frame() == (b"MSG mine 0", b"")
    assert pub.line() == b"PUBLISHED mine"
    assert pub.frame() == (b"MSG mine 9", b"two words")
    assert pub.line() == b"PUBLISHED t1"
    assert pub.line().startswith(b'HELLO {"protocol":1')
    assert pub.lines(2) == [b"PUBLISHED mine", b"MESSAGE mine back to text"]
    sub.subscribe("t1")
    assert [sub.frame() for _ in range(3)] == [
        (b"MSG t1 10", b"plain text"),
        (b"MSG t1 17", b"PUBLISH x y\nPING\n"),
        (b"MSG t1 2", b"\r\n"),
    ]


@pytest.mark.slow
def test_payload_sizes_around_every_buffer_boundary(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--max-line", str(MAX_LINE), "--max-payload", str(MAX_PAYLOAD))
    sub, pub = open_client(server), open_client(server)
    sub.subscribe("sizes")
    sizes = sorted(
        {
            size + delta
            for size in (0, 32, POOLED_MAX, MAX_LINE, 65536, READ_ROOM, OUT_BATCH, MAX_PAYLOAD)
            for delta in (-1, 0, 1)
            if 0 <= size + delta <= MAX_PAYLOAD
        }
    )
    for size in sizes:
        payload = bytes(i * 7 % 251 for i in range(size))
        pub.publish("sizes", payload)
        message = sub.next_message(timeout=10)
        assert (message.topic, len(message.data)) == ("sizes", size)
        assert message.data == payload, f"a payload of {size} bytes changed"
    raw = server.client()
    raw.connect()
    raw.send(_frame(raw.client_id, b"sizes", b"x" * (MAX_PAYLOAD + 1)) + b"PING\n")
    assert raw.line() == (
        b"ERROR PAYLOAD_TOO_LARGE payload of %d bytes is over the limit of %d bytes"
        % (MAX_PAYLOAD + 1, MAX_PAYLOAD)
    )
    assert raw.line() == b"PONG", "the payload was skipped and the connection went on"


def test_a_refused_frame_is_skipped_and_the_connection_goes_on(start_server: StartServer) -> None:
    server = start_server("--max-payload", "4")
    client = server.client()
    client.connect()
    cid = client.client_id
    client.send(_frame(cid, b"t", b"PING\n") + _frame("c999", b"t", b"PING") + _frame(cid, b"bad\x01", b"\n"))
    assert client.line() == b"ERROR PAYLOAD_TOO_LARGE payload of 5 bytes is over the limit of 4 bytes"
    assert client.line() == b"ERROR WRONG_CLIENT_ID client id does not belong to this connection: 'c999'"
    assert client.line().startswith(b"ERROR BAD_TOPIC ")
    assert client.ask("PING") == b"PONG"
    assert _stats(client)["errors"] == {**_stats(client)["errors"], "payload_too_large": 1}  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (
            b"PUB %s t\nabc\n",
            b"ERROR BAD_FRAME usage: PUB <client_id> <topic> <nbytes>, a line end, the payload",
        ),
        (b"PUB %s t many\nabc\n", b"ERROR BAD_FRAME usage: PUB"),
        (b"PUB %s t 3 4\nabc\n", b"ERROR BAD_FRAME usage: PUB"),
        (b"PUB %s t 2\nabc\n", b"ERROR BAD_FRAME payload of 2 bytes is not followed by a line end"),
        (b"PUB %s t 2\nab\rc\n", b"ERROR BAD_FRAME payload of 2 bytes is not followed by a line end"),
    ],
    ids=["no count", "a word", "extra field", "count short", "lone CR"],
)
def test_a_frame_whose_end_cannot_be_found_closes_the_connection(
    server: ServerProcess, data: bytes, error: bytes
) -> None:
    client = server.client()
    client.connect()
    client.send(data % client.client_id.encode() + b"PING\n")
    assert client.line().startswith(error)
    assert client.at_eof()


def test_a_v1_subscriber_gets_each_lf_and_a_final_cr_as_a_space(framed: Callable[[], LineClient]) -> None:
    """The documented rule (docs/protocol.md, "Binary payloads and v1 subscribers"): v1 framing
    holds, text-safe payloads are unchanged, the others are altered as stated and counted."""
    server_side = framed()
    v1 = LineClient(*server_side.sock.getpeername()[:2])
    v1.connect()
    v1.subscribe("v1")
    acked = LineClient(*server_side.sock.getpeername()[:2])
    acked.connect()
    assert acked.ask(f"SUBSCRIBE {acked.client_id} v1.acked ACK") == b"SUBSCRIBED v1.acked"
    pub = framed()
    safe = [b"", b"tab\there", b"\x00\xff", b"mid\rcr", b" "]
    for payload in safe + [payload for payload, _ in V1_ALTERED]:
        pub.send(_frame(pub.client_id, b"v1", payload) + _frame(pub.client_id, b"v1.acked", payload))
        assert pub.lines(2) == [b"PUBLISHED v1", b"PUBLISHED v1.acked"]
    expected = safe + [text for _, text in V1_ALTERED]
    assert v1.lines(len(expected)) == [b"MESSAGE v1 " + text for text in expected]
    assert acked.lines(len(expected)) == [
        b"DELIVER v1.acked %d 1 %s" % (i, text) for i, text in enumerate(expected, 1)
    ]
    assert _stats(pub)["v1_altered"] == 2 * len(V1_ALTERED)
    # the message itself is not altered: given back, it reaches a protocol 2 subscriber as published
    v2 = framed()
    assert v2.ask(f"SUBSCRIBE {v2.client_id} v1.acked ACK") == b"SUBSCRIBED v1.acked"
    assert acked.ask(f"UNSUBSCRIBE {acked.client_id} v1.acked") == b"UNSUBSCRIBED v1.acked"
    got = [v2.frame() for _ in expected]
    assert [payload for _, payload in got] == safe + [payload for payload, _ in V1_ALTERED]
    assert [header.split(b" ")[:4] for header, _ in got] == [
        [b"DMSG", b"v1.acked", b"%d" % i, b"2"] for i in range(1, 11)
    ]


def test_backlog_nack_and_dead_letters_keep_the_bytes(start_server: StartServer) -> None:
    server = start_server("--max-deliveries", "2")
    pub = _framed(server)
    pub.send(_frame(pub.client_id, b"jobs", NASTY))
    assert pub.line() == b"PUBLISHED jobs"
    worker = _framed(server)
    assert worker.ask(f"SUBSCRIBE {worker.client_id} jobs ACK") == b"SUBSCRIBED jobs"
    assert worker.frame() == (b"DMSG jobs 1 1 %d" % len(NASTY), NASTY)
    worker.send(f"NACK {worker.client_id} 1\n")
    assert worker.frame() == (b"DMSG jobs 2 2 %d" % len(NASTY), NASTY)
    dead = _framed(server)
    dead.subscribe("jobs.dead")
    worker.send(f"NACK {worker.client_id} 2\n")
    assert dead.frame() == (b"MSG jobs.dead %d" % len(NASTY), NASTY)


@pytest.mark.slow
def test_a_restart_with_a_data_dir_keeps_the_bytes(start_server: StartServer, tmp_path: Path) -> None:
    payloads = [NASTY, b"", b"\n", bytes(range(256)) * 300]
    first = start_server("--data-dir", str(tmp_path))
    pub = _framed(first)
    pub.send(b"".join(_frame(pub.client_id, b"kept", payload) for payload in payloads))
    assert pub.lines(len(payloads)) == [b"PUBLISHED kept"] * len(payloads)
    assert first.stop() == 0
    second = start_server("--data-dir", str(tmp_path))
    sub = _framed(second)
    sub.subscribe("kept")
    assert [sub.frame() for _ in payloads] == [(b"MSG kept %d" % len(p), p) for p in payloads]


def test_a_payload_memory_cannot_hold_is_refused_and_skipped(start_server: StartServer) -> None:
    server = start_server("--max-memory", str(8 * 1024 * 1024), "--max-payload", str(8 * 1024 * 1024))
    client = server.client()
    client.connect()
    big = 8 * 1024 * 1024
    client.sock.sendall(b"PUB %s t %d\n" % (client.client_id.encode(), big))
    assert client.line() == b"ERROR MEMORY_FULL memory limit reached: cannot hold a payload of %d bytes" % big
    client.sock.sendall(b"z" * big + b"\nPING\n")
    assert client.line() == b"PONG"
    # one that fits in memory to be received is still over a quarter of it to be kept (and
    # received and kept it would not fit)
    client.send(_frame(client.client_id, b"t", b"y" * (5 * 1024 * 1024)))
    assert client.line().startswith(b"ERROR MEMORY_FULL memory limit reached (")
    assert client.ask("PING") == b"PONG"


# ------------------------------------------------------------ the client library


def test_the_client_round_trips_bytes_and_str(server: ServerProcess, open_client: OpenClient) -> None:
    sub, pub = open_client(server), open_client(server)
    assert pub.server_info.protocol == 2 and pub.server_info.max_payload == LIMIT_DEFAULTS["max_payload"]
    sub.subscribe("lib")
    sub.subscribe("lib.acked", ack=True)
    payloads = [NASTY, bytes(range(256)), b"", "héllo\nwörld\r"]
    for payload in payloads:
        pub.publish("lib", payload)
        pub.publish("lib.acked", payload, wait=False)
    assert pub.flush() == []
    assert pub.publish_many("lib", [NASTY, b"\n\n", bytearray(b"\r")]) == []
    wanted = [p.encode() if isinstance(p, str) else p for p in payloads]
    got = [sub.next_message(timeout=10) for _ in range(2 * len(payloads) + 3)]
    plain = [m for m in got if m.topic == "lib"]
    acked = [m for m in got if m.topic == "lib.acked"]
    assert [m.data for m in plain] == [*wanted, NASTY, b"\n\n", b"\r"]
    assert [m.data for m in acked] == wanted and all(m.attempt == 1 for m in acked)
    assert acked[-1].text == "héllo\nwörld\r"
    sub.ack(acked)


@pytest.fixture
def v1_server() -> Iterator[_Address]:
    """A fake server older than protocol 2: it refuses HELLO 2 as a v1 server does, then answers HELLO."""
    listener = socket.create_server(("127.0.0.1", 0))
    hello = b'HELLO {"protocol":1,"max_line":4096,"topic_max":255,"idle_timeout":0.0,"features":["ack"]}\n'

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(1024).startswith(b"HELLO 2\n")
            conn.sendall(b"ERROR USAGE usage: HELLO\nCONNECTED c7\n")
            assert conn.recv(1024) == b"HELLO\n"
            conn.sendall(hello)
            conn.recv(1024)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield _Address(*listener.getsockname()[:2])
    listener.close()
    thread.join(5)


def test_binary_to_a_server_without_binary_is_refused_before_sending(
    v1_server: _Address, open_client: OpenClient
) -> None:
    client = open_client(v1_server)
    assert client.server_info.protocol == 1 and client.server_info.max_payload is None
    with pytest.raises(FeatureNotSupportedError, match="no 'binary'") as info:
        client.publish("t", b"a\nb")
    assert info.value.feature == "binary"
    with pytest.raises(FeatureNotSupportedError):
        client.publish_many("t", ["fine", "ends in CR\r"])


def test_a_backlog_holding_max_backlog_bytes_holds_its_publishers(start_server: StartServer) -> None:
    """Large payloads cannot grow a backlog past --max-backlog-bytes: the publisher waits (the
    bound behind the RSS figures in BENCHMARKS.md), and goes on once a subscriber drains it."""
    server = start_server("--max-backlog-bytes", "1000")
    pub = _framed(server)
    pub.send(b"".join(_frame(pub.client_id, b"big", bytes([i]) * 400) for i in range(5)))
    assert pub.lines(3) == [b"PUBLISHED big"] * 3, "1,200 bytes held: the next one waits"
    assert pub.quiet(0.3)
    sub = _framed(server)
    sub.subscribe("big")
    assert [sub.frame()[1] for _ in range(5)] == [bytes([i]) * 400 for i in range(5)]
    assert pub.lines(2) == [b"PUBLISHED big"] * 2
    assert _stats(pub)["publish_holds"] == 1


def test_metrics_count_the_altered_v1_deliveries(monitored: tuple[ServerProcess, str]) -> None:
    server, url = monitored
    v1 = server.client()
    v1.connect()
    v1.subscribe("m")
    pub = _framed(server)
    pub.send(_frame(pub.client_id, b"m", b"two\nlines") + _frame(pub.client_id, b"m", b"one line"))
    assert v1.lines(2) == [b"MESSAGE m two lines", b"MESSAGE m one line"]
    body = get(url + "metrics")[2]
    assert re.search(rb"^pigeon_v1_altered_total 1\.0$", body, re.MULTILINE), body
