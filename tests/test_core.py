"""The core without sockets: bytes in, output bytes out."""

from __future__ import annotations

import gc
import sys
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon._core import Broker
from pigeon.protocol import TOPIC_MAX

INVISIBLE = b"ERROR BAD_TOPIC topic must not contain whitespace, control, format or separator characters"
SUBSCRIBE_USAGE = b"ERROR USAGE usage: SUBSCRIBE <client_id> <topic> [ACK [PREFETCH <n>]]"


class Harness:
    """A broker with recording writers: one list of output chunks per connection."""

    def __init__(self, **limits: float) -> None:
        self.broker = Broker(**limits)  # type: ignore[arg-type]  # limits only, by name
        self.out: dict[int, list[bytes]] = {}

    def open(self) -> int:
        chunks: list[bytes] = []
        handle = self.broker.open(chunks.append)
        self.out[handle] = chunks
        return handle

    def connected(self) -> tuple[int, str]:
        handle = self.open()
        assert self.broker.feed(handle, b"CONNECT\n")
        return handle, self.take(handle).split()[1].decode()

    def subscribed(self, topic: str = "t") -> tuple[int, str]:
        """A connection that connected and subscribed to ``topic`` (its replies taken), and its client id."""
        handle, client_id = self.connected()
        reply = self.feed(handle, f"SUBSCRIBE {client_id} {topic}\n".encode())
        assert reply == f"SUBSCRIBED {topic}\n".encode()
        return handle, client_id

    def take(self, handle: int) -> bytes:
        data = b"".join(self.out[handle])
        self.out[handle].clear()
        return data

    def feed(self, handle: int, data: bytes) -> bytes:
        self.broker.feed(handle, data)
        return self.take(handle)


def test_connect_assigns_distinct_ids_and_refuses_a_second_connect() -> None:
    h = Harness()
    a, id_a = h.connected()
    _, id_b = h.connected()
    assert id_a != id_b and " " not in id_a
    assert h.broker.client_id(a) == id_a
    assert h.feed(a, b"CONNECT\n") == f"ERROR ALREADY_CONNECTED already connected as '{id_a}'\n".encode()
    assert h.broker.client_id(a) == id_a


def test_commands_before_connect_are_refused() -> None:
    h = Harness()
    a = h.open()
    out = h.feed(a, b"SUBSCRIBE x t\nPUBLISH x t m\nUNSUBSCRIBE x t\nPING\n")
    assert out == b"ERROR NOT_CONNECTED not connected: send CONNECT first\n" * 3 + b"PONG\n"
    assert h.broker.topic_info(b"t") is None


def test_an_id_that_is_not_the_connections_own_changes_nothing() -> None:
    h = Harness()
    a, _ = h.connected()
    b, id_b = h.connected()
    out = h.feed(a, f"SUBSCRIBE {id_b} t\nPUBLISH {id_b} t m\n".encode())
    assert out.count(b"ERROR WRONG_CLIENT_ID client id does not belong to this connection") == 2
    assert h.broker.topic_info(b"t") is None
    assert h.take(b) == b""


def test_subscribed_says_what_each_connection_holds_after_its_subscribe() -> None:
    h = Harness(max_subscriptions=3)
    a, id_a = h.connected()
    b, _ = h.connected()
    lines = f"SUBSCRIBE {id_a} t\nSUBSCRIBE {id_a} p.>\nSUBSCRIBE {id_a} p.* GROUP g\nSUBSCRIBE {id_a} q.>\n"
    assert h.feed(a, lines.encode()).endswith(
        b"\nERROR TOO_MANY_SUBSCRIPTIONS too many subscriptions on this connection (limit 3)\n"
    )
    assert [h.broker.subscribed(a, *args) for args in ((b"t",), (b"p.>",), (b"p.*", b"g"))] == [True] * 3
    # not the refused one, not another kind of the same name, not another connection's
    assert not h.broker.subscribed(a, b"q.>")
    assert not h.broker.subscribed(a, b"p.*") and not h.broker.subscribed(a, b"p.>", b"g")
    assert not h.broker.subscribed(b, b"t") and not h.broker.subscribed(b, b"p.>")
    assert h.feed(a, f"UNSUBSCRIBE {id_a} p.>\n".encode()) == b"UNSUBSCRIBED p.>\n"
    assert not h.broker.subscribed(a, b"p.>")
    assert not h.broker.subscribed(a, b"") and not h.broker.subscribed(a, b"t", b"")


