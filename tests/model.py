"""A pure-Python reference model of the broker core, written from the protocol's rules.

It has the core's Python interface (``open``, ``feed``, ``pause``, ``resume``,
``close``, ``tick``, ``topic_info``, ``stats``) and must produce the same bytes
through the same writer calls. It is deliberately plain: lists and dicts, one
method per rule, no speed tricks, so a disagreement with the core points at a
bug in one of them rather than at a shared shortcut.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pigeon.protocol import TOPIC_MAX
from pigeon.server import limits

Writer = Callable[[bytes], object]
Closer = Callable[[str, bool], object]
Pending = Callable[[], int]

COMMANDS = ("connect", "subscribe", "unsubscribe", "publish", "ping", "disconnect", "stats", "unknown")
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
)

SHOW_MAX = 64
READ_ROOM = 256 * 1024


@dataclass(eq=False)
class Topic:
    """A topic: its rotation of subscriber handles, whose turn is next, and its backlog."""

    name: bytes
    subs: list[int] = field(default_factory=list)
    cursor: int = 0
    backlog: deque[bytes] = field(default_factory=deque)


@dataclass(eq=False)
class Conn:
    """One connection's state, as the rules describe it."""

    writer: Writer
    closer: Closer | None
    in_transport: Pending | None  # bytes buffered past the broker
    open: bool = True  # False once closing (DISCONNECT, fatal error, dropped)
    rejected: bool = False
    paused: bool = False
    dirty: bool = False
    starved: bool = False
    idle: int = 0
    client_id: bytes = b""
    out: bytearray = field(default_factory=bytearray)
    pending: bytes = b""
    subs: list[Topic] = field(default_factory=list)


