"""Authentication and permissions in the core (issue 14), without sockets.

``Broker(auth=True)``: a ``CONNECT <user> <password>`` is handed to ``on_auth``
and the connection is not read until ``auth_result``; a bare ``CONNECT`` logs
in only an identity granted beforehand. ``grant`` compiles NATS-style patterns
per connection; PUBLISH, SUBSCRIBE and STATS CONNECTIONS are checked before
anything changes. The wire (users file, scrypt, TLS) is the server's, tested
over sockets in its own tests.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from pigeon._core import LIMIT_DEFAULTS, Broker


class Client:
    """One connection: its output, the reading and close events the broker sent about it."""

    def __init__(self, broker: Broker, events: Events) -> None:
        self.broker = broker
        self.chunks: list[bytes] = []
        self.handle = broker.open(self.chunks.append)
        self.events = events
        self.cid = ""

    def send(self, data: bytes) -> bool:
        return self.broker.feed(self.handle, data.replace(b"<me>", self.cid.encode()))

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data

    def login(
        self,
        user: str = "u",
        publish: list[str] | None = None,
        subscribe: list[str] | None = None,
        admin: bool = False,
    ) -> None:
        """CONNECT with credentials, granted as given and accepted."""
        self.send(b"CONNECT %s secret\n" % user.encode())
        self.broker.grant(self.handle, user, publish or [], subscribe or [], admin)
        self.broker.auth_result(self.handle, True)
        reply = self.take()
        assert reply.startswith(b"CONNECTED "), reply
        self.cid = reply.split()[1].decode()


class Events:
    """The broker's callbacks, recorded."""

    def __init__(self, broker: Broker) -> None:
        self.asked: list[tuple[int, bytes, bytes]] = []
        self.closes: list[tuple[int, str, bool]] = []
        self.reading: list[tuple[int, bool]] = []
        self.warnings: list[str] = []
        broker.on_auth = lambda h, user, password: self.asked.append((h, user, password))
        broker.on_close = lambda h, reason, flush: self.closes.append((h, reason, flush))
        broker.on_reading = lambda h, reading: self.reading.append((h, reading))
        broker.on_warning = self.warnings.append


def setup(auth: bool = True, max_backlog: int = LIMIT_DEFAULTS["max_backlog"]) -> tuple[Broker, Events]:
    broker = Broker(auth=auth, max_backlog=max_backlog)
    return broker, Events(broker)


# ---------------------------------------------------------------- patterns

