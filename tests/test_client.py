"""The blocking ``pigeon.Client`` against a real server process, over TCP."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import pytest

import pigeon
from pigeon import (
    BacklogFullError,
    Client,
    CommandError,
    ConnectionClosedError,
    InvalidArgumentError,
    Message,
    ProtocolError,
    ServerThread,
)
from pigeon.protocol import TOPIC_MAX
from pigeon.testing import ServerProcess
from tests.conftest import FakeServer

StartServer = Callable[..., ServerProcess]


@pytest.fixture
def client_of(server: ServerProcess) -> Iterator[Callable[..., Client]]:
    """A factory of clients connected to ``server``; closes them after the test."""
    clients: list[Client] = []

    def make(**options: object) -> Client:
        client = Client(server.host, server.port, **options)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_connect_gives_an_id_and_close_disconnects(pigeon_server: ServerThread) -> None:
    client = Client(pigeon_server.host, pigeon_server.port)
    assert client.connected and client.client_id.startswith("c")
    assert pigeon_server.stats()["connections"] == 1
    client.close()
    client.close()
    assert not client.connected
    stats = pigeon_server.stats()
    assert stats["commands"]["connect"] == 1 and stats["commands"]["disconnect"] == 1
    assert sum(stats["commands"].values()) == 2
    assert stats["connections"] == 0
    with pytest.raises(ConnectionClosedError, match="closed"):
        client.ping()


def test_context_manager_closes(server: ServerProcess) -> None:
    with Client(server.host, server.port) as client:
        assert client.ping() > 0
    assert not client.connected


@pytest.mark.smoke
def test_publish_and_receive_round_robin(client_of: Callable[..., Client]) -> None:
    first, second, publisher = client_of(), client_of(), client_of()
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


def test_messages_keep_spaces_unicode_and_may_be_empty(client_of: Callable[..., Client]) -> None:
    client = client_of()
    client.subscribe("t")
    sent = ["  two  leading", "héllo 🐦", "", "tab\tinside"]
    for text in sent:
        client.publish("t", text)
    client.publish("t", b"\x00\xff raw")
    got = [client.next_message(10).data for _ in range(len(sent) + 1)]
    assert got == [s.encode() for s in sent] + [b"\x00\xff raw"]


def test_unsubscribe_stops_deliveries(client_of: Callable[..., Client]) -> None:
    sub, pub = client_of(), client_of()
    sub.subscribe("t")
    sub.unsubscribe("t")
    assert sub.subscriptions == ()
    pub.publish("t", "kept in the backlog")
    with pytest.raises(pigeon.TimeoutError):
        sub.next_message(0.2)
    with pytest.raises(CommandError, match="not subscribed") as info:
        sub.unsubscribe("t")
    assert "not subscribed to 't'" in info.value.reason


def test_next_message_times_out_and_messages_stops(client_of: Callable[..., Client]) -> None:
    client = client_of()
    client.subscribe("t")
    with pytest.raises(pigeon.TimeoutError):
        client.next_message(timeout=0)
    client.publish("t", "a")
    client.publish("t", "b")
    assert [m.text for m in client.messages(timeout=0.3)] == ["a", "b"]
    assert client.ping() > 0, "the connection is still usable after timeouts"


def test_deliveries_that_interleave_with_replies_are_kept(client_of: Callable[..., Client]) -> None:
    # The client publishes to its own topic: each PUBLISHED reply and each
    # MESSAGE delivery arrive mixed together on the one connection.
    client, other = client_of(), client_of()
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


def test_100k_pipelined_publishes_arrive_in_order(client_of: Callable[..., Client]) -> None:
    sub, pub = client_of(), client_of()
    sub.subscribe("bulk")
    count = 100_000
    assert pub.publish_many("bulk", (b"%d" % i for i in range(count))) == []
    got = [sub.next_message(10).data for _ in range(count)]
    assert got == [b"%d" % i for i in range(count)]


def test_publish_without_waiting_then_flush(client_of: Callable[..., Client]) -> None:
    sub, pub = client_of(), client_of()
    sub.subscribe("t")
    for i in range(50_000):
        pub.publish("t", b"%d" % i, wait=False)
    assert pub.flush() == []
    assert pub.flush() == [], "nothing left to report"
    got = [sub.next_message(10).data for _ in range(50_000)]
    assert got[0] == b"0" and got[-1] == b"49999" and len(set(got)) == 50_000


def test_refusals_are_reported(start_server: StartServer) -> None:
    server = start_server("--max-backlog", "3")
    with Client(server.host, server.port) as client:
        refused = client.publish_many("full", ["a", "b", "c", "d", "e"])
        assert [r.index for r in refused] == [3, 4]
        assert all(isinstance(r.error, BacklogFullError) for r in refused)
        with pytest.raises(BacklogFullError, match=r"backlog full \(3 messages\) for topic 'full'"):
            client.publish("full", "f")
        client.publish("other", "x", wait=False)
        client.publish("full", "g", wait=False)
        client.publish("other", "y", wait=False)
        client.ping()
        client.publish("full", "h", wait=False)
        refused = client.flush()
        assert [r.index for r in refused] == [1, 3]
        assert all(isinstance(r.error, BacklogFullError) for r in refused)


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda c: c.subscribe("two words"), "whitespace"),
        (lambda c: c.subscribe(""), "empty"),
        (lambda c: c.unsubscribe("x" * (TOPIC_MAX + 1)), f"at most {TOPIC_MAX}"),
        (lambda c: c.publish("t", "line\nbreak"), "newline"),
        (lambda c: c.publish("t", "ok", wait=False), None),
        (lambda c: c.publish_many("t", ["fine", "bad\n"]), "newline"),
    ],
)
def test_bad_arguments_fail_before_anything_is_sent(
    pigeon_server: ServerThread, call: Callable[[Client], object], problem: str | None
) -> None:
    with Client(pigeon_server.host, pigeon_server.port) as client:
        before = _commands(pigeon_server)
        if problem is None:
            call(client)  # the control: a valid call does reach the server
            client.flush()
            assert _commands(pigeon_server) == before + 1
            return
        with pytest.raises(InvalidArgumentError, match=problem):
            call(client)
        assert _commands(pigeon_server) == before
        assert pigeon_server.stats()["published"] == 0


def test_server_error_then_close_is_reported(start_server: StartServer) -> None:
    server = start_server("--max-line", "64")
    with Client(server.host, server.port) as client:
        with pytest.raises(CommandError, match="line too long"):
            client.publish("t", "x" * 100)
        with pytest.raises(ConnectionClosedError):
            client.ping()
        assert not client.connected


def test_reply_timeout_leaves_the_connection_usable(server: ServerProcess) -> None:
    with Client(server.host, server.port, timeout=0.3) as client:
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(pigeon.TimeoutError):
                client.ping()
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        client.publish("t", "after the late PONG")
        client.subscribe("t")
        assert client.next_message(10).text == "after the late PONG"


def test_stopped_server_gives_connection_closed(start_server: StartServer) -> None:
    server = start_server()
    client = Client(server.host, server.port)
    assert server.stop() == 0
    with pytest.raises(ConnectionClosedError):
        client.ping()
    with pytest.raises(ConnectionClosedError):
        client.next_message(1)
    with pytest.raises(ConnectionClosedError, match="cannot connect"):
        Client(server.host, server.port)


def test_reconnect_after_server_restart(start_server: StartServer) -> None:
    first = start_server()
    sub = Client(first.host, first.port, reconnect=True)
    pub = Client(first.host, first.port, reconnect=True)
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
    sub.close()
    pub.close()


def test_reconnect_gives_up_after_its_timeout(start_server: StartServer) -> None:
    server = start_server()
    client = Client(server.host, server.port, reconnect=True, reconnect_timeout=0.3)
    assert server.stop() == 0
    with pytest.raises(ConnectionClosedError, match="could not reconnect"):
        client.ping()


def test_nonsense_from_the_server_is_a_protocol_error(fake_server: FakeServer) -> None:
    host, port = fake_server(b"HELLO there\n")
    with pytest.raises(ProtocolError, match="expected CONNECTED"):
        Client(host, port)


def _commands(server: ServerThread) -> int:
    return sum(server.stats()["commands"].values())