class ModelBroker:
    """The reference model; the constructor takes the core's keyword arguments."""

    def __init__(
        self,
        *,
        max_line: int = limits.DEFAULT_MAX_LINE,
        max_backlog: int = limits.DEFAULT_MAX_BACKLOG,
        max_connections: int = limits.DEFAULT_MAX_CONNECTIONS,
        max_memory: int = limits.DEFAULT_MAX_MEMORY,
        max_subscriptions: int = limits.DEFAULT_MAX_SUBSCRIPTIONS,
        max_topics: int = limits.DEFAULT_MAX_TOPICS,
        max_pending: int = limits.DEFAULT_MAX_PENDING,
        idle_ticks: int = 0,
        out_batch: int = 1024 * 1024,
    ) -> None:
        self.max_line = max_line
        self.max_backlog = max_backlog
        self.max_connections = max_connections
        self.max_memory = max_memory
        self.max_subscriptions = max_subscriptions
        self.max_topics = max_topics
        self.max_pending = max_pending
        self.idle_ticks = idle_ticks
        self.out_batch = out_batch
        self.conns: dict[int, Conn] = {}
        self.free: list[int] = []
        self.cap = 0
        self.topics: dict[bytes, Topic] = {}
        self.dirty: list[int] = []
        self.next_id = 1
        self.backlog_bytes = 0
        self.commands = dict.fromkeys(COMMANDS, 0)
        self.errors = dict.fromkeys(ERRORS, 0)
        self.counters = dict.fromkeys(
            (
                "published",
                "delivered",
                "backlogged",
                "refused",
                "connections_rejected",
                "slow_consumers",
                "idle_closed",
                "requeued",
            ),
            0,
        )

    # ---------------------------------------------------------------- interface

    def open(
        self,
        writer: Writer,
        peer: str | None = None,
        pending: Pending | None = None,
        closer: Closer | None = None,
    ) -> int:
        """Register a connection; handles are reused last-freed first, as in the core."""
        if not self.free:
            newcap = self.cap * 2 if self.cap else 16
            self.free.extend(range(newcap - 1, self.cap - 1, -1))
            self.cap = newcap
        h = self.free.pop()
        c = self.conns[h] = Conn(writer, closer, pending)
        admitted = sum(1 for x in self.conns.values() if not x.rejected) - 1
        if admitted >= self.max_connections:
            c.rejected = True
            self.counters["connections_rejected"] += 1
            reason = f"too many connections (limit {self.max_connections})"
            self._error(h, "too_many_connections", reason.encode())
            c.open = False
            self._flush()
            if closer is not None:
                closer("too many connections", True)
        return h

    def feed(self, h: int, data: bytes) -> bool:
        """Process bytes read from connection h; False when it must be closed."""
        c = self.conns[h]
        done = 0
        while True:
            if not c.open:
                return False
            chunk = data[done : done + READ_ROOM]
            done += len(chunk)
            c.idle = 0
            self._process(h, c.pending + chunk)
            self._flush()
            if not c.open:
                return False
            if done == len(data):
                return True

    def pause(self, h: int) -> None:
        """The transport is full: skip h in rotations, keep its output."""
        self.conns[h].paused = True

    def resume(self, h: int) -> None:
        """The transport drained: hand over what was kept, serve backlogs."""
        c = self.conns[h]
        c.paused = False
        if c.out:
            self._mark(h)
        self._drain_subscriptions(h)
        self._flush()

    def close(self, h: int) -> None:
        """The socket is gone: requeue what it was never handed, leave, forget it."""
        c = self.conns[h]
        touched: list[Topic] = []
        if c.out and c.open:
            self._requeue(h, touched)
        self._leave_all(h)
        del self.conns[h]
        self.free.append(h)
        for t in touched:
            self._drain(t)
        self._flush()

    def tick(self) -> None:
        """One tick of the idle clock."""
        if self.idle_ticks == 0:
            return
        closing = []
        for h in sorted(self.conns):
            c = self.conns[h]
            if not c.open:
                continue
            c.idle += 1
            if c.idle > self.idle_ticks:
                self._error(h, "idle_timeout", b"idle timeout")
                self._leave_all(h)
                c.open = False
                self.counters["idle_closed"] += 1
                closing.append(h)
        self._flush()
        for h in closing:
            closer = self.conns[h].closer
            if closer is not None:
                closer("idle timeout", True)

    def client_id(self, h: int) -> str | None:
        """The id CONNECT gave h."""
        cid = self.conns[h].client_id
        return cid.decode() if cid else None

    def topic_info(self, name: bytes) -> tuple[int, int] | None:
        """(subscribers, backlog messages), or None."""
        t = self.topics.get(name)
        return None if t is None else (len(t.subs), len(t.backlog))

    def stats(self) -> dict[str, object]:
        """The counters and gauges the model keeps (a subset of the core's)."""
        return {
            "connections": len(self.conns),
            "topics": len(self.topics),
            "backlog_bytes": self.backlog_bytes,
            "backlog_messages": sum(len(t.backlog) for t in self.topics.values()),
            "commands": dict(self.commands),
            "errors": dict(self.errors),
            **self.counters,
        }

    # ---------------------------------------------------------------- parsing

    def _process(self, h: int, buf: bytes) -> None:
        c = self.conns[h]
        pos = 0
        too_long = False
        while pos < len(buf) and c.open:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                too_long = len(buf) - pos > self.max_line
                break
            if nl - pos > self.max_line:
                too_long = True
                break
            self._dispatch(h, buf[pos:nl])
            pos = nl + 1
        if too_long and c.open:
            self._error(h, "line_too_long", f"line too long (limit {self.max_line} bytes)".encode())
            self._leave_all(h)
            c.open = False
        c.pending = buf[pos:] if c.open else b""

    def _dispatch(self, h: int, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        fields = [f for f in line.split(b" ") if f]
        if not fields:
            return
        word = fields[0].lower()
        self.commands[word.decode() if word.decode("latin-1") in COMMANDS[:-2] else "unknown"] += 1
        rest = line[line.index(fields[0]) + len(fields[0]) :]
        if word == b"publish":
            self._on_publish(h, rest)
        elif word == b"subscribe":
            self._on_subscribe(h, fields[1:])
        elif word == b"unsubscribe":
            self._on_unsubscribe(h, fields[1:])
        elif word == b"connect":
            self._on_connect(h, fields[1:])
        elif word == b"ping":
            if len(fields) > 1:
                self._error(h, "usage", b"usage: PING")
            else:
                self._line(h, b"PONG")
        elif word == b"disconnect":
            if len(fields) > 1:
                self._error(h, "usage", b"usage: DISCONNECT")
            else:
                self._line(h, b"DISCONNECTED")
                self._leave_all(h)
                self.conns[h].open = False
        else:
            self._error_quoting(h, "unknown_command", b"unknown command", fields[0])

    def _on_connect(self, h: int, args: list[bytes]) -> None:
        c = self.conns[h]
        if args:
            self._error(h, "usage", b"usage: CONNECT")
        elif c.client_id:
            self._error_quoting(h, "already_connected", b"already connected as", c.client_id)
        else:
            c.client_id = b"c%d" % self.next_id
            self.next_id += 1
            self._line(h, b"CONNECTED " + c.client_id)

    def _id_ok(self, h: int, cid: bytes) -> bool:
        c = self.conns[h]
        if not c.client_id:
            self._error(h, "not_connected", b"not connected: send CONNECT first")
            return False
        if cid != c.client_id:
            self._error_quoting(h, "wrong_client_id", b"client id does not belong to this connection:", cid)
            return False
        return True

    def _topic_ok(self, h: int, name: bytes) -> bool:
        problem = topic_problem(name)
        if problem:
            self._error(h, "bad_topic", problem)
        return not problem

    def _room_for_topic(self, h: int) -> bool:
        if len(self.topics) < self.max_topics:
            return True
        self._error(h, "too_many_topics", f"too many topics (limit {self.max_topics})".encode())
        return False

    def _on_subscribe(self, h: int, args: list[bytes]) -> None:
        if len(args) != 2:
            self._error(h, "usage", b"usage: SUBSCRIBE <client_id> <topic> [ACK [PREFETCH <n>]]")
            return
        cid, name = args
        if not self._id_ok(h, cid) or not self._topic_ok(h, name):
            return
        c = self.conns[h]
        t = self.topics.get(name)
        if t is not None and h in t.subs:
            self._line(h, b"SUBSCRIBED " + name)
            return
        if len(c.subs) >= self.max_subscriptions:
            msg = f"too many subscriptions on this connection (limit {self.max_subscriptions})"
            self._error(h, "too_many_subscriptions", msg.encode())
            return
        if t is None:
            if not self._room_for_topic(h):
                return
            t = self.topics[name] = Topic(name)
        c.subs.append(t)
        t.subs.append(h)
        self._line(h, b"SUBSCRIBED " + name)
        if t.backlog:
            self._drain(t)

    def _on_unsubscribe(self, h: int, args: list[bytes]) -> None:
        if len(args) != 2:
            self._error(h, "usage", b"usage: UNSUBSCRIBE <client_id> <topic>")
            return
        cid, name = args
        if not self._id_ok(h, cid) or not self._topic_ok(h, name):
            return
        t = self.topics.get(name)
        if t is not None and t in self.conns[h].subs:
            self._unsubscribe(h, t)
            self._line(h, b"UNSUBSCRIBED " + name)
            self._drop_if_unused(t)
        else:
            self._error_quoting(h, "not_subscribed", b"not subscribed to", name)

    def _on_publish(self, h: int, rest: bytes) -> None:
        # <id> <topic> <message>: the message is everything after the space that ends the topic
        parts = rest.lstrip(b" ").split(b" ", 1)
        cid = parts[0]
        after_id = parts[1].lstrip(b" ") if len(parts) == 2 else b""
        name, sep, message = after_id.partition(b" ")
        if not cid or not name or not sep:
            self._error(h, "usage", b"usage: PUBLISH <client_id> <topic> <message>")
            return
        if not self._id_ok(h, cid):
            return
        t = self.topics.get(name)
        if t is None:
            if not self._topic_ok(h, name) or not self._room_for_topic(h):
                return
            t = self.topics[name] = Topic(name)
        if not t.backlog:
            to = self._next_subscriber(t)
            if to is not None:
                self.counters["published"] += 1
                self._line(h, b"PUBLISHED " + name)
                self._deliver(to, t, message)
                return
        if len(t.backlog) >= self.max_backlog:
            self.counters["refused"] += 1
            reason = b"backlog full (%d messages) for topic" % self.max_backlog
            self._error_quoting(h, "backlog_full", reason, name)
            self._drop_if_unused(t)
            return
        if self.backlog_bytes + len(message) > self.max_memory:
            self.counters["refused"] += 1
            reason = b"memory limit reached (%d bytes in backlogs) for topic" % self.backlog_bytes
            self._error_quoting(h, "memory_full", reason, name)
            self._drop_if_unused(t)
            return
        t.backlog.append(message)
        self.backlog_bytes += len(message)
        self.counters["published"] += 1
        self.counters["backlogged"] += 1
        self._line(h, b"PUBLISHED " + name)
        if t.subs:
            self._drain(t)

    # ---------------------------------------------------------------- output

    def _mark(self, h: int) -> None:
        c = self.conns[h]
        if not c.dirty:
            c.dirty = True
            self.dirty.append(h)

    def _line(self, h: int, line: bytes) -> None:
        self._mark(h)
        self.conns[h].out += line + b"\n"

    def _error(self, h: int, kind: str, reason: bytes) -> None:
        self.errors[kind] += 1
        self._line(h, b"ERROR " + reason)

    def _error_quoting(self, h: int, kind: str, reason: bytes, arg: bytes) -> None:
        if len(arg) <= SHOW_MAX and all(0x21 <= b <= 0x7E for b in arg):
            self._error(h, kind, reason + b" '" + arg + b"'")
        else:
            self._error(h, kind, reason + b" (not shown)")

    def _deliver(self, h: int, t: Topic, message: bytes) -> None:
        self.counters["delivered"] += 1
        self._line(h, b"MESSAGE " + t.name + b" " + message)

    def _flush(self) -> None:
        while self.dirty:
            batch, self.dirty = self.dirty, []
            for h in batch:
                c = self.conns.get(h)
                if c is None:
                    continue
                c.dirty = False
                if not c.out:
                    continue
                if c.paused and c.open:
                    if self._unsent(c) > self.max_pending:
                        self._drop_slow(h)
                    continue
                self._hand_over(h)
                if not c.open:
                    continue
                if c.paused:
                    if self._unsent(c) > self.max_pending:
                        self._drop_slow(h)
                elif c.starved:
                    c.starved = False
                    self._drain_subscriptions(h)

    def _unsent(self, c: Conn) -> int:
        return len(c.out) + (c.in_transport() if c.in_transport is not None else 0)

    def _hand_over(self, h: int) -> None:
        c = self.conns[h]
        try:
            c.writer(bytes(c.out))
        except Exception:
            touched: list[Topic] = []
            if c.open:
                self._requeue(h, touched)
            c.out.clear()
            self._leave_all(h)
            c.open = False
            for t in touched:
                self._drain(t)
            return
        c.out.clear()

    def _drop_slow(self, h: int) -> None:
        c = self.conns[h]
        reason = f"slow consumer: {self._unsent(c)} bytes unsent (limit {self.max_pending})"
        touched: list[Topic] = []
        self._requeue(h, touched)
        c.out.clear()
        self._leave_all(h)
        c.open = False
        self.counters["slow_consumers"] += 1
        for t in touched:
            self._drain(t)
        if c.closer is not None:
            c.closer(reason, False)

    def _requeue(self, h: int, touched: list[Topic]) -> None:
        lines = bytes(self.conns[h].out).split(b"\n")
        messages = [line[8:] for line in lines if line.startswith(b"MESSAGE ")]
        for m in reversed(messages):
            name, _, body = m.partition(b" ")
            t = self.topics.get(name)
            if t is None:
                t = self.topics[name] = Topic(name)
            t.backlog.appendleft(body)
            self.backlog_bytes += len(body)
            self.counters["backlogged"] += 1
            self.counters["requeued"] += 1
            if not any(x is t for x in touched):
                touched.append(t)

    # ---------------------------------------------------------------- routing

    def _next_subscriber(self, t: Topic) -> int | None:
        if t.cursor >= len(t.subs):
            t.cursor = 0
        n = len(t.subs)
        for k in range(n):
            i = (t.cursor + k) % n
            c = self.conns[t.subs[i]]
            if c.paused:
                continue
            if len(c.out) < self.out_batch:
                t.cursor = i + 1
                return t.subs[i]
            c.starved = True
        return None

    def _drain(self, t: Topic) -> None:
        while t.backlog:
            to = self._next_subscriber(t)
            if to is None:
                return
            message = t.backlog.popleft()
            self.backlog_bytes -= len(message)
            self._deliver(to, t, message)

    def _drain_subscriptions(self, h: int) -> None:
        for t in list(self.conns[h].subs):
            if t.backlog:
                self._drain(t)

    def _unsubscribe(self, h: int, t: Topic) -> None:
        i = t.subs.index(h)
        del t.subs[i]
        if i < t.cursor:
            t.cursor -= 1
        subs = self.conns[h].subs
        j = subs.index(t)
        last = subs.pop()
        if j < len(subs):
            subs[j] = last

    def _leave_all(self, h: int) -> None:
        subs = self.conns[h].subs
        while subs:
            t = subs[-1]
            self._unsubscribe(h, t)
            self._drop_if_unused(t)

    def _drop_if_unused(self, t: Topic) -> None:
        if not t.subs and not t.backlog:
            del self.topics[t.name]


def topic_problem(name: bytes) -> bytes:
    """The ERROR reason for an invalid topic name, or b"" for a valid one (first fault wins)."""
    if not 1 <= len(name) <= TOPIC_MAX:
        return b"topic must be 1 to %d bytes" % TOPIC_MAX
    blank = b"topic must not contain whitespace, control, format or separator characters"
    bad = b"topic is not valid UTF-8"
    i = 0
    while i < len(name):
        b = name[i]
        if b < 0x80:
            if b <= 0x20 or b == 0x7F:
                return blank
            i += 1
            continue
        size = 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 0
        if size == 0 or i + size > len(name):
            return bad
        try:
            ch = ord(name[i : i + size].decode("utf-8"))
        except UnicodeDecodeError:
            return bad
        if ch <= 0x9F or ch in (0xA0, 0x2028, 0x2029):
            return blank
        i += size
    return b""
