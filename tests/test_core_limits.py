"""The limits, slow-consumer handling and requeue rules, on the core and on the reference model.

Each test states the expected bytes itself, so the model is checked against
the rules too, not only against the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pigeon._core import Broker
from tests.model import ModelBroker

AnyBroker = Any  # Broker or ModelBroker: the same interface


class Client:
    """One connection on a broker, with what it was sent and how the core closed it."""

    def __init__(self, broker: AnyBroker, connect: bool = True) -> None:
        self.broker = broker
        self.got: list[bytes] = []
        self.closed_by_core: list[tuple[str, bool]] = []
        self.pause_on_write = False
        self.transport_holds = 0
        self.fail = False
        self.h = broker.open(
            self._write,
            pending=lambda: self.transport_holds,
            closer=lambda reason, flush: self.closed_by_core.append((reason, flush)),
        )
        if connect:
            self.send("CONNECT")
            self.got.clear()

    def _write(self, data: bytes) -> None:
        if self.fail:
            raise ConnectionResetError
        self.got.append(data)
        if self.pause_on_write:
            self.broker.pause(self.h)

    @property
    def cid(self) -> str:
        return str(self.broker.client_id(self.h))

    def send(self, *lines: str) -> bool:
        return bool(self.broker.feed(self.h, "".join(f"{line}\n" for line in lines).encode()))

    def take(self) -> bytes:
        data = b"".join(self.got)
        self.got.clear()
        return data


@pytest.fixture(params=[Broker, ModelBroker], ids=["core", "model"])
def make(request: pytest.FixtureRequest) -> Callable[..., AnyBroker]:
    factory: Callable[..., AnyBroker] = request.param
    return factory


def test_max_connections_refuses_one_more(make: Callable[..., AnyBroker]) -> None:
    b = make(max_connections=2)
    first, second = Client(b), Client(b)
    extra = Client(b, connect=False)
    assert extra.take() == b"ERROR TOO_MANY_CONNECTIONS too many connections (limit 2)\n"
    assert extra.closed_by_core == [("too many connections", True)]
    assert first.send("PING") and first.take() == b"PONG\n"
    b.close(extra.h)
    b.close(second.h)
    again = Client(b, connect=False)
    assert again.closed_by_core == []
    assert b.stats()["connections_rejected"] == 1


def test_max_memory_refuses_and_does_not_store(make: Callable[..., AnyBroker]) -> None:
    b = make(max_memory=10)
    pub = Client(b)
    pub.send(f"PUBLISH {pub.cid} t 123456", f"PUBLISH {pub.cid} t 12345", f"PUBLISH {pub.cid} t 1234")
    assert pub.take() == (
        b"PUBLISHED t\nERROR MEMORY_FULL memory limit reached (6 bytes in backlogs) for topic 't'\nPUBLISHED t\n"
    )
    assert b.topic_info(b"t") == (0, 2)
    assert b.stats()["backlog_bytes"] == 10
    sub = Client(b)
    sub.send(f"SUBSCRIBE {sub.cid} t")
    assert sub.take() == b"SUBSCRIBED t\nMESSAGE t 123456\nMESSAGE t 1234\n"


def test_full_backlog_refuses_publish(make: Callable[..., AnyBroker]) -> None:
    b = make(max_backlog=1)
    pub = Client(b)
    pub.send(f"PUBLISH {pub.cid} t a", f"PUBLISH {pub.cid} t b")
    assert pub.take() == b"PUBLISHED t\nERROR BACKLOG_FULL backlog full (1 messages) for topic 't'\n"


def test_max_subscriptions_per_connection(make: Callable[..., AnyBroker]) -> None:
    b = make(max_subscriptions=1)
    c = Client(b)
    c.send(f"SUBSCRIBE {c.cid} a", f"SUBSCRIBE {c.cid} b", f"SUBSCRIBE {c.cid} a")
    assert c.take() == (
        b"SUBSCRIBED a\nERROR TOO_MANY_SUBSCRIPTIONS too many subscriptions on this connection (limit 1)\nSUBSCRIBED a\n"
    )
    assert b.topic_info(b"b") is None


def test_max_topics(make: Callable[..., AnyBroker]) -> None:
    b = make(max_topics=1)
    c = Client(b)
    c.send(f"SUBSCRIBE {c.cid} a", f"SUBSCRIBE {c.cid} b", f"PUBLISH {c.cid} c x", f"PUBLISH {c.cid} a x")
    assert c.take() == (
        b"SUBSCRIBED a\nERROR TOO_MANY_TOPICS too many topics (limit 1)\nERROR TOO_MANY_TOPICS too many topics (limit 1)\n"
        b"PUBLISHED a\nMESSAGE a x\n"
    )


def test_idle_timeout_closes_silent_connections_only(make: Callable[..., AnyBroker]) -> None:
    b = make(idle_ticks=2)
    talker, silent = Client(b), Client(b)
    for _ in range(3):
        b.tick()
        talker.send("PING")
    assert talker.take() == b"PONG\n" * 3
    assert silent.take() == b"ERROR IDLE_TIMEOUT idle timeout\n"
    assert silent.closed_by_core == [("idle timeout", True)]
    assert talker.closed_by_core == []
    assert b.stats()["idle_closed"] == 1


def test_paused_connection_keeps_its_output_until_resumed(make: Callable[..., AnyBroker]) -> None:
    b = make()
    c = Client(b)
    b.pause(c.h)
    c.send("PING", "PING")
    assert c.take() == b""
    b.resume(c.h)
    assert c.got == [b"PONG\nPONG\n"]


def test_publisher_that_never_reads_is_dropped(make: Callable[..., AnyBroker]) -> None:
    b = make(max_pending=20)
    c = Client(b)
    c.transport_holds = 10
    b.pause(c.h)
    c.send("PING", "PING")  # 10 kept + 10 in the transport: at the limit
    assert c.closed_by_core == []
    assert not c.send("PING")
    assert c.closed_by_core == [("slow consumer: 25 bytes unsent (limit 20)", False)]
    assert b.stats()["slow_consumers"] == 1


def test_transport_over_the_limit_at_pause_drops_at_once(make: Callable[..., AnyBroker]) -> None:
    b = make(max_pending=100)
    c = Client(b)
    c.pause_on_write = True
    c.transport_holds = 500
    c.send("PING")
    assert c.closed_by_core == [("slow consumer: 500 bytes unsent (limit 100)", False)]


def test_paused_subscriber_is_skipped_and_kept_replies_die(make: Callable[..., AnyBroker]) -> None:
    b = make()
    pub, sub, other = Client(b), Client(b), Client(b)
    sub.send(f"SUBSCRIBE {sub.cid} t")
    other.send(f"SUBSCRIBE {other.cid} t")
    b.pause(sub.h)
    sub.send("PING")
    pub.send(f"PUBLISH {pub.cid} t 1", f"PUBLISH {pub.cid} t 2")
    assert other.take() == b"SUBSCRIBED t\nMESSAGE t 1\nMESSAGE t 2\n"
    b.close(sub.h)
    assert sub.take() == b"SUBSCRIBED t\n"
    assert b.stats()["requeued"] == 0


def test_long_backlog_is_handed_over_in_batches(make: Callable[..., AnyBroker]) -> None:
    b = make(out_batch=25)
    pub, sub = Client(b), Client(b)
    pub.send(*(f"PUBLISH {pub.cid} t {i}" for i in range(5)))
    sub.send(f"SUBSCRIBE {sub.cid} t")
    # a writer call ends once it holds 25 bytes or more
    assert sub.got == [
        b"SUBSCRIBED t\nMESSAGE t 0\n",
        b"MESSAGE t 1\nMESSAGE t 2\nMESSAGE t 3\n",
        b"MESSAGE t 4\n",
    ]


def test_batches_stop_when_the_transport_pauses(make: Callable[..., AnyBroker]) -> None:
    b = make(out_batch=1)
    pub, sub = Client(b), Client(b)
    pub.send(*(f"PUBLISH {pub.cid} t {i}" for i in range(3)))
    sub.pause_on_write = True
    sub.send(f"SUBSCRIBE {sub.cid} t")
    assert sub.got == [b"SUBSCRIBED t\n"]
    assert b.topic_info(b"t") == (1, 3)
    sub.pause_on_write = False
    b.resume(sub.h)
    assert sub.got == [b"SUBSCRIBED t\n", b"MESSAGE t 0\n", b"MESSAGE t 1\n", b"MESSAGE t 2\n"]


def test_failed_writer_gives_messages_back(make: Callable[..., AnyBroker]) -> None:
    b = make()
    pub, gone, ok = Client(b), Client(b), Client(b)
    gone.send(f"SUBSCRIBE {gone.cid} t")
    gone.fail = True
    pub.send(f"PUBLISH {pub.cid} t 1", f"PUBLISH {pub.cid} t 2")
    assert b.stats()["requeued"] == 2
    ok.send(f"SUBSCRIBE {ok.cid} t")
    assert ok.take() == b"SUBSCRIBED t\nMESSAGE t 1\nMESSAGE t 2\n"


def test_slow_subscriber_is_dropped_and_others_take_its_turns(make: Callable[..., AnyBroker]) -> None:
    b = make(max_pending=30)
    pub, slow, ok = Client(b), Client(b), Client(b)
    slow.send(f"SUBSCRIBE {slow.cid} t")
    ok.send(f"SUBSCRIBE {ok.cid} t")
    slow.take()
    ok.take()
    slow.pause_on_write = True
    pub.send(f"PUBLISH {pub.cid} t 1", f"PUBLISH {pub.cid} t 2")
    pub.send(f"PUBLISH {pub.cid} t 3", f"PUBLISH {pub.cid} t 4")
    assert slow.take() == b"MESSAGE t 1\n"
    assert ok.take() == b"MESSAGE t 2\nMESSAGE t 3\nMESSAGE t 4\n"
    slow.send(*["PING"] * 7)
    assert slow.closed_by_core == [("slow consumer: 35 bytes unsent (limit 30)", False)]
    assert b.topic_info(b"t") == (1, 0)
    b.close(slow.h)
    pub.send(f"PUBLISH {pub.cid} t 5")
    assert ok.take() == b"MESSAGE t 5\n"


def test_requeued_messages_count_in_the_backlog_gauges(make: Callable[..., AnyBroker]) -> None:
    # found by the differential test: the requeue path once left backlog_messages behind
    b = make()
    pub, gone = Client(b), Client(b)
    gone.send(f"SUBSCRIBE {gone.cid} t")
    gone.fail = True
    pub.send(f"PUBLISH {pub.cid} t abc")
    stats = b.stats()
    assert (stats["backlog_messages"], stats["backlog_bytes"], stats["requeued"]) == (1, 3, 1)
