"""Unit tests of the client's codec, session and error table: no sockets, just bytes in and values out."""

from __future__ import annotations

import pytest

import pigeon
from pigeon import errors
from pigeon.client import codec
from pigeon.client.codec import Message, ServerInfo
from pigeon.client.session import Session
from pigeon.errors import (
    BacklogFullError,
    CommandError,
    ConnectionClosedError,
    IdleTimeoutError,
    InvalidArgumentError,
    LineTooLongError,
    MemoryFullError,
    RetryableError,
)
from pigeon.protocol import TOPIC_MAX


@pytest.mark.parametrize("topic", ["news", "a.b.c", "x" * TOPIC_MAX, "émoji-🐦", b"bytes-topic"])
def test_valid_topics_encode_to_utf8(topic: str | bytes) -> None:
    expected = topic if isinstance(topic, bytes) else topic.encode()
    assert codec.encode_topic(topic) == expected


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("", "empty"),
        ("two words", "whitespace"),
        ("tab\there", "whitespace"),
        ("new\nline", "whitespace"),
        ("nbsp\u00a0", "whitespace"),
        ("ideographic\u3000space", "whitespace"),
        ("zero\u200bwidth", "format"),
        ("\ufeffbom", "format"),
        ("bidi\u202eoverride", "format"),
        ("soft\u00adhyphen", "format"),
        ("line\u2028separator", "separator"),
        ("x" * (TOPIC_MAX + 1), f"at most {TOPIC_MAX}"),
        ("é" * (TOPIC_MAX // 2 + 1), f"at most {TOPIC_MAX}"),  # 2 bytes each
        (b"\xff\xfe", "UTF-8"),
        ("\ud800", "Unicode"),
    ],
)
def test_bad_topics_are_refused_with_a_clear_message(topic: str | bytes, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem):
        codec.encode_topic(topic)


@pytest.mark.parametrize("topic", [42, bytearray(b"t"), None])
def test_topic_of_the_wrong_type_is_refused(topic: object) -> None:
    with pytest.raises(InvalidArgumentError, match="str or bytes"):
        codec.encode_topic(topic)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("héllo world", "héllo world".encode()),
        (b"", b""),
        (bytearray(b"ab"), b"ab"),
        (memoryview(b"cd"), b"cd"),
    ],
)
def test_messages_encode_to_bytes(message: codec.Data, expected: bytes) -> None:
    assert codec.encode_message(message) == expected


@pytest.mark.parametrize(("message", "problem"), [("a\nb", "newline"), (b"ends\r", "carriage return")])
def test_messages_that_cannot_be_one_line_are_refused(message: codec.Data, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem):
        codec.encode_message(message)


def test_message_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="bytes or str"):
        codec.encode_message(3.5)  # type: ignore[arg-type]


def test_many_messages_are_checked_together() -> None:
    checked = codec.checked_messages(b"c1", b"t", ["a", b"b", bytearray(b"c"), memoryview(b"d"), "", "é"])
    assert [bytes(m) for m in checked] == [b"a", b"b", b"c", b"d", b"", "é".encode()]
    given = [b"x", b"y\tz", b"\r in the middle"]
    assert codec.checked_messages(b"c1", b"t", given) is given, "a list of bytes is used as it is"
    assert codec.checked_messages(b"c1", b"t", (m for m in given)) == given
    assert codec.checked_messages(b"c1", b"t", iter([])) == []


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        (["a", "b", "c\nd"], "message 2: message must not contain a newline"),
        ([b"a\r", b"b"], r"message 0: .*carriage return"),
        ([b"a", b"b\r"], r"message 1: .*carriage return"),
        ([b"a\rb", b"b\r\nc"], r"message 1: .*newline"),
        ([b"x"] * codec.CHUNK + [b"y", b"\n"], f"message {codec.CHUNK + 1}: .*newline"),
        (["a", 1], "message 1: message must be bytes or str"),
        (
            [b"ok", b"x" * 90],
            r"message 1: the PUBLISH line would be 103 bytes, over the server's limit of 100",
        ),
    ],
)
def test_the_first_message_that_cannot_be_sent_is_named(messages: list[codec.Data], problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem):
        codec.checked_messages(b"c1", b"t", messages, max_line=100)


