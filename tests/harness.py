"""One session run on the Cython core and on the reference model side by side, compared as a client sees it.

Shared by the differential test (tests/test_differential.py) and the fuzzer
(fuzz/fuzz_core.py). A ``Session`` opens connections on both brokers through
fake transports, applies every operation to both, and ``check`` compares what
the model states (tests/model.py): each connection's output bytes (not their
split into writer calls), its close and reading events, its client id, the
warnings, the figures of ``stats()``, every topic (through a walk of the
topic pages) and ``topic_info``. Connections are matched by the order they
were opened, not by handle.

A STATS reply holds figures no model can state (memory, clocks, handles, which
topics a partial page holds): the session records the core's figures of each
reply as the core serializes them and gives them to the model
(``ModelBroker.unstated``), which writes its own figures over them. So the
replies are compared byte for byte on what the model states, and have the
same length, on which flow control depends.

With ``auth``, a ``CONNECT <user> <password>`` is answered as a server would,
from the fixed table ``USERS``: ``grant`` then ``auth_result``, on both
brokers, once ``feed`` returns or when the session says (``answer_logins``).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pigeon._core
from pigeon._core import Broker
from tests.model import NOT_STATED, ModelBroker

AnyBroker = Broker | ModelBroker
OWN_ID = b"<me>"  # stands for the connection's own client id in commands a test sends
PAGE_LIMIT = 100_000  # pages a walk may take before it is called endless
# the users a session with auth knows: name -> (password, publish patterns, subscribe patterns, admin)
USERS: dict[bytes, tuple[bytes, list[str], list[str], bool]] = {
    b"ops": (b"pw", [], [], True),
    b"worker": (b"pw", ["b", "*.dead", "a.>"], ["a", "a.*", "\u00e9"], False),
    b"reader": (b"pw", [], [">"], False),
    b"writer": (b"pw", [">"], ["*"], False),
    b"nobody": (b"pw", [], [], False),
}


class StatsRecorder:
    """Stands in for the json module inside the core: keeps the figures of each STATS reply it serializes."""

    def __init__(self) -> None:
        self.replies: deque[dict[str, Any]] = deque()

    def dumps(self, figures: dict[str, Any], **options: Any) -> str:
        self.replies.append(figures)
        return json.dumps(figures, **options)

    def next_reply(self) -> dict[str, Any]:
        assert self.replies, "the model sent a STATS reply the core did not"
        return self.replies.popleft()


def read_into(broker: AnyBroker, h: int, data: bytes) -> None:
    """Bytes arriving on a connection's socket, as the server hands them over: no flush of their own."""
    if isinstance(broker, ModelBroker):
        broker.read(h, data)
        return
    done = 0
    while True:
        view = broker.get_buffer(h)
        n = min(len(view), len(data) - done)
        view[:n] = data[done : done + n]
        broker.buffer_updated(h, n)
        done += n
        if done == len(data):
            return


@dataclass(eq=False)
class Transport:
    """A fake transport in front of one connection of one broker, as the server's behaves.

    ``stuck``: the socket takes nothing, so what is written stays in the
    transport (and is reported by ``size``); ``drain`` lets it go.
    ``pause_on_write``: the transport says it is full after each write.
    ``fail``: the transport is gone, so ``write`` raises.
    """

    broker: AnyBroker
    handle: int = -1
    written: bytearray = field(default_factory=bytearray)
    holds: int = 0
    stuck: bool = False
    pause_on_write: bool = False
    fail: bool = False

    def write(self, data: bytes) -> None:
        if self.fail:
            raise ConnectionResetError("gone")
        self.written += data
        if self.stuck:
            self.holds += len(data)
        if self.pause_on_write:
            self.broker.pause(self.handle)

    def size(self) -> int:
        return self.holds


