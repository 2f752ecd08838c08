"""At-least-once delivery in the core (issue 12), without sockets: acknowledged subscriptions,
ACK and NACK, prefetch, redelivery, dead letters, and publisher flow control."""

from __future__ import annotations

import gc
import time
import tracemalloc

import pytest

from pigeon._core import Broker


class Peer:
    """One connection: what the core wrote to it."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.chunks: list[bytes] = []
        self.handle = broker.open(self.chunks.append)
        self.broker.feed(self.handle, b"CONNECT\n")
        self.cid = self.take().split()[1].decode()

    def send(self, *lines: str) -> bytes:
        """Feed lines (``<me>`` stands for the connection's id) and return what came back."""
        self.broker.feed(
            self.handle, "".join(line.replace("<me>", self.cid) + "\n" for line in lines).encode()
        )
        return self.take()

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data

    def deliveries(self, data: bytes | None = None) -> list[tuple[str, int, int, str]]:
        """The DELIVER lines of ``data`` (default: received since the last take), as
        (topic, tag, attempt, body)."""
        out = []
        for line in (self.take() if data is None else data).splitlines():
            if line.startswith(b"DELIVER "):
                _, topic, tag, attempt, body = line.decode().split(" ", 4)
                out.append((topic, int(tag), int(attempt), body))
        return out


def publish(peer: Peer, topic: str, bodies: list[str]) -> None:
    peer.send(*(f"PUBLISH <me> {topic} {body}" for body in bodies))


# ---------------------------------------------------------------- delivery and ACK


def test_acknowledged_subscribers_get_deliver_lines_with_tags_counting_up() -> None:
    b = Broker()
    sub, pub = Peer(b), Peer(b)
    assert sub.send("SUBSCRIBE <me> jobs ACK") == b"SUBSCRIBED jobs\n"
    publish(pub, "jobs", ["a", "b c", ""])
    assert sub.take() == b"DELIVER jobs 1 1 a\nDELIVER jobs 2 1 b c\nDELIVER jobs 3 1 \n"
    assert b.stats()["unacked"] == 3
    assert sub.send("ACK <me> 2") == b""  # no reply on success
    assert sub.send("ACK <me> 1-3") == b""  # 2 already settled: skipped
    stats = b.stats()
    assert (stats["unacked"], stats["acks"], stats["commands"]["ack"]) == (0, 3, 2)
    (topic,) = b.topics()["topics"]
    assert (topic["unacked"], topic["acked"], topic["delivered"]) == (0, 3, 3)


def test_unknown_tags_get_an_error_and_change_nothing() -> None:
    b = Broker()
    sub, pub = Peer(b), Peer(b)
    sub.send("SUBSCRIBE <me> jobs ACK")
    publish(pub, "jobs", ["a"])
    sub.take()
    assert sub.send("ACK <me> 7") == b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 7\n"
    assert sub.send("ACK <me> 2-9") == b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 2-9\n"
    assert sub.send("NACK <me> 5") == b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 5\n"
    assert sub.send("ACK <me> 1") == b""
    assert sub.send("ACK <me> 1") == b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 1\n"
    assert b.stats()["errors"]["unknown_delivery_tag"] == 4


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("ACK <me>", b"ERROR USAGE usage: ACK <client_id> <tag>|<first>-<last>"),
        ("ACK <me> 0", b"ERROR USAGE usage: ACK <client_id> <tag>|<first>-<last>"),
        ("ACK <me> x", b"ERROR USAGE usage: ACK <client_id> <tag>|<first>-<last>"),
        ("ACK <me> 3-1", b"ERROR USAGE usage: ACK <client_id> <tag>|<first>-<last>"),
        ("ACK <me> 1- 2", b"ERROR USAGE usage: ACK <client_id> <tag>|<first>-<last>"),
        ("ACK <me> 1 2", b"ERROR USAGE usage: ACK <client_id> <tag>|<first>-<last>"),
        ("NACK <me> 1 later", b"ERROR USAGE usage: NACK <client_id> <tag>|<first>-<last> [<delay_ms>]"),
        ("NACK <me> 1 86400001", b"ERROR USAGE usage: NACK <client_id> <tag>|<first>-<last> [<delay_ms>]"),
        ("NACK <me> 1 5 5", b"ERROR USAGE usage: NACK <client_id> <tag>|<first>-<last> [<delay_ms>]"),
        ("SUBSCRIBE <me> t ACK PREFETCH 0", b"ERROR USAGE prefetch must be 1 to 1000000"),
        ("SUBSCRIBE <me> t ACK PREFETCH 1000001", b"ERROR USAGE prefetch must be 1 to 1000000"),
        (
            "SUBSCRIBE <me> t ACK PREFETCH",
            b"ERROR USAGE usage: SUBSCRIBE <client_id> <topic> [ACK [PREFETCH <n>]]",
        ),
        ("SUBSCRIBE <me> t NOACK", b"ERROR USAGE usage: SUBSCRIBE <client_id> <topic> [ACK [PREFETCH <n>]]"),
        (
            "SUBSCRIBE <me> t ACK PREFETCH 5 more",
            b"ERROR USAGE usage: SUBSCRIBE <client_id> <topic> [ACK [PREFETCH <n>]]",
        ),
        ("ACK c999 1", b"ERROR WRONG_CLIENT_ID client id does not belong to this connection: 'c999'"),
        ("NACK c999 1", b"ERROR WRONG_CLIENT_ID client id does not belong to this connection: 'c999'"),
    ],
)
def test_malformed_ack_nack_and_subscribe_options_change_nothing(line: str, reply: bytes) -> None:
    b = Broker()
    sub, pub = Peer(b), Peer(b)
    sub.send("SUBSCRIBE <me> jobs ACK")
    publish(pub, "jobs", ["a"])
    sub.take()
    assert sub.send(line) == reply + b"\n"
    assert b.stats()["unacked"] == 1 and b.topic_info(b"t") is None