PATTERN_CASES = [
    # (pattern, topic, allowed)
    ("jobs", "jobs", True),
    ("jobs", "jobs.x", False),
    ("jobs", "job", False),
    ("orders.*", "orders.a", True),
    ("orders.*", "orders", False),
    ("orders.*", "orders.a.b", False),
    ("orders.*", "orders.", False),  # `*` is one token, never an empty one
    ("orders.*", "ordersXa", False),
    ("orders.>", "orders.a", True),
    ("orders.>", "orders.a.b.c", True),
    ("orders.>", "orders", False),
    ("orders.>", "orders.", False),
    ("orders.>", "ordersX", False),
    (">", "anything.at.all", True),
    (">", "x", True),
    ("*", "x", True),
    ("*", "x.y", False),
    ("*.b", "a.b", True),
    ("*.b", "a.c", False),
    ("*.b", ".b", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.c.>", "a.x.c.d", True),
    ("a.*.c.>", "a.x.c", False),
    ("a.*.c.>", "a..c.d", False),
    ("a.*.c", "a.x.c", True),
    ("a.*.c", "a.x.y", False),
    ("a.*.c", "a.x.c.d", False),
    ("ord*", "ord*", True),  # no partial-token wildcards: a literal
    ("ord*", "orders", False),
    ("o>", "o>", True),
    ("o>", "ox", False),
    ("é.*", "é.x", True),
]


@pytest.mark.parametrize(("pattern", "topic", "allowed"), PATTERN_CASES)
def test_patterns_follow_the_nats_rules_for_publish_and_subscribe(
    pattern: str, topic: str, allowed: bool
) -> None:
    broker, events = setup()
    c = Client(broker, events)
    c.login(publish=[pattern], subscribe=[pattern])
    name = topic.encode()
    c.send(b"SUBSCRIBE <me> " + name + b"\nPUBLISH <me> " + name + b" hi\n")
    if allowed:
        assert c.take() == b"SUBSCRIBED " + name + b"\nPUBLISHED " + name + b"\nMESSAGE " + name + b" hi\n"
    else:
        shown = b"'" + name + b"'" if name.isascii() else b"(not shown)"
        denied = b"ERROR PERMISSION_DENIED permission denied for " + shown + b"\n"
        assert c.take() == denied * 2
        assert broker.topic_info(name) is None


@pytest.mark.parametrize("pattern", ["a.>.b", ">.a", "", "a b", "a\u200bb", "x" * 256, "a.\x01"])
def test_a_malformed_pattern_is_refused_and_the_last_grant_stays(pattern: str) -> None:
    broker, events = setup()
    c = Client(broker, events)
    c.login(publish=["ok"], subscribe=["ok"])
    memory = broker.stats()["memory_bytes"]
    with pytest.raises(ValueError, match="pattern"):
        broker.grant(c.handle, "v", ["fine"], [pattern])
    with pytest.raises(TypeError):
        broker.grant(c.handle, "v", "ok", [])  # one string is not a list of patterns
    assert broker.stats()["memory_bytes"] == memory
    assert broker.connections()["connections"][0]["user"] == "u"
    c.send(b"PUBLISH <me> ok m\nPUBLISH <me> fine m\n")
    assert c.take() == b"PUBLISHED ok\nERROR PERMISSION_DENIED permission denied for 'fine'\n"


def test_admin_may_do_everything_and_no_lists_allow_nothing() -> None:
    broker, events = setup()
    admin, nobody = Client(broker, events), Client(broker, events)
    admin.login("ops", admin=True)
    nobody.login("nobody")
    admin.send(b"SUBSCRIBE <me> any.thing\nPUBLISH <me> x y\nSTATS CONNECTIONS\n")
    out = admin.take()
    assert out.startswith(b"SUBSCRIBED any.thing\nPUBLISHED x\nSTATS {")
    nobody.send(b"SUBSCRIBE <me> any.thing\nPUBLISH <me> x y\nSTATS CONNECTIONS\nSTATS TOPICS\n")
    out = nobody.take()
    assert out.startswith(
        b"ERROR PERMISSION_DENIED permission denied for 'any.thing'\n"
        b"ERROR PERMISSION_DENIED permission denied for 'x'\n"
        b"ERROR PERMISSION_DENIED permission denied\n"
        b"STATS {"
    )
    entries = {e["client_id"]: e["user"] for e in broker.connections()["connections"]}
    assert entries == {admin.cid: "ops", nobody.cid: "nobody"}
    assert broker.stats()["errors"]["permission_denied"] == 3


# ---------------------------------------------------------------- logging in


def test_connect_with_credentials_waits_for_the_answer_with_the_rest_of_the_input() -> None:
    broker, events = setup()
    sub, c = Client(broker, events), Client(broker, events)
    sub.login(subscribe=["jobs"])
    sub.send(b"SUBSCRIBE <me> jobs\n")
    sub.take()
    events.asked.clear()
    assert c.send(b"CONNECT alice s3cr3t\nPUBLISH c2 jobs one\nPUBLISH c2 jobs two\nPI")
    assert events.asked == [(c.handle, b"alice", b"s3cr3t")]
    assert c.take() == b""
    assert (c.handle, False) in events.reading
    c.send(b"NG\n")  # a read already under way: kept with the rest
    assert c.take() == b"" and len(events.asked) == 1
    broker.grant(c.handle, "alice", ["jobs"], [])
    broker.auth_result(c.handle, True)
    assert c.take() == b"CONNECTED c2\nPUBLISHED jobs\nPUBLISHED jobs\nPONG\n"
    assert sub.take() == b"MESSAGE jobs one\nMESSAGE jobs two\n"
    assert events.reading[-1] == (c.handle, True)
    assert broker.stats()["logins"] == 2
    assert broker.client_id(c.handle) == "c2"


def test_a_failed_login_gets_auth_failed_and_closes_without_running_the_rest() -> None:
    broker, events = setup()
    c = Client(broker, events)
    c.send(b"CONNECT mallory guess\nPING\n")
    broker.auth_result(c.handle, False)
    assert c.take() == b"ERROR AUTH_FAILED authentication failed\n"
    assert events.closes == [(c.handle, "authentication failed", True)]
    stats = broker.stats()
    assert (stats["auth_failures"], stats["logins"], stats["errors"]["auth_failed"]) == (1, 0, 1)
    assert stats["commands"]["ping"] == 0


def test_a_bare_connect_needs_a_granted_identity_when_auth_is_on() -> None:
    broker, events = setup()
    c = Client(broker, events)
    assert c.send(b"PING\nHELLO\nCONNECT\nSTATS\nSUBSCRIBE c1 t\n")
    out = c.take().splitlines()
    assert out[0] == b"PONG" and out[1].startswith(b"HELLO ")
    assert out[2:] == [
        b"ERROR AUTH_REQUIRED authentication required",
        b"ERROR NOT_CONNECTED not connected: send CONNECT first",
        b"ERROR NOT_CONNECTED not connected: send CONNECT first",
    ]
    assert events.closes == [] and events.asked == []
    # a client certificate the server mapped to a user: granted before CONNECT
    broker.grant(c.handle, "svc", ["t"], [])
    c.send(b"CONNECT\nPUBLISH c1 t m\nDISCONNECT\n")
    assert c.take() == b"CONNECTED c1\nPUBLISHED t\nDISCONNECTED\n"
    assert broker.stats()["logins"] == 1


def test_with_auth_off_credentials_are_accepted_and_ignored() -> None:
    broker, events = setup(auth=False)
    c = Client(broker, events)
    c.send(b"CONNECT anyone anything\nPUBLISH c1 t m\nSTATS CONNECTIONS\n")
    assert c.take().startswith(b"CONNECTED c1\nPUBLISHED t\nSTATS {")
    assert events.asked == []
    assert broker.stats()["logins"] == 0
    assert broker.connections()["connections"][0]["user"] is None


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"CONNECT alice", b"ERROR USAGE usage: CONNECT [<user> <password>]"),
        (b"CONNECT alice pw extra", b"ERROR USAGE usage: CONNECT [<user> <password>]"),
    ],
)
def test_connect_takes_no_argument_or_exactly_two(line: bytes, reply: bytes) -> None:
    broker, events = setup()
    c = Client(broker, events)
    assert c.send(line + b"\n")
    assert c.take() == reply + b"\n"
    assert events.asked == []


