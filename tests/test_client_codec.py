"""Unit tests of the client's codec and session: no sockets, just bytes in and values out."""

from __future__ import annotations

import pytest

from pigeon.client import codec
from pigeon.client.codec import Message
from pigeon.client.session import Session
from pigeon.errors import BacklogFullError, CommandError, ConnectionClosedError, InvalidArgumentError
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
    assert codec.encode_messages(["a", b"b", bytearray(b"c"), ""]) == [b"a", b"b", b"c", b""]
    assert codec.encode_messages([b"a", bytearray(b"b"), memoryview(b"c")]) == [b"a", b"b", b"c"]
    assert codec.encode_messages(m for m in (b"x", b"y")) == [b"x", b"y"]
    assert codec.encode_messages(iter([])) == []
    with pytest.raises(InvalidArgumentError, match="message 2: message must not contain a newline"):
        codec.encode_messages(["a", "b", "c\nd"])
    with pytest.raises(InvalidArgumentError, match=r"message 0: .*carriage return"):
        codec.encode_messages([b"a\r", b"b"])
    with pytest.raises(InvalidArgumentError, match=r"message 1: .*carriage return"):
        codec.encode_messages([b"a", b"b\r"])
    with pytest.raises(InvalidArgumentError, match="bytes or str"):
        codec.encode_messages([b"a", 1])  # type: ignore[list-item]


def test_message_text_decodes_utf8() -> None:
    assert Message("t", "naïve".encode()).text == "naïve"


def test_command_lines() -> None:
    assert codec.publish_line(b"c1", b"t", b"a b") == b"PUBLISH c1 t a b\n"
    assert codec.publish_chunk(b"c1", b"t", [b"x", b""]) == b"PUBLISH c1 t x\nPUBLISH c1 t \n"
    assert codec.subscribe_line(b"c1", b"t") == b"SUBSCRIBE c1 t\n"
    assert codec.unsubscribe_line(b"c1", b"t") == b"UNSUBSCRIBE c1 t\n"


def test_line_splitter_keeps_partial_lines() -> None:
    lines = codec.LineSplitter()
    assert lines.feed(b"PON") == b""
    assert lines.feed(b"G\nPUB") == b"PONG\n"
    assert lines.feed(b"LISHED t\n") == b"PUBLISHED t\n"
    lines.feed(b"half")
    lines.reset()
    assert lines.feed(b"PONG\n") == b"PONG\n"


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
        b"SUBSCRIBED t\nERROR BACKLOG_FULL backlog full (2 messages) for topic 't'\nERROR nope\n"
    )
    assert done == [first, second, third]
    assert first.reply == b"t" and first.error is None
    assert isinstance(second.error, BacklogFullError)
    assert type(third.error) is CommandError and third.error.reason == "nope"
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
    session.receive(b"ERROR IDLE_TIMEOUT idle timeout\n")
    batch = session.expect_batch(2)
    failed, error = session.lost("connection closed by the server")
    assert error.reason == "idle timeout"
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
