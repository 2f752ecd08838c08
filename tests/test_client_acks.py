"""Acknowledged subscriptions through both clients, over TCP to a ``pigeon`` process.

Every test runs against ``Client`` and ``AsyncClient`` (the ``open_client``
fixture, tests/faces.py) and each server event loop.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import pigeon
from pigeon import InvalidArgumentError, StaleDeliveryError, UnknownDeliveryTagError
from pigeon.testing import ServerProcess
from tests.clients import figures, until
from tests.faces import OpenClient

StartServer = Callable[..., ServerProcess]


def test_deliveries_carry_tags_and_attempts_and_ack_settles_them(
    server: ServerProcess, open_client: OpenClient
) -> None:
    consumer, publisher = open_client(server), open_client(server)
    consumer.subscribe("jobs", ack=True)
    consumer.subscribe("news")
    publisher.publish_many("jobs", ["a", "b", "c"])
    publisher.publish("news", "plain")
    got = [consumer.next_message(10) for _ in range(4)]
    acked = [m for m in got if m.topic == "jobs"]
    assert [(m.text, m.tag, m.attempt) for m in acked] == [("a", 1, 1), ("b", 2, 1), ("c", 3, 1)]
    plain = next(m for m in got if m.topic == "news")
    assert (plain.tag, plain.attempt) == (None, None) and plain == pigeon.Message("news", b"plain")
    topic, data = acked[0]
    assert (topic, data) == ("jobs", b"a")
    consumer.ack(acked)
    assert consumer.check_acks() == []
    stats = figures(server)
    assert (stats["acks"], stats["unacked"], stats["commands"]["ack"]) == (3, 0, 1), "one ACK 1-3 line"
    with pytest.raises(InvalidArgumentError, match="plain subscription"):
        plain.ack()


def test_client_ack_sends_one_range_per_run_of_consecutive_tags(
    server: ServerProcess, open_client: OpenClient
) -> None:
    consumer, publisher = open_client(server), open_client(server)
    consumer.subscribe("jobs", ack=True, prefetch=100)
    publisher.publish_many("jobs", [str(i) for i in range(10)])
    got = [consumer.next_message(10) for _ in range(10)]
    consumer.ack(got[5:7] + got[:3] + got[8:])  # tags 6-7, 1-3, 9-10: three lines, in any order
    assert consumer.check_acks() == []
    stats = figures(server)
    assert (stats["acks"], stats["commands"]["ack"], stats["unacked"]) == (7, 3, 3)
    got[3].ack()
    got[4].nack()
    consumer.ack([got[7]])
    assert consumer.check_acks() == []
    redelivered = consumer.next_message(10)
    assert (redelivered.text, redelivered.tag, redelivered.attempt) == ("4", 11, 2)
    redelivered.ack()
    assert consumer.check_acks() == []
    assert figures(server)["unacked"] == 0


def test_prefetch_bounds_what_the_client_holds(server: ServerProcess, open_client: OpenClient) -> None:
    consumer, publisher = open_client(server), open_client(server)
    consumer.subscribe("jobs", ack=True, prefetch=2)
    publisher.publish_many("jobs", ["a", "b", "c"])
    first, second = consumer.next_message(10), consumer.next_message(10)
    with pytest.raises(pigeon.TimeoutError):
        consumer.next_message(0.5)  # the third waits in the backlog until an ACK opens the window
    first.ack()
    third = consumer.next_message(10)
    assert third.text == "c"
    consumer.ack([second, third])


def test_nack_redelivers_at_once_or_after_its_delay(server: ServerProcess, open_client: OpenClient) -> None:
    consumer, publisher = open_client(server), open_client(server)
    consumer.subscribe("jobs", ack=True)
    publisher.publish_many("jobs", ["later", "now"])
    later, now = consumer.next_message(10), consumer.next_message(10)
    later.nack(delay=3600)
    now.nack()
    again = consumer.next_message(10)
    assert (again.text, again.attempt) == ("now", 2), "the delayed message does not hold back the next"
    assert figures(server)["delayed"] == 1
    with pytest.raises(pigeon.TimeoutError):
        consumer.next_message(0.5)  # an hour away
    consumer.nack([again], delay=0.2)
    third = consumer.next_message(10)
    assert (third.text, third.attempt) == ("now", 3)
    third.ack()
    with pytest.raises(InvalidArgumentError, match="delay must be"):
        third.nack(delay=-1)
    with pytest.raises(InvalidArgumentError, match="delay must be"):
        consumer.nack([third], delay=86_401)


def test_unacknowledged_messages_come_again_to_another_consumer_after_a_close(
    server: ServerProcess, open_client: OpenClient
) -> None:
    first, second, publisher = open_client(server), open_client(server), open_client(server)
    first.subscribe("jobs", ack=True, prefetch=10)
    publisher.publish_many("jobs", ["a", "b", "c"])
    taken = [first.next_message(10) for _ in range(3)]
    taken[0].ack()
    assert first.check_acks() == []
    second.subscribe("jobs", ack=True)
    first.close()
    again = [second.next_message(10) for _ in range(2)]
    assert [(m.text, m.attempt) for m in again] == [("b", 2), ("c", 2)]
    second.ack(again)
    assert second.check_acks() == []
    stats = figures(server)
    assert (stats["acks"], stats["redelivered"], stats["unacked"]) == (3, 2, 0)


def test_attempts_count_up_to_the_dead_letter_topic(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--max-deliveries", "3")
    consumer, publisher = open_client(server), open_client(server)
    consumer.subscribe("jobs", ack=True)
    consumer.subscribe("jobs.dead", ack=True)
    publisher.publish("jobs", "poison")
    attempts = []
    for _ in range(3):
        message = consumer.next_message(10)
        attempts.append((message.topic, message.attempt))
        message.nack()
    dead = consumer.next_message(10)
    assert attempts == [("jobs", 1), ("jobs", 2), ("jobs", 3)]
    assert (dead.topic, dead.text, dead.attempt) == ("jobs.dead", "poison", 1)
    dead.ack()


def test_an_unknown_tag_is_kept_for_check_acks_and_never_taken_for_a_reply(
    server: ServerProcess, open_client: OpenClient
) -> None:
    consumer = open_client(server)
    consumer.subscribe("jobs", ack=True)
    consumer.publish("jobs", "once")
    message = consumer.next_message(10)
    message.ack()
    message.ack()  # settled already: ERROR UNKNOWN_DELIVERY_TAG comes back, with no reply to match
    consumer.publish("jobs", "the reply to this is PUBLISHED, not the error")
    assert consumer.ping() > 0
    refused = consumer.check_acks()
    assert [type(error) for error in refused] == [UnknownDeliveryTagError]
    assert refused[0].code == "UNKNOWN_DELIVERY_TAG" and refused[0].tags == (1, 1)
    assert str(refused[0]) == "unknown delivery tag 1"
    assert consumer.check_acks() == [], "each refusal is returned once"
    consumer.next_message(10).ack()


def test_after_a_reconnect_old_messages_are_stale_and_the_subscription_is_restored(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--idle-timeout", "1")
    consumer = open_client(server, reconnect=True)
    consumer.subscribe("jobs", ack=True, prefetch=2)
    probe = server.client()
    probe.connect()
    for name in ("a", "b", "c"):
        assert probe.ask(f"PUBLISH {probe.client_id} jobs {name}") == b"PUBLISHED jobs"
    probe.close()
    first = consumer.next_message(10)
    assert (first.text, first.tag, first.attempt) == ("a", 1, 1)
    until(lambda: figures(server)["idle_closed"] >= 1, "the server closes the idle consumer")
    if isinstance(consumer.client, pigeon.AsyncClient):
        # its loop thread takes the server's close in its own time; until then the old
        # connection looks open and an ACK would just be written to it
        until(lambda: consumer.reconnects >= 1, "the asyncio client notices the close")
    with pytest.raises(StaleDeliveryError, match="came on a connection that has closed since") as info:
        first.ack()
    assert info.value.messages == [first]
    assert isinstance(info.value, pigeon.ConnectionClosedError)
    # b, queued on the old connection but not taken, was dropped with it: both come again
    again = [consumer.next_message(10) for _ in range(2)]
    assert [(m.text, m.tag, m.attempt) for m in again] == [("a", 1, 2), ("b", 2, 2)]
    assert consumer.reconnects == 1
    with pytest.raises(pigeon.TimeoutError):
        consumer.next_message(0.5)  # resubscribed with prefetch 2: c waits for an ACK
    consumer.ack(again)
    last = consumer.next_message(10)
    assert (last.text, last.tag, last.attempt) == ("c", 3, 1)
    last.ack()


def test_unsubscribe_gives_the_queued_messages_back(server: ServerProcess, open_client: OpenClient) -> None:
    first, second, publisher = open_client(server), open_client(server), open_client(server)
    first.subscribe("jobs", ack=True)
    publisher.publish_many("jobs", ["a", "b"])
    taken = first.next_message(10)
    first.unsubscribe("jobs")
    with pytest.raises(pigeon.TimeoutError):
        first.next_message(0.3)  # b was given back by UNSUBSCRIBE: its queued copy is gone
    second.subscribe("jobs", ack=True)
    again = [second.next_message(10) for _ in range(2)]
    assert [(m.text, m.attempt) for m in again] == [("a", 2), ("b", 2)]
    taken.ack()  # its tag died with the UNSUBSCRIBE
    assert [error.tags for error in first.check_acks()] == [(1, 1)]
    second.ack(again)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"prefetch": 10}, "needs ack=True"),
        ({"ack": True, "prefetch": 0}, "prefetch must be 1 to"),
        ({"ack": True, "prefetch": 1_000_001}, "prefetch must be 1 to"),
    ],
)
def test_bad_subscribe_options_fail_before_anything_is_sent(
    server: ServerProcess, open_client: OpenClient, options: dict[str, object], problem: str
) -> None:
    client = open_client(server)
    with pytest.raises(InvalidArgumentError, match=problem):
        client.subscribe("jobs", **options)
    assert client.subscriptions == ()


def test_messages_of_another_client_are_refused(server: ServerProcess, open_client: OpenClient) -> None:
    consumer, other = open_client(server), open_client(server)
    consumer.subscribe("jobs", ack=True)
    other.publish("jobs", "x")
    message = consumer.next_message(10)
    with pytest.raises(InvalidArgumentError, match="another client"):
        other.ack([message])
    message.ack()