def test_an_answer_for_a_connection_that_went_is_ignored() -> None:
    broker, events = setup()
    c = Client(broker, events)
    c.send(b"CONNECT alice pw\n")
    broker.close(c.handle)
    broker.auth_result(c.handle, True)
    fresh = Client(broker, events)  # the same handle, reused
    assert fresh.handle == c.handle
    broker.auth_result(fresh.handle, True)
    assert fresh.take() == b"" and broker.client_id(fresh.handle) is None
    # one whose client sent FIN meanwhile gets nothing either
    eof = Client(broker, events)
    eof.send(b"CONNECT alice pw\n")
    broker.eof(eof.handle)
    broker.auth_result(eof.handle, True)
    assert eof.take() == b"" and broker.stats()["logins"] == 0


def test_an_answer_from_inside_on_auth_is_refused() -> None:
    broker, events = setup()
    c = Client(broker, events)
    broker.on_auth = lambda h, user, password: broker.auth_result(h, True)
    with pytest.raises(RuntimeError, match="on_auth"):
        c.send(b"CONNECT alice pw\n")


def test_without_on_auth_every_login_fails() -> None:
    broker, events = setup()
    broker.on_auth = None
    c = Client(broker, events)
    assert not c.send(b"CONNECT alice pw\nPING\n")
    assert c.take() == b"ERROR AUTH_FAILED authentication failed\n"