def test_round_robin_in_subscription_order() -> None:
    h = Harness()
    pub, pid = h.connected()
    subs = [h.connected() for _ in range(3)]
    for s, sid in subs:
        assert h.feed(s, f"SUBSCRIBE {sid} jobs\n".encode()) == b"SUBSCRIBED jobs\n"
    out = h.feed(pub, b"".join(f"PUBLISH {pid} jobs m{i}\n".encode() for i in range(7)))
    assert out == b"PUBLISHED jobs\n" * 7
    assert h.take(subs[0][0]) == b"MESSAGE jobs m0\nMESSAGE jobs m3\nMESSAGE jobs m6\n"
    assert h.take(subs[1][0]) == b"MESSAGE jobs m1\nMESSAGE jobs m4\n"
    assert h.take(subs[2][0]) == b"MESSAGE jobs m2\nMESSAGE jobs m5\n"


@pytest.mark.parametrize(
    ("leaver", "next_two"),
    [(0, (1, 2)), (1, (2, 0)), (2, (1, 0))],  # after subs[0] was served, whose turns come next
)
@pytest.mark.parametrize("how", ["unsubscribe", "close"])
def test_a_leaver_makes_nobody_skip_or_repeat_a_turn(
    leaver: int, next_two: tuple[int, int], how: str
) -> None:
    h = Harness()
    pub, pid = h.connected()
    subs = [h.connected() for _ in range(3)]
    for s, sid in subs:
        h.feed(s, f"SUBSCRIBE {sid} t\n".encode())
    h.feed(pub, f"PUBLISH {pid} t first\n".encode())
    assert h.take(subs[0][0]).endswith(b"MESSAGE t first\n")
    s, sid = subs[leaver]
    if how == "unsubscribe":
        assert h.feed(s, f"UNSUBSCRIBE {sid} t\n".encode()) == b"UNSUBSCRIBED t\n"
    else:
        h.broker.close(s)
    for s, _ in subs:
        h.out.get(s, []).clear()
    h.feed(pub, b"".join(f"PUBLISH {pid} t m{i}\n".encode() for i in range(4)))
    first, second = (subs[i][0] for i in next_two)
    assert h.take(first) == b"MESSAGE t m0\nMESSAGE t m2\n"
    assert h.take(second) == b"MESSAGE t m1\nMESSAGE t m3\n"


def test_a_new_subscriber_takes_the_next_turn_after_the_last_served() -> None:
    h = Harness()
    pub, pid = h.connected()
    (a, ida), (b, idb), (c, idc) = (h.connected() for _ in range(3))
    h.feed(a, f"SUBSCRIBE {ida} t\n".encode())
    h.feed(b, f"SUBSCRIBE {idb} t\n".encode())
    h.feed(pub, f"PUBLISH {pid} t 1\nPUBLISH {pid} t 2\n".encode())  # a, then b
    h.feed(c, f"SUBSCRIBE {idc} t\n".encode())
    h.feed(pub, f"PUBLISH {pid} t 3\nPUBLISH {pid} t 4\n".encode())
    assert h.take(c) == b"MESSAGE t 3\n"
    assert h.take(a).endswith(b"MESSAGE t 4\n")