def test_long_chunks_are_checked_for_the_line_length() -> None:
    fits = b"x" * (100 - len(b"PUBLISH c1 t "))
    assert len(codec.checked_messages(b"c1", b"t", [fits] * 5000, max_line=100)) == 5000
    with pytest.raises(InvalidArgumentError, match=r"message 4999: .*over the server's limit of 100"):
        codec.checked_messages(b"c1", b"t", [fits] * 4999 + [fits + b"x"], max_line=100)


def test_message_text_decodes_utf8() -> None:
    assert Message("t", "naïve".encode()).text == "naïve"


def test_command_lines() -> None:
    assert codec.publish_line(b"c1", b"t", b"a b") == b"PUBLISH c1 t a b\n"
    assert codec.publish_chunk(b"c1", b"t", [b"x", b""]) == b"PUBLISH c1 t x\nPUBLISH c1 t \n"
    assert codec.subscribe_line(b"c1", b"t") == b"SUBSCRIBE c1 t\n"
    assert codec.unsubscribe_line(b"c1", b"t") == b"UNSUBSCRIBE c1 t\n"
    assert codec.hello_line() == b"HELLO\n"
    assert codec.stats_line() == b"STATS\n"
    assert codec.stats_line("topics", 9) == b"STATS TOPICS 9 %d\n" % codec.STATS_PAGE


def test_a_publish_line_over_max_line_is_refused() -> None:
    assert codec.publish_line(b"c1", b"t", b"x" * 87, max_line=100) == b"PUBLISH c1 t " + b"x" * 87 + b"\n"
    with pytest.raises(InvalidArgumentError, match="would be 101 bytes, over the server's limit of 100"):
        codec.publish_line(b"c1", b"t", b"x" * 88, max_line=100)


def test_parse_hello() -> None:
    reply = b'{"protocol":1,"max_line":4096,"topic_max":255,"idle_timeout":2.5,"features":["acks"],"new":1}'
    assert codec.parse_hello(reply) == ServerInfo(1, 4096, 255, 2.5, ("acks",))
    for bad in (b"{}", b"not json", b'{"protocol":1}', b"[]"):
        with pytest.raises(ValueError, match="bad HELLO reply"):
            codec.parse_hello(bad)


def test_parse_stats_pages() -> None:
    assert codec.parse_stats(b'{"published":3}') == {"published": 3}
    assert codec.parse_stats_page("topics", b'{"topics":[{"name":"t"}],"next":7}') == ([{"name": "t"}], 7)
    with pytest.raises(ValueError, match="bad STATS reply"):
        codec.parse_stats(b"[1]")
    with pytest.raises(ValueError, match="bad STATS CONNECTIONS reply"):
        codec.parse_stats_page("connections", b'{"topics":[],"next":0}')


def test_frame_splitter_keeps_partial_lines() -> None:
    lines = codec.FrameSplitter()
    assert lines.feed(b"PON") == []
    assert lines.feed(b"G\nPUB") == [b"PONG\n"]
    assert lines.feed(b"LISHED t\n") == [b"PUBLISHED t\n"]
    lines.feed(b"half")
    lines.reset()
    assert lines.feed(b"PONG\n") == [b"PONG\n"]


def test_frame_splitter_takes_payloads_by_length_across_reads() -> None:
    payload = b"\nMSG t 1\nx\n\r\x00"
    stream = b"PUBLISHED t\nMSG t %d\n%s\nDMSG u 7 2 0\n\nMESSAGE v MSG w\n" % (len(payload), payload)
    # requests carry their reply token before the count; a reply (RMSG) has its request id
    stream += b"MSG s 0.1.7 2\nhi\nDMSG r 3 1 0.1.8 1\nz\nRMSG 9 2\nok\n"
    whole = [
        b"PUBLISHED t\n",
        (b"t", payload, None, None, None),
        (b"u", b"", 7, 2, None),
        b"MESSAGE v MSG w\n",
        (b"s", b"hi", None, None, b"0.1.7"),
        (b"r", b"z", 3, 1, b"0.1.8"),
        (b"", b"ok", 9, None, None),
    ]
    assert codec.FrameSplitter().feed(stream) == whole
    one_by_one = codec.FrameSplitter()
    parts = [part for i in range(len(stream)) for part in one_by_one.feed(stream[i : i + 1])]
    assert b"".join(p for p in parts if isinstance(p, bytes)) == b"PUBLISHED t\nMESSAGE v MSG w\n"
    assert [p for p in parts if isinstance(p, tuple)] == [p for p in whole if isinstance(p, tuple)]


