"""A plain-Python model of what a client of the broker core can observe.

Written from docs/protocol.md and the notes on the new core (issue 11), not
from the core's code, so that a design flaw in one is not copied into the
other. It takes the core's Python calls (``open``, ``read``, ``feed``,
``flush``, ``pause``, ``resume``, ``eof``, ``close``, ``tick`` and the
reports) and states, for every connection:

- its output stream: replies, ``ERROR <CODE> <text>`` lines and ``MESSAGE``
  lines, in order, and when they reach its writer: at a flush; at once when a
  connection's own output passes ``out_batch`` in the middle of a read; at the
  end of a call when a connection's output waiting for the flush is half of
  ``out_batch`` or more (a flush then, not a request for one); at EOF;
- the close events ``on_close(handle, reason, flush)`` and the reading events
  ``on_reading(handle, reading)``, and the warnings;
- work-queue delivery: round robin in subscription order, skipping a subscriber
  that cannot take output now (paused, holding a full batch of output not
  yet handed over, or an acknowledged subscription at its prefetch window);
  one skipped for its batch has its topics served again once the batch is
  handed over (pinned: not the others at that flush);
  backlogs and their bound, messages given back to the head of their topic
  when they were never handed to a connection (close, EOF, a failing writer,
  a slow-consumer drop, a write timeout);
- protocol 2: the framed ``PUB <id> <topic> <nbytes>`` (its payload taken by
  length; over ``max_payload`` ERROR PAYLOAD_TOO_LARGE and the payload skipped;
  a header without a count, or a payload not followed by a line end, ERROR
  BAD_FRAME and close), ``HELLO [1|2]``, ``MSG``/``DMSG`` frames to a
  connection that sent ``HELLO 2``, and in a v1 line each LF of a payload and
  a CR at its end written as a space (``v1_altered``);
- request/reply: ``REQ <id> <topic> <nbytes>`` frames published like PUB and
  answered ``REQUESTED <id>``, their deliveries ``MSG <topic> <token> <n>`` and
  ``DMSG <topic> <tag> <attempt> <token> <n>`` (a v1 line has no token), the
  token ``<handle>.<generation>.<id>`` naming the core's handle (the model
  keeps the core's handle order: the last freed first), ``REPLY <token>
  <nbytes>`` frames to the requester as ``RMSG <id> <n>`` when the request
  waits (the first reply; a connection keeps its last 4096), else dropped and
  counted, ERROR BAD_REPLY_TOKEN for one that is no token;
- acknowledged subscriptions (``SUBSCRIBE <id> <topic> ACK [PREFETCH <n>]``):
  ``DELIVER <topic> <tag> <attempt> <message>`` lines, tags counted per
  connection, ``ACK`` and ``NACK`` of single tags and ranges, unknown tags,
  redelivery (attempt + 1) when the connection ends or unsubscribes, DELIVER
  lines given back unsent (their attempt not counted), dead letters to
  ``<topic>.dead`` after ``max_deliveries``;
- publisher flow control: a PUBLISH that finds its topic's backlog full waits
  with the rest of its connection's input, which is not read meanwhile, until
  the backlog is back at half (or, with a bound of 0, a subscriber can take);
  a connection subscribed to that topic itself gets ERROR BACKLOG_FULL instead;
- the figures of STATS and ``stats()``, HELLO, the pages of topics and
  connections (a whole listing holds every one; in the model's own order, as
  the core's follows a random hash), ``topic_info`` and client ids;
- idle and write timeouts, counted in ticks;
- authentication (``auth=True``): ``CONNECT <user> <password>`` asks
  ``on_auth`` and the connection's input waits until ``auth_result``; a bare
  ``CONNECT`` logs in an identity ``grant`` gave before, else ERROR
  AUTH_REQUIRED; ``grant`` permissions as topic patterns (tokens split on
  ``.``, ``*`` one non-empty token, ``>`` as the last token one or more),
  checked by PUBLISH and SUBSCRIBE, STATS CONNECTIONS for admins only; a new
  grant ends the subscriptions it no longer allows, as UNSUBSCRIBE does.

What it leaves out on purpose:

- memory. ``max_memory`` is accepted and reported, but the model does not
  count bytes: the core's accounting (message records, pooled records, buffer
  capacities) is not something a client can predict byte for byte. Tests that
  compare the two run with a ``max_memory`` large enough never to be reached;
  memory, and publishers held for it, are tested on the core alone (so is a
  framed payload refused because memory cannot hold it)
  (tests/test_core_reliability.py, tests/test_core_acks.py).
- time. The core reads the monotonic clock for NACK delays and ack timeouts,
  which no caller can drive. A message NACKed with a delay is held by the model
  for good (it counts in ``delayed`` and keeps its topic), so tests that
  compare the two use delays that do not pass during a session (or none), and
  no ack timeout (``ack_timeout=0``) or one that sessions never reach; both
  are tested on the core alone (tests/test_core_acks.py) and over the wire
  (tests/test_acks_wire.py).
- figures no client can predict: ``memory_bytes``, the clocks, the core's
  handles (``NOT_STATED``), and which topics or connections a page that is not
  a whole listing holds, and its cursor. A STATS reply still has to be written
  with them, since its length decides flow control further on: ``unstated``,
  when set, gives the core's figures of the same reply (the differential test
  records them), and the model writes its own figures over them.
- how output is split into writer calls: the model makes one call per hand-over
  too, but what it states is each connection's bytes, in order.
- handles: the model numbers its connections 0, 1, 2, ... and never reuses a
  number; a test maps them to the core's by the order connections were opened.
  Where the core's order of handles decides something (connections timing out
  in the same tick), ``tick`` takes that order from the caller.
- which characters count as invisible in topic names follows this Python's
  ``unicodedata``; the core's table is of ``INVISIBLE_UNICODE_VERSION``. They
  differ only for characters assigned between the two versions.

A few orders the protocol leaves open are pinned to the core's choice, each
named where it is used ("pinned:"), so that the comparison stays exact.
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pigeon._core import LIMIT_DEFAULTS
from pigeon.protocol import TOPIC_MAX

Writer = Callable[[bytes], object]
TransportSize = Callable[[], int]

COMMANDS = (
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "ping",
    "disconnect",
    "stats",
    "hello",
    "ack",
    "nack",
    "destroy",
)
FRAMED_COMMANDS = ("req", "reply")  # commands that exist only as frames (a line of that word is unknown)
ERRORS = (
    "usage",
    "unknown_command",
    "not_connected",
    "already_connected",
    "wrong_client_id",
    "bad_topic",
    "not_subscribed",
    "backlog_full",
    "line_too_long",
    "too_many_connections",
    "too_many_subscriptions",
    "too_many_topics",
    "memory_full",
    "idle_timeout",
    "unknown_delivery_tag",
    "storage_full",
    "auth_required",
    "auth_failed",
    "permission_denied",
    "payload_too_large",
    "bad_frame",
    "no_such_group",
    "group_in_use",
    "bad_reply_token",
    "not_enough_replicas",  # only a replicated log refuses so; the model has none
)
# the log's figures of a broker without --data-dir (the model has no log: tests/test_store_wire.py)
NO_LOG = {
    "durable": False,
    "log_disk_bytes": 0,
    "log_records": 0,
    "log_writes": 0,
    "log_syncs": 0,
    "log_unsynced_bytes": 0,
    "log_live_messages": 0,
    "log_write_failed": False,
    "log_recovering": False,
    "log_recovered_messages": 0,
    "log_recovery_done_bytes": 0,
    "log_recovery_total_bytes": 0,
    "log_compacting": False,
    "log_compactions": 0,
    "log_compaction_failures": 0,
    "log_compacted_segments": 0,
    "log_compaction_removed_segments": 0,
    "log_compaction_reclaimed_bytes": 0,
    "log_compaction_last_seconds": 0.0,
    "log_compaction_last_at": 0.0,
}
# figures of the core the model does not state (see the module docstring)
NOT_STATED = frozenset({"uptime_seconds", "memory_bytes", "connected_since", "connected_seconds", "handle"})

PROTOCOL_VERSION = 2  # the newest, chosen by HELLO 2
PUB_USAGE = b"usage: PUB <client_id> <topic> <nbytes>, a line end, the payload, a line end"
REQ_USAGE = b"usage: REQ <client_id> <topic> <nbytes>, a line end, the payload, a line end"
REPLY_USAGE = b"usage: REPLY <token> <nbytes>, a line end, the payload, a line end"
# the frames: their word, how many fields follow it, the command they count as, their usage
FRAMES = {
    b"pub": (3, "publish", PUB_USAGE),
    b"req": (3, "req", REQ_USAGE),
    b"reply": (2, "reply", REPLY_USAGE),
}
REQUEST_WINDOW = 4096  # requests of one connection that wait for a reply; past it the oldest is forgotten
QUOTE_MAX = 64  # the longest input an ERROR quotes
STATS_PAGE_DEFAULT = 100
STATS_PAGE_MAX = 1000
SUBSCRIPTIONS_LISTED = 100
STATS_USAGE = b"usage: STATS [TOPICS|CONNECTIONS [<cursor> [<count>]]]"
CONNECT_USAGE = b"usage: CONNECT [<user> <password>]"
SUBSCRIBE_USAGE = b"usage: SUBSCRIBE <client_id> <topic> [ACK [PREFETCH <n>]]"
ACK_USAGE = b"usage: ACK <client_id> <tag>|<first>-<last>"
NACK_USAGE = b"usage: NACK <client_id> <tag>|<first>-<last> [<delay_ms>]"
UNSUBSCRIBE_USAGE = b"usage: UNSUBSCRIBE <client_id> <topic>"
DESTROY_USAGE = b"usage: DESTROY <client_id> <topic_or_pattern> GROUP <name>"
GROUP_NAME_MAX = 64
GROUP_NAME_RULE = (
    b"group name must be 1 to 64 bytes without whitespace, control, format or separator characters"
)
BAD_PATTERN = b"'>' may only be the last token of a pattern"
PREFETCH_MAX = 1_000_000
NACK_DELAY_MAX = 86_400_000  # a day, in milliseconds
DEAD_SUFFIX = b".dead"
# Unicode categories refused in topic names: control, format, surrogate, separators
INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
BLANKS = b" \t"


@dataclass(eq=False)
class Topic:
    """A topic while anything holds it: its rotation, whose turn is next, its backlog.

    A consumer group is one too, named ``<pattern> <name>`` (``<pattern> `` for the default group of
    a wildcard pattern): its own rotation and backlog.
    """

    name: bytes
    rotation: list[Sub] = field(default_factory=list)
    turn: int = 0  # index in rotation of the next subscriber to try; past the end means the first
    backlog: deque[Message] = field(default_factory=deque)
    in_flight: int = 0  # lines of its messages in some connection's output not yet handed over
    unacked: int = 0  # its messages delivered to acknowledged subscriptions, not settled
    delayed: int = 0  # its messages NACKed with a delay
    waiters: list[Conn] = field(default_factory=list)  # publishers held for its backlog, oldest first
    pins: int = 0  # held for the length of an operation (a subscription leaving, a drain)
    touched: bool = False  # on a list of topics to serve once the operation is done
    published: int = 0
    delivered: int = 0
    acked: int = 0
    nacked: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    warned: bool = False  # backlog-full warning given since the backlog last emptied
    pattern: bytes = b""  # a group: the pattern it subscribes to
    group: bytes | None = None  # a group: its name, None for a plain topic or a wildcard's default group
    registered: bool = False  # a group that messages reach (from its first SUBSCRIBE until it ends)
    serial: int = 0  # a group: when it was registered (copies go to groups in that order)
    idle_since: float = 0.0  # a named group: when its last subscriber left (monotonic), 0 while it has some
    copies: int = 0  # groups' copies of its messages not yet settled or dropped: they keep it

    @property
    def is_group(self) -> bool:
        return bool(self.pattern)


@dataclass(eq=False)
class Message:
    """A message: its body, its topic, and how often it was delivered on an acknowledged subscription."""

    payload: bytes
    topic: Topic  # where it waits: a topic, or a group's copy in its group
    attempt: int = 0
    origin: Topic | None = None  # a group's copy: the topic it was published to
    reply_to: bytes | None = None  # a request: its reply token

    @property
    def name(self) -> bytes:
        """The topic named in its delivery line: the one it was published to."""
        return (self.origin or self.topic).name


@dataclass(eq=False)
class Sub:
    """A subscription: plain, or acknowledged with a prefetch window."""

    topic: Topic
    conn: Conn
    ack: bool = False
    prefetch: int | None = None  # None: plain, no window
    unacked: int = 0
    in_rotation: bool = True

    def can_take(self) -> bool:
        """Whether its prefetch window has room (always, for a plain subscription)."""
        return self.prefetch is None or self.unacked < self.prefetch


@dataclass(eq=False)
class Unacked:
    """A delivery on an acknowledged subscription, outstanding until settled or given back."""

    tag: int
    message: Message
    sub: Sub


@dataclass(eq=False)
class Line:
    """One line of a connection's output not yet handed over; a MESSAGE or DELIVER line knows its message."""

    data: bytes
    topic: Topic | None = None
    message: Message | None = None
    tag: int = 0  # a DELIVER line's delivery tag


