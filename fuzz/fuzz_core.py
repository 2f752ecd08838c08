"""Coverage-guided fuzzing of the broker core with atheris, differential against the reference model.

Each input is a session (see ``Input`` for its format): limits, then
operations (open, read with or without a flush, flush, pause, resume, EOF,
close, ticks, transports that fill up, pause their connection, drain or fail,
walks of the topic and connection pages), run on the Cython core and on
tests/model.py through tests/harness.Session, which the differential test uses
too. After every operation the session compares what the model states
(output bytes, close and reading events, client ids, warnings, figures,
topics); any difference, and any crash, is a finding. Coverage comes from the
instrumented model and harness, whose branches follow the protocol's rules, so
it guides the search through the core's states too.

    python fuzz/fuzz_core.py fuzz/corpus -dict=fuzz/pigeon.dict -max_total_time=300

A finding is saved as crash-*: add it to fuzz/regressions/ with the format
line in front (see fuzz/regressions/README.md), and a test that names the bug.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports(include=["tests"]):
    from tests.harness import Peer, Session

# The version of the input format below; a saved regression starts with the line REGRESSION_HEADER.
FORMAT = 2
REGRESSION_HEADER = b"pigeon-fuzz %d\n" % FORMAT
MEMORY_NEVER_FULL = 1 << 40  # the model does not count memory (tests/model.py)
OPERATIONS = 18
# well-formed commands, so that sessions route messages; <me> is the connection's own client id
COMMANDS = (
    b"CONNECT",
    b"SUBSCRIBE <me> %s",
    b"UNSUBSCRIBE <me> %s",
    b"PUBLISH <me> %s ",
    b"PUBLISH <me> %s ",
    b"PUBLISH <me> %s ",
    b"PING",
    b"HELLO",
    b"STATS",
    b"STATS TOPICS",
    b"STATS CONNECTIONS 0 1",
    b"DISCONNECT",
)
TOPICS = (b"a", b"b", "\u00e9".encode())


class Input:
    """One fuzz input, read front to back; past its end every byte reads as 0.

    Format 2: one byte for flushing (odd: deferred to flush(), as the server
    does), nine bytes of limits, then operations: one byte picks the
    operation, a byte picks the connection it acts on (among those not
    closed, modulo their number), then its own bytes: a length byte and that
    many bytes for a read (where ``<me>`` stands for the connection's client
    id), one byte for a setting or a count; a well-formed command takes a
    byte for the command, one for the topic, a read for the rest of the line
    (a PUBLISH's message) and one for whether a flush follows.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def byte(self) -> int:
        value = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return value

    def chunk(self) -> bytes:
        n = self.byte()
        data = self.data[self.pos : self.pos + n]
        self.pos += n
        return data


def start(source: Input) -> Session:
    """A session with the flushing mode and the limits the input gives."""
    deferred = bool(source.byte() & 1)
    limits = {
        "max_line": 64 + source.byte() % 137,
        "max_backlog": source.byte() % 7,
        "max_connections": 1 + source.byte() % 6,
        "max_memory": MEMORY_NEVER_FULL,
        "max_subscriptions": 1 + source.byte() % 4,
        "max_topics": 1 + source.byte() % 6,
        "max_pending": 1 + source.byte(),
        "idle_timeout": source.byte() % 4,
        "write_timeout": source.byte() % 4,
        "out_batch": 1 + source.byte(),
    }
    return Session(limits, deferred=deferred)


def step(session: Session, source: Input) -> None:
    """One operation on both brokers."""
    op = source.byte() % OPERATIONS
    if op == 0 or not session.peers:
        session.open()
        return
    if op == 4:
        session.flush()
    elif op == 9:
        session.tick()
    elif op == 14:
        session.walk_topics(1 + source.byte() % 3)
    elif op == 15:
        session.walk_connections(1 + source.byte() % 3)
    elif op == 16:
        session.reap()
    else:
        peer = session.live(source.byte())
        if peer is not None:
            act(session, peer, op, source)


def act(session: Session, peer: Peer, op: int, source: Input) -> None:
    """An operation on one connection."""
    if op == 1:
        session.read(peer, session.own_id(peer, source.chunk()))
    elif op in (2, 3):
        session.feed(peer, session.own_id(peer, source.chunk()))
    elif op == 5:
        session.pause(peer)
    elif op == 6:
        session.resume(peer)
    elif op == 7:
        session.close(peer)
    elif op == 8:
        session.eof(peer)
    elif op == 10:
        session.transport(peer, pause_on_write=bool(source.byte() & 1))
    elif op == 11:
        session.transport(peer, stuck=bool(source.byte() & 1))
    elif op == 12:
        session.drain(peer, source.byte())
    elif op == 13:
        session.transport(peer, fail=True)
    else:
        command = COMMANDS[source.byte() % len(COMMANDS)]
        topic = TOPICS[source.byte() % len(TOPICS)]
        line = (command % topic if b"%s" in command else command) + source.chunk().replace(b"\n", b"") + b"\n"
        if source.byte() & 1:
            session.feed(peer, session.own_id(peer, line))
        else:
            session.read(peer, session.own_id(peer, line))


def test_one_input(data: bytes) -> None:
    """One fuzz case: a whole session from the input's bytes."""
    source = Input(data)
    session = start(source)
    try:
        while source.more():
            step(session, source)
            session.check()
    except BaseException:
        session.stop_recording()
        raise
    session.finish()


def replay(path: Path) -> None:
    """Run a saved regression input (the format line, then the input)."""
    data = path.read_bytes()
    header, _, rest = data.partition(b"\n")
    assert header + b"\n" == REGRESSION_HEADER, f"{path.name} is in format {header!r}: re-encode it"
    test_one_input(rest)


def main() -> None:
    """Run the fuzzer with libFuzzer's command line (``-help=1`` lists the flags)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