@pytest.mark.parametrize(
    "stream",
    [b"MSG t x\nabc\n", b"DMSG t 1 1\n\n", b"MSG t 2\nabc\n", b"RMSG 1 2 3\nab\n", b"MSG t a b 1\nx\n"],
    ids=["count", "fields", "line end", "reply fields", "message fields"],
)
def test_frame_splitter_refuses_what_is_not_a_frame(stream: bytes) -> None:
    with pytest.raises(codec.BadStream):
        codec.FrameSplitter().feed(stream)


def test_only_replies_counts_uniform_chunks_and_rejects_mixed_ones() -> None:
    assert codec.only_replies(b"PUBLISHED t\n" * 3, b"PUBLISHED") == 3
    assert codec.only_replies(b"PUBLISHED t\nERROR BACKLOG_FULL backlog full\n", b"PUBLISHED") == 0
    assert codec.only_replies(b"PUBLISHED t\nMESSAGE t PUBLISHED x\n", b"PUBLISHED") == 0
    assert codec.only_replies(b"MESSAGE t PUBLISHED x\n", b"PUBLISHED") == 0


def test_parse_delivery() -> None:
    assert codec.parse_delivery(b"MESSAGE t hello  world") == (b"t", b"hello  world")
    assert codec.parse_delivery(b"MESSAGE t ") == (b"t", b"")
    assert codec.parse_delivery(b"PUBLISHED t") is None
    assert codec.parse_delivery(b"MESSAGE t") is None


def test_parse_acked_delivery() -> None:
    assert codec.parse_acked_delivery(b"DELIVER t 7 2 hello  world") == (b"t", 7, 2, b"hello  world")
    assert codec.parse_acked_delivery(b"DELIVER t 1 1 ") == (b"t", 1, 1, b"")
    assert codec.parse_acked_delivery(b"MESSAGE t 1 1 x") is None
    assert codec.parse_acked_delivery(b"DELIVER t 1 1") is None
    assert codec.parse_acked_delivery(b"DELIVER t one 1 x") is None


def test_subscribe_lines_with_acknowledgements() -> None:
    ack = codec.SubscribeOptions(ack=True)
    assert codec.subscribe_line(b"c1", b"t", ack) == b"SUBSCRIBE c1 t ACK\n"
    windowed = codec.SubscribeOptions(ack=True, prefetch=50)
    assert codec.subscribe_line(b"c1", b"t", windowed) == b"SUBSCRIBE c1 t ACK PREFETCH 50\n"
    with pytest.raises(InvalidArgumentError, match="needs ack=True"):
        codec.SubscribeOptions(prefetch=5)
    with pytest.raises(InvalidArgumentError, match="prefetch must be 1 to 1,000,000, not True"):
        codec.SubscribeOptions(ack=True, prefetch=True)


@pytest.mark.parametrize(
    ("tags", "lines"),
    [
        ([5], [b"ACK c1 5"]),
        ([3, 1, 2, 4], [b"ACK c1 1-4"]),
        ([1, 2, 2, 3], [b"ACK c1 1-3"]),
        ([1, 2, 4, 6, 7, 8], [b"ACK c1 1-2", b"ACK c1 4", b"ACK c1 6-8"]),
        ([10, 1], [b"ACK c1 1", b"ACK c1 10"]),
    ],
)
def test_settle_lines_make_ranges_only_of_consecutive_tags(tags: list[int], lines: list[bytes]) -> None:
    assert codec.settle_lines(b"ACK", b"c1", tags) == b"".join(line + b"\n" for line in lines)


def test_nack_delays_are_seconds_sent_as_milliseconds() -> None:
    assert codec.settle_lines(b"NACK", b"c1", [1, 2], codec.nack_suffix(1.5)) == b"NACK c1 1-2 1500\n"
    assert codec.nack_suffix(None) == b""
    assert codec.nack_suffix(0) == b" 0"
    assert codec.nack_suffix(86_400) == b" 86400000"
    for bad in (-0.001, 86_400.001, "1", True):
        with pytest.raises(InvalidArgumentError, match="delay must be 0 to 86,400 seconds"):
            codec.nack_suffix(bad)  # type: ignore[arg-type]