def test_plain_and_acknowledged_subscribers_share_a_topic_one_message_each() -> None:
    b = Broker()
    plain, acked, pub = Peer(b), Peer(b), Peer(b)
    plain.send("SUBSCRIBE <me> jobs")
    acked.send("SUBSCRIBE <me> jobs ACK")
    publish(pub, "jobs", [str(i) for i in range(6)])
    assert plain.take() == b"MESSAGE jobs 0\nMESSAGE jobs 2\nMESSAGE jobs 4\n"
    assert acked.deliveries() == [("jobs", 1, 1, "1"), ("jobs", 2, 1, "3"), ("jobs", 3, 1, "5")]


# ---------------------------------------------------------------- prefetch


def test_prefetch_bounds_what_a_subscription_holds_and_round_robin_skips_it() -> None:
    b = Broker()
    small, big, pub = Peer(b), Peer(b), Peer(b)
    small.send("SUBSCRIBE <me> jobs ACK PREFETCH 2")
    big.send("SUBSCRIBE <me> jobs ACK PREFETCH 100")
    publish(pub, "jobs", [str(i) for i in range(8)])
    assert [d[3] for d in small.deliveries()] == ["0", "2"]
    assert [d[3] for d in big.deliveries()] == ["1", "3", "4", "5", "6", "7"]
    big.send("ACK <me> 1-6")
    publish(pub, "jobs", ["8", "9"])
    assert [d[3] for d in big.deliveries()] == ["8", "9"]
    assert small.take() == b""


def test_an_ack_opens_the_window_and_the_backlog_flows() -> None:
    b = Broker()
    sub, pub = Peer(b), Peer(b)
    sub.send("SUBSCRIBE <me> jobs ACK PREFETCH 1")
    publish(pub, "jobs", ["a", "b", "c"])
    assert sub.deliveries() == [("jobs", 1, 1, "a")]
    assert b.topic_info(b"jobs") == (1, 2)
    assert sub.send("ACK <me> 1") == b"DELIVER jobs 2 1 b\n"
    assert sub.send("ACK <me> 2") == b"DELIVER jobs 3 1 c\n"