@dataclass(eq=False)
class Conn:
    """One connection, as far as its client can tell."""

    handle: int
    writer: Writer
    transport_size: TransportSize | None
    peer: str | None
    rejected: bool = False  # over max_connections
    open: bool = True  # False once closing: no more input, out of every rotation
    paused: bool = False  # its transport is full
    paused_at: int = 0  # the tick it paused at
    starved: bool = False  # skipped for its full batch: served again once that batch is handed over
    reading: bool = True  # whether the server reads it (on_reading)
    silent: int = 0  # ticks since its last read
    client_id: bytes = b""
    unsent: list[Line] = field(default_factory=list)
    held: bytes = b""  # input not run yet: an unfinished line, or lines held while paused or held
    held_topic: Topic | None = None  # its PUBLISH waits for this topic's backlog to drain
    subscriptions: list[Sub] = field(default_factory=list)
    unacked: list[Unacked] = field(default_factory=list)  # outstanding deliveries, in tag order
    next_tag: int = 0  # the last delivery tag given out
    in_transport: int = 0  # what its transport held unsent when last asked
    close_reason: str | None = None  # set while an on_close report waits for the end of a flush
    close_flush: bool = True
    authenticating: bool = False  # its CONNECT <user> <password> waits for auth_result
    granted: bool = False  # grant() gave it an identity
    user: str | None = None
    admin: bool = False
    checked: bool = False  # its PUBLISH and SUBSCRIBE are checked against the patterns below
    may_publish: list[bytes] = field(default_factory=list)
    may_subscribe: list[bytes] = field(default_factory=list)
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    framed: bool = False  # sent HELLO 2: deliveries are MSG and DMSG frames
    skip: int = 0  # payload bytes of a refused PUB still to drop
    slot: int = 0  # the core's handle for it, which reply tokens name
    generation: int = 0  # connections opened before it and it
    requests: int = 0  # the last request id it was given
    waiting: set[int] = field(default_factory=set)  # ids of its requests that wait for a reply

    def unsent_bytes(self) -> int:
        return sum(len(line.data) for line in self.unsent)

    def sub_of(self, t: Topic | None) -> Sub | None:
        """Its subscription to t, if any."""
        return next((s for s in self.subscriptions if s.topic is t), None)