def test_a_connection_paused_while_its_login_waits_goes_on_once_both_are_over() -> None:
    broker, events = setup()
    c = Client(broker, events)
    c.send(b"CONNECT alice pw\nPING\n")
    broker.pause(c.handle)
    broker.grant(c.handle, "alice", [], [])
    broker.auth_result(c.handle, True)
    assert c.take() == b""  # kept while paused
    broker.resume(c.handle)
    assert c.take() == b"CONNECTED c1\nPONG\n"
    assert events.reading[-1] == (c.handle, True)


# ---------------------------------------------------------------- checks change nothing


def test_a_denied_publish_is_not_held_by_flow_control_and_creates_nothing() -> None:
    broker, events = setup(max_backlog=1)
    c = Client(broker, events)
    c.login(publish=["full"])
    c.send(b"PUBLISH <me> full 1\nPUBLISH <me> other 2\nPUBLISH <me> full 3\nPING\n")
    assert c.take() == b"PUBLISHED full\nERROR PERMISSION_DENIED permission denied for 'other'\n"
    assert broker.stats()["publishers_held"] == 1
    d = Client(broker, events)
    d.login(publish=["other"])
    c2 = Client(broker, events)
    c2.login(publish=["x"])
    # the backlog is full, but this publisher may not use it: refused, not held
    c2.send(b"PUBLISH <me> full 4\nPING\n")
    assert c2.take() == b"ERROR PERMISSION_DENIED permission denied for 'full'\nPONG\n"
    stats = broker.stats()
    assert (stats["published"], stats["topics"], stats["publishers_held"]) == (1, 1, 1)


def test_the_fast_path_checks_the_publisher_not_the_last_topic_used() -> None:
    broker, events = setup()
    allowed, other = Client(broker, events), Client(broker, events)
    allowed.login(publish=["t"])
    other.login(publish=["u"])
    allowed.send(b"PUBLISH <me> t 1\n")
    # the same topic, last used by another connection: `PUBLISH <id> t` matches by comparison
    other.send(b"PUBLISH <me> t 2\nPUBLISH <me> t 3\n")
    assert other.take() == b"ERROR PERMISSION_DENIED permission denied for 't'\n" * 2
    assert broker.stats()["published"] == 1


def test_the_allowed_topic_is_remembered_by_a_serial_no_freed_topic_can_take() -> None:
    broker, events = setup()
    sub, pub = Client(broker, events), Client(broker, events)
    sub.login(subscribe=[">"])
    pub.login(publish=["x"])
    sub.send(b"SUBSCRIBE <me> x\n")
    pub.send(b"PUBLISH <me> x 1\n")
    sub.send(b"UNSUBSCRIBE <me> x\nSUBSCRIBE <me> y\n")  # x is freed; y may get its memory
    assert broker.topic_info(b"x") is None
    pub.send(b"PUBLISH <me> y 2\n")
    assert pub.take() == b"PUBLISHED x\nERROR PERMISSION_DENIED permission denied for 'y'\n"


def test_subscribing_with_ack_and_to_dead_letters_is_checked_too() -> None:
    broker, events = setup()
    c = Client(broker, events)
    c.login(subscribe=["jobs"])
    c.send(b"SUBSCRIBE <me> jobs ACK PREFETCH 5\nSUBSCRIBE <me> other ACK\nSUBSCRIBE <me> jobs.dead\n")
    assert c.take() == (
        b"SUBSCRIBED jobs\n"
        b"ERROR PERMISSION_DENIED permission denied for 'other'\n"
        b"ERROR PERMISSION_DENIED permission denied for 'jobs.dead'\n"
    )