def test_subscribing_again_changes_the_mode_and_the_window_but_not_the_turn() -> None:
    b = Broker()
    a, other, pub = Peer(b), Peer(b), Peer(b)
    a.send("SUBSCRIBE <me> jobs ACK PREFETCH 1")
    other.send("SUBSCRIBE <me> jobs")
    publish(pub, "jobs", ["0", "1", "2"])
    assert a.deliveries() == [("jobs", 1, 1, "0")]
    assert other.take() == b"MESSAGE jobs 1\nMESSAGE jobs 2\n"
    assert a.send("SUBSCRIBE <me> jobs ACK PREFETCH 3") == b"SUBSCRIBED jobs\n"
    publish(pub, "jobs", ["3", "4", "5"])
    assert [d[3] for d in a.deliveries()] == ["3", "5"]
    assert a.send("SUBSCRIBE <me> jobs") == b"SUBSCRIBED jobs\n"  # plain again: MESSAGE lines
    publish(pub, "jobs", ["6", "7"])
    assert a.take() == b"MESSAGE jobs 7\n"
    assert b.stats()["unacked"] == 3  # the earlier deliveries still wait for their ACK


# ---------------------------------------------------------------- NACK and redelivery


def test_nack_gives_back_in_order_to_the_next_subscribers_with_the_attempt_counted() -> None:
    b = Broker()
    a, c, pub = Peer(b), Peer(b), Peer(b)
    a.send("SUBSCRIBE <me> jobs ACK PREFETCH 3")
    publish(pub, "jobs", ["x", "y", "z"])
    assert [d[3] for d in a.deliveries()] == ["x", "y", "z"]
    c.send("SUBSCRIBE <me> jobs ACK")
    # c is next in the rotation: the messages go round robin from it, in order, on their second attempt
    assert a.deliveries(a.send("NACK <me> 1-3")) == [("jobs", 4, 2, "y")]
    assert c.deliveries() == [("jobs", 1, 2, "x"), ("jobs", 2, 2, "z")]
    assert a.send("ACK <me> 1") == b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 1\n"  # its tag is dead
    stats = b.stats()
    assert (stats["nacks"], stats["redelivered"], stats["unacked"]) == (3, 3, 3)
    (topic,) = b.topics()["topics"]
    assert (topic["nacked"], topic["redelivered"]) == (3, 3)


def test_a_nack_with_a_delay_keeps_the_message_out_until_then_without_holding_back_others() -> None:
    b = Broker()
    timers: list[float] = []
    b.on_timer = timers.append
    sub, pub = Peer(b), Peer(b)
    sub.send("SUBSCRIBE <me> jobs ACK")
    publish(pub, "jobs", ["first"])
    sub.deliveries()
    assert sub.send("NACK <me> 1 200") == b""
    assert timers and 0 < timers[-1] <= 0.2
    publish(pub, "jobs", ["second"])
    assert [d[3] for d in sub.deliveries()] == ["second"]  # not held back by the delayed one
    b.run_timers()
    assert sub.deliveries() == []  # not due yet
    assert b.stats()["delayed"] == 1
    time.sleep(0.25)
    b.run_timers()
    assert sub.deliveries() == [("jobs", 3, 2, "first")]
    assert b.stats()["delayed"] == 0


def test_closing_gives_back_every_unacknowledged_delivery_in_order() -> None:
    b = Broker()
    a, c, pub = Peer(b), Peer(b), Peer(b)
    a.send("SUBSCRIBE <me> jobs ACK", "SUBSCRIBE <me> other ACK")
    publish(pub, "jobs", ["1", "2", "3"])
    publish(pub, "other", ["o"])
    a.send("ACK <me> 2")
    b.close(a.handle)
    out = c.send("SUBSCRIBE <me> jobs ACK", "SUBSCRIBE <me> other ACK")
    assert [(d[0], d[2], d[3]) for d in c.deliveries(out)] == [
        ("jobs", 2, "1"),
        ("jobs", 2, "3"),
        ("other", 2, "o"),
    ]


def test_unsubscribing_gives_back_what_that_subscription_did_not_acknowledge() -> None:
    b = Broker()
    a, c, pub = Peer(b), Peer(b), Peer(b)
    a.send("SUBSCRIBE <me> jobs ACK", "SUBSCRIBE <me> other ACK")
    c.send("SUBSCRIBE <me> jobs ACK PREFETCH 1")
    publish(pub, "jobs", ["1", "2", "3"])
    publish(pub, "other", ["o"])
    assert [d[3] for d in c.deliveries()] == ["2"]  # its window holds one
    assert [d[3] for d in a.deliveries()] == ["1", "3", "o"]
    assert a.send("UNSUBSCRIBE <me> jobs") == b"UNSUBSCRIBED jobs\n"
    assert c.send("ACK <me> 1") == b"DELIVER jobs 2 2 1\n"
    assert c.send("ACK <me> 2") == b"DELIVER jobs 3 2 3\n"
    assert a.send("ACK <me> 3") == b""  # its other subscription is untouched


