"""Unit tests of the core's counters, figures and STATS command, without sockets."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from pigeon._core import COMMAND_NAMES, ERROR_NAMES, Broker


class Peer:
    """A connection handle plus everything the core wrote to it."""

    def __init__(self, broker: Broker, address: str | None = None, pending: int | None = None) -> None:
        self.broker = broker
        self.out = b""
        getter = (lambda: pending) if pending is not None else None
        self.handle = broker.open(self._write, address, getter)

    def _write(self, data: bytes) -> None:
        self.out += data

    def send(self, text: str) -> list[str]:
        """Feed lines (newlines added) and return the lines written back."""
        self.out = b""
        self.broker.feed(self.handle, "".join(line + "\n" for line in text.split("|")).encode())
        return self.out.decode().splitlines()


# the acknowledgement figures of a topic that has no acknowledged subscriber
NO_ACKS = {"unacked": 0, "acked": 0, "nacked": 0, "redelivered": 0, "dead_lettered": 0}


def stats_line(peer: Peer, command: str = "STATS") -> Any:
    """Send a STATS command and decode its JSON."""
    (reply,) = peer.send(command)
    word, _, payload = reply.partition(" ")
    assert word == "STATS", reply
    return json.loads(payload)


def test_commands_and_errors_are_counted_by_kind() -> None:
    broker = Broker()
    p = Peer(broker)
    p.send(
        "CONNECT|CONNECT|SUBSCRIBE c1 a|UNSUBSCRIBE c1 a|UNSUBSCRIBE c1 a|PING|PING x|BOGUS|PUBLISH c1|"
        "PUBLISH c9 t m|PUBLISH c1 bad\x01topic m|PUBLISH c1 t m"
    )
    stats = broker.stats()
    assert stats["commands"] == {
        "connect": 2,
        "subscribe": 1,
        "unsubscribe": 2,
        "publish": 4,
        "ping": 2,
        "disconnect": 0,
        "stats": 0,
        "hello": 0,
        "ack": 0,
        "nack": 0,
        "destroy": 0,
        "req": 0,
        "reply": 0,
        "unknown": 1,
    }
    assert stats["errors"] == {
        "usage": 2,
        "unknown_command": 1,
        "not_connected": 0,
        "already_connected": 1,
        "wrong_client_id": 1,
        "bad_topic": 1,
        "not_subscribed": 1,
        "backlog_full": 0,
        "line_too_long": 0,
        "too_many_connections": 0,
        "too_many_subscriptions": 0,
        "too_many_topics": 0,
        "memory_full": 0,
        "idle_timeout": 0,
        "unknown_delivery_tag": 0,
        "storage_full": 0,
        "auth_required": 0,
        "auth_failed": 0,
        "permission_denied": 0,
        "payload_too_large": 0,
        "bad_frame": 0,
        "no_such_group": 0,
        "group_in_use": 0,
        "bad_reply_token": 0,
        "not_enough_replicas": 0,
    }
    assert list(stats["commands"]) == list(COMMAND_NAMES)
    assert list(stats["errors"]) == list(ERROR_NAMES)


def test_not_connected_and_line_too_long_errors() -> None:
    broker = Broker(max_line=64)
    p = Peer(broker)
    p.send("SUBSCRIBE c1 a|" + "x" * 100)
    errors = broker.stats()["errors"]
    assert errors["not_connected"] == 1
    assert errors["line_too_long"] == 1


def test_message_counters_and_backlog_gauges() -> None:
    broker = Broker(max_backlog=2)
    pub = Peer(broker)
    pub.send("CONNECT|PUBLISH c1 q one|PUBLISH c1 q two|PUBLISH c1 q three")
    stats = broker.stats()
    assert (stats["published"], stats["backlogged"], stats["refused"]) == (2, 2, 0)
    assert (stats["backlog_messages"], stats["backlog_bytes"]) == (2, 6)
    assert (stats["publishers_held"], stats["publish_holds"]) == (1, 1)
    sub = Peer(broker)
    assert sub.send("CONNECT|SUBSCRIBE c2 q") == [
        "CONNECTED c2",
        "SUBSCRIBED q",
        "MESSAGE q one",
        "MESSAGE q two",
        "MESSAGE q three",
    ]
    pub.send("PUBLISH c1 q four")
    stats = broker.stats()
    assert (stats["published"], stats["delivered"], stats["backlogged"]) == (4, 4, 2)
    assert (stats["backlog_messages"], stats["backlog_bytes"]) == (0, 0)
    assert stats["connections"] == 2 and stats["connections_total"] == 2 and stats["topics"] == 1


def test_bytes_in_and_out_match_the_traffic() -> None:
    broker = Broker()
    p = Peer(broker)
    sent = b"CONNECT\nPING\n"
    broker.feed(p.handle, sent)
    stats = broker.stats()
    assert stats["bytes_in"] == len(sent)
    assert stats["bytes_out"] == len(p.out) == len(b"CONNECTED c1\nPONG\n")


def test_topics_report_subscribers_backlog_and_traffic() -> None:
    broker = Broker()
    a, b = Peer(broker), Peer(broker)
    a.send("CONNECT|SUBSCRIBE c1 jobs")
    b.send(
        "CONNECT|SUBSCRIBE c2 jobs|PUBLISH c2 jobs x|PUBLISH c2 jobs y|PUBLISH c2 jobs z|PUBLISH c2 idle w"
    )
    listing = broker.topics()
    assert listing["next"] == 0
    assert sorted(listing["topics"], key=lambda topic: topic["name"]) == [
        {
            "name": "idle",
            "subscribers": 0,
            "backlog_messages": 1,
            "backlog_bytes": 1,
            "published": 1,
            "delivered": 0,
            **NO_ACKS,
        },
        {
            "name": "jobs",
            "subscribers": 2,
            "backlog_messages": 0,
            "backlog_bytes": 0,
            "published": 3,
            "delivered": 3,
            **NO_ACKS,
        },
    ]


def test_connections_report_identity_traffic_and_pending_output() -> None:
    broker = Broker()
    before = time.time()
    sub = Peer(broker, "127.0.0.1:4000", pending=123)
    pub = Peer(broker, "[::1]:5000")
    anon = Peer(broker)
    sub.send("CONNECT|SUBSCRIBE c1 b|SUBSCRIBE c1 a")
    pub.send("CONNECT|PUBLISH c2 a 1|PUBLISH c2 a 2|PUBLISH c2 z 3")
    listing = broker.connections()
    assert listing["next"] == 0
    by_handle = {c["handle"]: c for c in listing["connections"]}
    assert set(by_handle) == {sub.handle, pub.handle, anon.handle}
    s, p, n = by_handle[sub.handle], by_handle[pub.handle], by_handle[anon.handle]
    assert (s["client_id"], s["address"], s["subscriptions"]) == ("c1", "127.0.0.1:4000", ["a", "b"])
    assert (s["messages_in"], s["messages_out"], s["pending_bytes"]) == (0, 2, 123)
    assert (p["client_id"], p["address"], p["subscriptions"]) == ("c2", "[::1]:5000", [])
    assert (p["messages_in"], p["messages_out"], p["pending_bytes"]) == (3, 0, 0)
    assert (n["client_id"], n["address"], n["messages_in"], n["bytes_in"]) == (None, None, 0, 0)
    assert s["bytes_in"] == len(b"CONNECT\nSUBSCRIBE c1 b\nSUBSCRIBE c1 a\n")
    assert p["bytes_out"] == len(b"CONNECTED c2\n" + b"PUBLISHED a\n" * 2 + b"PUBLISHED z\n")
    assert before <= s["connected_since"] <= time.time()
    assert s["connected_seconds"] >= 0
    broker.close(sub.handle)
    assert [c["handle"] for c in broker.connections()["connections"]] == sorted([pub.handle, anon.handle])


def test_stats_command_returns_the_server_figures_on_one_line() -> None:
    broker = Broker()
    p = Peer(broker)
    p.send("CONNECT|PUBLISH c1 t hello")
    figures = stats_line(p, "stats")
    expected = broker.stats()
    del figures["uptime_seconds"], expected["uptime_seconds"]
    expected["bytes_out"] -= len(p.out)  # the STATS line itself was not yet counted when it was written
    assert figures == expected
    assert figures["published"] == 1 and figures["commands"]["stats"] == 1


def test_stats_sections_and_usage() -> None:
    broker = Broker()
    p = Peer(broker, "10.0.0.1:1")
    p.send("CONNECT|SUBSCRIBE c1 t")
    assert stats_line(p, "STATS topics") == broker.topics()
    (conn,) = stats_line(p, "Stats CONNECTIONS")["connections"]
    assert (conn["client_id"], conn["address"], conn["subscriptions"]) == ("c1", "10.0.0.1:1", ["t"])
    usage = "ERROR USAGE usage: STATS [TOPICS|CONNECTIONS [<cursor> [<count>]]]"
    for bad in (
        "STATS queues",
        "STATS topics extra",
        "STATS topics 0 0",
        "STATS topics 0 1001",
        "STATS topics -1",
        "STATS connections 0 5 5",
    ):
        assert p.send(bad) == [usage], bad
    assert broker.stats()["errors"]["usage"] == 6


def test_stats_needs_connect() -> None:
    broker = Broker()
    p = Peer(broker)
    p.send("CONNECT|SUBSCRIBE c1 secret")
    q = Peer(broker)
    for section in ("", " TOPICS", " CONNECTIONS"):
        assert q.send("STATS" + section) == ["ERROR NOT_CONNECTED not connected: send CONNECT first"]
    assert broker.stats()["errors"]["not_connected"] == 3


def test_stats_escapes_non_ascii_topics() -> None:
    broker = Broker()
    p = Peer(broker)
    p.send("CONNECT|PUBLISH c1 café x")
    (reply,) = p.send("STATS TOPICS")
    assert reply.isascii()
    assert json.loads(reply.split(" ", 1)[1])["topics"][0]["name"] == "café"


@pytest.mark.parametrize("refills", [1, 3])
def test_a_full_backlog_warns_once_until_it_empties(refills: int) -> None:
    broker = Broker(max_backlog=1)
    warnings: list[str] = []
    broker.on_warning = warnings.append
    pub = Peer(broker)
    pub.send("CONNECT|PUBLISH c1 q a|PUBLISH c1 q b|PUBLISH c1 q c")
    assert len(warnings) == 1
    assert "'q'" in warnings[0] and "backlog full" in warnings[0]
    sub = Peer(broker)
    sub.send("CONNECT|SUBSCRIBE c2 q")  # takes a, then b: the publisher goes on and c is taken too
    sub.send("UNSUBSCRIBE c2 q")
    for _ in range(refills):
        pub.send("PUBLISH c1 q d|PUBLISH c1 q e")
    assert len(warnings) == 2