def test_subscribing_twice_is_one_turn() -> None:
    h = Harness()
    pub, pid = h.connected()
    (a, ida), (b, idb) = h.connected(), h.connected()
    assert h.feed(a, f"SUBSCRIBE {ida} t\nSUBSCRIBE {ida} t\n".encode()) == b"SUBSCRIBED t\n" * 2
    h.feed(b, f"SUBSCRIBE {idb} t\n".encode())
    assert h.broker.topic_info(b"t") == (2, 0)
    h.feed(pub, b"".join(f"PUBLISH {pid} t {i}\n".encode() for i in range(4)))
    assert h.take(a) == b"MESSAGE t 0\nMESSAGE t 2\n"
    assert h.take(b) == b"MESSAGE t 1\nMESSAGE t 3\n"


def test_backlog_is_kept_in_order_and_delivered_on_subscribe() -> None:
    h = Harness()
    pub, pid = h.connected()
    h.feed(pub, b"".join(f"PUBLISH {pid} q m{i}\n".encode() for i in range(5)))
    assert h.broker.topic_info(b"q") == (0, 5)
    (a, ida), (b, idb) = h.connected(), h.connected()
    assert h.feed(a, f"SUBSCRIBE {ida} q\n".encode()) == b"SUBSCRIBED q\n" + b"".join(
        f"MESSAGE q m{i}\n".encode() for i in range(5)
    )
    assert h.broker.topic_info(b"q") == (1, 0)
    h.feed(b, f"SUBSCRIBE {idb} q\n".encode())
    h.feed(pub, f"PUBLISH {pid} q next\n".encode())
    assert h.take(b) == b"MESSAGE q next\n"


def test_a_full_backlog_holds_the_publisher_until_it_drains() -> None:
    h = Harness(max_backlog=3)
    reading: list[tuple[int, bool]] = []
    h.broker.on_reading = lambda handle, on: reading.append((handle, on))
    pub, pid = h.connected()
    out = h.feed(pub, b"".join(f"PUBLISH {pid} q m{i}\n".encode() for i in range(6)) + b"PING\n")
    # the fourth PUBLISH waits, with everything after it, and the publisher is not read
    assert out == b"PUBLISHED q\n" * 3
    assert reading == [(pub, False)]
    assert h.broker.stats()["publishers_held"] == 1 and h.broker.stats()["refused"] == 0
    a, ida = h.connected()
    h.broker.pause(a)
    h.feed(a, f"SUBSCRIBE {ida} q\n".encode())
    h.broker.resume(a)  # takes the backlog down to 0 (its half mark is 1): the publisher goes on
    assert h.take(pub) == b"PUBLISHED q\n" * 3 + b"PONG\n"
    assert reading == [(pub, False), (a, False), (a, True), (pub, True)]
    assert h.take(a) == b"SUBSCRIBED q\n" + b"".join(f"MESSAGE q m{i}\n".encode() for i in range(6))
    assert h.broker.stats()["publish_holds"] == 1 and h.broker.stats()["publishers_held"] == 0


def test_a_publisher_never_waits_for_a_topic_it_consumes() -> None:
    # it may be the one that has to drain it: waiting could deadlock it, so it is refused as in v1
    h = Harness(max_backlog=2)
    pub, pid = h.connected()
    assert h.feed(pub, f"SUBSCRIBE {pid} q ACK PREFETCH 1\n".encode()) == b"SUBSCRIBED q\n"
    out = h.feed(pub, b"".join(f"PUBLISH {pid} q m{i}\n".encode() for i in range(4)))
    assert out == (
        b"PUBLISHED q\nDELIVER q 1 1 m0\nPUBLISHED q\nPUBLISHED q\n"
        b"ERROR BACKLOG_FULL backlog full (2 messages) for topic 'q'\n"
    )
    assert h.feed(pub, f"ACK {pid} 1\n".encode()) == b"DELIVER q 2 1 m1\n"
    assert h.broker.stats()["publishers_held"] == 0


