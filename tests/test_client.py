"""The suite both clients share: each test runs against ``Client`` and ``AsyncClient``, over TCP to a server.

The ``open_client`` fixture gives both clients the same blocking methods
(``Face``, tests/faces.py). What only one client does is tested in
tests/test_aio.py (and at the end of this file); acknowledged subscriptions
in tests/test_client_acks.py.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import pytest

import pigeon
from pigeon import (
    BacklogFullError,
    Client,
    ConnectionClosedError,
    IdleTimeoutError,
    InvalidArgumentError,
    LineTooLongError,
    MemoryFullError,
    Message,
    NotSubscribedError,
    ProtocolError,
    RetryableError,
    ServerThread,
    TooManyConnectionsError,
)
from pigeon._core import LIMIT_DEFAULTS
from pigeon.client.codec import STATS_PAGE
from pigeon.protocol import TOPIC_MAX
from pigeon.testing import ServerProcess
from tests.clients import figures, until
from tests.conftest import FakeServer
from tests.faces import Face, OpenClient

StartServer = Callable[..., ServerProcess]
MAX_PAYLOAD: int = LIMIT_DEFAULTS["max_payload"]


def test_connect_says_hello_gives_an_id_and_close_disconnects(
    pigeon_server: ServerThread, open_client: OpenClient
) -> None:
    client = open_client(pigeon_server)
    assert client.connected and client.client_id.startswith("c")
    limits = pigeon_server.call(lambda: pigeon_server.server.broker.limits)
    assert client.server_info.max_line == limits["max_line"]
    assert pigeon_server.stats()["connections"] == 1
    client.close()
    client.close()
    assert not client.connected
    commands = pigeon_server.stats()["commands"]
    assert (commands["hello"], commands["connect"], commands["disconnect"]) == (1, 1, 1)
    assert sum(commands.values()) == 3
    assert pigeon_server.stats()["connections"] == 0
    with pytest.raises(ConnectionClosedError, match="closed"):
        client.ping()


@pytest.mark.smoke
def test_publish_and_receive_round_robin(server: ServerProcess, open_client: OpenClient) -> None:
    first, second, publisher = open_client(server), open_client(server), open_client(server)
    first.subscribe("jobs")
    second.subscribe(b"jobs")
    assert first.subscriptions == ("jobs",)
    for i in range(4):
        publisher.publish("jobs", f"job {i}")
    got_first = [first.next_message(10) for _ in range(2)]
    got_second = [second.next_message(10) for _ in range(2)]
    assert got_first == [Message("jobs", b"job 0"), Message("jobs", b"job 2")]
    assert got_second == [Message("jobs", b"job 1"), Message("jobs", b"job 3")]
    assert got_first[0].text == "job 0"


def test_messages_keep_spaces_tabs_unicode_and_may_be_empty(
    server: ServerProcess, open_client: OpenClient
) -> None:
    client = open_client(server)
    client.subscribe("t")
    sent = ["  two  leading", "héllo 🐦", "", "tab\tinside", "\tleading tab"]
    for text in sent:
        client.publish("t", text)
    client.publish("t", b"\x00\xff raw")
    assert client.publish_many("t", ["\t", "a\tb"]) == []
    got = [client.next_message(10).data for _ in range(len(sent) + 3)]
    assert got == [s.encode() for s in sent] + [b"\x00\xff raw", b"\t", b"a\tb"]


def test_unsubscribe_stops_deliveries(server: ServerProcess, open_client: OpenClient) -> None:
    sub, pub = open_client(server), open_client(server)
    sub.subscribe("t")
    sub.unsubscribe("t")
    assert sub.subscriptions == ()
    pub.publish("t", "kept in the backlog")
    with pytest.raises(pigeon.TimeoutError):
        sub.next_message(0.2)
    with pytest.raises(NotSubscribedError) as info:
        sub.unsubscribe("t")
    assert (info.value.code, info.value.reason) == ("NOT_SUBSCRIBED", "not subscribed to 't'")
    assert str(info.value) == "not subscribed to 't'"


def test_next_message_times_out_and_messages_stops(server: ServerProcess, open_client: OpenClient) -> None:
    client = open_client(server)
    client.subscribe("t")
    with pytest.raises(pigeon.TimeoutError, match="no message within 0s"):
        client.next_message(timeout=0)
    client.publish("t", "a")
    client.publish("t", "b")
    assert [m.text for m in client.messages(timeout=0.3)] == ["a", "b"]
    assert client.ping() > 0, "the connection is still usable after timeouts"


def test_deliveries_that_interleave_with_replies_are_kept(
    server: ServerProcess, open_client: OpenClient
) -> None:
    # The client publishes to its own topic: each PUBLISHED reply and each
    # MESSAGE delivery arrive mixed together on the one connection.
    client, other = open_client(server), open_client(server)
    client.subscribe("self")
    for i in range(200):
        client.publish("self", f"own {i}")
        other.publish("self", f"other {i}")
        assert client.ping() > 0
    assert client.publish_many("self", [f"many {i}" for i in range(1000)]) == []
    client.subscribe("second")
    got = [m.text for m in client.messages(timeout=0.5)]
    assert len(got) == 1400
    own = [t for t in got if t.startswith("own")]
    assert own == [f"own {i}" for i in range(200)], "in order, none lost or taken for a reply"
    assert [t for t in got if t.startswith("many")] == [f"many {i}" for i in range(1000)]


def test_100k_pipelined_publishes_arrive_in_order(server: ServerProcess, open_client: OpenClient) -> None:
    sub, pub = open_client(server), open_client(server)
    sub.subscribe("bulk")
    count = 100_000
    assert pub.publish_many("bulk", (b"%d" % i for i in range(count))) == []
    got = [m.data for m in sub.messages(timeout=2)]
    assert got == [b"%d" % i for i in range(count)]


def test_publish_without_waiting_then_flush(server: ServerProcess, open_client: OpenClient) -> None:
    sub, pub = open_client(server), open_client(server)
    sub.subscribe("t")
    for i in range(50_000):
        pub.publish("t", b"%d" % i, wait=False)
    assert pub.flush() == []
    assert pub.flush() == [], "nothing left to report"
    got = [m.data for m in sub.messages(timeout=2)]
    assert got[0] == b"0" and got[-1] == b"49999" and len(set(got)) == 50_000


def test_a_publisher_to_a_full_backlog_is_held_not_refused(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--max-backlog", "3")
    publisher = open_client(server)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(publisher.publish_many("full", "abcdefgh")))
    thread.start()
    until(lambda: figures(server)["publishers_held"] == 1, "the publisher is held")
    assert thread.is_alive(), "publish_many waits for its delayed replies"
    assert figures(server)["errors"].get("backlog_full", 0) == 0
    consumer = open_client(server)
    consumer.subscribe("full")
    got = [consumer.next_message(10).text for _ in range(8)]
    thread.join(20)
    assert result == [[]], "every message taken once the backlog drained: nothing refused"
    assert got == list("abcdefgh")
    assert figures(server)["publish_holds"] >= 1


def test_a_held_publish_times_out_and_the_connection_stays_usable(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--max-backlog", "2")
    publisher = open_client(server, timeout=0.5)
    publisher.publish("held", "1")
    publisher.publish("held", "2")
    with pytest.raises(pigeon.TimeoutError, match=r"no reply from the server in 0\.5s"):
        publisher.publish("held", "3")  # waits in the broker: not refused, only not confirmed in time
    consumer = open_client(server)
    consumer.subscribe("held")
    assert [consumer.next_message(10).text for _ in range(3)] == ["1", "2", "3"]
    assert publisher.ping() > 0, "the late PUBLISHED was matched and discarded"
    publisher.publish("held", "4")
    assert consumer.next_message(10).text == "4"


@pytest.mark.parametrize("size", [8, 1000], ids=["replies-wait", "socket-full"])
def test_a_pipelined_batch_held_past_the_timeout_reports_what_has_no_reply(
    start_server: StartServer, open_client: OpenClient, size: int
) -> None:
    # small messages: the client waits for replies; 1 kB ones: the socket fills first and a send stalls
    server = start_server("--max-backlog", "10")
    publisher = open_client(server, timeout=0.5)
    messages = [b"%0*d" % (size, i) for i in range(50_000)]
    refused = publisher.publish_many("held", messages)
    assert all(isinstance(r.error, pigeon.TimeoutError) for r in refused)
    first = refused[0].index
    assert 10 <= first < 50_000 and [r.index for r in refused] == list(range(first, 50_000))
    consumer = open_client(server)
    consumer.subscribe("held")
    got = [m.data for m in consumer.messages(timeout=2)]
    # the late replies are matched; a blocking client sends the rest of a stalled send first
    assert publisher.ping() > 0
    got += [m.data for m in consumer.messages(timeout=2)]
    assert got == messages[: len(got)] and len(got) >= first, "what was sent is taken, in order"
    publisher.publish("held", "after")
    assert consumer.next_message(10).text == "after"


def test_backlog_full_remains_for_a_publisher_that_consumes_the_topic(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--max-backlog", "3")
    client = open_client(server)
    client.subscribe("full", ack=True, prefetch=1)  # holds one message, the backlog keeps three
    refused = client.publish_many("full", ["a", "b", "c", "d", "e"])
    assert [r.index for r in refused] == [4]
    assert all(isinstance(r.error, BacklogFullError) for r in refused)
    assert refused[0].error.code == "BACKLOG_FULL"
    with pytest.raises(RetryableError, match=r"^backlog full \(3 messages\) for topic 'full'$") as info:
        client.publish("full", "f")
    assert type(info.value) is BacklogFullError
    client.publish("other", "x", wait=False)
    client.publish("full", "g", wait=False)
    client.publish("other", "y", wait=False)
    client.ping()
    client.publish("full", "h", wait=False)
    refused = client.flush()
    assert [r.index for r in refused] == [1, 3]
    assert all(isinstance(r.error, BacklogFullError) for r in refused)


def test_memory_full_remains_for_a_publisher_that_consumes_the_topic(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--max-memory", "1000000")
    client = open_client(server)
    client.subscribe("t", ack=True, prefetch=1)  # a consumer of its own topic is refused, not held
    refused = client.publish_many("t", [b"x" * 1000] * 2000)
    assert refused, "1 MB of messages does not fit next to the broker's own structures"
    assert all(isinstance(r.error, MemoryFullError) for r in refused)
    with pytest.raises(RetryableError) as info:
        for _ in range(1000):
            client.publish("t", b"y" * 1000)
    assert info.value.code == "MEMORY_FULL" and "memory limit reached" in info.value.reason


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda c: c.subscribe("two words"), "whitespace"),
        (lambda c: c.subscribe("zero\u200bwidth"), "format"),
        (lambda c: c.subscribe(""), "empty"),
        (lambda c: c.unsubscribe("x" * (TOPIC_MAX + 1)), f"at most {TOPIC_MAX}"),
        (lambda c: c.publish("t", b"x" * (MAX_PAYLOAD + 1)), r"over the server's limit .*max_payload"),
        (lambda c: c.publish("", "x", wait=False), "empty"),
        (lambda c: c.publish_many("t", ["fine", b"x" * (MAX_PAYLOAD + 1)]), "message 1: .*max_payload"),
        (lambda c: c.publish_many("t", [b"ok", 7]), "message 1: .*bytes or str"),
        (lambda c: c.publish("t", "ok", wait=False), None),
    ],
)
def test_bad_arguments_fail_before_anything_is_sent(
    pigeon_server: ServerThread, open_client: OpenClient, call: Callable[[Face], object], problem: str | None
) -> None:
    client = open_client(pigeon_server)
    before = _commands(pigeon_server)
    if problem is None:
        call(client)  # the control: a valid call does reach the server
        client.flush()
        assert _commands(pigeon_server) == before + 1
        return
    with pytest.raises(InvalidArgumentError, match=problem):
        call(client)
    client.flush()
    assert _commands(pigeon_server) == before
    assert pigeon_server.stats()["published"] == 0


def test_a_payload_over_the_servers_max_payload_is_refused_before_sending(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--max-payload", "100")
    client = open_client(server)
    assert client.server_info.max_payload == 100
    fits = "x" * 100
    client.publish("t", fits)
    with pytest.raises(InvalidArgumentError, match="over the server's limit of 100"):
        client.publish("t", fits + "x")
    with pytest.raises(InvalidArgumentError, match="over the server's limit"):
        client.publish("t", fits + "x", wait=False)
    with pytest.raises(InvalidArgumentError, match=r"message 2: .*over the server's limit"):
        client.publish_many("t", [fits, fits, fits + "x"])
    assert client.publish_many("t", [fits] * 3000) == []
    assert client.stats()["published"] == 3001, "the refused ones were never sent"


def test_a_line_too_long_ends_the_connection_with_the_servers_reason(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--max-line", "64")
    client = open_client(server)
    with pytest.raises(ConnectionClosedError, match="line too long") as info:
        client.subscribe("x" * 100)  # only PUBLISH lines are checked before sending
    assert isinstance(info.value.error, LineTooLongError)
    assert (info.value.code, info.value.reason) == ("LINE_TOO_LONG", "line too long (limit 64 bytes)")
    assert not client.connected
    with pytest.raises(ConnectionClosedError):
        client.ping()


def test_too_many_connections_is_the_reason_of_the_close(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--max-connections", "1")
    open_client(server)
    with pytest.raises(ConnectionClosedError, match="too many connections") as info:
        open_client(server)
    assert isinstance(info.value.error, TooManyConnectionsError)


def test_reply_timeout_leaves_the_connection_usable(server: ServerProcess, open_client: OpenClient) -> None:
    client = open_client(server, timeout=0.3)
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(pigeon.TimeoutError, match=r"no reply from the server in 0\.3s"):
            client.ping()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    client.publish("t", "after the late PONG")
    client.subscribe("t")
    assert client.next_message(10).text == "after the late PONG"


def test_stopped_server_gives_connection_closed(start_server: StartServer, open_client: OpenClient) -> None:
    server = start_server()
    client = open_client(server)
    client.subscribe("t")
    assert server.stop() == 0
    with pytest.raises(ConnectionClosedError):
        client.ping()
    with pytest.raises(ConnectionClosedError):
        client.next_message(1)
    with pytest.raises(ConnectionClosedError, match="cannot connect"):
        open_client(server)


def test_reconnect_after_server_restart(start_server: StartServer, open_client: OpenClient) -> None:
    first = start_server()
    sub = open_client(first, reconnect=True)
    pub = open_client(first, reconnect=True)
    sub.subscribe("jobs")
    sub.subscribe("other")
    assert first.stop() == 0
    second = start_server("--port", str(first.port))
    assert second.port == first.port
    pub.publish("jobs", "after the restart")
    assert sub.next_message(10) == Message("jobs", b"after the restart")
    assert (pub.reconnects, sub.reconnects) == (1, 1)
    assert sub.subscriptions == ("jobs", "other")
    pub.publish("other", "restored")
    assert sub.next_message(10).text == "restored"


def test_reconnect_gives_up_after_its_timeout(start_server: StartServer, open_client: OpenClient) -> None:
    server = start_server()
    client = open_client(server, reconnect=True, reconnect_timeout=0.3)
    assert server.stop() == 0
    with pytest.raises(ConnectionClosedError, match="could not reconnect"):
        client.ping()


def test_reconnect_on_the_first_command_after_an_idle_timeout(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--idle-timeout", "0.5")
    client = open_client(server, reconnect=True)
    _wait_for_idle_closes(server, 1)
    client.publish("t", "after the idle close")
    assert client.reconnects == 1
    assert client.stats("topics")[0]["backlog_messages"] == 1


def test_an_idle_timeout_is_the_reason_of_the_close(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--idle-timeout", "0.5")
    client = open_client(server)
    _wait_for_idle_closes(server, 1)
    with pytest.raises(ConnectionClosedError, match="idle timeout") as info:
        client.publish("t", "x")
    assert isinstance(info.value.error, IdleTimeoutError)
    assert info.value.code == "IDLE_TIMEOUT"


def test_a_waiting_subscriber_keeps_its_connection_alive(
    start_server: StartServer, open_client: OpenClient
) -> None:
    server = start_server("--idle-timeout", "1")
    client = open_client(server)
    assert client.server_info.idle_timeout == 1.0
    client.subscribe("t")
    with pytest.raises(pigeon.TimeoutError):
        client.next_message(3)  # three idle timeouts: without a keepalive the server closes it
    assert client.connected and client.ping() > 0
    assert client.stats()["idle_closed"] == 0


def test_stats_reads_every_page(server: ServerProcess, open_client: OpenClient) -> None:
    client, other = open_client(server), open_client(server)
    count = STATS_PAGE + 500
    for i in range(count):
        client.publish(f"topic-{i}", "x", wait=False)
    assert client.flush() == []
    other.subscribe("topic-0")
    figures = client.stats()
    assert figures["topics"] == count and figures["connections"] == 2
    topics = client.stats("topics")
    assert sorted(t["name"] for t in topics) == sorted(f"topic-{i}" for i in range(count))
    assert {t["subscribers"] for t in topics if t["name"] == "topic-0"} == {1}
    connections = client.stats("CONNECTIONS")
    assert sorted(c["client_id"] for c in connections) == sorted([client.client_id, other.client_id])
    with pytest.raises(InvalidArgumentError, match="no STATS section 'queues'"):
        client.stats("queues")


def test_nonsense_from_the_server_is_a_protocol_error(
    fake_server: FakeServer, open_client: OpenClient
) -> None:
    host, port = fake_server(b"WELCOME\n")
    with pytest.raises(ProtocolError, match="expected HELLO or ERROR"):
        open_client(_Address(host, port))


def test_a_server_older_than_hello_has_unknown_limits(
    fake_server: FakeServer, open_client: OpenClient
) -> None:
    host, port = fake_server(b"ERROR UNKNOWN_COMMAND unknown command 'HELLO'\nCONNECTED c7\n")
    client = open_client(_Address(host, port))
    assert client.client_id == "c7" and client.server_info is None


def test_a_hello_reply_without_the_limits_is_a_protocol_error(
    fake_server: FakeServer, open_client: OpenClient
) -> None:
    host, port = fake_server(b"HELLO {}\nCONNECTED c1\n")
    with pytest.raises(ProtocolError, match="bad HELLO reply"):
        open_client(_Address(host, port))


# ------------------------------------------------------------ the blocking client only


def test_the_blocking_client_closes_at_the_end_of_with(server: ServerProcess) -> None:
    with Client(server.host, server.port) as client:
        assert client.ping() > 0
    assert not client.connected


class _Address:
    """A host and port to connect to, for a fake server (whose loop kind does not matter)."""

    loop_name = "asyncio"

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port


def _wait_for_idle_closes(server: ServerProcess, count: int) -> None:
    """Until the server has closed ``count`` connections for their idle timeout."""
    until(lambda: figures(server)["idle_closed"] >= count, f"the server closes {count} idle connections")


def _commands(server: ServerThread) -> int:
    return sum(server.stats()["commands"].values())