class ModelBroker:
    """The reference model; the constructor takes the core's keyword arguments."""

    def __init__(
        self, *, tick_interval: float = 0.25, auth: bool = False, tls: bool = False, **limits: Any
    ) -> None:
        unknown = set(limits) - set(LIMIT_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown limits {sorted(unknown)}")
        given = {**LIMIT_DEFAULTS, **limits}
        self.limit = given
        self.max_line: int = given["max_line"]
        self.max_backlog: int = given["max_backlog"]
        self.max_backlog_bytes: int = given["max_backlog_bytes"]
        self.max_connections: int = given["max_connections"]
        self.max_subscriptions: int = given["max_subscriptions"]
        self.max_topics: int = given["max_topics"]
        self.max_pending: int = given["max_pending"]
        self.out_batch: int = given["out_batch"]
        self.idle_timeout = float(given["idle_timeout"])
        self.write_timeout = float(given["write_timeout"])
        self.default_prefetch: int = given["default_prefetch"]
        self.max_deliveries: int = given["max_deliveries"]
        self.group_ttl = float(given["group_ttl"])
        self.serials = 0  # groups registered so far
        self.idle_ticks = math.ceil(self.idle_timeout / tick_interval)
        self.write_ticks = math.ceil(self.write_timeout / tick_interval)
        self.on_output: Callable[[], object] | None = None
        self.on_close: Callable[[int, str, bool], object] | None = None
        self.on_reading: Callable[[int, bool], object] | None = None
        self.on_warning: Callable[[str], object] | None = None
        self.on_auth: Callable[[int, bytes, bytes], object] | None = None
        self.auth = auth
        self.tls = tls
        self.max_payload: int = given["max_payload"]
        self.conns: dict[int, Conn] = {}
        self.topics_held: dict[bytes, Topic] = {}
        self.next_handle = 0
        self.free_slots: list[int] = []  # the core's free handles, the last freed on top
        self.slots = 0  # core handles ever used
        self.request: bytes | None = None  # the reply token of the request being routed now
        self.next_client = 1
        self.ticks = 0
        # connections whose output waits for a flush, in the order it began to wait
        self.waiting: list[Conn] = []
        # connections the broker closed, to report through on_close at the end of a flush
        self.closing: list[Conn] = []
        # publishers whose held PUBLISH goes on at the next flush, in that order
        self.woken: list[Conn] = []
        self.delayed: list[Message] = []  # NACKed with a delay (see the module docstring)
        self.flushing = False  # in flush(), or in a writer: calls from callbacks leave the flush to it
        self.flush_asked = False
        # the core's figures of the next STATS reply, for what the model does not state
        self.unstated: Callable[[], dict[str, Any]] | None = None
        self.commands = dict.fromkeys((*COMMANDS, *FRAMED_COMMANDS, "unknown"), 0)
        self.errors = dict.fromkeys(ERRORS, 0)
        self.count = dict.fromkeys(
            (
                "connections_total",
                "published",
                "delivered",
                "backlogged",
                "refused",
                "connections_rejected",
                "idle_closed",
                "write_timeouts",
                "requeued",
                "read_pauses",
                "bytes_in",
                "bytes_out",
                "slow_consumers",
                "acks",
                "nacks",
                "redelivered",
                "ack_timeouts",
                "dead_lettered",
                "dead_letters_dropped",
                "publish_holds",
                "auth_failures",
                "logins",
                "v1_altered",
                "groups_expired",
                "groups_destroyed",
                "group_copies_dropped",
                "requests",
                "replies",
                "replies_dropped",
                "replies_malformed",
                "requests_forgotten",
            ),
            0,
        )

    # ---------------------------------------------------------------- the core's calls

    def open(
        self, writer: Writer, peer: str | None = None, transport_size: TransportSize | None = None
    ) -> int:
        """A new connection; one over max_connections gets an ERROR and is closed."""
        c = Conn(self.next_handle, writer, transport_size, peer)
        self.next_handle += 1
        c.generation = self.next_handle
        if self.free_slots:
            c.slot = self.free_slots.pop()
        else:
            c.slot = self.slots
            self.slots += 1
        admitted = sum(1 for other in self.conns.values() if not other.rejected)
        self.conns[c.handle] = c
        self.count["connections_total"] += 1
        if admitted >= self.max_connections:
            c.rejected = True
            self.count["connections_rejected"] += 1
            reason = f"too many connections (limit {self.max_connections})"
            self._error(c, "too_many_connections", reason.encode())
            self._close_later(c, reason, flush=True)
        self._settle()
        return c.handle

    def read(self, h: int, data: bytes) -> None:
        """Bytes read from the socket (the core's get_buffer and buffer_updated)."""
        c = self.conns[h]
        c.bytes_in += len(data)
        self.count["bytes_in"] += len(data)
        c.silent = 0
        if c.open:
            if c.reading:
                self._run_input(c, c.held + data)
            else:
                c.held += data  # a read already under way when reading stopped
        self._settle()

    def feed(self, h: int, data: bytes) -> bool:
        """A read followed by a flush; whether the connection is still open."""
        c = self.conns[h]
        if c.open:
            self.read(h, data)
        self.flush()
        return c.open

    def flush(self) -> None:
        """Hand every waiting connection its output, then report the connections the broker closed."""
        if self.flushing:
            return
        self.flushing = True
        self.flush_asked = False
        try:
            while self.waiting or self.closing or self.woken:
                while self.woken:
                    self._continue(self.woken.pop(0))
                while self.waiting:
                    self._flush_one(self.waiting.pop(0))
                if self.closing:
                    self._report_close(self.closing.pop(0))
        finally:
            self.flushing = False

    def eof(self, h: int) -> None:
        """The client sent FIN: it leaves every rotation, its messages go back, its replies go out now."""
        c = self.conns[h]
        if c.open:
            self._leave_connection(c, "cut_all")
            self._hand_over(c)
        self._settle()

    def pause(self, h: int) -> None:
        """The transport is full: skipped by every rotation, not read, output kept."""
        c = self.conns[h]
        if not c.paused:
            c.paused = True
            c.paused_at = self.ticks
            if c.open:
                # the next flush checks max_pending against what the transport holds now
                self._ask_transport(c)
                self._wait(c)
                self._stop_reading(c)
        self._settle()

    def resume(self, h: int) -> None:
        """The transport drained: output goes out, backlogs are served, held input runs, reading restarts."""
        c = self.conns[h]
        c.paused = False
        if c.unsent:
            self._wait(c)
        if c.open:
            self._serve_subscriptions(c)
            self._continue(c)
        self._settle()

    def close(self, h: int) -> None:
        """The socket is gone: messages it was never handed go back; it is forgotten."""
        c = self.conns[h]
        self._leave_connection(c, "drop")
        if c in self.waiting:
            self.waiting.remove(c)
        if c in self.closing:
            self.closing.remove(c)
        del self.conns[h]
        self.free_slots.append(c.slot)
        self._settle()

    def tick(self, order: Iterable[int] | None = None) -> None:
        """One tick: idle and write timeouts; ``order`` is the order to visit the connections in.

        The core visits them by handle, which the model does not state; without
        ``order`` they are visited in the order they were opened.
        """
        self.ticks += 1
        for h in list(self.conns) if order is None else list(order):
            c = self.conns.get(h)
            if c is None or not c.open:
                continue
            if c.in_transport:
                unsent = c.in_transport
                self._ask_transport(c)
                if c.in_transport < unsent:
                    c.paused_at = self.ticks  # its output is moving: the write timeout counts from here
            if self.write_ticks and c.paused and self.ticks - c.paused_at > self.write_ticks:
                self.count["write_timeouts"] += 1
                self._close_later(
                    c, f"write timeout: output not taken for {self.write_timeout:g} s", flush=False
                )
            elif self.idle_ticks and c.reading:
                c.silent += 1
                if c.silent > self.idle_ticks:
                    self.count["idle_closed"] += 1
                    self._error(c, "idle_timeout", b"idle timeout")
                    self._close_later(c, "idle timeout", flush=not c.paused)
        now = time.monotonic()
        for g in self._groups():
            if (
                g.group is not None
                and not g.rotation
                and g.idle_since
                and now - g.idle_since >= self.group_ttl
            ):
                self.count["groups_expired"] += 1
                self._end_group(g)
        self._settle()

    def grant(self, h: int, user: str, publish: list[str], subscribe: list[str], admin: bool = False) -> None:
        """Set h's identity and permissions; once connected, its subscriptions no longer allowed end."""
        c = self.conns[h]
        c.granted, c.user, c.admin, c.checked = True, user, admin, not admin
        c.may_publish = [p.encode() for p in publish]
        c.may_subscribe = [p.encode() for p in subscribe]
        if c.client_id and c.checked and c.open:
            i = 0
            while i < len(c.subscriptions):
                s = c.subscriptions[i]
                subscribed = s.topic.pattern or s.topic.name  # a group: its topic or pattern
                if any(pattern_matches(p, subscribed) for p in c.may_subscribe):
                    i += 1
                    continue
                name = subscribed.decode("utf-8", "replace")
                who = f"user {user!r} ({c.client_id.decode()})"
                self._warn(f"{who}: subscription to {name!r} ended: no longer allowed")
                # as UNSUBSCRIBE: out of the rotation, what it holds back to the others; pinned: the
                # connection's last subscription takes its place in the list
                self._leave_rotation(s)
                self._give_back_unacked(c, s)
                self._free_sub(s)
        self._settle()

    def auth_result(self, h: int, ok: bool) -> None:
        """The answer to h's CONNECT with credentials: CONNECTED and its input goes on, or AUTH_FAILED and
        it closes. One that asked nothing (closed meanwhile) is left alone."""
        c = self.conns.get(h)
        if c is not None:
            self._answer(c, ok)
        self._settle()

    def _answer(self, c: Conn, ok: bool) -> None:
        if not c.authenticating:
            return
        c.authenticating = False
        if not c.open:
            return
        if ok:
            self._connect(c, login=True)
            self._continue(c)
        else:
            self.count["auth_failures"] += 1
            self._error(c, "auth_failed", b"authentication failed")
            self._close_later(c, "authentication failed", flush=True)

    def flush_due(self) -> bool:
        """Whether output or a close report waits for a flush."""
        return bool(self.waiting or self.closing or self.woken)

    # ---------------------------------------------------------------- reports

    def client_id(self, h: int) -> str | None:
        """The id CONNECT gave h, or None."""
        cid = self.conns[h].client_id
        return cid.decode() if cid else None

    def topic_info(self, name: bytes) -> tuple[int, int] | None:
        """(subscribers, backlog messages), or None when the broker holds no such topic."""
        t = self.topics_held.get(name)
        return None if t is None else (len(t.rotation), len(t.backlog))

    @property
    def limits(self) -> dict[str, Any]:
        """Every limit, by keyword."""
        return dict(self.limit)

    def stats(self) -> dict[str, Any]:
        """The server-wide figures, but for those in NOT_STATED."""
        return {
            "connections": len(self.conns),
            "topics": sum(1 for t in self.topics_held.values() if not t.is_group),
            "groups": len(self._groups()),
            "wildcard_subscriptions": sum(
                1 for c in self.conns.values() for s in c.subscriptions if is_pattern(s.topic.pattern)
            ),
            "backlog_messages": sum(len(t.backlog) for t in self.topics_held.values()),
            "backlog_bytes": sum(map(len, self._backlogged())),
            "memory_in_transports_bytes": sum(c.in_transport for c in self.conns.values()),
            "memory_limit_bytes": self.limit["max_memory"],
            "commands": dict(self.commands),
            "errors": dict(self.errors),
            "lost": 0,  # only an allocation that fails loses a message
            "reading_paused": sum(1 for c in self.conns.values() if not c.reading),
            "unacked": sum(len(c.unacked) for c in self.conns.values()),
            "delayed": len(self.delayed),
            "publishers_held": sum(1 for c in self.conns.values() if c.held_topic is not None),
            **self.count,
            **NO_LOG,
            "disk_limit_bytes": self.limit.get("max_disk", 0),
        }

    def topics(self, cursor: int = 0, count: int = STATS_PAGE_DEFAULT) -> dict[str, Any]:
        """A page of topics in name order; the cursor is a position in that order."""
        names = sorted(name for name, t in self.topics_held.items() if not t.is_group)
        page = names[cursor : cursor + count]
        after = cursor + count
        return {
            "topics": [self._topic_entry(self.topics_held[name]) for name in page],
            "next": after if after < len(names) else 0,
        }

    def groups(self, cursor: int = 0, count: int = STATS_PAGE_DEFAULT) -> dict[str, Any]:
        """A page of the registered groups, newest first; the cursor is the registration serial of the
        last one listed (0: from the newest)."""
        newest_first = [g for g in reversed(self._groups()) if not cursor or g.serial < cursor]
        page = newest_first[:count]
        return {
            "groups": [self._group_entry(g) for g in page],
            "next": page[-1].serial if len(newest_first) > count else 0,
        }

    def connections(self, cursor: int = 0, count: int = STATS_PAGE_DEFAULT) -> dict[str, Any]:
        """A page of connections in the order they opened; the cursor is a handle."""
        handles = [h for h in self.conns if h >= cursor]
        return {
            "connections": [self._conn_entry(self.conns[h]) for h in handles[:count]],
            "next": handles[count] if len(handles) > count else 0,
        }

    def _backlogged(self) -> Iterable[bytes]:
        for t in self.topics_held.values():
            yield from (m.payload for m in t.backlog)

    def _topic_entry(self, t: Topic) -> dict[str, Any]:
        entry = self._topic_figures(t)
        groups = self._groups_of(t)
        if groups:
            entry["groups"] = [self._group_entry(g) for g in groups]
        return entry

    def _group_entry(self, g: Topic) -> dict[str, Any]:
        return {
            "pattern": g.pattern.decode("utf-8", "replace"),
            "group": None if g.group is None else g.group.decode("utf-8", "replace"),
            "subscribers": len(g.rotation),
            "backlog_messages": len(g.backlog),
            "backlog_bytes": sum(len(m.payload) for m in g.backlog),
            "delivered": g.delivered,
            "unacked": g.unacked,
            "acked": g.acked,
            "redelivered": g.redelivered,
        }

    def _topic_figures(self, t: Topic) -> dict[str, Any]:
        return {
            "name": t.name.decode("utf-8", "replace"),
            "subscribers": len(t.rotation),
            "backlog_messages": len(t.backlog),
            "backlog_bytes": sum(len(m.payload) for m in t.backlog),
            "published": t.published,
            "delivered": t.delivered,
            "unacked": t.unacked,
            "acked": t.acked,
            "nacked": t.nacked,
            "redelivered": t.redelivered,
            "dead_lettered": t.dead_lettered,
        }

    def _conn_entry(self, c: Conn) -> dict[str, Any]:
        names = sorted(s.topic.name.decode("utf-8", "replace") for s in c.subscriptions)
        return {
            "handle": c.handle,
            "client_id": c.client_id.decode() if c.client_id else None,
            "user": c.user,
            "address": c.peer,
            "protocol": 2 if c.framed else 1,
            "subscriptions": names[:SUBSCRIPTIONS_LISTED],
            "subscriptions_total": len(names),
            "pending_bytes": c.unsent_bytes() + c.in_transport,
            "messages_in": c.messages_in,
            "messages_out": c.messages_out,
            "bytes_in": c.bytes_in,
            "bytes_out": c.bytes_out,
            "closing": not c.open,
            "paused": c.paused,
            "held": c.held_topic is not None,
            "unacked": len(c.unacked),
        }

    # ---------------------------------------------------------------- input

    def _run_input(self, c: Conn, buf: bytes) -> None:
        """Run the complete lines while c can go on (not paused, no PUBLISH held); keep the rest."""
        pos = 0
        too_long = False
        while pos < len(buf) and c.open and not c.paused and c.held_topic is None and not c.authenticating:
            if c.skip:
                dropped = min(c.skip, len(buf) - pos)
                c.skip -= dropped
                pos += dropped
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                too_long = len(buf) - pos > self.max_line
                break
            if nl - pos > self.max_line:
                too_long = True
                break
            word = _frame_word(buf, pos, nl)
            if word:
                end = self._frame(c, buf, pos, nl, word)
                if end is None:
                    break  # its payload has not all arrived, or it waits for flow control
                pos = end
            else:
                if self._dispatch(c, buf[pos:nl]):
                    break  # a PUBLISH waits, with the rest
                pos = nl + 1
                if c.authenticating:
                    break  # the CONNECT ran; the rest waits for its answer
            # a connection's own output passing a batch goes out at once, so its transport can say it is full
            if c.open and c.unsent_bytes() >= self.out_batch:
                self._hand_over(c)
        if too_long and c.open:
            self._error(c, "line_too_long", b"line too long (limit %d bytes)" % self.max_line)
            self._close_later(c, "line too long", flush=True)
        if not c.open:
            c.held = b""
            return
        c.held = buf[pos:]
        if c.paused or c.held_topic is not None or c.authenticating:
            self._stop_reading(c)

    def _frame(self, c: Conn, buf: bytes, pos: int, nl: int, word: bytes) -> int | None:
        """A frame (PUB, REQ or REPLY: ``word``) whose header is buf[pos:nl]: where the input goes on
        after it, or None when its payload (and the line end after it) has not all arrived, or when
        it waits."""
        fields, kind, usage = FRAMES[word]
        header = buf[pos + len(word) : nl]
        if header.endswith(b"\r"):
            header = header[:-1]
        args = _fields(header)
        if len(args) != fields or not (args[-1].isdigit() and len(args[-1]) <= 18):
            self.commands[kind] += 1
            self._error(c, "bad_frame", usage)
            self._close_later(c, "bad frame", flush=True)
            return nl + 1
        count = int(args[-1])
        if count > self.max_payload:
            self.commands[kind] += 1
            self.count["refused"] += 1
            self._error(
                c,
                "payload_too_large",
                b"payload of %d bytes is over the limit of %d bytes" % (count, self.max_payload),
            )
            c.skip = count
            return nl + 1
        end = nl + 1 + count
        if end >= len(buf) or (buf[end] == 0x0D and end + 1 >= len(buf)):
            return None
        if buf[end] == 0x0A:
            after = end + 1
        elif buf[end : end + 2] == b"\r\n":
            after = end + 2
        else:
            self.commands[kind] += 1
            self._error(c, "bad_frame", b"payload of %d bytes is not followed by a line end" % count)
            self._close_later(c, "bad frame", flush=True)
            return nl + 1
        payload = buf[nl + 1 : end]
        if kind == "reply":
            self._on_reply(c, args[0], payload)
        elif self._on_pub(c, args[0], args[1], payload, request=kind == "req"):
            return None
        self.commands[kind] += 1
        return after

    def _continue(self, c: Conn) -> None:
        """c can go on (its transport drained, or its PUBLISH may proceed): run its input, read it again."""
        if not c.open or c.paused or c.held_topic is not None or c.authenticating:
            return
        held, c.held = c.held, b""
        if held:
            self._run_input(c, held)
        if c.open and not c.reading and not c.paused and c.held_topic is None and not c.authenticating:
            c.reading = True
            if self.on_reading is not None:
                self.on_reading(c.handle, True)

    def _stop_reading(self, c: Conn) -> None:
        if c.reading:
            c.reading = False
            self.count["read_pauses"] += 1
            if self.on_reading is not None:
                self.on_reading(c.handle, False)

    def _dispatch(self, c: Conn, line: bytes) -> bool:
        """Run one command line; True when it is a PUBLISH that waits (flow control)."""
        if line.endswith(b"\r"):
            line = line[:-1]
        word, rest = _split_field(line)
        if not word:
            return False  # blank lines are ignored
        kind = word.lower().decode("latin-1")
        if kind not in COMMANDS:
            self.commands["unknown"] += 1
            self._error_quoting(c, "unknown_command", b"unknown command", word)
            return False
        if kind == "publish":
            held = self._on_publish(c, rest)
            if not held:
                self.commands[kind] += 1  # one that waits is counted when it runs
            return held
        self.commands[kind] += 1
        args = _fields(rest)
        if kind == "ack":
            self._on_ack(c, args)
        elif kind == "nack":
            self._on_nack(c, args)
        elif kind == "subscribe":
            self._on_subscribe(c, args)
        elif kind == "unsubscribe":
            self._on_unsubscribe(c, args)
        elif kind == "connect":
            self._on_connect(c, args)
        elif kind == "stats":
            self._on_stats(c, args)
        elif kind == "hello":
            self._on_hello(c, args)
        elif kind == "destroy":
            self._on_destroy(c, args)
        elif args:
            self._error(c, "usage", b"usage: " + kind.upper().encode())
        elif kind == "ping":
            self._reply(c, b"PONG")
        else:
            self._reply(c, b"DISCONNECTED")
            self._close_later(c, "", flush=True)
        return False

    def _on_hello(self, c: Conn, args: list[bytes]) -> None:
        if len(args) > 1 or (args and args[0] not in (b"1", b"2")):
            self._error(c, "usage", b"usage: HELLO [1|2]")
            return
        if args:
            c.framed = args[0] == b"2"
        about = {
            "protocol": 2 if c.framed else 1,
            "max_line": self.max_line,
            "topic_max": TOPIC_MAX,
            "idle_timeout": self.idle_timeout,
            "max_payload": self.max_payload,
            "features": [
                "ack",
                "binary",
                "groups",
                "wildcards",
                "request",
                *(["auth"] if self.auth else []),
                *(["tls"] if self.tls else []),
            ],
        }
        self._reply(c, b"HELLO " + json.dumps(about, separators=(",", ":")).encode())

    # ---------------------------------------------------------------- commands

    def _on_connect(self, c: Conn, args: list[bytes]) -> None:
        if len(args) not in (0, 2):
            self._error(c, "usage", CONNECT_USAGE)
        elif c.client_id:
            self._error_quoting(c, "already_connected", b"already connected as", c.client_id)
        elif not self.auth:
            self._connect(c, login=False)  # credentials, if any, are ignored
        elif args:
            c.authenticating = True
            if self.on_auth is None:
                self._answer(c, False)  # nothing can check the password
            else:
                self.on_auth(c.handle, args[0], args[1])
        elif c.granted:
            self._connect(c, login=True)
        else:
            self._error(c, "auth_required", b"authentication required")

    def _connect(self, c: Conn, *, login: bool) -> None:
        c.client_id = b"c%d" % self.next_client
        self.next_client += 1
        if login:
            self.count["logins"] += 1
            c.checked = not c.admin
        self._reply(c, b"CONNECTED " + c.client_id)

    def _may(self, c: Conn, patterns: list[bytes], name: bytes) -> bool:
        """Whether c may use topic ``name`` (when its permissions are checked); else the ERROR."""
        if not c.checked or any(pattern_matches(p, name) for p in patterns):
            return True
        self._error_quoting(c, "permission_denied", b"permission denied for", name)
        return False

    def _connected(self, c: Conn) -> bool:
        if not c.client_id:
            self._error(c, "not_connected", b"not connected: send CONNECT first")
        return bool(c.client_id)

    def _own_id(self, c: Conn, cid: bytes) -> bool:
        if not self._connected(c):
            return False
        if cid != c.client_id:
            self._error_quoting(c, "wrong_client_id", b"client id does not belong to this connection:", cid)
            return False
        return True

    def _valid_topic(self, c: Conn, name: bytes) -> bool:
        problem = topic_problem(name)
        if problem:
            self._error(c, "bad_topic", problem)
        return not problem

    def _new_topic(self, c: Conn, name: bytes) -> Topic | None:
        if len(self.topics_held) >= self.max_topics:
            self._error(c, "too_many_topics", b"too many topics (limit %d)" % self.max_topics)
            return None
        t = self.topics_held[name] = Topic(name)
        return t

    def _on_subscribe(self, c: Conn, args: list[bytes]) -> None:
        if len(args) < 2:
            self._error(c, "usage", SUBSCRIBE_USAGE)
            return
        cid, name, *options = args
        ok, group = self._group_option(c, options, SUBSCRIBE_USAGE)
        if not ok:
            return
        mode = self._subscribe_options(c, options)
        if (
            mode is None
            or not self._own_id(c, cid)
            or not self._valid_topic(c, name)
            or not self._may(c, c.may_subscribe, name)
            or not self._valid_pattern(c, name)
        ):
            return
        ack, prefetch = mode
        grouped = group is not None or is_pattern(name)
        key = name + b" " + (group or b"") if grouped else name
        t = self.topics_held.get(key)
        s = c.sub_of(t)
        if s is not None:
            t = s.topic
        else:
            if len(c.subscriptions) >= self.max_subscriptions:
                limit = b"too many subscriptions on this connection (limit %d)" % self.max_subscriptions
                self._error(c, "too_many_subscriptions", limit)
                return
            if t is None:
                t = self._new_topic(c, key)
                if t is None:
                    return
                if grouped:
                    t.pattern, t.group = name, group
            if grouped:
                self._register(t)
            s = Sub(t, c)
            t.rotation.append(s)
            c.subscriptions.append(s)
        # subscribing again keeps the turn and sets the mode and the window
        s.ack, s.prefetch = ack, prefetch
        self._reply(c, b"SUBSCRIBED " + name)
        self._serve(t)

    def _group_option(self, c: Conn, options: list[bytes], usage: bytes) -> tuple[bool, bytes | None]:
        """Take a leading ``GROUP <name>`` off options: (True, the name or None when there is none), or
        (False, None) after the ERROR."""
        if not options or options[0].lower() != b"group":
            return True, None
        if len(options) < 2:
            self._error(c, "usage", usage)
            return False, None
        name = options[1]
        if len(name) > GROUP_NAME_MAX or topic_problem(name):
            self._error(c, "bad_topic", GROUP_NAME_RULE)
            return False, None
        del options[:2]
        return True, name

    def _valid_pattern(self, c: Conn, name: bytes) -> bool:
        if b">" in name.split(b".")[:-1]:
            self._error(c, "bad_topic", BAD_PATTERN)
            return False
        return True

    def _subscribe_options(self, c: Conn, options: list[bytes]) -> tuple[bool, int | None] | None:
        """(acknowledged, prefetch) from nothing, ``ACK`` or ``ACK PREFETCH <n>``; None after the ERROR."""
        if not options:
            return False, None
        if options[0].lower() == b"ack":
            if len(options) == 1:
                return True, self.default_prefetch
            if len(options) == 3 and options[1].lower() == b"prefetch":
                n = _count(options[2])
                if n is not None and 1 <= n <= PREFETCH_MAX:
                    return True, n
                self._error(c, "usage", b"prefetch must be 1 to %d" % PREFETCH_MAX)
                return None
        self._error(c, "usage", SUBSCRIBE_USAGE)
        return None

    def _on_unsubscribe(self, c: Conn, args: list[bytes]) -> None:
        if len(args) < 2:
            self._error(c, "usage", UNSUBSCRIBE_USAGE)
            return
        cid, name, *options = args
        ok, group = self._group_option(c, options, UNSUBSCRIBE_USAGE)
        if not ok:
            return
        if options:
            self._error(c, "usage", UNSUBSCRIBE_USAGE)
            return
        if not self._own_id(c, cid) or not self._valid_topic(c, name):
            return
        grouped = group is not None or is_pattern(name)
        s = c.sub_of(self.topics_held.get(name + b" " + (group or b"") if grouped else name))
        if s is None:
            self._error_quoting(c, "not_subscribed", b"not subscribed to", name)
            return
        self._reply(c, b"UNSUBSCRIBED " + name)
        # out of the rotation first, so that what it did not acknowledge goes to someone else
        self._leave_rotation(s)
        self._give_back_unacked(c, s)
        self._free_sub(s)

    def _on_publish(self, c: Conn, rest: bytes) -> bool:
        """PUBLISH; True when it waits for flow control."""
        cid, rest = _split_field(rest)
        name, rest = _split_field(rest)
        if not name or not rest:
            self._error(c, "usage", b"usage: PUBLISH <client_id> <topic> <message>")
            return False
        if not self._own_id(c, cid):
            return False
        return self._publish(c, name, rest[1:])  # everything after the one separator that ends the topic

    def _on_pub(self, c: Conn, cid: bytes, name: bytes, payload: bytes, *, request: bool) -> bool:
        """A framed PUB (or REQ: ``request``) with its payload; True when it waits for flow control."""
        if not self._own_id(c, cid):
            return False
        if not request:
            return self._publish(c, name, payload)
        self.request = b"%d.%d.%d" % (c.slot, c.generation, c.requests + 1)
        try:
            return self._publish(c, name, payload)
        finally:
            self.request = None

    def _on_reply(self, c: Conn, token: bytes, payload: bytes) -> None:
        """A framed REPLY: to the requester as RMSG when its request waits; else dropped and counted."""
        if not self._connected(c):
            return
        parts = token.split(b".")
        numbers = [int(p) if p.isdigit() and len(p) <= 18 else -1 for p in parts]
        if (
            len(parts) != 3
            or min(numbers) < 0
            or numbers[0] > 0x7FFFFFFF
            or numbers[1] > 0xFFFFFFFF
            or not numbers[2]
        ):
            self.count["replies_malformed"] += 1
            self._error_quoting(c, "bad_reply_token", b"not a reply token:", token)
            return
        slot, generation, request_id = numbers
        to = next((o for o in self.conns.values() if o.slot == slot and o.open), None)
        if to is None or to.generation != generation or request_id not in to.waiting:
            self.count["replies_dropped"] += 1
            return
        to.waiting.discard(request_id)
        self.count["replies"] += 1
        self._reply(to, b"RMSG %d %d\n%s" % (request_id, len(payload), payload))

    def _publish(self, c: Conn, name: bytes, message: bytes) -> bool:
        """Route a message of a PUBLISH or PUB whose sender is checked; True when it waits."""
        t = self.topics_held.get(name)
        if t is None:
            if not self._valid_topic(c, name) or not self._may(c, c.may_publish, name):
                return False
            t = self._new_topic(c, name)
            if t is None:
                return False
        elif not self._may(c, c.may_publish, name):
            return False
        groups = self._groups_of(t)
        if groups:
            return self._publish_groups(c, t, groups, message)
        if not t.backlog:
            to = self._next_taker(t)
            if to is not None:
                self._accepted(c, t)
                self._deliver(to, Message(message, t, reply_to=self.request))
                return False
        if self._backlog_at_limit(t):
            return self._hold_or_refuse(c, t, t)
        t.backlog.append(Message(message, t, reply_to=self.request))
        self.count["backlogged"] += 1
        self._accepted(c, t)
        self._serve(t)
        return False

    def _hold_or_refuse(self, c: Conn, q: Topic, t: Topic) -> bool:
        """A message of c to topic t finds the backlog of q (t, or one of its groups) full: c waits
        for it (True), unless it is subscribed to q itself, as waiting for a backlog it drains
        could deadlock it (ERROR BACKLOG_FULL, False). t, made for this PUBLISH, goes when unused."""
        self._warn_full(q)
        if c.sub_of(q) is None:
            c.held_topic = q
            q.waiters.append(c)
            self.count["publish_holds"] += 1
            self._forget_if_unused(t)  # the PUBLISH runs again later
            return True
        self.count["refused"] += 1
        full = self._backlog_full_text(q).encode() + b" for topic"
        self._error_quoting(c, "backlog_full", full, q.name)
        self._forget_if_unused(t)
        return False

    def _backlog_at_limit(self, t: Topic) -> bool:
        """A message for t's backlog waits: max_backlog messages, or some holding max_backlog_bytes."""
        held = sum(len(m.payload) for m in t.backlog)
        return len(t.backlog) >= self.max_backlog or (bool(t.backlog) and held >= self.max_backlog_bytes)

    def _backlog_full_text(self, t: Topic) -> str:
        if len(t.backlog) >= self.max_backlog:
            return f"backlog full ({self.max_backlog} messages)"
        return f"backlog full ({self.max_backlog_bytes} bytes)"

    def _publish_groups(self, c: Conn, t: Topic, groups: list[Topic], payload: bytes) -> bool:
        """A copy to each group, and to t itself when it has subscribers; True when it waits: every
        backlog is checked before anything changes."""
        targets = groups + ([t] if t.rotation else [])
        for q in targets:
            if self._backlog_at_limit(q):
                return self._hold_or_refuse(c, q, t)
        self._accepted(c, t)
        for q in targets:
            if q is not t:
                q.published += 1
            copy = Message(payload, q, origin=t if q is not t else None, reply_to=self.request)
            if q is not t:
                t.copies += 1
            to = self._next_taker(q) if not q.backlog else None
            if to is not None:
                self._deliver(to, copy)
                continue
            q.backlog.append(copy)
            self.count["backlogged"] += 1
            self._serve(q)
        return False

    def _on_destroy(self, c: Conn, args: list[bytes]) -> None:
        if len(args) < 2:
            self._error(c, "usage", DESTROY_USAGE)
            return
        cid, name, *options = args
        ok, group = self._group_option(c, options, DESTROY_USAGE)
        if not ok:
            return
        if group is None or options:
            self._error(c, "usage", DESTROY_USAGE)
            return
        if (
            not self._own_id(c, cid)
            or not self._valid_topic(c, name)
            or not self._may(c, c.may_subscribe, name)
        ):
            return
        g = self.topics_held.get(name + b" " + group)
        if g is None or not g.registered:
            self._error_quoting(c, "no_such_group", b"no such group on", name)
            return
        if g.rotation:
            self._error_quoting(c, "group_in_use", b"group has %d subscriber(s) on" % len(g.rotation), name)
            return
        self.count["groups_destroyed"] += 1
        g.pins += 1
        self._end_group(g)
        self._reply(c, b"DESTROYED " + g.name)
        g.pins -= 1
        self._forget_if_unused(g)

    # ---------------------------------------------------------------- groups

    def _groups(self) -> list[Topic]:
        """The registered groups, in the order they were registered."""
        return sorted((t for t in self.topics_held.values() if t.registered), key=lambda g: g.serial)

    def _groups_of(self, t: Topic) -> list[Topic]:
        """The groups whose pattern matches t's name, in the order they were registered."""
        return [g for g in self._groups() if pattern_matches(g.pattern, t.name)]

    def _register(self, g: Topic) -> None:
        g.idle_since = 0.0
        if not g.registered:
            self.serials += 1
            g.registered, g.serial = True, self.serials

    def _end_group(self, g: Topic) -> None:
        """g ends: no message reaches it any more; its backlog is dropped, its publishers woken."""
        g.registered = False
        self.count["group_copies_dropped"] += len(g.backlog)
        dropped = list(g.backlog)
        g.backlog.clear()
        for message in dropped:
            self._copy_done(message)
        if g.waiters:
            self._wake(g)
        self._forget_if_unused(g)

    def _back_to(self, message: Message) -> bool:
        """Whether a copy coming back can go to its group (False: the group ended, it is dropped)."""
        t = message.topic
        if t.is_group and not t.registered:
            self.count["group_copies_dropped"] += 1
            self._copy_done(message)
            return False
        return True

    def _copy_done(self, message: Message) -> None:
        """A group's copy is settled or dropped: it holds its topic no more."""
        origin, message.origin = message.origin, None
        if origin is not None:
            origin.copies -= 1
            self._forget_if_unused(origin)

    def _warn_full(self, t: Topic) -> None:
        """Tell the operator once, until the backlog empties again."""
        if not t.warned:
            t.warned = True
            self._warn(
                f"topic {t.name.decode('utf-8', 'replace')!r}: {self._backlog_full_text(t)}: "
                "publishers wait until a subscriber drains it"
            )

    def _accepted(self, c: Conn, t: Topic) -> None:
        t.published += 1
        self.count["published"] += 1
        c.messages_in += 1
        if self.request is None:
            self._reply(c, b"PUBLISHED " + t.name)
            return
        c.requests += 1
        forgotten = {i for i in c.waiting if i <= c.requests - REQUEST_WINDOW}
        self.count["requests_forgotten"] += len(forgotten)
        c.waiting -= forgotten
        c.waiting.add(c.requests)
        self.count["requests"] += 1
        self._reply(c, b"REQUESTED %d" % c.requests)

    def _on_stats(self, c: Conn, args: list[bytes]) -> None:
        if not self._connected(c):
            return
        if not args:
            figures = self.stats()
            if self.unstated is not None:
                figures = _overlay(self.unstated(), figures)
            self._reply(c, b"STATS " + _json(figures))
            return
        section = args[0].lower().decode("latin-1")
        numbers = [_count(arg) for arg in args[1:]]
        cursor = numbers[0] if numbers else 0
        count = numbers[1] if len(numbers) > 1 else STATS_PAGE_DEFAULT
        if (
            section not in ("topics", "connections", "groups")
            or len(args) > 3
            or cursor is None
            or count is None
            or not 1 <= count <= STATS_PAGE_MAX
        ):
            self._error(c, "usage", STATS_USAGE)
            return
        if section == "connections" and self.auth and not c.admin:
            self._error(c, "permission_denied", b"permission denied")
            return
        self._reply(c, b"STATS " + _json(self._page(section, cursor, count)))

    def _page(self, section: str, cursor: int, count: int) -> dict[str, Any]:
        """A STATS page: the model's own, or the core's choice of entries with the model's figures."""
        if section == "groups":
            if self.unstated is not None:
                self.unstated()  # the core's reply, which the model states whole
            return self.groups(cursor, count)
        if self.unstated is None:
            return self.topics(cursor, count) if section == "topics" else self.connections(cursor, count)
        key = "name" if section == "topics" else "address"
        every = (
            self.topics(0, len(self.topics_held) + 1) if section == "topics" else self.connections(0, 1 << 31)
        )
        mine = {entry[key]: entry for entry in every[section]}
        theirs = self.unstated()
        listed = [_overlay(entry, mine.get(entry[key], {})) for entry in theirs.get(section, [])]
        if cursor == 0 and count > len(mine):
            # a whole listing holds every one, in whatever order
            named = {entry[key] for entry in listed}
            listed += [entry for name, entry in mine.items() if name not in named]
            return {section: listed, "next": 0}
        return {section: listed, "next": theirs.get("next")}

    # ---------------------------------------------------------------- acknowledgements

    def _tag_range(self, c: Conn, args: list[bytes], usage: bytes) -> tuple[int, int] | None:
        """``<first>, <last>`` from ``<tag>`` or ``<first>-<last>`` after the own id; None after the ERROR."""
        if len(args) < 2:
            self._error(c, "usage", usage)
            return None
        cid, spec = args[0], args[1]
        first, dash, rest = spec.partition(b"-")
        a = _count(first)
        z = _count(rest) if dash else a
        if a is None or z is None or a == 0 or z < a:
            self._error(c, "usage", usage)
            return None
        if not self._own_id(c, cid):
            return None
        return a, z

    def _unknown_tags(self, c: Conn, first: int, last: int) -> None:
        spec = b"%d" % first if first == last else b"%d-%d" % (first, last)
        self._error(c, "unknown_delivery_tag", b"unknown delivery tag " + spec)

    def _on_ack(self, c: Conn, args: list[bytes]) -> None:
        tags = self._tag_range(c, args, ACK_USAGE)
        if tags is None:
            return
        if len(args) > 2:
            self._error(c, "usage", ACK_USAGE)
        elif not self._settle_tags(c, *tags):
            self._unknown_tags(c, *tags)

    def _on_nack(self, c: Conn, args: list[bytes]) -> None:
        tags = self._tag_range(c, args, NACK_USAGE)
        if tags is None:
            return
        delay = _count(args[2]) if len(args) > 2 else 0
        if delay is None or delay > NACK_DELAY_MAX or len(args) > 3:
            self._error(c, "usage", NACK_USAGE)
        elif not self._nack_tags(c, *tags, delayed=delay > 0):
            self._unknown_tags(c, *tags)

    def _settle_tags(self, c: Conn, first: int, last: int) -> int:
        """ACK: settle c's outstanding tags from first to last; how many."""
        touched: list[Topic] = []
        settled = [e for e in c.unacked if first <= e.tag <= last]
        for e in settled:
            s = e.sub
            if s.unacked == s.prefetch and s.in_rotation:
                self._touch(s.topic, touched)  # its window opens
            message = self._unlink(c, e)
            message.topic.acked += 1
            self._forget_if_unused(message.topic)
            self._copy_done(message)
        self.count["acks"] += len(settled)
        self._serve_touched(touched)
        return len(settled)

    def _nack_tags(self, c: Conn, first: int, last: int, *, delayed: bool) -> int:
        """NACK: give c's outstanding tags from first to last back, in order; how many."""
        touched: list[Topic] = []
        given = [e for e in c.unacked if first <= e.tag <= last]
        # newest first, each to the head of its topic: the oldest ends up first
        for e in reversed(given):
            if e.sub.in_rotation:
                self._touch(e.sub.topic, touched)
            message = self._unlink(c, e)
            message.topic.nacked += 1
            if delayed:
                message.topic.delayed += 1
                self.delayed.append(message)
            else:
                self._touch(message.topic, touched)
                self._redeliver(message)
        self.count["nacks"] += len(given)
        self._serve_touched(touched)
        return len(given)

    def _unlink(self, c: Conn, e: Unacked) -> Message:
        """An outstanding delivery is no longer: its message is the caller's."""
        c.unacked.remove(e)
        e.sub.unacked -= 1
        e.message.topic.unacked -= 1
        return e.message

    def _give_back_unacked(self, c: Conn, only: Sub | None) -> None:
        """c's outstanding deliveries (of ``only``, when given) go back for redelivery, in order."""
        touched: list[Topic] = []
        for e in reversed([e for e in c.unacked if only is None or e.sub is only]):
            message = self._unlink(c, e)
            self._touch(message.topic, touched)
            self._redeliver(message)
        self._serve_touched(touched)

    def _redeliver(self, message: Message) -> None:
        """Back to the head of its topic, or to <topic>.dead once delivered max_deliveries times."""
        t = message.topic
        if self.max_deliveries and message.attempt >= self.max_deliveries:
            self._dead_letter(message)
            return
        t.redelivered += 1
        self.count["redelivered"] += 1
        self.count["backlogged"] += 1
        if self._back_to(message):
            t.backlog.appendleft(message)

    def _dead_letter(self, message: Message) -> None:
        """To the tail of <topic>.dead as a new message; dropped when that topic cannot take it."""
        t, origin = message.topic, message.origin
        name = message.name + DEAD_SUFFIX  # a group's copy: the dead letters of its topic
        dead = None
        if len(name) <= TOPIC_MAX:
            dead = self.topics_held.get(name)
            if dead is None and len(self.topics_held) < self.max_topics:
                dead = self.topics_held[name] = Topic(name)
        if dead is None or len(dead.backlog) >= self.max_backlog:
            self.count["dead_letters_dropped"] += 1
            self._copy_done(message)
            self._forget_if_unused(t)
            if dead is not None:
                self._forget_if_unused(dead)
            return
        t.dead_lettered += 1
        self.count["dead_lettered"] += 1
        message.topic, message.attempt, message.origin = dead, 0, None
        if origin is not None:
            origin.copies -= 1
        dead.published += 1
        self.count["backlogged"] += 1
        dead.backlog.append(message)
        if origin is not None:
            self._forget_if_unused(origin)
        self._forget_if_unused(t)
        self._serve(dead)

    def _touch(self, t: Topic, touched: list[Topic]) -> None:
        """Put t on a list of topics to serve once the operation is done (it stays meanwhile)."""
        if not t.touched:
            t.touched = True
            touched.append(t)

    def _serve_touched(self, touched: list[Topic]) -> None:
        # pinned: the topic touched last is served first
        for t in reversed(touched):
            t.touched = False
            self._serve(t)
            self._forget_if_unused(t)

    # ---------------------------------------------------------------- output

    def _wait(self, c: Conn) -> None:
        if c not in self.waiting:
            self.waiting.append(c)

    def _reply(self, c: Conn, text: bytes) -> None:
        c.unsent.append(Line(text + b"\n"))
        self._wait(c)

    def _error(self, c: Conn, kind: str, text: bytes) -> None:
        self.errors[kind] += 1
        self._reply(c, b"ERROR " + kind.upper().encode() + b" " + text)

    def _error_quoting(self, c: Conn, kind: str, text: bytes, arg: bytes) -> None:
        shown = len(arg) <= QUOTE_MAX and all(0x21 <= b <= 0x7E for b in arg)
        self._error(c, kind, text + (b" '" + arg + b"'" if shown else b" (not shown)"))

    def _deliver(self, s: Sub, message: Message) -> None:
        """A MESSAGE line, or on an acknowledged subscription a DELIVER line with the next tag."""
        c, t = s.conn, message.topic
        t.in_flight += 1
        if not s.ack:
            if c.framed:
                head = b"MSG %s%s %d\n" % (message.name, _token_field(message), len(message.payload))
            else:
                head = b"MESSAGE " + message.name + b" "
            c.unsent.append(Line(head + self._payload(c, message.payload) + b"\n", t, message))
            self._wait(c)
            return
        c.next_tag += 1
        message.attempt += 1
        c.unacked.append(Unacked(c.next_tag, message, s))
        s.unacked += 1
        t.unacked += 1
        if c.framed:
            head = b"DMSG %s %d %d%s %d\n" % (
                message.name,
                c.next_tag,
                message.attempt,
                _token_field(message),
                len(message.payload),
            )
        else:
            head = b"DELIVER %s %d %d " % (message.name, c.next_tag, message.attempt)
        c.unsent.append(Line(head + self._payload(c, message.payload) + b"\n", t, message, c.next_tag))
        self._wait(c)

    def _payload(self, c: Conn, payload: bytes) -> bytes:
        """A payload as c's line holds it: as it is in a frame; in a v1 text line each LF, and a CR
        at its end, written as a space (counted)."""
        if c.framed:
            return payload
        text = payload.replace(b"\n", b" ")
        if text.endswith(b"\r"):
            text = text[:-1] + b" "
        if text != payload:
            self.count["v1_altered"] += 1
        return text

    def _warn(self, text: str) -> None:
        if self.on_warning is not None:
            self.on_warning(text)

    def _settle(self) -> None:
        """End of a call: flush now, or ask the server to (on_output). Now also when a connection
        waiting for the flush holds half of ``out_batch`` or more: it would fill its batch during
        the next read, and what routing skipped would wait in a backlog."""
        if not self.flush_due() or self.flushing:
            return
        if self.on_output is None or any(c.unsent_bytes() >= self.out_batch // 2 for c in self.waiting):
            self.flush()
        elif not self.flush_asked:
            self.flush_asked = True
            self.on_output()

    def _flush_one(self, c: Conn) -> None:
        if c.handle not in self.conns or (c.close_reason is not None and not c.close_flush):
            return
        if c.unsent:
            if c.open and c.paused:
                self._check_unsent(c)
                return
            self._hand_over(c)
        if not c.open:
            return
        if c.paused:
            self._check_unsent(c)
        elif c.starved:
            # its batch went out: it can take the messages it was skipped for
            c.starved = False
            self._serve_subscriptions(c)

    def _hand_over(self, c: Conn) -> None:
        """One writer call with all of c's output; a writer that raises sent nothing."""
        lines, c.unsent = c.unsent, []
        if not lines:
            return
        data = b"".join(line.data for line in lines)
        was_flushing, self.flushing = self.flushing, True
        try:
            try:
                c.writer(data)
            finally:
                self.flushing = was_flushing
        except Exception:
            # it sent nothing: the lines go back to be given back with the rest
            c.unsent = lines
            self._leave_connection(c, "drop")
            return
        for line in lines:
            if line.topic is not None:
                self.count["delivered"] += 1
                c.messages_out += 1
                line.topic.delivered += 1
                line.topic.in_flight -= 1
                self._forget_if_unused(line.topic)
                if not line.tag and line.message is not None:
                    self._copy_done(line.message)
        self.count["bytes_out"] += len(data)
        c.bytes_out += len(data)
        self._ask_transport(c)

    def _ask_transport(self, c: Conn) -> None:
        if c.transport_size is not None:
            c.in_transport = c.transport_size()

    def _check_unsent(self, c: Conn) -> None:
        unsent = c.unsent_bytes() + c.in_transport
        if unsent > self.max_pending:
            self.count["slow_consumers"] += 1
            reason = f"slow consumer: {unsent} bytes unsent (limit {self.max_pending})"
            self._close_later(c, reason, flush=False)

    def _close_later(self, c: Conn, reason: str, *, flush: bool) -> None:
        """The broker ends c: out of every rotation now, reported through on_close at the end of a flush.

        Without flush its output is dropped and its messages go back at once.
        """
        self._leave_connection(c, "cut_acked" if flush else "drop")
        if not flush:
            c.close_flush = False
        if c.close_reason is None:
            c.close_reason = reason
            self.closing.append(c)

    def _report_close(self, c: Conn) -> None:
        reason, c.close_reason = c.close_reason, None
        if self.on_close is not None and reason is not None:
            self.on_close(c.handle, reason, c.close_flush)

    def _give_back_lines(self, c: Conn, how: str) -> None:
        """Messages in c's unsent output go back to the head of their topics, in order.

        ``how``: "drop" all of them, with the output; "cut_all" all of them,
        their lines cut out and the replies kept; "cut_acked" only DELIVER
        lines (no ACK can come for them), MESSAGE lines and replies kept. A
        DELIVER line's message goes back only while its tag is outstanding,
        and its attempt is not counted: the line never left.
        """
        touched: list[Topic] = []
        given: set[int] = set()
        for line in reversed(c.unsent):
            t, message = line.topic, line.message
            if t is None or message is None or (how == "cut_acked" and not line.tag):
                continue
            given.add(id(line))
            self._touch(t, touched)
            t.in_flight -= 1
            if line.tag:
                e = next((e for e in c.unacked if e.tag == line.tag), None)
                if e is None:
                    continue
                self._unlink(c, e)
                message.attempt -= 1
            if self._back_to(message):
                t.backlog.appendleft(message)
            self.count["requeued"] += 1
            self.count["backlogged"] += 1
        c.unsent = [] if how == "drop" else [line for line in c.unsent if id(line) not in given]
        self._serve_touched(touched)

    def _leave_connection(self, c: Conn, how: str) -> None:
        """c takes no more messages and is read no more: out of every rotation, its unsent messages
        back as ``how`` says (_give_back_lines), then what it did not acknowledge, its PUBLISH held
        no more. One already leaving only drops its output ("drop")."""
        if not c.open:
            if how == "drop":
                self._give_back_lines(c, how)
            return
        c.open = False
        self._release_held(c)
        if c in self.woken:
            self.woken.remove(c)
        for s in c.subscriptions:
            self._leave_rotation(s)
        self._give_back_lines(c, how)
        self._give_back_unacked(c, None)
        while c.subscriptions:
            self._free_sub(c.subscriptions[-1])
        c.held = b""

    # ---------------------------------------------------------------- routing

    def _next_taker(self, t: Topic) -> Sub | None:
        """The next subscription in turn that can take a message now."""
        n = len(t.rotation)
        start = t.turn if t.turn < n else 0
        for k in range(n):
            i = (start + k) % n
            if self._can_take(t.rotation[i]):
                # the turn moves past it; a subscriber joining the end gets the next one
                t.turn = i + 1
                return t.rotation[i]
        return None

    def _can_take(self, s: Sub) -> bool:
        """Whether s can take a message now; one skipped only for its full batch is marked starved."""
        c = s.conn
        if c.paused or not s.can_take():
            return False
        if c.unsent_bytes() >= self.out_batch:
            c.starved = True
            return False
        return True

    def _serve(self, t: Topic) -> None:
        """Deliver t's backlog in order while a subscriber can take it; wake the publishers it held
        once it is back at half of max_backlog (with a bound of 0: once a subscriber can take)."""
        if not t.backlog:
            if t.waiters and any([self._can_take(s) for s in t.rotation]):  # each is asked (starved)
                self._wake(t)
            return
        t.pins += 1
        while t.backlog:
            to = self._next_taker(t)
            if to is None:
                break
            message = t.backlog.popleft()
            if not t.backlog:
                t.warned = False
            self._deliver(to, message)
        held = sum(len(m.payload) for m in t.backlog)
        if t.waiters and len(t.backlog) <= self.max_backlog // 2 and held <= self.max_backlog_bytes // 2:
            self._wake(t)
        t.pins -= 1
        self._forget_if_unused(t)

    def _wake(self, t: Topic) -> None:
        """t's held publishers go on at the next flush, before those woken earlier (pinned)."""
        woken, t.waiters = t.waiters, []
        for c in woken:
            c.held_topic = None
        self.woken[:0] = woken

    def _release_held(self, c: Conn) -> None:
        if c.held_topic is not None:
            c.held_topic.waiters.remove(c)
            t, c.held_topic = c.held_topic, None
            self._forget_if_unused(t)

    def _serve_subscriptions(self, c: Conn) -> None:
        """Serve c's topics, in the order of c.subscriptions."""
        for s in list(c.subscriptions):
            self._serve(s.topic)

    def _leave_rotation(self, s: Sub) -> None:
        """s leaves its topic's rotation (nobody skips or repeats a turn); the topic stays until s goes."""
        if not s.in_rotation:
            return
        s.in_rotation = False
        t = s.topic
        t.pins += 1
        i = t.rotation.index(s)
        del t.rotation[i]
        if i < t.turn:
            t.turn -= 1

    def _free_sub(self, s: Sub) -> None:
        """Forget a subscription that holds no outstanding delivery."""
        self._leave_rotation(s)
        t, c = s.topic, s.conn
        t.pins -= 1
        # pinned: the place of the subscription left in c's list is taken by c's last one
        j = c.subscriptions.index(s)
        last = c.subscriptions.pop()
        if j < len(c.subscriptions):
            c.subscriptions[j] = last
        if t.registered and not t.rotation:
            # its last subscriber left: a named group's --group-ttl starts, a wildcard default group ends
            if t.group is None:
                self._end_group(t)
            else:
                t.idle_since = time.monotonic()
        self._forget_if_unused(t)

    def _forget_if_unused(self, t: Topic) -> None:
        """A topic exists while it has subscribers or messages (or a publisher waits for it)."""
        if (
            not t.rotation
            and not t.registered
            and not t.copies
            and not t.backlog
            and not (t.in_flight or t.unacked or t.delayed or t.pins or t.waiters or t.touched)
            and self.topics_held.get(t.name) is t
        ):
            del self.topics_held[t.name]


def pattern_matches(pattern: bytes, name: bytes) -> bool:
    """NATS rules over '.'-separated tokens: ``*`` is one non-empty token, ``>`` (last) one or more
    tokens after it, whatever they hold but not nothing; any other token, ``ord*`` too, is literal."""
    want, have = pattern.split(b"."), name.split(b".")
    if want[-1] == b">":
        head = want[:-1]
        return (
            len(have) > len(head)
            and _tokens_match(head, have[: len(head)])
            and bool(b".".join(have[len(head) :]))
        )
    return len(want) == len(have) and _tokens_match(want, have)


def is_pattern(name: bytes) -> bool:
    """Whether a name has a wildcard token: SUBSCRIBE to it joins a pattern's group."""
    return any(token in (b"*", b">") for token in name.split(b".")) if name else False


def _tokens_match(want: list[bytes], have: list[bytes]) -> bool:
    return all(w == h or (w == b"*" and h) for w, h in zip(want, have, strict=True))


def topic_problem(name: bytes) -> bytes:
    """The ERROR text for an invalid topic name, or b"" for a valid one; the first fault wins."""
    if not 1 <= len(name) <= TOPIC_MAX:
        return b"topic must be 1 to %d bytes" % TOPIC_MAX
    try:
        text, bad_utf8 = name.decode("utf-8"), False
    except UnicodeDecodeError as e:
        text, bad_utf8 = name[: e.start].decode("utf-8"), True
    if any(unicodedata.category(ch) in INVISIBLE for ch in text):
        return b"topic must not contain whitespace, control, format or separator characters"
    return b"topic is not valid UTF-8" if bad_utf8 else b""


def _frame_word(buf: bytes, pos: int, nl: int) -> bytes:
    """The word of a frame's header line buf[pos:nl] (``pub``, ``req``, ``reply``), lower case; b"" for
    any other line."""
    for word in FRAMES:
        n = len(word)
        if nl - pos > n + 1 and buf[pos : pos + n].lower() == word and buf[pos + n] in BLANKS:
            return word
    return b""


def _token_field(message: Message) -> bytes:
    """`` <reply token>`` of a request's MSG or DMSG header (before the count); b"" for a plain message."""
    return b"" if message.reply_to is None else b" " + message.reply_to


def _split_field(data: bytes) -> tuple[bytes, bytes]:
    """The first field (fields are separated by spaces or tabs) and what follows it, separator included."""
    start = len(data) - len(data.lstrip(BLANKS))
    end = start
    while end < len(data) and data[end] not in BLANKS:
        end += 1
    return data[start:end], data[end:]


def _fields(data: bytes) -> list[bytes]:
    fields: list[bytes] = []
    while True:
        field_, data = _split_field(data)
        if not field_:
            return fields
        fields.append(field_)


def _count(text: bytes) -> int | None:
    """A decimal number of 1 to 18 digits, or None."""
    return int(text) if 1 <= len(text) <= 18 and text.isdigit() else None


def _overlay(theirs: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """The model's figures in the core's order, with the core's where the model states none."""
    keys = list(theirs) + [key for key in mine if key not in theirs]
    return {key: theirs[key] if key in NOT_STATED else mine.get(key) for key in keys}


def _json(figures: dict[str, Any]) -> bytes:
    return json.dumps(figures, separators=(",", ":")).encode()
