"""Differential test: random sessions run against the Cython core and the reference model.

After every step, everything the model states must be what the core did
(tests/harness.py): each connection's output bytes, its close and reading
events and client id, the warnings, the figures of ``stats()``, every topic.
Sessions connect, send well-formed and broken commands (tabs, HELLO, STATS
with its pages), read with and without a flush, pause and resume, send EOF,
close, tick through idle and write timeouts, and run over transports that fill
up, pause their connection, drain or fail; half of them defer flushes to an
explicit ``flush()``, as the server does. They subscribe plain and with
acknowledgements (``ACK [PREFETCH <n>]``), ACK and NACK the tags they were
given, single and as ranges, tags no longer or never outstanding, and broken
tags; publishers outrun small backlogs and wait. They speak protocol 2 too:
``HELLO 2`` (MSG and DMSG deliveries) and framed ``PUB`` with any bytes in
the payload, over ``max_payload``, with wrong counts, cut across reads. Half of them run with
authentication: connections log in as the users of tests/harness.USERS
(answered as the server would, at once or later), with wrong passwords, with
an identity granted before CONNECT, are granted other permissions while
connected, and publish and subscribe inside and outside their patterns.
Limits are random, but for
``max_memory``, which the model does not count, and ``ack_timeout`` (0) and
NACK delays that pass during a session (none), which depend on the clock (see
tests/model.py).

``PIGEON_STATEFUL_EXAMPLES`` sets the number of sessions (default 150; the
long run in docs/operations.md uses 5000).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.harness import OWN_ID, Peer, Session
from tests.strategies import (
    FRAME_SHAPES,
    GOOD_TOPICS,
    command,
    destroy_groups,
    frame,
    good_topics,
    group_options,
    group_patterns,
    group_topics,
    hello_lines,
    logins,
    messages,
    nack_delays,
    pattern_topics,
    payloads,
    reply_tokens,
    separators,
    stats_lines,
    subscribe_options,
    tag_specs,
)

# which live connection a rule acts on (modulo their number)
picks = st.integers(0, 7)
MEMORY_NEVER_FULL = 1 << 40


def publishes(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    """One ``PUBLISH <me> <topic> <body>`` line per (topic, body)."""
    return b"".join(b"PUBLISH <me> %s %s\n" % item for item in items)


class CoreVsModel(RuleBasedStateMachine):
    """Drives both brokers with the same calls and compares what the model states after each."""

    session: Session

    @initialize(
        limits=st.fixed_dictionaries(
            {
                "max_line": st.integers(64, 100),
                "max_backlog": st.sampled_from([0, 2, 5, 100]),
                "max_connections": st.sampled_from([2, 4, 8, 8]),
                "max_memory": st.just(MEMORY_NEVER_FULL),
                "max_subscriptions": st.sampled_from([1, 2, 4, 4]),
                "max_topics": st.sampled_from([1, 3, 8, 8]),
                "max_pending": st.sampled_from([1, 40, 120, 10_000]),
                "idle_timeout": st.sampled_from([0, 0, 0, 1, 3]),
                "write_timeout": st.sampled_from([0, 0, 1, 2, 4]),
                "out_batch": st.sampled_from([1, 30, 80, 10_000]),
                "default_prefetch": st.sampled_from([1, 2, 1000]),
                "max_deliveries": st.sampled_from([0, 1, 2, 5]),
                "ack_timeout": st.just(0),
                "max_payload": st.sampled_from([0, 5, 1 << 20, 1 << 20]),
                "max_backlog_bytes": st.sampled_from([0, 8, 30, 1 << 30]),
            }
        ),
        deferred=st.booleans(),
        nconns=st.integers(1, 4),
        topics=st.permutations(GOOD_TOPICS),
        options=st.sampled_from([b" ACK", b" ACK PREFETCH 1", b" ACK PREFETCH 2"]),
        auth=st.booleans(),
    )
    def make(
        self,
        limits: dict[str, int],
        deferred: bool,
        nconns: int,
        topics: list[bytes],
        options: bytes,
        auth: bool,
    ) -> None:
        self.session = Session(limits, deferred=deferred, auth=auth)
        self.login = b"CONNECT writer pw\n" if auth else b"CONNECT\n"
        self._open(nconns)
        # most sessions start with subscribers, so that publishing routes something: the first
        # acknowledges what it gets, the others are plain
        for k, peer in enumerate(self.session.peers[: nconns - 1]):
            mode = b"" if k else options
            self._send(peer, b"".join(b"SUBSCRIBE <me> %s%s\n" % (topic, mode) for topic in topics))

    def _send(self, peer: Peer | None, data: bytes, *, flush: bool = True) -> None:
        if peer is None or peer.closed:
            return
        data = self.session.own_id(peer, data)
        if flush:
            self.session.feed(peer, data)
        else:
            self.session.read(peer, data)

    def _open(self, n: int, login: bytes | None = None) -> None:
        """Open n connections that CONNECT (one refused over max_connections gets nowhere); with auth,
        as a user that may publish to and subscribe to the session's topics, unless told otherwise."""
        for _ in range(n):
            self._send(self.session.open(), login or self.login)

    @rule(login=logins)
    def open(self, login: bytes) -> None:
        self._open(1, login + b"\n")

    @rule(
        login=logins,
        lines=st.lists(command(), max_size=4),
        pause=st.booleans(),
        answer=st.booleans(),
    )
    def log_in_slowly(self, login: bytes, lines: list[bytes], pause: bool, answer: bool) -> None:
        """A login answered later than the read it came in, with commands after it, maybe while paused."""
        peer = self.session.open()
        self.session.read(peer, login + b"\n" + b"".join(lines))
        if pause:
            self.session.pause(peer)
        self.session.read(peer, b"PING\n")
        if answer:
            self.session.answer_logins()
        self.session.flush()

    @rule()
    def answer_logins(self) -> None:
        self.session.answer_logins()

    @rule(user=st.sampled_from([b"ops", b"worker", b"reader", b"writer", b"nobody"]))
    def certificate(self, user: bytes) -> None:
        """An identity granted before CONNECT, as a server mapping a client certificate does."""
        peer = self.session.open()
        self.session.grant(peer, user)
        self._send(peer, b"CONNECT\n")

    @rule(i=picks, user=st.sampled_from([b"ops", b"worker", b"reader", b"writer", b"nobody"]))
    def grant_again(self, i: int, user: bytes) -> None:
        """New permissions for a live connection (a reload): subscriptions they do not allow end."""
        peer = self.session.live(i)
        if peer is not None:
            self.session.grant(peer, user)

    @rule(i=picks, topic=pattern_topics, body=messages, options=subscribe_options)
    def use_patterns(self, i: int, topic: bytes, body: bytes, options: bytes) -> None:
        """Topics on the edges of the users' patterns (`*`, `>`, dead letters)."""
        line = b"SUBSCRIBE <me> %s%s\nPUBLISH <me> %s %s\n" % (topic, options, topic, body)
        self._send(self.session.live(i), line)

    @rule(n=st.integers(2, 3))
    def open_many(self, n: int) -> None:
        """Several connections at once, to reach max_connections."""
        self._open(n)

    @rule(
        i=picks, lines=st.lists(command(), min_size=1, max_size=6), cut=st.integers(0, 8), flush=st.booleans()
    )
    def send(self, i: int, lines: list[bytes], cut: int, flush: bool) -> None:
        data = b"".join(lines)
        # sometimes leave the end of the last line for a later read
        if cut and len(data) > cut:
            data = data[:-cut]
        self._send(self.session.live(i), data, flush=flush)

    @rule(i=picks, topic=good_topics, sep=separators)
    def subscribe(self, i: int, topic: bytes, sep: bytes) -> None:
        self._send(self.session.live(i), b"CONNECT\nSUBSCRIBE" + sep + b"<me>" + sep + topic + b"\n")

    @rule(i=picks, topic=good_topics, options=subscribe_options)
    def subscribe_acknowledged(self, i: int, topic: bytes, options: bytes) -> None:
        self._send(self.session.live(i), b"SUBSCRIBE <me> " + topic + options + b"\n")

    @rule(
        i=picks,
        nack=st.booleans(),
        back=st.integers(0, 6),
        span=st.integers(0, 4),
        delay=nack_delays,
        flush=st.booleans(),
    )
    def settle(self, i: int, nack: bool, back: int, span: int, delay: bytes, flush: bool) -> None:
        """ACK or NACK tags a connection holds: one, a range from it, or, once settled, none outstanding."""
        peer = self.session.holding(i)
        if peer is None:
            return
        tags = self.session.outstanding(peer) or [1]
        first = tags[max(0, len(tags) - 1 - back)]
        spec = b"%d" % first if span == 0 else b"%d-%d" % (first, first + span)
        line = (b"NACK <me> " + spec + delay if nack else b"ACK <me> " + spec) + b"\n"
        self._send(peer, line, flush=flush)

    @rule(
        i=picks,
        j=picks,
        topic=good_topics,
        bodies=st.lists(messages, min_size=1, max_size=4),
        nack=st.booleans(),
        back=st.integers(0, 3),
        span=st.integers(0, 4),
        flush=st.booleans(),
    )
    def work(
        self, i: int, j: int, topic: bytes, bodies: list[bytes], nack: bool, back: int, span: int, flush: bool
    ) -> None:
        """A publisher's messages, then a consumer that settles some of what it holds."""
        lines = publishes((topic, body) for body in bodies)
        self._send(self.session.live(i), lines, flush=flush)
        self.settle(j, nack, back, span, b"", flush)

    @rule(i=picks, nack=st.booleans(), spec=tag_specs)
    def settle_any(self, i: int, nack: bool, spec: bytes) -> None:
        """ACK or NACK of a tag spec that may be broken or unknown."""
        self._send(self.session.live(i), (b"NACK <me> " if nack else b"ACK <me> ") + spec + b"\n")

    @rule(i=picks, topic=good_topics, bodies=st.lists(messages, min_size=1, max_size=8), flush=st.booleans())
    def publish(self, i: int, topic: bytes, bodies: list[bytes], flush: bool) -> None:
        lines = publishes((topic, body) for body in bodies)
        self._send(self.session.live(i), lines, flush=flush)

    @rule(
        i=picks,
        items=st.lists(st.tuples(good_topics, messages), min_size=2, max_size=8),
        flush=st.booleans(),
    )
    def publish_to_several_topics(self, i: int, items: list[tuple[bytes, bytes]], flush: bool) -> None:
        lines = publishes(items)
        self._send(self.session.live(i), lines, flush=flush)

    @rule(
        i=picks,
        j=picks,
        items=st.lists(st.tuples(good_topics, messages), min_size=1, max_size=8),
        fate=st.sampled_from(["close", "eof", "fail", "pause"]),
    )
    def strand(self, i: int, j: int, items: list[tuple[bytes, bytes]], fate: str) -> None:
        """Messages routed to a connection that goes, fails or pauses before they are handed over."""
        self._send(self.session.live(i), publishes(items), flush=False)
        victim = self.session.live(j)
        if victim is None:
            return
        if fate == "close":
            self.session.close(victim)
        elif fate == "eof":
            self.session.eof(victim)
        elif fate == "fail":
            self.session.transport(victim, fail=True)
        else:
            self.session.pause(victim)
        self.session.flush()

    @rule(i=picks, pattern=group_patterns, options=group_options)
    def join_group(self, i: int, pattern: bytes, options: bytes) -> None:
        """SUBSCRIBE to a pattern or an exact topic, in a named group or the default one."""
        self._send(self.session.live(i), b"SUBSCRIBE <me> " + pattern + options + b"\n")

    @rule(i=picks, pattern=group_patterns, group=st.sampled_from([b"", b" GROUP g1", b" GROUP g2"]))
    def leave_group(self, i: int, pattern: bytes, group: bytes) -> None:
        self._send(self.session.live(i), b"UNSUBSCRIBE <me> " + pattern + group + b"\n")

    @rule(i=picks, pattern=group_patterns, group=destroy_groups)
    def destroy_group(self, i: int, pattern: bytes, group: bytes) -> None:
        self._send(self.session.live(i), b"DESTROY <me> " + pattern + group + b"\n")

    @rule(
        i=picks,
        items=st.lists(st.tuples(group_topics, messages), min_size=1, max_size=8),
        flush=st.booleans(),
    )
    def publish_to_groups(self, i: int, items: list[tuple[bytes, bytes]], flush: bool) -> None:
        """Messages to topics that patterns and groups match (fan-out, backlogs of groups)."""
        lines = publishes(items)
        self._send(self.session.live(i), lines, flush=flush)

    @rule(i=picks, topic=good_topics)
    def unsubscribe(self, i: int, topic: bytes) -> None:
        self._send(self.session.live(i), b"UNSUBSCRIBE <me> " + topic + b"\n")

    @rule(i=picks, line=stats_lines)
    def stats(self, i: int, line: bytes) -> None:
        self._send(self.session.live(i), line + b"\n")

    @rule(i=picks, line=hello_lines)
    def hello(self, i: int, line: bytes) -> None:
        self._send(self.session.live(i), line + b"\n")

    @rule(
        i=picks,
        frames=st.lists(frame(good_topics, st.just(OWN_ID), (*FRAME_SHAPES, "long")), min_size=1, max_size=4),
        cut=st.integers(0, 64),
        flush=st.booleans(),
    )
    def publish_frames(self, i: int, frames: list[bytes], cut: int, flush: bool) -> None:
        """Framed publishes, in two reads cut anywhere (inside a header or a payload too)."""
        peer = self.session.live(i)
        data = b"".join(frames)
        cut %= len(data) + 1
        self._send(peer, data[:cut], flush=flush)
        self._send(peer, data[cut:], flush=flush)

    @rule(i=picks, j=picks, topic=good_topics, payload=payloads, token=reply_tokens, twice=st.booleans())
    def request_and_reply(
        self, i: int, j: int, topic: bytes, payload: bytes, token: bytes, twice: bool
    ) -> None:
        """A request, then a reply from some connection: the first connections' first requests have
        the tokens ``reply_tokens`` mostly names, so many replies reach a requester; a second reply
        to the same token is dropped."""
        self._send(self.session.live(i), b"REQ <me> %s %d\n%s\n" % (topic, len(payload), payload))
        for _ in range(2 if twice else 1):
            self._send(self.session.live(j), b"REPLY %s %d\n%s\n" % (token, len(payload), payload))

    @rule(i=picks, event=st.sampled_from(["pause", "resume", "eof", "close"]))
    def connection_event(self, i: int, event: str) -> None:
        """The transport fills up or drains, the client sends FIN, or the socket goes."""
        peer = self.session.live(i)
        if peer is not None:
            {
                "pause": self.session.pause,
                "resume": self.session.resume,
                "eof": self.session.eof,
                "close": self.session.close,
            }[event](peer)

    @rule(i=picks, stuck=st.booleans(), pause_on_write=st.booleans())
    def transport_fills(self, i: int, stuck: bool, pause_on_write: bool) -> None:
        peer = self.session.live(i)
        if peer is not None:
            self.session.transport(peer, stuck=stuck, pause_on_write=pause_on_write)

    @rule(i=picks, nbytes=st.sampled_from([10, 100, 1 << 20]))
    def transport_drains(self, i: int, nbytes: int) -> None:
        peer = self.session.live(i)
        if peer is not None:
            self.session.drain(peer, nbytes)

    @rule(i=picks)
    def transport_fails(self, i: int) -> None:
        peer = self.session.live(i)
        if peer is not None:
            self.session.transport(peer, fail=True)

    @rule()
    def reap(self) -> None:
        self.session.reap()

    @rule(n=st.integers(1, 3))
    def tick(self, n: int) -> None:
        for _ in range(n):
            self.session.tick()

    @rule()
    def flush(self) -> None:
        self.session.flush()

    @rule(count=st.sampled_from([1, 2, 100]))
    def walk_topics(self, count: int) -> None:
        self.session.walk_topics(count)

    @rule(count=st.sampled_from([1, 2, 100]))
    def walk_connections(self, count: int) -> None:
        self.session.walk_connections(count)

    @precondition(lambda self: hasattr(self, "session"))
    @invariant()
    def same_as_the_model(self) -> None:
        self.session.check()

    def teardown(self) -> None:
        if hasattr(self, "session"):
            self.session.finish()


CoreVsModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("PIGEON_STATEFUL_EXAMPLES", "150")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_core_matches_model = pytest.mark.slow(CoreVsModel.TestCase)


def test_request_reply_session_matches_the_model() -> None:
    """One request/reply session step by step, so that every path is compared on every run: a request to a
    framed subscriber and a v1 one, its reply (RMSG), a second reply dropped, a malformed token, a reply to
    a closed requester, and a reused handle of a new generation."""
    session = Session({"max_memory": MEMORY_NEVER_FULL, "ack_timeout": 0}, deferred=False)
    try:
        requester, responder, v1 = session.open(), session.open(), session.open()
        for peer in (requester, responder, v1):
            session.feed(peer, b"CONNECT\n")
        session.feed(
            responder, session.own_id(responder, b"HELLO 2\nSUBSCRIBE <me> a\nSUBSCRIBE <me> b ACK\n")
        )
        session.feed(v1, session.own_id(v1, b"SUBSCRIBE <me> a GROUP g\n"))
        session.feed(requester, session.own_id(requester, b"REQ <me> a 3\nx\ny\nREQ <me> b 0\n\n"))
        session.feed(responder, b"REPLY 0.1.1 2\nok\nREPLY 0.1.1 2\nno\nREPLY 0.1.2 0\n\nREPLY 1..2 1\nz\n")
        session.check()
        session.feed(requester, session.own_id(requester, b"REQ <me> c 1\nq\n"))
        session.close(requester)
        again = session.open()  # the core's handle 0 again, of generation 4
        session.feed(again, b"CONNECT\n")
        session.feed(again, session.own_id(again, b"REQ <me> c 1\nr\n"))
        session.feed(responder, session.own_id(responder, b"SUBSCRIBE <me> c\n"))
        session.feed(responder, b"REPLY 0.1.3 1\n1\nREPLY 0.4.1 1\n2\n")
        session.check()
        assert session.core_broker.stats()["replies"] == 3
    finally:
        session.finish()