def test_paused_subscribers_are_skipped_and_the_backlog_waits_for_a_resume() -> None:
    h = Harness()
    pub, pid = h.connected()
    (a, _), (b, _) = h.subscribed(), h.subscribed()
    h.broker.pause(a)
    h.feed(pub, f"PUBLISH {pid} t 1\nPUBLISH {pid} t 2\n".encode())
    assert h.take(a) == b""
    assert h.take(b) == b"MESSAGE t 1\nMESSAGE t 2\n"
    h.broker.pause(b)
    h.feed(pub, f"PUBLISH {pid} t 3\nPUBLISH {pid} t 4\n".encode())
    assert h.broker.topic_info(b"t") == (2, 2)
    h.broker.resume(b)
    assert h.take(b) == b"MESSAGE t 3\nMESSAGE t 4\n"
    assert h.broker.topic_info(b"t") == (2, 0)


def test_the_message_is_kept_byte_for_byte() -> None:
    h = Harness()
    pub, pid = h.connected()
    a, _ = h.subscribed()
    payload = b"  two leading spaces,\ttabs, \x00 NUL, \xff\xfe bytes, trailing  "
    h.feed(pub, f"PUBLISH {pid} t ".encode() + payload + b"\n")
    h.feed(pub, f"PUBLISH {pid} t \n".encode())
    assert h.take(a) == b"MESSAGE t " + payload + b"\nMESSAGE t \n"


def test_crlf_case_insensitive_words_and_extra_spaces() -> None:
    h = Harness()
    a = h.open()
    assert h.feed(a, b"connect\r\n").startswith(b"CONNECTED ")
    cid = h.broker.client_id(a)
    assert h.feed(a, f"SuBsCrIbE  {cid}   t  \r\n".encode()) == b"SUBSCRIBED t\n"
    assert h.feed(a, b"\n\r\n   \n") == b""
    assert h.feed(a, b"pInG\r\n") == b"PONG\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"FOO", b"ERROR UNKNOWN_COMMAND unknown command 'FOO'"),
        (b"PUBLISHX {id} t m", b"ERROR UNKNOWN_COMMAND unknown command 'PUBLISHX'"),
        (b"\x00PING", b"ERROR UNKNOWN_COMMAND unknown command (not shown)"),
        (b"P\xc3\xa9NG", b"ERROR UNKNOWN_COMMAND unknown command (not shown)"),
        (b"SUBSCRIBE", SUBSCRIBE_USAGE),
        (b"SUBSCRIBE {id}", SUBSCRIBE_USAGE),
        (b"SUBSCRIBE {id} t extra", SUBSCRIBE_USAGE),
        (b"UNSUBSCRIBE {id}", b"ERROR USAGE usage: UNSUBSCRIBE <client_id> <topic>"),
        (b"UNSUBSCRIBE {id} t x", b"ERROR USAGE usage: UNSUBSCRIBE <client_id> <topic>"),
        (b"UNSUBSCRIBE {id} never", b"ERROR NOT_SUBSCRIBED not subscribed to 'never'"),
        (b"PUBLISH {id} t", b"ERROR USAGE usage: PUBLISH <client_id> <topic> <message>"),
        (b"PUBLISH {id}", b"ERROR USAGE usage: PUBLISH <client_id> <topic> <message>"),
        (b"PING now", b"ERROR USAGE usage: PING"),
        (b"CONNECT me", b"ERROR USAGE usage: CONNECT [<user> <password>]"),
        (b"CONNECT me secret more", b"ERROR USAGE usage: CONNECT [<user> <password>]"),
        (b"DISCONNECT now", b"ERROR USAGE usage: DISCONNECT"),
        (
            b"SUBSCRIBE {id} " + b"x" * (TOPIC_MAX + 1),
            b"ERROR BAD_TOPIC topic must be 1 to %d bytes" % TOPIC_MAX,
        ),
        (b"SUBSCRIBE {id} a\x01b", INVISIBLE),
        (b"SUBSCRIBE {id} a\tb", SUBSCRIBE_USAGE),  # a tab separates fields
        (b"SUBSCRIBE {id} a\x00b", INVISIBLE),
        (b"SUBSCRIBE {id} a\x7fb", INVISIBLE),
        (b"SUBSCRIBE {id} a\xc2\x85b", INVISIBLE),
        (b"SUBSCRIBE {id} a\xffb", b"ERROR BAD_TOPIC topic is not valid UTF-8"),
        (b"SUBSCRIBE {id} a\xc3", b"ERROR BAD_TOPIC topic is not valid UTF-8"),
        (b"SUBSCRIBE {id} \xc0\xaf", b"ERROR BAD_TOPIC topic is not valid UTF-8"),
        (b"SUBSCRIBE {id} \xed\xa0\x80", b"ERROR BAD_TOPIC topic is not valid UTF-8"),
        (b"PUBLISH {id} a\xffb m", b"ERROR BAD_TOPIC topic is not valid UTF-8"),
        (
            b"PUBLISH c\x00 t m",
            b"ERROR WRONG_CLIENT_ID client id does not belong to this connection: (not shown)",
        ),
    ],
)
def test_bad_input_gets_one_error_line_and_the_connection_stays_usable(line: bytes, reply: bytes) -> None:
    h = Harness()
    a, cid = h.connected()
    assert h.feed(a, line.replace(b"{id}", cid.encode()) + b"\n") == reply + b"\n"
    assert h.feed(a, b"PING\n") == b"PONG\n"
    assert h.broker.stats()["topics"] == 0


