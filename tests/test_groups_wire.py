"""Consumer groups and wildcard subscriptions over real sockets (issue 15, requirements 2 and 3):
every rule of docs/protocol.md "Consumer groups and wildcards" against a ``pigeon`` process."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pigeon.testing import LineClient, ServerProcess


def messages(client: LineClient, n: int) -> list[str]:
    """The next n MESSAGE lines as ``<topic> <body>``; any other line fails the test."""
    out = []
    for _ in range(n):
        line = client.line().decode()
        assert line.startswith("MESSAGE "), line
        out.append(line[len("MESSAGE ") :])
    return out


def stats(client: LineClient, section: str = "") -> Any:
    reply = client.ask(f"STATS {section}".strip()).decode()
    assert reply.startswith("STATS "), reply
    return json.loads(reply[len("STATS ") :])


def topic_entry(client: LineClient, name: str) -> dict[str, Any]:
    entries = [t for t in stats(client, "TOPICS 0 1000")["topics"] if t["name"] == name]
    assert len(entries) == 1, entries
    return entries[0]


def group_entry(client: LineClient, pattern: str, group: str | None) -> dict[str, Any]:
    entries = [
        g for g in stats(client, "GROUPS 0 1000")["groups"] if (g["pattern"], g["group"]) == (pattern, group)
    ]
    assert len(entries) == 1, entries
    return entries[0]


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def subscribe(client: LineClient, rest: str) -> None:
    name = rest.split()[0]
    assert client.ask(f"SUBSCRIBE {client.client_id} {rest}") == f"SUBSCRIBED {name}".encode()


def test_two_groups_each_get_every_message_shared_inside(connect: Callable[[], LineClient]) -> None:
    billing = [connect(), connect()]
    shipping = [connect()]
    pub = connect()
    for c in billing:
        subscribe(c, "orders GROUP billing")
    subscribe(shipping[0], "orders GROUP shipping")
    for i in range(6):
        pub.publish("orders", f"o{i}")
    # round robin inside billing, every message to shipping
    assert messages(billing[0], 3) == ["orders o0", "orders o2", "orders o4"]
    assert messages(billing[1], 3) == ["orders o1", "orders o3", "orders o5"]
    assert messages(shipping[0], 6) == [f"orders o{i}" for i in range(6)]
    figures = stats(pub)
    assert figures["groups"] == 2 and figures["wildcard_subscriptions"] == 0
    listed = stats(pub, "GROUPS")["groups"]
    assert [(g["pattern"], g["group"], g["subscribers"], g["delivered"]) for g in listed] == [
        ("orders", "shipping", 1, 6),  # newest first
        ("orders", "billing", 2, 6),
    ]
    # the topic keeps nothing that groups took: with every copy delivered, nothing holds it
    assert [t for t in stats(pub, "TOPICS")["topics"] if t["name"] == "orders"] == []
    # while a group holds a copy, the topic's entry lists its groups
    assert shipping[0].ask(f"UNSUBSCRIBE {shipping[0].client_id} orders GROUP shipping") == b"UNSUBSCRIBED orders"
    pub.publish("orders", "o6")
    assert messages(billing[0], 1) == ["orders o6"]
    groups = {g["group"]: g for g in topic_entry(pub, "orders")["groups"]}
    assert (groups["billing"]["subscribers"], groups["billing"]["backlog_messages"]) == (2, 0)
    assert (groups["shipping"]["subscribers"], groups["shipping"]["backlog_messages"]) == (0, 1)
    assert groups["billing"]["delivered"] == 7 and groups["shipping"]["delivered"] == 6


def test_plain_subscribers_are_the_topics_own_group(connect: Callable[[], LineClient]) -> None:
    plain, grouped, pub = connect(), connect(), connect()
    subscribe(plain, "t")
    subscribe(grouped, "t GROUP g")
    pub.publish("t", "one")
    assert messages(plain, 1) == ["t one"]
    assert messages(grouped, 1) == ["t one"]
    # the default group keeps a backlog while it has a subscriber that cannot take (here: after it left,
    # nothing is kept for it: the named group took the message)
    assert plain.ask(f"UNSUBSCRIBE {plain.client_id} t") == b"UNSUBSCRIBED t"
    pub.publish("t", "two")
    assert messages(grouped, 1) == ["t two"]
    assert [t for t in stats(pub, "TOPICS")["topics"] if t["name"] == "t"] == []


def test_joins_and_leaves_mid_stream(connect: Callable[[], LineClient]) -> None:
    a, b, pub = connect(), connect(), connect()
    subscribe(a, "jobs GROUP w")
    for i in range(2):
        pub.publish("jobs", f"{i}")
    assert messages(a, 2) == ["jobs 0", "jobs 1"]
    subscribe(b, "jobs GROUP w")
    for i in range(2, 6):
        pub.publish("jobs", f"{i}")
    got_a, got_b = messages(a, 2), messages(b, 2)
    assert sorted(got_a + got_b) == [f"jobs {i}" for i in range(2, 6)]
    assert a.ask(f"UNSUBSCRIBE {a.client_id} jobs GROUP w") == b"UNSUBSCRIBED jobs"
    for i in range(6, 9):
        pub.publish("jobs", f"{i}")
    assert messages(b, 3) == ["jobs 6", "jobs 7", "jobs 8"]
    assert a.quiet()
    assert a.ask(f"UNSUBSCRIBE {a.client_id} jobs GROUP w").startswith(b"ERROR NOT_SUBSCRIBED")


def test_a_group_keeps_a_backlog_until_a_member_comes_back(connect: Callable[[], LineClient]) -> None:
    first, pub = connect(), connect()
    subscribe(first, "audit GROUP log")
    assert first.ask(f"UNSUBSCRIBE {first.client_id} audit GROUP log") == b"UNSUBSCRIBED audit"
    for i in range(3):
        pub.publish("audit", f"e{i}")
    (group,) = topic_entry(pub, "audit")["groups"]
    assert (group["group"], group["subscribers"], group["backlog_messages"]) == ("log", 0, 3)
    later = connect()
    subscribe(later, "audit GROUP log")
    assert messages(later, 3) == ["audit e0", "audit e1", "audit e2"]


def test_a_full_group_backlog_holds_the_publisher(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-backlog", "2")
    pub, member = server.client(), server.client()
    pub.connect()
    member.connect()
    subscribe(member, "q GROUP g")
    assert member.ask(f"UNSUBSCRIBE {member.client_id} q GROUP g") == b"UNSUBSCRIBED q"
    pub.send("".join(f"PUBLISH {pub.client_id} q m{i}\n" for i in range(4)))
    assert pub.lines(2) == [b"PUBLISHED q", b"PUBLISHED q"]
    assert pub.quiet()  # the third waits: the group's backlog is full
    subscribe(member, "q GROUP g")
    assert pub.lines(2) == [b"PUBLISHED q", b"PUBLISHED q"]
    assert messages(member, 4) == [f"q m{i}" for i in range(4)]


def test_group_ttl_ends_an_idle_group(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--group-ttl", "0.5")
    c = server.client()
    c.connect()
    subscribe(c, "t GROUP g")
    assert c.ask(f"UNSUBSCRIBE {c.client_id} t GROUP g") == b"UNSUBSCRIBED t"
    c.publish("t", "kept for a while")
    assert stats(c)["groups"] == 1
    until(lambda: stats(c)["groups"] == 0, "the group to expire")
    figures = stats(c)
    assert figures["groups_expired"] == 1 and figures["group_copies_dropped"] == 1
    subscribe(c, "t GROUP g")  # a new group: the old backlog is gone
    c.publish("t", "new")
    assert messages(c, 1) == ["t new"]


def test_destroy(connect: Callable[[], LineClient]) -> None:
    member, admin = connect(), connect()
    subscribe(member, "t GROUP g")
    cid = admin.client_id
    assert admin.ask(f"DESTROY {cid} t GROUP g") == b"ERROR GROUP_IN_USE group has 1 subscriber(s) on 't'"
    assert member.ask(f"UNSUBSCRIBE {member.client_id} t GROUP g") == b"UNSUBSCRIBED t"
    admin.publish("t", "dropped")
    assert admin.ask(f"DESTROY {cid} t GROUP g") == b"DESTROYED t g"
    assert admin.ask(f"DESTROY {cid} t GROUP g") == b"ERROR NO_SUCH_GROUP no such group on 't'"
    assert admin.ask(f"DESTROY {cid} t").startswith(b"ERROR USAGE usage: DESTROY")
    figures = stats(admin)
    assert (figures["groups"], figures["groups_destroyed"], figures["group_copies_dropped"]) == (0, 1, 1)


def test_wildcards_and_their_edges(connect: Callable[[], LineClient]) -> None:
    star, tail, everything, exact, pub = connect(), connect(), connect(), connect(), connect()
    subscribe(star, "a.*")
    subscribe(tail, "a.>")
    subscribe(everything, ">")
    subscribe(exact, "a.b")
    for topic in ["a", "a.b", "a.", "a..b", "a.b.c", "b"]:
        pub.publish(topic, "x")
    # `*` is one non-empty token: a.b only; `>` one or more tokens with something in them
    assert messages(star, 1) == ["a.b x"]
    assert messages(tail, 3) == ["a.b x", "a..b x", "a.b.c x"]
    assert messages(everything, 6) == ["a x", "a.b x", "a. x", "a..b x", "a.b.c x", "b x"]
    # an exact subscription and a pattern are two groups: two deliveries of a.b
    assert messages(exact, 1) == ["a.b x"]
    for c in (star, tail, everything, exact):
        assert c.quiet()
    assert stats(pub)["wildcard_subscriptions"] == 3
    bad = star.ask(f"SUBSCRIBE {star.client_id} a.>.b")
    assert bad == b"ERROR BAD_TOPIC '>' may only be the last token of a pattern"


def test_a_wildcard_default_group_keeps_nothing_without_subscribers(connect: Callable[[], LineClient]) -> None:
    sub, pub = connect(), connect()
    subscribe(sub, "logs.*")
    assert sub.ask(f"UNSUBSCRIBE {sub.client_id} logs.*") == b"UNSUBSCRIBED logs.*"
    pub.publish("logs.web", "lost")
    subscribe(sub, "logs.*")
    pub.publish("logs.web", "seen")
    assert messages(sub, 1) == ["logs.web seen"]
    # logs.web had no subscriber and no group took the first message: it waits there (v1)
    assert topic_entry(pub, "logs.web")["backlog_messages"] == 1


def test_groups_on_patterns_share_across_topics(connect: Callable[[], LineClient]) -> None:
    a, b, pub = connect(), connect(), connect()
    subscribe(a, "metrics.> GROUP agg")
    subscribe(b, "metrics.> GROUP agg")
    for i, topic in enumerate(["metrics.cpu", "metrics.mem", "metrics.cpu.0", "metrics.disk"]):
        pub.publish(topic, f"{i}")
    got = messages(a, 2) + messages(b, 2)
    assert Counter(line.split()[0] for line in got) == Counter(
        ["metrics.cpu", "metrics.mem", "metrics.cpu.0", "metrics.disk"]
    )


def test_acks_and_nack_stay_inside_a_group(connect: Callable[[], LineClient]) -> None:
    w1, w2, other, pub = connect(), connect(), connect(), connect()
    subscribe(w1, "tasks GROUP workers ACK PREFETCH 1")
    subscribe(w2, "tasks GROUP workers ACK PREFETCH 1")
    subscribe(other, "tasks GROUP audit")
    pub.publish("tasks", "t1")
    assert w1.line() == b"DELIVER tasks 1 1 t1"
    assert messages(other, 1) == ["tasks t1"]
    w1.send(f"NACK {w1.client_id} 1")
    # back to its group: the next member in turn, attempt 2; the audit group does not see it again
    assert w2.line() == b"DELIVER tasks 1 2 t1"
    assert other.quiet()
    w2.send(f"ACK {w2.client_id} 1")
    workers = group_entry(pub, "tasks", "workers")
    assert (workers["acked"], workers["redelivered"], workers["unacked"]) == (1, 1, 0)


def test_group_usage_errors(connect: Callable[[], LineClient]) -> None:
    c = connect()
    cid = c.client_id
    assert c.ask(f"SUBSCRIBE {cid} t GROUP").startswith(b"ERROR USAGE usage: SUBSCRIBE")
    assert c.ask(f"SUBSCRIBE {cid} t GROUP {'x' * 65}").startswith(b"ERROR BAD_TOPIC group name must be")
    assert c.ask(f"SUBSCRIBE {cid} t ACK GROUP g").startswith(b"ERROR USAGE")  # GROUP comes first
    assert c.ask(f"UNSUBSCRIBE {cid} t GROUP g x").startswith(b"ERROR USAGE usage: UNSUBSCRIBE")
    assert c.ask(f"SUBSCRIBE {cid} t group g ack prefetch 5") == b"SUBSCRIBED t"


def test_groups_survive_a_restart(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    server = start_server("--data-dir", data, "--fsync", "always")
    c = server.client()
    c.connect()
    for group in ("a", "b"):
        subscribe(c, f"events GROUP {group} ACK")
        assert c.ask(f"UNSUBSCRIBE {c.client_id} events GROUP {group}") == b"UNSUBSCRIBED events"
    subscribe(c, "events.* GROUP p ACK")
    c.send(f"PUBLISH {c.client_id} events e1\nPUBLISH {c.client_id} events.x e2\n")
    assert c.lines(2) == [b"PUBLISHED events", b"PUBLISHED events.x"]
    assert c.line() == b"DELIVER events.x 1 1 e2"  # not acknowledged: it comes back too
    c.close()
    assert server.stop() == 0
    again = start_server("--data-dir", data)
    readers = {}
    for group, pattern in (("a", "events"), ("b", "events"), ("p", "events.*")):
        readers[group] = again.client()
        readers[group].connect()
        subscribe(readers[group], f"{pattern} GROUP {group} ACK")
    assert readers["a"].line() == b"DELIVER events 1 1 e1"
    assert readers["b"].line() == b"DELIVER events 1 1 e1"
    assert readers["p"].line() == b"DELIVER events.x 1 2 e2"
    for reader in readers.values():
        reader.send(f"ACK {reader.client_id} 1")
        assert reader.quiet()
    listed = stats(readers["a"], "GROUPS")["groups"]
    assert sorted((g["group"], g["backlog_messages"], g["unacked"]) for g in listed) == [
        ("a", 0, 0),
        ("b", 0, 0),
        ("p", 0, 0),
    ]
