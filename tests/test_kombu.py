"""The kombu transport (pigeon.kombu) against a real ``pigeon`` process, through kombu's own API:
``kombu.Connection``, ``SimpleQueue``, ``Producer`` and ``Consumer``.

Each test uses queues of its own name on one server per module. The broker's
figures (``STATS TOPICS``, read with ``pigeon.Client``) say what it holds, so
the tests check the broker's side of every acknowledgement, not only kombu's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue
from kombu.asynchronous import Hub

from pigeon import Client
from pigeon.errors import TooManyTopicsError
from pigeon.kombu.routes import ExchangeTypeNotSupported, OverlappingQueues
from pigeon.kombu.transport import Transport
from pigeon.testing import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One broker for the module (queues are named per test)."""
    proc = ServerProcess("--ack-timeout", "0")
    yield proc
    assert proc.stop() == 0, "".join(proc.log)


@pytest.fixture
def url(server: ServerProcess) -> str:
    """The broker's kombu URL."""
    return f"pigeon://{server.host}:{server.port}"


@pytest.fixture
def name() -> str:
    """A queue name no other test uses."""
    return f"q-{uuid.uuid4().hex[:12]}"


def topic(server: ServerProcess, queue: str) -> dict[str, Any]:
    """The broker's STATS TOPICS entry for ``queue`` (zeros when it holds no such topic)."""
    with Client(server.host, server.port) as client:
        for entry in client.stats("topics"):
            if entry["name"] == queue:
                return entry
    return {"name": queue, "backlog_messages": 0, "unacked": 0, "acked": 0, "nacked": 0}


def acking(bodies: list[Any], routing_keys: list[str] | None = None) -> Callable[[Any, Message], None]:
    """A consumer callback that keeps each body (and routing key) and acknowledges the message."""

    def callback(body: Any, message: Message) -> None:
        bodies.append(body)
        if routing_keys is not None:
            routing_keys.append(message.delivery_info["routing_key"])
        message.ack()

    return callback


def drain(connection: Connection, count: int, timeout: float = 10.0) -> None:
    """Drain events until ``count`` more deliveries were handled (each drain_events call delivers one
    batch or raises TimeoutError after ``timeout``)."""
    transport = connection.transport
    before = transport.delivered_total
    while transport.delivered_total - before < count:
        connection.drain_events(timeout=timeout)


# ------------------------------------------------------------ registration


def test_pigeon_urls_resolve_to_the_transport_in_a_fresh_interpreter(url: str) -> None:
    # the entry point is loaded when kombu imports its serialization, as Queue, Exchange, Producer do
    script = (
        "from kombu import Connection, Queue\n"
        f"c = Connection({url!r})\n"
        "print(type(c.transport).__module__, c.transport.driver_type)\n"
        "from celery import Celery\n"
        f"app = Celery(broker={url!r})\n"
        "print(type(app.connection_for_write().transport).__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pigeon.kombu.transport", "pigeon", "pigeon.kombu.transport"]


