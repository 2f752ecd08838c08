"""Consumer groups and wildcards through the client library (``Client`` and ``AsyncClient`` alike, by
tests/faces.py), against a real server: subscribe with a group, patterns, unsubscribe from a group,
destroy_group and its errors, and the group kept across a reconnection."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import pigeon
from pigeon import GroupInUseError, InvalidArgumentError, NoSuchGroupError
from pigeon.testing import ServerProcess
from tests.faces import OpenClient

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