def test_a_new_grant_ends_the_subscriptions_it_no_longer_allows_and_redelivers_their_messages() -> None:
    broker, events = setup()
    worker, spare, pub = Client(broker, events), Client(broker, events), Client(broker, events)
    worker.login("w", publish=["a"], subscribe=["jobs", "keep"])
    spare.login("s", subscribe=["jobs"])
    pub.login("p", publish=["jobs"])
    worker.send(b"SUBSCRIBE <me> jobs ACK\nSUBSCRIBE <me> keep\nPUBLISH <me> a 1\n")
    pub.send(b"PUBLISH <me> jobs m1\n")
    assert worker.take().endswith(b"DELIVER jobs 1 1 m1\n")
    spare.send(b"SUBSCRIBE <me> jobs\n")
    spare.take()
    broker.grant(worker.handle, "w", ["b"], ["keep"])
    assert spare.take() == b"MESSAGE jobs m1\n"  # what the ended subscription held went on
    assert worker.take() == b""  # no unsolicited line
    assert events.warnings == [f"user 'w' ({worker.cid}): subscription to 'jobs' ended: no longer allowed"]
    assert broker.connections()["connections"][0]["subscriptions"] == ["keep"]
    worker.send(b"PUBLISH <me> a 2\nPUBLISH <me> b 3\nACK <me> 1\n")
    assert worker.take() == (
        b"ERROR PERMISSION_DENIED permission denied for 'a'\nPUBLISHED b\n"
        b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 1\n"
    )


# ---------------------------------------------------------------- memory


def test_permission_sets_are_counted_and_freed_with_the_connection() -> None:
    broker, events = setup()
    base = broker.stats()["memory_bytes"]
    c = Client(broker, events)
    opened = broker.stats()["memory_bytes"]
    broker.grant(c.handle, "u", [f"orders.{i}.*" for i in range(20)], ["jobs"])
    granted = broker.stats()["memory_bytes"]
    assert granted > opened + 20 * len("orders.0.*")
    broker.grant(c.handle, "u", ["a"], [])
    assert opened < broker.stats()["memory_bytes"] < granted
    broker.close(c.handle)
    assert broker.stats()["memory_bytes"] <= opened and broker.stats()["memory_bytes"] >= base


def test_a_grant_that_cannot_be_allocated_raises_and_keeps_the_last_one() -> None:
    broker, events = setup()
    c = Client(broker, events)
    c.login(publish=["old"])
    for fail_at in (1, 2):
        broker._fail_allocation(fail_at)
        with pytest.raises(MemoryError):
            broker.grant(c.handle, "v", ["new"], ["new"])
        broker._fail_allocation(0)
    c.send(b"PUBLISH <me> old m\nPUBLISH <me> new m\n")
    assert c.take() == b"PUBLISHED old\nERROR PERMISSION_DENIED permission denied for 'new'\n"


def test_a_permitted_publish_creates_no_python_object_per_message() -> None:
    broker, events = setup()
    sub, pub = Client(broker, events), Client(broker, events)
    sub.login(subscribe=["jobs"])
    pub.login(publish=[f"other.{i}.>" for i in range(19)] + ["jobs"])
    sub.send(b"SUBSCRIBE <me> jobs\n")
    batch = b"".join(b"PUBLISH %s jobs %06d\n" % (pub.cid.encode(), i) for i in range(5000))

    def round_trip() -> None:
        broker.feed(pub.handle, batch)
        sub.chunks.clear()
        pub.chunks.clear()

    for _ in range(3):  # warm the buffers up first
        round_trip()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(3):
        round_trip()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.count_diff for stat in after.compare_to(before, "filename") if stat.count_diff > 0)
    assert grown < 100, [str(s) for s in after.compare_to(before, "lineno")[:5]]
    assert broker.stats()["published"] == 30000