def test_valid_topics_include_utf8_and_the_longest_length() -> None:
    h = Harness()
    a, cid = h.connected()
    for topic in ["é.ü/日本", "x" * TOPIC_MAX, "a.b-c_d:e*f>g"]:
        encoded = topic.encode()
        assert h.feed(a, f"SUBSCRIBE {cid} ".encode() + encoded + b"\n") == b"SUBSCRIBED " + encoded + b"\n"


def test_disconnect_replies_leaves_every_rotation_and_ignores_what_follows() -> None:
    h = Harness()
    pub, pid = h.connected()
    a, _ = h.subscribed()
    assert h.broker.feed(a, b"DISCONNECT\nPING\n") is False
    assert h.take(a) == b"DISCONNECTED\n"
    assert h.broker.topic_info(b"t") is None
    h.feed(pub, f"PUBLISH {pid} t m\n".encode())
    assert h.broker.topic_info(b"t") == (0, 1)


def test_a_line_over_max_line_gets_an_error_and_closes_only_that_connection() -> None:
    h = Harness(max_line=100)
    a, _ = h.connected()
    b, idb = h.connected()
    h.feed(b, f"SUBSCRIBE {idb} t\n".encode())
    h.take(b)
    assert h.broker.feed(a, b"PING " + b"x" * 200) is False  # no newline yet: refused early
    assert h.take(a) == b"ERROR LINE_TOO_LONG line too long (limit 100 bytes)\n"
    c, _ = h.connected()
    assert h.broker.feed(c, b"P" * 101 + b"\nPING\n") is False
    assert h.take(c) == b"ERROR LINE_TOO_LONG line too long (limit 100 bytes)\n"
    assert (
        h.feed(b, f"PUBLISH {idb} t ".encode() + b"y" * 60 + b"\n")
        == b"PUBLISHED t\n" + b"MESSAGE t " + b"y" * 60 + b"\n"
    )


def test_a_line_of_exactly_max_line_is_accepted() -> None:
    h = Harness(max_line=100)
    a, ida = h.connected()
    line = f"PUBLISH {ida} t ".encode()
    line += b"z" * (100 - len(line))
    assert h.feed(a, line + b"\n") == b"PUBLISHED t\n"


def test_output_is_one_write_per_connection_per_read() -> None:
    h = Harness()
    pub, pid = h.connected()
    a, _ = h.subscribed()
    h.broker.feed(pub, b"".join(f"PUBLISH {pid} t {i}\nPING\n".encode() for i in range(1000)))
    assert len(h.out[pub]) == 1 and len(h.out[a]) == 1
    assert h.out[a][0].count(b"\n") == 1000