def test_the_ack_timeout_gives_back_what_stays_unacknowledged() -> None:
    b = Broker(ack_timeout=0.2, tick_interval=0.05)
    a, c, pub = Peer(b), Peer(b), Peer(b)
    a.send("SUBSCRIBE <me> jobs ACK")
    publish(pub, "jobs", ["1", "2"])
    a.send("ACK <me> 2")
    c.send("SUBSCRIBE <me> jobs ACK")
    b.tick()
    assert c.deliveries() == []
    time.sleep(0.3)
    b.tick()
    assert c.deliveries() == [("jobs", 1, 2, "1")]
    assert b.stats()["ack_timeouts"] == 1
    assert a.send("ACK <me> 1") == b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 1\n"


def test_no_ack_timeout_while_the_connection_is_not_read() -> None:
    b = Broker(ack_timeout=0.1, tick_interval=0.05)
    a, pub = Peer(b), Peer(b)
    a.send("SUBSCRIBE <me> jobs ACK")
    publish(pub, "jobs", ["1"])
    assert a.deliveries() == [("jobs", 1, 1, "1")]
    b.pause(a.handle)  # its transport is full: it is not read, so its ACK may be waiting in the socket
    time.sleep(0.2)
    b.tick()
    assert b.stats()["ack_timeouts"] == 0
    b.resume(a.handle)
    assert a.send("ACK <me> 1") == b""


# ---------------------------------------------------------------- dead letters


def test_a_message_delivered_max_deliveries_times_moves_to_the_dead_topic() -> None:
    b = Broker(max_deliveries=2)
    sub, pub = Peer(b), Peer(b)
    sub.send("SUBSCRIBE <me> jobs ACK")
    publish(pub, "jobs", ["poison"])
    assert sub.deliveries() == [("jobs", 1, 1, "poison")]
    assert sub.deliveries(sub.send("NACK <me> 1")) == [("jobs", 2, 2, "poison")]
    assert sub.send("NACK <me> 2") == b""
    assert b.topic_info(b"jobs.dead") == (0, 1)
    stats = b.stats()
    assert (stats["dead_lettered"], stats["redelivered"]) == (1, 1)
    dead = Peer(b)
    assert dead.deliveries(dead.send("SUBSCRIBE <me> jobs.dead ACK")) == [
        ("jobs.dead", 1, 1, "poison")
    ]  # a new message: attempt 1 again
    by_name = {t["name"]: t for t in b.topics()["topics"]}
    assert by_name["jobs"]["dead_lettered"] == 1 and by_name["jobs.dead"]["published"] == 1


def test_a_dead_letter_whose_topic_name_would_be_too_long_is_dropped_and_counted() -> None:
    b = Broker(max_deliveries=1)
    sub, pub = Peer(b), Peer(b)
    name = "x" * 252
    sub.send(f"SUBSCRIBE <me> {name} ACK")
    publish(pub, name, ["poison"])
    sub.send("NACK <me> 1")
    stats = b.stats()
    assert (stats["dead_lettered"], stats["dead_letters_dropped"]) == (0, 1)
    assert b.topic_info(name.encode()) == (1, 0)


def test_zero_max_deliveries_means_no_limit() -> None:
    b = Broker(max_deliveries=0)
    sub, pub = Peer(b), Peer(b)
    sub.send("SUBSCRIBE <me> jobs ACK")
    publish(pub, "jobs", ["again"])
    out = sub.take()
    for attempt in range(1, 30):
        ((_, tag, seen, _),) = sub.deliveries(out)
        assert seen == attempt
        out = sub.send(f"NACK <me> {tag}")
    assert b.stats()["dead_lettered"] == 0


# ---------------------------------------------------------------- leaving connections


def _read(peer: Peer, line: str) -> None:
    """One socket read, as the server does it: no flush until the loop pass ends."""
    data = (line.replace("<me>", peer.cid) + "\n").encode()
    view = peer.broker.get_buffer(peer.handle)
    view[: len(data)] = data
    peer.broker.buffer_updated(peer.handle, len(data))