def test_the_kombu_example_of_docs_celery_md_runs_in_a_fresh_interpreter(url: str) -> None:
    text = (ROOT / "docs" / "celery.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    script = example.replace("pigeon://127.0.0.1:3333", url)
    assert script != example
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "{'photo': 'photo-1.jpg'}\n"


# ------------------------------------------------------------ SimpleQueue


def test_simple_queue_round_trips_json_and_binary_bodies_with_headers(url: str, name: str) -> None:
    binary = bytes(range(256)) + b"\n\r\nend"  # newlines and every byte: the envelope keeps them on one line
    with Connection(url) as connection:
        queue = connection.SimpleQueue(name)
        queue.put({"text": "line one\nline two \u2028 é", "n": 1}, headers={"h": "v\nw"})
        queue.put(binary, serializer=None, content_type="application/octet-stream", content_encoding="binary")
        first = queue.get(timeout=10)
        second = queue.get(timeout=10)
        assert first.payload == {"text": "line one\nline two \u2028 é", "n": 1}
        assert first.headers["h"] == "v\nw"
        assert second.body == binary
        assert second.content_type == "application/octet-stream"
        first.ack()
        second.ack()
        queue.close()


def test_acked_messages_are_gone_from_the_broker(server: ServerProcess, url: str, name: str) -> None:
    with Connection(url) as connection:
        queue = connection.SimpleQueue(name)
        for i in range(20):
            queue.put({"i": i})
        got = [queue.get(timeout=10) for _ in range(20)]
        assert [m.payload["i"] for m in got] == list(range(20))
        for message in got:
            message.ack()
        assert queue.qsize() == 0  # a command: the queued ACKs go out before it
        figures = topic(server, name)  # read while subscribed: the topic goes when nothing holds it
        assert (figures["acked"], figures["unacked"]) == (20, 0)
        queue.close()


def test_unacked_messages_come_back_when_the_consumer_goes(url: str, name: str) -> None:
    with Connection(url) as connection:
        queue = connection.SimpleQueue(name)
        queue.put({"job": 1})
        taken = queue.get(timeout=10)
        assert taken.payload == {"job": 1}
        assert not taken.delivery_info["redelivered"]
        queue.close()  # closed without acking
    with Connection(url) as connection:
        queue = connection.SimpleQueue(name)
        again = queue.get(timeout=10)
        assert again.payload == {"job": 1}
        assert again.delivery_info["redelivered"]
        again.ack()
        queue.close()


def test_reject_with_requeue_is_a_nack_and_without_drops_the_message(
    server: ServerProcess, url: str, name: str
) -> None:
    with Connection(url) as connection:
        queue = connection.SimpleQueue(name)
        queue.consumer.qos(prefetch_count=1)  # one at a time: the requeued message is the next one
        queue.put({"n": "requeued"})
        queue.put({"n": "dropped"})
        message = queue.get(timeout=10)
        assert message.payload == {"n": "requeued"}
        message.requeue()
        again = queue.get(timeout=10)
        assert again.payload == {"n": "requeued"}
        assert again.delivery_info["redelivered"]
        again.ack()
        dropped = queue.get(timeout=10)
        assert dropped.payload == {"n": "dropped"}
        dropped.reject()
        assert queue.qsize() == 0
        figures = topic(server, name)
        assert (figures["nacked"], figures["acked"], figures["unacked"]) == (1, 2, 0)
        queue.close()


def test_qsize_counts_ready_messages_not_unacked_ones(server: ServerProcess, url: str, name: str) -> None:
    with Connection(url) as connection:
        queue = connection.SimpleQueue(name)
        queue.consumer.qos(prefetch_count=3)
        for i in range(10):
            queue.put({"i": i})
        assert queue.qsize() == 10
        held = queue.get(timeout=10)  # consuming starts: the broker hands over a window of 3
        assert topic(server, name)["unacked"] == 3
        assert queue.qsize() == 7
        held.ack()
        queue.close()


def test_purge_drops_the_ready_messages_and_counts_them(url: str, name: str) -> None:
    with Connection(url) as connection:
        queue = connection.SimpleQueue(name)
        for i in range(500):
            queue.put({"i": i})
        assert queue.qsize() == 500
        assert queue.clear() == 500
        assert queue.qsize() == 0
        assert queue.clear() == 0
        queue.put({"after": True})
        message = queue.get(timeout=10)
        assert message.payload == {"after": True}
        message.ack()
        queue.close()


def test_purging_a_queue_the_broker_never_saw_purges_nothing(url: str, name: str) -> None:
    with Connection(url) as connection, connection.channel() as channel:
        assert channel.queue_purge(name) == 0


def test_basic_get_is_refused_with_the_reason(url: str, name: str) -> None:
    with Connection(url) as connection:
        queue = connection.SimpleQueue(name)
        with pytest.raises(NotImplementedError, match="no basic_get"):
            queue.get_nowait()
        queue.close()


# ------------------------------------------------------------ Producer and Consumer


def holding_consumer(
    producing: Connection, consuming: Connection, name: str, count: int, prefetch: int
) -> tuple[Any, Consumer, list[Message]]:
    """Publish ``count`` messages ``{"i": i}`` to ``name``; a consumer of it with ``prefetch`` that
    keeps the messages it gets (without settling them), with its channel and that list."""
    producer = Producer(producing.channel())
    for i in range(count):
        producer.publish({"i": i}, routing_key=name)
    received: list[Message] = []
    channel = consuming.channel()
    consumer = Consumer(channel, [Queue(name)], callbacks=[lambda body, message: received.append(message)])
    consumer.qos(prefetch_count=prefetch)
    return channel, consumer, received


def test_consumer_with_prefetch_holds_at_most_its_window(server: ServerProcess, url: str, name: str) -> None:
    with Connection(url) as producer_connection, Connection(url) as consumer_connection:
        channel, consumer, received = holding_consumer(producer_connection, consumer_connection, name, 50, 5)
        with consumer:
            drain(consumer_connection, 5)
            assert len(received) == 5
            assert topic(server, name)["unacked"] == 5  # the broker stops at the window
            received[-1].ack(multiple=True)  # ACK 1-5
            while len(received) < 50:
                settled = len(received)
                drain(consumer_connection, 1)
                for message in received[settled:]:
                    message.ack()
            assert (
                channel.queue_declare(name, passive=True).message_count == 0
            )  # a command: the ACKs go first
            figures = topic(server, name)
            assert (figures["acked"], figures["unacked"]) == (50, 0)
        assert [m.payload["i"] for m in received] == list(range(50))


def publish_elsewhere(url: str, exchange: str, kind: str, keys: list[str], count: int = 1) -> None:
    """Publish ``count`` messages ``{"key": key, "i": i}`` per routing key through ``exchange`` from
    another process, which declares the exchange but knows none of this process's bindings (kombu
    keeps bindings per process: the broker has to route)."""
    script = (
        "from kombu import Connection, Exchange, Producer\n"
        f"with Connection({url!r}) as connection:\n"
        f"    producer = Producer(connection.channel(), exchange=Exchange({exchange!r}, type={kind!r}))\n"
        "    producer.declare()\n"
        f"    for key in {keys!r}:\n"
        f"        for i in range({count}):\n"
        "            producer.publish({'key': key, 'i': i}, routing_key=key)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def consume_all(connection: Connection, queues: list[Queue], count: int) -> dict[str, list[Any]]:
    """Consume ``count`` messages from ``queues`` (one channel each), acknowledging them: the bodies
    per queue name."""
    got: dict[str, list[Any]] = {queue.name: [] for queue in queues}
    consumers = [
        Consumer(connection.channel(), [queue], callbacks=[acking(got[queue.name])]) for queue in queues
    ]
    for consumer in consumers:
        consumer.consume()
    drain(connection, count)
    for consumer in consumers:
        consumer.cancel()
    return got


def test_a_direct_exchange_routes_by_the_key_to_every_queue_bound_with_it(url: str, name: str) -> None:
    """The publisher knows no binding: the key goes to the queues bound with it (each a group on the
    topic the key names, declared before the publish: they keep it until consumed)."""
    exchange = Exchange(f"{name}-ex", type="direct")
    bound = [
        Queue(f"{name}-{kind}", exchange, routing_key=f"{name}-images") for kind in ("thumbs", "archive")
    ]
    with Connection(url) as connection:
        for queue in bound:
            queue(connection.channel()).declare()
        publish_elsewhere(url, exchange.name, "direct", [f"{name}-images"], count=3)
        got = consume_all(connection, bound, 6)
    assert got == {queue.name: [{"key": f"{name}-images", "i": i} for i in range(3)] for queue in bound}


def test_a_queue_bound_with_its_own_name_is_its_topic_as_celerys_task_queues(url: str, name: str) -> None:
    exchange = Exchange(f"{name}-tasks", type="direct")
    queue = Queue(f"{name}-default", exchange, routing_key=f"{name}-default")
    with Connection(url) as connection:
        queue(connection.channel()).declare()
        publish_elsewhere(url, exchange.name, "direct", [queue.name], count=3)
        assert (
            connection.default_channel.wire.stats_group(queue.name, queue.name) is None
        )  # its topic, no group
        assert consume_all(connection, [queue], 3) == {
            queue.name: [{"key": queue.name, "i": i} for i in range(3)]
        }


def test_a_fanout_exchange_gives_every_bound_queue_a_copy_and_consumers_of_a_queue_share_it(
    url: str, name: str
) -> None:
    broadcast = Exchange(f"{name}-fanout", type="fanout")
    first, second = Queue(f"{name}-a", broadcast), Queue(f"{name}-b", broadcast)
    with Connection(url) as connection:
        for queue in (first, second):
            queue(connection.channel()).declare()
        publish_elsewhere(url, broadcast.name, "fanout", [""], count=20)
        # the size is the group's backlog: kept before any consumer came
        assert connection.default_channel.queue_declare(first.name, passive=True).message_count == 20
        sharing: list[Any] = []
        with Consumer(connection.channel(), [second], callbacks=[acking(sharing)]):  # a second consumer of b
            got = consume_all(connection, [first, second], 40)
    assert got[first.name] == [{"key": "", "i": i} for i in range(20)]
    assert sorted(body["i"] for body in got[second.name] + sharing) == list(range(20))  # b's 20, shared out


def test_a_topic_exchange_routes_by_binding_patterns(url: str, name: str) -> None:
    events = Exchange(f"{name}-events", type="topic")
    star = Queue(f"{name}-star", events, routing_key="task.*")
    hash_ = Queue(f"{name}-hash", events, routing_key="task.#")
    exact = Queue(f"{name}-exact", events, routing_key="worker.online")
    keys = ["task", "task.sent", "task.sent.late", "worker.online", "worker.offline"]
    with Connection(url) as connection:
        for queue in (star, hash_, exact):
            queue(connection.channel()).declare()
        publish_elsewhere(url, events.name, "topic", keys)
        got = consume_all(connection, [star, hash_, exact], 5)
    assert {queue: sorted(body["key"] for body in bodies) for queue, bodies in got.items()} == {
        star.name: ["task.sent"],
        hash_.name: ["task", "task.sent", "task.sent.late"],  # '#' matches zero or more words
        exact.name: ["worker.online"],
    }


def test_bindings_pigeon_cannot_express_and_overlapping_queues_on_one_channel_are_refused(
    url: str, name: str
) -> None:
    events = Exchange(f"{name}-events", type="topic")
    with Connection(url) as connection:
        with pytest.raises(ExchangeTypeNotSupported, match="only supported as the last word"):
            Queue(f"{name}-mid", events, routing_key="a.#.b")(connection.channel()).declare()
        wide = Queue(f"{name}-wide", events, routing_key="a.*")
        narrow = Queue(f"{name}-narrow", events, routing_key="a.b")
        with pytest.raises(OverlappingQueues, match="use two channels"):
            Consumer(connection.channel(), [wide, narrow], callbacks=[lambda body, message: None]).consume()
        headers = Exchange(f"{name}-h", type="headers")
        with pytest.raises(ExchangeTypeNotSupported, match="headers"):
            Producer(connection.channel()).publish({}, exchange=headers, declare=[headers])


def test_purge_size_and_delete_of_a_queue_bound_to_a_fanout_exchange(url: str, name: str) -> None:
    broadcast = Exchange(f"{name}-fanout", type="fanout")
    queue = Queue(f"{name}-q", broadcast)
    with Connection(url) as connection:
        bound = queue(connection.channel())
        bound.declare()
        publish_elsewhere(url, broadcast.name, "fanout", [""], count=7)
        assert bound.queue_declare(passive=True).message_count == 7
        assert bound.purge() == 7
        assert bound.queue_declare(passive=True).message_count == 0
        wire = connection.default_channel.wire
        assert wire.stats_group(f"_ex.{broadcast.name}", queue.name) is not None
        bound.delete()
        assert wire.stats_group(f"_ex.{broadcast.name}", queue.name) is None


def test_a_message_longer_than_the_brokers_line_limit_is_refused_before_sending(name: str) -> None:
    server = ServerProcess("--max-line", "2000")
    try:
        with Connection(f"pigeon://{server.host}:{server.port}") as connection:
            queue = connection.SimpleQueue(name)
            with pytest.raises(ValueError, match="max_line"):
                queue.put("x" * 3000)
            queue.put("fits")
            message = queue.get(timeout=10)
            assert message.payload == "fits"
            message.ack()
            queue.close()
    finally:
        assert server.stop() == 0


def test_the_event_loop_wakes_on_the_socket(url: str, name: str) -> None:
    """In a kombu Hub (Celery's worker loop) the consumer's socket is a reader of the loop: a delivery
    is handled by the loop's own iteration, no drain_events call and no polling interval involved."""
    assert Transport.polling_interval is None
    received: list[Any] = []
    hub = Hub()
    try:
        with Connection(url) as connection, Connection(url) as producer_connection:
            channel = connection.channel()
            consumer = Consumer(
                channel,
                [Queue(name)],
                callbacks=[acking(received)],
            )
            consumer.consume()
            connection.transport.register_with_event_loop(connection.connection, hub)
            hub.call_soon(lambda: None)  # makes the first iteration register the sockets (on_tick)
            loop = hub.create_loop()
            next(loop)
            assert channel.wire.fileno() in hub.readers
            Producer(producer_connection.channel()).publish({"via": "hub"}, routing_key=name)
            for _ in range(200):  # each iteration waits in poll() for at most 1 s
                if received:
                    break
                next(loop)
            assert received == [{"via": "hub"}]
            consumer.cancel()
    finally:
        hub.close()


def test_a_lost_broker_is_a_connection_error_kombu_can_retry(name: str) -> None:
    server = ServerProcess()
    connection = Connection(f"pigeon://{server.host}:{server.port}")
    queue = connection.SimpleQueue(name)
    server.stop()
    try:
        with pytest.raises(connection.connection_errors):
            for _ in range(100):  # the first sends may still go into the socket's buffer
                queue.put({"lost": True})
                queue.channel.wire.sync()
    finally:
        connection.release()


def beat_for(connection: Connection, seconds: float) -> None:
    """Call ``heartbeat_check`` as Celery's worker does (``rate`` times per interval) for ``seconds``."""
    interval = connection.get_heartbeat_interval()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        connection.heartbeat_check(rate=2)
        time.sleep(interval / 2)


@pytest.mark.parametrize("beating", [True, False])
def test_heartbeats_keep_a_quiet_connection_open_under_the_brokers_idle_timeout(
    name: str, beating: bool
) -> None:
    """The interval is half the broker's ``--idle-timeout`` (from HELLO); without the checks the
    broker closes the quiet connection, which is what the checks prevent."""
    server = ServerProcess("--idle-timeout", "1")
    try:
        with Connection(f"pigeon://{server.host}:{server.port}") as connection:
            queue = connection.SimpleQueue(name)
            assert connection.supports_heartbeats
            assert connection.get_heartbeat_interval() == 0.5
            if beating:
                beat_for(connection, 3.0)
                queue.put({"after": "quiet"})
                assert queue.get(timeout=10).payload == {"after": "quiet"}
            else:
                time.sleep(3.0)
                with pytest.raises(connection.connection_errors):
                    queue.put({"after": "quiet"})
                    queue.channel.wire.sync()
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_heartbeat_check_raises_a_connection_error_for_a_hung_broker(name: str) -> None:
    """A broker that stops answering (SIGSTOP) is found out within two intervals plus a check, as a
    connection error kombu and Celery recover from."""
    server = ServerProcess()
    connection = Connection(f"pigeon://{server.host}:{server.port}", heartbeat=0.5)
    try:
        connection.SimpleQueue(name)
        assert connection.get_heartbeat_interval() == 0.5
        beat_for(connection, 1.0)  # a live broker answers the pings
        server.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 30
        with pytest.raises(connection.connection_errors, match="no heartbeat"):
            while time.monotonic() < deadline:
                connection.heartbeat_check(rate=2)
                time.sleep(0.25)
    finally:
        server.proc.send_signal(signal.SIGCONT)
        connection.release()
        server.stop()


def test_a_cancelled_consumer_keeps_what_it_holds_until_it_settles_it(
    server: ServerProcess, url: str, name: str
) -> None:
    """As in AMQP (Celery's warm shutdown acks its running tasks after cancelling): no redelivery of
    the held messages, no new ones, and the subscription ends with the last settlement."""
    with Connection(url) as connection:
        channel, consumer, received = holding_consumer(connection, connection, name, 10, 3)
        consumer.consume()
        drain(connection, 3)
        consumer.cancel()
        figures = topic(server, name)
        assert (figures["unacked"], figures["backlog_messages"], figures["subscribers"]) == (3, 7, 1)
        received[0].ack()
        received[1].reject(requeue=True)
        assert topic(server, name)["subscribers"] == 1  # still holds one
        received[2].ack()  # the last: the channel unsubscribes
        assert channel.queue_declare(name, passive=True).message_count == 8
        figures = topic(server, name)
        assert (figures["unacked"], figures["subscribers"], figures["acked"], figures["nacked"]) == (
            0,
            0,
            2,
            1,
        )
        assert len(received) == 3


def test_a_refused_publish_is_raised_by_the_next_one_or_at_once_with_confirm_publish(name: str) -> None:
    server = ServerProcess("--max-topics", "1")
    url = f"pigeon://{server.host}:{server.port}"
    try:
        with Connection(url) as connection:
            producer = Producer(connection.channel())
            producer.publish({"n": 1}, routing_key=f"{name}-a")  # the one topic allowed
            producer.publish({"n": 2}, routing_key=f"{name}-b")  # refused: pipelined, not known yet
            assert producer.channel.queue_declare(f"{name}-a", passive=True).message_count == 1  # reads it
            with pytest.raises(TooManyTopicsError):
                producer.publish({"n": 3}, routing_key=f"{name}-a")
        with Connection(url, transport_options={"confirm_publish": True}) as connection:
            producer = Producer(connection.channel())
            with pytest.raises(TooManyTopicsError):
                producer.publish({"n": 4}, routing_key=f"{name}-c")
            producer.publish({"n": 5}, routing_key=f"{name}-a")
        assert topic(server, f"{name}-a")["backlog_messages"] == 2
    finally:
        assert server.stop() == 0


# ------------------------------------------------------------ acknowledgements in an event loop


def hub_consumer(
    connection: Connection, name: str, prefetch: int, received: list[Any]
) -> tuple[Hub, Iterator[None], Consumer]:
    """A consumer of ``name`` (acknowledging each message) registered with a fresh kombu Hub, whose
    loop has made its first turn."""
    consumer = Consumer(connection.channel(), [Queue(name)], callbacks=[acking(received)])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    hub = Hub()
    connection.transport.register_with_event_loop(connection.connection, hub)
    hub.call_soon(lambda: None)
    loop = hub.create_loop()
    next(loop)
    return hub, loop, consumer


def turn_until(loop: Iterator[None], done: Callable[[], bool], timeout: float = 30.0) -> None:
    """Turn the event loop until ``done()``; fails after ``timeout`` s (a turn may wait in poll for
    the loop's next timer, up to 10 s)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the event loop did not get there in time"
        next(loop)


def test_acks_in_an_event_loop_go_out_after_the_delay_without_other_traffic(
    server: ServerProcess, url: str, name: str
) -> None:
    received: list[Any] = []
    with Connection(url) as producer, Connection(url, transport_options={"ack_delay": 0.01}) as connection:
        hub, loop, consumer = hub_consumer(connection, name, 100, received)  # batch of 50: never reached
        try:
            for i in range(3):
                Producer(producer.channel()).publish({"i": i}, routing_key=name)
            turn_until(loop, lambda: len(received) == 3)
            # nothing else happens on the channel: only the delay's timer can send the acks
            turn_until(loop, lambda: topic(server, name)["acked"] == 3)
            assert topic(server, name)["unacked"] == 0
            consumer.cancel()
        finally:
            hub.close()


def test_a_full_window_is_acked_without_waiting_for_the_delay(
    server: ServerProcess, url: str, name: str
) -> None:
    """A delay of an hour: only the batch of half the window (2 of 4) lets 40 messages through."""
    received: list[Any] = []
    with Connection(url) as producer, Connection(url, transport_options={"ack_delay": 3600}) as connection:
        hub, loop, consumer = hub_consumer(connection, name, 4, received)
        try:
            publisher = Producer(producer.channel())
            for i in range(40):
                publisher.publish({"i": i}, routing_key=name)
            turn_until(loop, lambda: len(received) == 40)
            assert [body["i"] for body in received] == list(range(40))
            consumer.cancel()
        finally:
            hub.close()


def test_queued_acks_are_sent_before_a_publish_and_at_close(
    server: ServerProcess, url: str, name: str
) -> None:
    """With a delay of an hour and a window of 100, acks wait: a publish on the channel sends them
    first, and so does closing the connection; none is redelivered."""
    received: list[Any] = []
    with Connection(url) as producer:
        publisher = Producer(producer.channel())
        with Connection(url, transport_options={"ack_delay": 3600}) as connection:
            hub, loop, consumer = hub_consumer(connection, name, 100, received)
            try:
                channel = consumer.channel
                for i in range(3):
                    publisher.publish({"i": i}, routing_key=name)
                turn_until(loop, lambda: len(received) == 3)
                assert channel.wire.acks_queued == 3
                Producer(channel).publish({"after": "acks"}, routing_key=f"{name}-other")
                channel.wire.sync()
                assert topic(server, name)["acked"] == 3
                for i in range(3, 6):
                    publisher.publish({"i": i}, routing_key=name)
                turn_until(loop, lambda: len(received) == 6)
                assert channel.wire.acks_queued == 3
            finally:
                hub.close()
        # the connection closed: unacknowledged, the last 3 would be back in the backlog (with no
        # consumer left); acknowledged, the topic is empty (and gone: zeros)
        figures = topic(server, name)
        assert (figures["unacked"], figures["backlog_messages"]) == (0, 0)
    assert [body["i"] for body in received] == list(range(6))