def test_handles_are_checked() -> None:
    h = Harness()
    with pytest.raises(ValueError):
        h.broker.feed(5, b"PING\n")
    a = h.open()
    h.broker.close(a)
    with pytest.raises(ValueError):
        h.broker.close(a)


def test_a_writer_that_fails_takes_only_its_connection_out() -> None:
    h = Harness()
    pub, pid = h.connected()

    def broken(data: bytes) -> None:
        raise RuntimeError("transport closed")

    dead = h.broker.open(broken)
    h.broker.feed(dead, b"CONNECT\n")
    dead_id = h.broker.client_id(dead)
    a, _ = h.subscribed()
    assert h.broker.feed(dead, f"SUBSCRIBE {dead_id} t\n".encode()) is False
    assert h.broker.topic_info(b"t") == (1, 0)
    h.feed(pub, f"PUBLISH {pid} t x\nPUBLISH {pid} t y\n".encode())
    assert h.take(a) == b"MESSAGE t x\nMESSAGE t y\n"


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=60))
def test_any_split_into_reads_gives_the_same_output(cuts: list[int]) -> None:
    stream = (
        b"CONNECT\r\nSUBSCRIBE c1 news\nPUBLISH c1 news hello world\r\nping\n\n"
        b"PUBLISH c1 other  spaced  out \nFOO bar\nSUBSCRIBE c1 other\nUNSUBSCRIBE c1 news\n"
        b"PUBLISH c1 news later\nDISCONNECT\n"
    )
    whole = Harness()
    w = whole.open()
    whole.broker.feed(w, stream)
    expected = whole.take(w)
    split = Harness()
    s = split.open()
    pos = 0
    for cut in cuts:
        split.broker.feed(s, stream[pos : pos + cut])
        pos += cut
    split.broker.feed(s, stream[pos:])
    assert split.take(s) == expected
    assert expected == (
        b"CONNECTED c1\nSUBSCRIBED news\nPUBLISHED news\nMESSAGE news hello world\nPONG\n"
        b"PUBLISHED other\nERROR UNKNOWN_COMMAND unknown command 'FOO'\n"
        b"SUBSCRIBED other\nMESSAGE other  spaced  out \n"
        b"UNSUBSCRIBED news\nPUBLISHED news\nDISCONNECTED\n"
    )


def _pipelined(pid: str, count: int) -> bytes:
    return f"PUBLISH {pid} bench {'x' * 64}\n".encode() * count


def _python_memory_for(count: int) -> tuple[int, int, int]:
    """(blocks kept, peak traced bytes, output bytes) around feeding ``count`` PUBLISH commands."""
    broker = Broker()
    sizes: list[int] = []

    def measure(data: bytes) -> None:
        sizes.append(len(data))

    pub = broker.open(measure)
    sub = broker.open(measure)
    broker.feed(pub, b"CONNECT\n")
    broker.feed(sub, b"CONNECT\nSUBSCRIBE c2 bench\n")
    data = _pipelined("c1", count)
    sizes.clear()
    gc.collect()
    blocks = sys.getallocatedblocks()
    tracemalloc.start()
    try:
        broker.feed(pub, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    gc.collect()
    assert broker.stats()["delivered"] == count
    return sys.getallocatedblocks() - blocks, peak, sum(sizes)


def test_pipelined_publish_allocates_no_python_memory_per_message() -> None:
    small_blocks, small_peak, small_out = _python_memory_for(10_000)
    big_blocks, big_peak, big_out = _python_memory_for(100_000)
    assert big_out >= 10 * 80 * 10_000 * 0.99
    # nothing is kept per message
    assert big_blocks - small_blocks < 100
    # at any moment the Python heap holds at most the connection's output (its C buffer plus the
    # bytes handed to the writer); 90,000 more messages add no more than that
    per_message = (big_peak - small_peak) / 90_000
    output_per_message = (big_out - small_out) / 90_000
    assert per_message <= 2 * output_per_message + 1