def test_eof_cuts_out_and_gives_back_deliveries_not_yet_sent() -> None:
    b = Broker()
    a, c, pub = Peer(b), Peer(b), Peer(b)
    a.send("SUBSCRIBE <me> jobs ACK")
    b.on_output = lambda: None  # the server flushes after the loop pass
    _read(a, "PING")
    _read(pub, "PUBLISH <me> jobs 1")
    b.eof(a.handle)
    assert a.take() == b"PONG\n"
    b.flush()
    b.on_output = None
    b.close(a.handle)
    assert c.deliveries(c.send("SUBSCRIBE <me> jobs ACK")) == [("jobs", 1, 1, "1")]  # a never saw it


def test_disconnect_sends_plain_messages_but_gives_back_deliveries() -> None:
    b = Broker()
    plain, acked, pub, late = Peer(b), Peer(b), Peer(b), Peer(b)
    plain.send("SUBSCRIBE <me> p")
    acked.send("SUBSCRIBE <me> q ACK")
    b.on_output = lambda: None
    _read(pub, "PUBLISH <me> p 1")
    _read(pub, "PUBLISH <me> q 2")
    _read(plain, "DISCONNECT")
    _read(acked, "DISCONNECT")
    b.flush()
    b.on_output = None
    assert plain.take() == b"MESSAGE p 1\nDISCONNECTED\n"
    assert acked.take() == b"DISCONNECTED\n"
    assert late.deliveries(late.send("SUBSCRIBE <me> q ACK")) == [("q", 1, 1, "2")]


# ---------------------------------------------------------------- publisher flow control


def test_a_publisher_held_on_memory_goes_on_once_memory_is_freed() -> None:
    b = Broker(max_memory=600_000)
    reading: list[tuple[int, bool]] = []
    b.on_reading = lambda h, on: reading.append((h, on))
    pub = Peer(b)
    body = "x" * 1000
    sent = 0
    while not reading:  # as the server does: no more reads once the core says stop
        pub.send(*(f"PUBLISH <me> q {body}" for _ in range(10)))
        sent += 10
    held = b.stats()
    assert held["publishers_held"] == 1 and held["refused"] == 0
    # over the limit by at most what the publisher sent after its held PUBLISH (one read)
    assert held["memory_bytes"] <= 600_000 + 10 * 1024
    assert reading == [(pub.handle, False)]
    sub = Peer(b)
    got = sub.send("SUBSCRIBE <me> q").count(b"MESSAGE q ")
    assert got == sent
    assert b.stats()["publishers_held"] == 0 and reading[-1] == (pub.handle, True)


def test_a_message_too_large_to_ever_fit_is_refused_not_held() -> None:
    b = Broker(max_memory=400_000)
    pub = Peer(b)
    assert pub.send("PUBLISH <me> q " + "x" * 150_000).startswith(b"ERROR MEMORY_FULL")
    assert b.stats()["publishers_held"] == 0


def test_a_consumer_publishing_to_its_own_topic_keeps_making_progress() -> None:
    """The no-deadlock rule: with acknowledgements, one connection both publishes and consumes."""
    b = Broker(max_backlog=10)
    worker = Peer(b)
    worker.send("SUBSCRIBE <me> loop ACK PREFETCH 5")
    published = acked = 0
    out = b""
    for _ in range(200):
        out += worker.send(*(f"PUBLISH <me> loop m{published + i}" for i in range(20)))
        published = b.stats()["published"]
        tags = [tag for _, tag, _, _ in worker.deliveries(out)]
        out = worker.send(f"ACK <me> {min(tags)}-{max(tags)}") if tags else b""
        acked += len(tags)
    assert published >= 1000 and acked >= 1000
    assert b.stats()["publishers_held"] == 0 and b.stats()["refused"] > 0


# ---------------------------------------------------------------- found while extending the model (issue 12)


def _deferred(b: Broker) -> None:
    """Flushes wait for flush(), as in the server (one per pass of its loop)."""
    b.on_output = lambda: None


def test_a_delayed_nack_of_a_range_gives_the_messages_back_in_their_original_order() -> None:
    b = Broker()
    sub, pub = Peer(b), Peer(b)
    sub.send("SUBSCRIBE <me> jobs ACK")
    publish(pub, "jobs", [f"m{i}" for i in range(1, 6)])
    sub.take()
    sub.send("NACK <me> 1-5 1", "UNSUBSCRIBE <me> jobs")
    time.sleep(0.01)
    b.run_timers()
    late = Peer(b)
    assert late.send("SUBSCRIBE <me> jobs") == b"SUBSCRIBED jobs\n" + b"".join(
        b"MESSAGE jobs m%d\n" % i for i in range(1, 6)
    )