class Side:
    """One broker under test and what it told each connection (indexed by the order they opened)."""

    def __init__(self, broker: AnyBroker) -> None:
        self.broker = broker
        self.transports: list[Transport] = []
        self.handles: list[int] = []
        self.index_of: dict[int, int] = {}  # handle -> index, while the connection is not closed
        self.closes: list[list[tuple[str, bool]]] = []
        self.reading: list[list[bool]] = []
        self.warnings: list[str] = []
        self.flush_asked = False
        self.logins: list[tuple[int, bytes, bytes]] = []  # (index, user, password) of every on_auth call
        self.unanswered: list[int] = []  # ... of the logins not answered yet, in order
        broker.on_auth = self._asked
        broker.on_close = lambda h, reason, flush: self.closes[self._index(h)].append((reason, flush))
        broker.on_reading = lambda h, reading: self.reading[self._index(h)].append(reading)
        broker.on_warning = self.warnings.append

    def _asked(self, h: int, user: bytes, password: bytes) -> None:
        self.logins.append((self._index(h), user, password))
        self.unanswered.append(self._index(h))

    def _index(self, h: int) -> int:
        # a connection refused over max_connections is reported before open() returns its handle
        return self.index_of.get(h, len(self.transports) - 1)

    def defer_flushes(self) -> None:
        """Flush only when told (as the server does, once per pass of its loop), not in every call."""
        self.broker.on_output = self._ask_flush

    def _ask_flush(self) -> None:
        self.flush_asked = True

    def open(self, peer: str) -> None:
        transport = Transport(self.broker)
        index = len(self.transports)
        self.transports.append(transport)
        self.closes.append([])
        self.reading.append([])
        self.handles.append(-1)
        handle = self.broker.open(transport.write, peer, transport.size)
        transport.handle = self.handles[index] = handle
        self.index_of[handle] = index

    def read(self, i: int, data: bytes) -> None:
        read_into(self.broker, self.handles[i], data)

    def flush(self) -> None:
        self.flush_asked = False
        self.broker.flush()

    def close(self, i: int) -> None:
        h = self.handles[i]
        self.broker.close(h)
        del self.index_of[h]

    def tick(self) -> None:
        self.broker.tick()

    def topics(self, count: int) -> list[dict[str, Any]]:
        """Every topic, through a walk of the pages of ``count``."""
        return self._walk(self.broker.topics, "topics", count)

    def connections(self, count: int) -> list[dict[str, Any]]:
        """Every connection, through a walk of the pages of ``count``."""
        return self._walk(self.broker.connections, "connections", count)

    def _walk(self, page_of: Any, key: str, count: int) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        cursor = 0
        for _ in range(PAGE_LIMIT):
            page = page_of(cursor, count)
            entries += page[key]
            cursor = page["next"]
            if cursor == 0:
                return entries
        raise AssertionError(f"the {key} pages never end")


@dataclass
class Peer:
    """One connection as the session sees it."""

    index: int
    closed: bool = False  # the server closed its socket (close was called)
    gone: bool = False  # the broker ended it, its writer failed, or its client sent FIN