def test_messages_compare_by_topic_data_tag_and_attempt() -> None:
    plain = Message("t", b"x")
    assert plain == Message("t", b"x") and hash(plain) == hash(Message("t", b"x"))
    assert plain != Message("t", b"x", 1, 1) and Message("t", b"x", 1, 1) == Message("t", b"x", 1, 1)
    assert repr(plain) == "Message(topic='t', data=b'x')"
    assert repr(Message("t", b"x", 3, 2)) == "Message(topic='t', data=b'x', tag=3, attempt=2)"
    assert tuple(plain) == ("t", b"x")
    with pytest.raises(AttributeError):
        plain.data = b"y"  # type: ignore[misc]


def test_session_sets_unknown_tags_aside_and_keeps_the_connections_link() -> None:
    session = Session()
    link = codec.Link(Session)  # type: ignore[arg-type]
    session.link = link
    pending = session.expect(b"PUBLISHED")
    done = session.receive(
        b"DELIVER t 1 1 a\nERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 4-6\nMESSAGE u b\nPUBLISHED t\n"
    )
    assert done == [pending] and pending.error is None
    assert [m.tags for m in session.take_unknown_tags()] == [(4, 6)]
    assert session.take_unknown_tags() == []
    acked, plain = session.messages
    assert (acked.tag, acked.attempt, acked._link) == (1, 1, link)
    assert plain == Message("u", b"b")
    session.lost("gone")
    assert list(session.messages) == [plain], "the acknowledged delivery died with its connection"
    assert session.link is None


def test_session_queues_deliveries_that_arrive_before_the_reply() -> None:
    session = Session()
    pending = session.expect(b"PONG")
    done = session.receive(b"MESSAGE t one\nMESSAGE t PONG\nPO")
    assert done == [] and not pending.done
    assert session.receive(b"NG\nMESSAGE u three\n") == [pending]
    assert pending.error is None
    assert list(session.messages) == [Message("t", b"one"), Message("t", b"PONG"), Message("u", b"three")]


def test_session_matches_replies_in_order_and_maps_errors() -> None:
    session = Session()
    first = session.expect(b"SUBSCRIBED")
    second = session.expect(b"PUBLISHED")
    third = session.expect(b"PUBLISHED")
    done = session.receive(
        b"SUBSCRIBED t\nERROR BACKLOG_FULL backlog full (2 messages) for topic 't'\nERROR NEW_CODE x\n"
    )
    assert done == [first, second, third]
    assert first.reply == b"t" and first.error is None
    assert isinstance(second.error, BacklogFullError)
    assert type(third.error) is CommandError and (third.error.code, third.error.reason) == ("NEW_CODE", "x")
    assert session.in_flight == 0


def test_session_batch_reports_refusals_by_index() -> None:
    session = Session()
    batch = session.expect_batch(4)
    session.receive(b"PUBLISHED t\nPUBLISHED t\n")  # the fast path
    assert not batch.done and session.in_flight == 2
    done = session.receive(
        b"ERROR BACKLOG_FULL backlog full (2 messages) for topic 't'\nMESSAGE t m\nPUBLISHED t\n"
    )
    assert done == [batch]
    assert [r.index for r in batch.refused] == [2]
    assert isinstance(batch.refused[0].error, BacklogFullError)
    assert list(session.messages) == [Message("t", b"m")]


def test_fast_path_does_not_run_past_its_batch() -> None:
    session = Session()
    batch = session.expect_batch(1)
    ping = session.expect(b"PUBLISHED")
    assert session.receive(b"PUBLISHED t\nPUBLISHED t\n") == [batch, ping]


def test_unwaited_publishes_extend_one_batch_until_something_else_is_sent() -> None:
    session = Session()
    a = session.expect_unwaited()
    assert session.expect_unwaited() is a and a.total == 2
    session.expect(b"PONG")
    b = session.expect_unwaited()
    assert b is not a


def test_lost_connection_fails_everything_awaited() -> None:
    session = Session()
    answered = session.expect(b"PONG")
    single = session.expect(b"PONG")
    batch = session.expect_batch(3)
    session.receive(b"PONG\n")
    failed, error = session.lost("connection closed by the server")
    assert failed == [single, batch]
    assert answered.error is None
    assert single.error is error and isinstance(error, ConnectionClosedError)
    assert [r.index for r in batch.refused] == [0, 1, 2]
    assert session.in_flight == 0 and single.done and batch.done