def test_a_publisher_held_by_a_backlog_bound_of_0_goes_on_once_a_subscriber_can_take() -> None:
    b = Broker(max_backlog=0)
    reading: list[tuple[int, bool]] = []
    b.on_reading = lambda h, on: reading.append((h, on))
    pub = Peer(b)
    assert pub.send("PUBLISH <me> t x", "PING") == b""  # nobody can take it: the publisher waits
    sub = Peer(b)
    assert sub.send("SUBSCRIBE <me> t") == b"SUBSCRIBED t\nMESSAGE t x\n"
    assert pub.take() == b"PUBLISHED t\nPONG\n"
    assert reading == [(pub.handle, False), (pub.handle, True)]
    assert b.stats()["publishers_held"] == 0


def test_a_publish_that_waited_is_counted_once() -> None:
    b = Broker(max_backlog=1)
    pub, sub = Peer(b), Peer(b)
    assert pub.send("PUBLISH <me> t a", "PUBLISH <me> t b") == b"PUBLISHED t\n"
    sub.send("SUBSCRIBE <me> t")
    assert pub.take() == b"PUBLISHED t\n"
    stats = b.stats()
    assert (stats["commands"]["publish"], stats["published"], stats["publish_holds"]) == (2, 2, 1)


def test_a_topic_stays_while_a_deliver_line_of_it_is_on_its_way_even_once_acknowledged() -> None:
    # once freed under the unsent line, the topic was written to at the hand-over (a use after free)
    b = Broker()
    _deferred(b)
    sub, pub = Peer(b), Peer(b)
    sub.send("SUBSCRIBE <me> t ACK")
    _read(pub, "PUBLISH <me> t x")
    _read(sub, "ACK <me> 1")  # the client may ack a tag before it has read its line
    _read(sub, "UNSUBSCRIBE <me> t")
    assert b.topic_info(b"t") == (0, 0)  # the DELIVER line is on its way
    for i in range(50):  # topics that may take the freed topic's memory
        _read(pub, f"PUBLISH <me> u{i} y")
    b.flush()
    assert sub.take() == b"DELIVER t 1 1 x\nUNSUBSCRIBED t\n"
    assert b.topic_info(b"t") is None
    assert [t["name"] for t in b.topics(0, 1000)["topics"] if t["delivered"]] == []
    assert b.stats()["topics"] == 50


def test_a_message_given_back_unsent_by_a_plain_subscriber_keeps_its_attempt() -> None:
    b = Broker()
    _deferred(b)
    pub, plain = Peer(b), Peer(b)
    pub.send("PUBLISH <me> t x")  # into the backlog
    _read(plain, "SUBSCRIBE <me> t")  # MESSAGE t x written, never handed over
    b.close(plain.handle)
    b.flush()
    b.on_output = None
    acked = Peer(b)
    assert acked.send("SUBSCRIBE <me> t ACK") == b"SUBSCRIBED t\nDELIVER t 1 1 x\n"


# ---------------------------------------------------------------- no Python object per message


def test_the_ack_path_creates_no_python_object_per_message() -> None:
    b = Broker()
    sub, pub = Peer(b), Peer(b)
    sub.send("SUBSCRIBE <me> jobs ACK PREFETCH 1000000")
    batch = b"".join(b"PUBLISH %s jobs %06d\n" % (pub.cid.encode(), i) for i in range(5000))
    ack = b"ACK " + sub.cid.encode() + b" %d-%d\n"

    def round_trip(first: int) -> None:
        b.feed(pub.handle, batch)
        sub.chunks.clear()
        pub.chunks.clear()
        b.feed(sub.handle, ack % (first, first + 4999))

    for r in range(3):  # warm the buffers up first
        round_trip(1 + r * 5000)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for r in range(3, 6):
        round_trip(1 + r * 5000)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.count_diff for stat in after.compare_to(before, "filename") if stat.count_diff > 0)
    assert grown < 100, [str(s) for s in after.compare_to(before, "lineno")[:5]]
    assert b.stats()["acks"] == 30000 and b.stats()["unacked"] == 0
