"""Consumer groups and wildcards through the client library (``Client`` and ``AsyncClient`` alike, by
tests/faces.py), against a real server: subscribe with a group, patterns, unsubscribe from a group,
destroy_group and its errors, and the group kept across a reconnection; against fake servers whose
HELLO lacks ``groups`` and ``wildcards`` (or who answer no HELLO), the FeatureNotSupportedError
raised before anything is sent."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

import pigeon
from pigeon import FeatureNotSupportedError, GroupInUseError, InvalidArgumentError, NoSuchGroupError
from pigeon.testing import ServerProcess
from tests.faces import OpenClient
from tests.test_client import _Address

StartServer = Callable[..., ServerProcess]


def test_groups_fan_out_and_share(server: ServerProcess, open_client: OpenClient) -> None:
    a1, a2, b, pub = open_client(server), open_client(server), open_client(server), open_client(server)
    a1.subscribe("orders", "a")
    a2.subscribe("orders", group="a", ack=True, prefetch=10)
    b.subscribe("orders.>")  # another group: a pattern's default group does not match "orders"
    b.subscribe("orders", group="b")
    for i in range(4):
        pub.publish("orders", f"o{i}")
    got_a = [m.text for m in a1.messages(timeout=0.5)] + [m.text for m in a2.messages(timeout=0.5)]
    assert sorted(got_a) == [f"o{i}" for i in range(4)] and len(a1.messages(timeout=0.1)) == 0
    assert [m.text for m in b.messages(timeout=0.5)] == [f"o{i}" for i in range(4)]
    assert b.subscriptions == ("orders.>", "orders")


def test_patterns_name_the_published_topic(server: ServerProcess, open_client: OpenClient) -> None:
    sub, pub = open_client(server), open_client(server)
    sub.subscribe("metrics.*")
    pub.publish("metrics.cpu", "1")
    pub.publish("metrics", "not matched")
    message = sub.next_message(5)
    assert (message.topic, message.text) == ("metrics.cpu", "1")
    with pytest.raises(pigeon.TimeoutError):
        sub.next_message(0.2)


def test_unsubscribe_and_destroy_a_group(server: ServerProcess, open_client: OpenClient) -> None:
    member, pub = open_client(server), open_client(server)
    member.subscribe("t", "g", ack=True)
    with pytest.raises(GroupInUseError):
        pub.destroy_group("t", "g")
    member.unsubscribe("t", "g")
    assert member.subscriptions == ()
    pub.publish("t", "dropped with the group")
    pub.destroy_group("t", "g")
    with pytest.raises(NoSuchGroupError):
        pub.destroy_group("t", "g")
    member.subscribe("t", "g")
    pub.publish("t", "new")
    assert member.next_message(5).text == "new"


def test_bad_group_names_are_refused_before_sending(server: ServerProcess, open_client: OpenClient) -> None:
    client = open_client(server)
    for bad in ("x" * 65, "with space", ""):
        with pytest.raises(InvalidArgumentError):
            client.subscribe("t", bad)
    assert client.subscriptions == ()


def test_a_reconnection_keeps_the_group(start_server: StartServer, open_client: OpenClient) -> None:
    first = start_server()
    sub = open_client(first, reconnect=True)
    pub = open_client(first, reconnect=True)
    sub.subscribe("jobs", "workers", ack=True)
    assert first.stop() == 0
    second = start_server("--port", str(first.port))
    # its next command reconnects the subscriber and subscribes it again, in its group (a message
    # published before would wait in the topic's backlog, which a group does not read)
    sub.ping()
    assert sub.reconnects == 1
    assert [(g["pattern"], g["group"], g["subscribers"]) for g in pub.stats("groups")] == [
        ("jobs", "workers", 1)
    ]
    pub.publish("jobs", "after the restart")
    message = sub.next_message(10)
    assert (message.topic, message.text) == ("jobs", "after the restart")
    message.ack()
    # the subscription came back in its group: a second group on the topic gets its own copy
    other = open_client(second)
    other.subscribe("jobs", "audit")
    pub.publish("jobs", "two")
    assert sub.next_message(10).text == "two"
    assert other.next_message(10).text == "two"
    assert {(g["pattern"], g["group"]) for g in pub.stats("groups")} == {
        ("jobs", "workers"),
        ("jobs", "audit"),
    }


# a protocol 2 server without consumer groups and wildcards, and one older than HELLO
HELLO_WITHOUT_GROUPS = (
    b'HELLO {"protocol":2,"max_line":4096,"topic_max":255,"idle_timeout":0.0,"max_payload":1024,'
    b'"features":["ack","binary"]}\n'
)
NO_HELLO = b"ERROR UNKNOWN_COMMAND unknown command 'HELLO'\n"


class RecordingServer:
    """A fake server that answers the handshake with ``hello`` and CONNECTED, PING with PONG, and
    SUBSCRIBE with SUBSCRIBED; ``lines`` holds every line it received."""

    def __init__(self, hello: bytes) -> None:
        self.lines: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = _Address(*self.listener.getsockname()[:2])
        self.thread = threading.Thread(target=self._serve, args=(hello,), daemon=True)
        self.thread.start()

    def _serve(self, hello: bytes) -> None:
        conn, _ = self.listener.accept()
        buf = b""
        with conn:
            while chunk := conn.recv(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self.lines.append(line)
                    if line.startswith(b"HELLO"):
                        conn.sendall(hello)
                    elif line == b"CONNECT":
                        conn.sendall(b"CONNECTED c7\n")
                    elif line == b"PING":
                        conn.sendall(b"PONG\n")
                    elif line.startswith(b"SUBSCRIBE "):
                        conn.sendall(b"SUBSCRIBED %s\n" % line.split()[2])
                    elif line == b"DISCONNECT":
                        conn.sendall(b"DISCONNECTED\n")


@pytest.fixture(params=[HELLO_WITHOUT_GROUPS, NO_HELLO], ids=["hello-without-groups", "no-hello"])
def server_without_groups(request: pytest.FixtureRequest) -> Iterator[RecordingServer]:
    fake = RecordingServer(request.param)
    yield fake
    fake.listener.close()
    fake.thread.join(5)


def test_groups_and_patterns_need_the_servers_features(
    server_without_groups: RecordingServer, open_client: OpenClient
) -> None:
    client = open_client(server_without_groups.address)
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: client.subscribe("orders", group="billing"), "groups"),
        (lambda: client.subscribe("orders", group="billing", ack=True), "groups"),
        (lambda: client.subscribe("metrics.*"), "wildcards"),
        (lambda: client.subscribe("metrics.>", ack=True), "wildcards"),
        (lambda: client.destroy_group("orders", "billing"), "groups"),
    ]
    for call, feature in calls:
        with pytest.raises(FeatureNotSupportedError, match=f"no '{feature}' in its HELLO") as info:
            call()
        assert info.value.feature == feature
    client.subscribe("metrics.cpu")  # an exact topic (with a dot) needs neither
    client.ping()
    sent = [line for line in server_without_groups.lines if not line.startswith((b"HELLO", b"CONNECT"))]
    assert sent == [b"SUBSCRIBE c7 metrics.cpu", b"PING"], "nothing was sent for the refused calls"