def test_unasked_error_becomes_the_reason_of_the_close() -> None:
    session = Session()
    session.receive(b"ERROR MEMORY_FULL memory limit reached: cannot hold 5000 bytes of input\n")
    batch = session.expect_batch(2)
    failed, error = session.lost("connection closed by the server")
    assert isinstance(error.error, MemoryFullError) and error.code == "MEMORY_FULL"
    assert error.reason == "memory limit reached: cannot hold 5000 bytes of input"
    assert str(error) == f"connection closed by the server: {error.reason}"
    assert failed == [batch]
    assert [r.index for r in batch.refused] == [0, 1]
    assert all(isinstance(r.error, ConnectionClosedError) for r in batch.refused)


def test_a_reply_that_makes_no_sense_breaks_the_session() -> None:
    session = Session()
    pending = session.expect(b"PONG")
    session.receive(b"SUBSCRIBED t\n")
    assert session.broken is not None and "PONG" in session.broken
    assert not pending.done
    fresh = Session()
    fresh.receive(b"PONG\n")
    assert fresh.broken is not None


@pytest.mark.parametrize("pending", [True, False])
def test_an_error_after_which_the_server_closes_stops_the_session(pending: bool) -> None:
    session = Session()
    ping = session.expect(b"PONG") if pending else None
    session.receive(b"ERROR IDLE_TIMEOUT idle timeout\nPONG\n")
    assert session.closing and session.broken is None
    assert ping is None or not ping.done, "the reply after the closing error is not taken"
    failed, error = session.lost("connection closed by the server")
    assert isinstance(error.error, IdleTimeoutError) and error.reason == "idle timeout"
    assert failed == ([ping] if ping else [])
    assert not session.closing


def test_a_line_too_long_fails_the_command_with_the_close() -> None:
    session = Session()
    publish = session.expect(b"PUBLISHED")
    session.receive(b"ERROR LINE_TOO_LONG line too long (limit 64 bytes)\n")
    assert session.closing and not publish.done
    _, error = session.lost("connection closed by the server")
    assert publish.error is error and isinstance(error.error, LineTooLongError)


def test_every_code_has_its_class() -> None:
    for code, cls in {**errors.ERROR_CLASSES, **errors.CLUSTER_ERROR_CLASSES}.items():
        error = errors.error_from_reply(f"{code} some text")
        assert type(error) is cls
        assert (error.code, error.reason, str(error)) == (code, "some text", "some text")
        assert getattr(pigeon, cls.__name__) is cls, "exported from pigeon"
    retryable = {code for code, cls in errors.ERROR_CLASSES.items() if issubclass(cls, RetryableError)}
    assert retryable == {"BACKLOG_FULL", "MEMORY_FULL", "STORAGE_FULL", "NOT_ENOUGH_REPLICAS"}
    closing = {code for code, cls in errors.ERROR_CLASSES.items() if issubclass(cls, errors.ClosingError)}
    assert closing == {"LINE_TOO_LONG", "TOO_MANY_CONNECTIONS", "IDLE_TIMEOUT", "AUTH_FAILED", "BAD_FRAME"}


def test_the_cluster_errors_carry_their_slot_and_address() -> None:
    moved = errors.error_from_reply("MOVED 197 10.0.0.2:4333")
    assert isinstance(moved, errors.MovedError) and (moved.slot, moved.address) == (197, ("10.0.0.2", 4333))
    v6 = errors.error_from_reply("MOVED 3 [::1]:4333")
    assert isinstance(v6, errors.MovedError) and v6.address == ("::1", 4333)
    odd = errors.error_from_reply("MOVED somewhere")
    assert isinstance(odd, errors.MovedError) and (odd.slot, odd.address) == (None, None)
    again = errors.error_from_reply("TRYAGAIN slot 5 of 'jobs' has no owner yet: retry")
    assert isinstance(again, errors.TryAgainError) and isinstance(again, RetryableError) and again.slot == 5


def test_unknown_codes_and_codeless_errors_are_command_errors() -> None:
    unknown = errors.error_from_reply("OVER_QUOTA no room")
    assert type(unknown) is CommandError and (unknown.code, unknown.reason) == (
        "OVER_QUOTA",
        "no room",
    )
    older = errors.error_from_reply("not subscribed to 't'")  # a server from before the codes
    assert type(older) is CommandError and (older.code, older.reason) == (None, "not subscribed to 't'")
    bare = errors.error_from_reply("USAGE")
    assert type(bare) is errors.UsageError and bare.reason == ""


def test_the_clients_error_codes_are_the_servers() -> None:
    core = pytest.importorskip("pigeon._core", reason="the compiled core is not built")
    assert tuple(core.ERROR_CODES) == errors.ERROR_CODES