class Session:
    """The core and the model driven alike; ``check`` compares them."""

    def __init__(
        self, limits: dict[str, Any], *, deferred: bool, tick_interval: float = 1.0, auth: bool = False
    ) -> None:
        self.core_broker = Broker(tick_interval=tick_interval, auth=auth, **limits)
        self.model_broker = ModelBroker(tick_interval=tick_interval, auth=auth, **limits)
        # from here on (and until finish) the core's STATS figures are recorded for the model
        self.stats_replies = StatsRecorder()
        pigeon._core.json = self.stats_replies  # type: ignore[attr-defined]
        self.model_broker.unstated = self.stats_replies.next_reply
        self.core = Side(self.core_broker)
        self.model = Side(self.model_broker)
        self.sides = (self.core, self.model)
        if deferred:
            for side in self.sides:
                side.defer_flushes()
        self.peers: list[Peer] = []

    # ---------------------------------------------------------------- operations

    def live(self, i: int) -> Peer | None:
        """The i-th (modulo) connection whose socket is not closed, if any."""
        live = [peer for peer in self.peers if not peer.closed]
        return live[i % len(live)] if live else None

    def open(self) -> Peer:
        peer = Peer(len(self.peers))
        self.peers.append(peer)
        for side in self.sides:
            side.open(f"p{peer.index}")
        return peer

    def own_id(self, peer: Peer, data: bytes) -> bytes:
        """``data`` with OWN_ID replaced by the connection's client id (c0 before CONNECT)."""
        cid = self.core_broker.client_id(self.core.handles[peer.index]) or "c0"
        return data.replace(OWN_ID, cid.encode())

    def outstanding(self, peer: Peer) -> list[int]:
        """The connection's outstanding delivery tags, oldest first (as the model states them)."""
        return [e.tag for e in self.model_broker.conns[self.model.handles[peer.index]].unacked]

    def holding(self, i: int) -> Peer | None:
        """The i-th (modulo) connection not closed that holds outstanding deliveries, else ``live(i)``."""
        holding = [peer for peer in self.peers if not peer.closed and self.outstanding(peer)]
        return holding[i % len(holding)] if holding else self.live(i)

    def read(self, peer: Peer, data: bytes) -> None:
        for side in self.sides:
            side.read(peer.index, data)

    def feed(self, peer: Peer, data: bytes) -> None:
        """A read and a flush; then the logins it asked for are answered."""
        core_open = self.core_broker.feed(self.core.handles[peer.index], data)
        model_open = self.model_broker.feed(self.model.handles[peer.index], data)
        assert core_open == model_open, (peer.index, core_open, model_open)
        peer.gone = peer.gone or not core_open
        self.answer_logins()

    def answer_logins(self) -> None:
        """Answer the logins asked for, oldest first, from USERS (a server skips a closed connection)."""
        assert self.core.unanswered == self.model.unanswered
        while self.core.unanswered:
            index = self.core.unanswered.pop(0)
            self.model.unanswered.pop(0)
            _, user, password = next(login for login in reversed(self.core.logins) if login[0] == index)
            if self.peers[index].closed:
                continue
            known = USERS.get(user)
            ok = known is not None and known[0] == password
            if ok:
                self.grant(self.peers[index], user)
            for side in self.sides:
                side.broker.auth_result(side.handles[index], ok)

    def grant(self, peer: Peer, user: bytes) -> None:
        """Grant a user of USERS to a connection: before CONNECT (a client certificate), or again."""
        _, publish, subscribe, admin = USERS[user]
        for side in self.sides:
            side.broker.grant(side.handles[peer.index], user.decode(), publish, subscribe, admin)

    def flush(self) -> None:
        for side in self.sides:
            side.flush()

    def pause(self, peer: Peer) -> None:
        for side in self.sides:
            side.broker.pause(side.handles[peer.index])

    def resume(self, peer: Peer) -> None:
        for side in self.sides:
            side.broker.resume(side.handles[peer.index])

    def eof(self, peer: Peer) -> None:
        for side in self.sides:
            side.broker.eof(side.handles[peer.index])
        peer.gone = True

    def close(self, peer: Peer) -> None:
        if not peer.closed:
            peer.closed = True
            for side in self.sides:
                side.close(peer.index)

    def reap(self) -> None:
        """Close the sockets the server would close now: ended by the broker, failed, or at EOF."""
        for peer in self.peers:
            if peer.gone or self.core.closes[peer.index] or self.core.transports[peer.index].fail:
                self.close(peer)

    def tick(self) -> None:
        self.core.tick()
        # the core visits connections by handle; the model is told that order
        order = sorted((h, i) for i, h in enumerate(self.core.handles) if not self.peers[i].closed)
        self.model_broker.tick(self.model.handles[i] for _, i in order)

    def transport(self, peer: Peer, **settings: bool) -> None:
        """Set ``stuck``, ``pause_on_write`` or ``fail`` on the connection's transport on both sides."""
        for side in self.sides:
            for name, value in settings.items():
                setattr(side.transports[peer.index], name, value)

    def drain(self, peer: Peer, nbytes: int) -> None:
        """The socket takes up to nbytes of what the transport holds."""
        for side in self.sides:
            transport = side.transports[peer.index]
            transport.holds -= min(nbytes, transport.holds)

    def walk_topics(self, count: int) -> None:
        assert _entries(self.core.topics(count)) == _entries(self.model.topics(count))

    def walk_connections(self, count: int) -> None:
        assert _entries(self.core.connections(count)) == _entries(self.model.connections(count))

    # ---------------------------------------------------------------- comparison

    def check(self) -> None:
        """Everything the model states must be what the core did."""
        core, model = self.core_broker, self.model_broker
        assert not self.stats_replies.replies, "the core sent a STATS reply the model did not"
        for peer in self.peers:
            i = peer.index
            core_out, model_out = self.core.transports[i].written, self.model.transports[i].written
            assert core_out == model_out, _first_difference(i, bytes(core_out), bytes(model_out))
            assert self.core.closes[i] == self.model.closes[i], i
            assert self.core.reading[i] == self.model.reading[i], i
            if not peer.closed:
                assert core.client_id(self.core.handles[i]) == model.client_id(self.model.handles[i]), i
        assert self.core.logins == self.model.logins
        assert self.core.warnings == self.model.warnings
        core_stats, model_stats = core.stats(), model.stats()
        assert set(core_stats) - set(model_stats) <= NOT_STATED
        differ = {k: (core_stats.get(k), v) for k, v in model_stats.items() if core_stats.get(k) != v}
        assert not differ, f"stats (core, model): {differ}"
        core_topics = self.core.topics(1000)
        assert _entries(core_topics) == _entries(self.model.topics(1000))
        assert core.groups(0, 1000) == model.groups(0, 1000)
        for entry in core_topics:
            name = entry["name"].encode()
            assert core.topic_info(name) == model.topic_info(name), name
        # a flush is due only if the server was asked for one (or it flushes in every call anyway)
        if core.on_output is not None and model.flush_due():
            assert self.core.flush_asked

    def finish(self) -> None:
        """The end of a session: flush, close every socket, compare once more."""
        try:
            self.flush()
            for peer in self.peers:
                self.close(peer)
            self.check()
        finally:
            self.stop_recording()

    def stop_recording(self) -> None:
        """Give the core its json module back."""
        pigeon._core.json = json  # type: ignore[attr-defined]


def _entries(entries: list[dict[str, Any]]) -> list[str]:
    """Listed topics or connections as a sorted list, without the figures the model does not state."""
    return sorted(
        json.dumps({k: v for k, v in entry.items() if k not in NOT_STATED}, sort_keys=True)
        for entry in entries
    )


def _first_difference(i: int, core: bytes, model: bytes) -> str:
    core_lines, model_lines = core.split(b"\n"), model.split(b"\n")
    n = next(
        (k for k, (a, b) in enumerate(zip(core_lines, model_lines, strict=False)) if a != b),
        min(len(core_lines), len(model_lines)),
    )
    return f"connection {i}, line {n}: core {core_lines[n : n + 3]!r}, model {model_lines[n : n + 3]!r}"
