"""Coverage-guided fuzzing of the broker core with atheris, differential against the reference model.

Each input is a session (see ``Input`` for its format): limits, then
operations (open, read with or without a flush, flush, pause, resume, EOF,
close, ticks, transports that fill up, pause their connection, drain or fail,
walks of the topic and connection pages, well-formed commands among them
SUBSCRIBE ... ACK [PREFETCH n], and ACK or NACK of the tags a connection
holds, single or as ranges, or of tags it does not; consumer groups and
wildcard patterns (SUBSCRIBE ... GROUP, DESTROY, STATS GROUPS); with authentication,
CONNECT with the credentials of tests/harness.USERS or wrong ones, logins
answered later, identities granted before CONNECT or again while connected,
topics on the edges of the users' patterns; protocol 2: HELLO 2 and framed PUB
with any payload, wrong counts and counts over max_payload; request/reply: REQ
frames, REPLY frames with real, stale and malformed tokens), run on the Cython core and on
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
    from tests.harness import USERS, Peer, Session

# The version of the input format below; a saved regression starts with the line REGRESSION_HEADER.
# Inputs of formats 2 (before acknowledgements), 3 (before authentication), 4 (before protocol 2),
# 5 (before consumer groups and wildcards) and 6 (before request/reply) still replay, as they were read then.
FORMAT = 7
FORMATS = (2, 3, 4, 5, 6)
REGRESSION_HEADER = b"pigeon-fuzz %d\n" % FORMAT
MEMORY_NEVER_FULL = 1 << 40  # the model does not count memory (tests/model.py)
OPERATIONS = {2: 18, 3: 19, 4: 21, 5: 22, 6: 22, 7: 23}
# well-formed commands, so that sessions route messages; <me> is the connection's own client id
COMMANDS_2 = (
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
COMMANDS = {
    2: COMMANDS_2,
    3: (
        *COMMANDS_2,
        b"SUBSCRIBE <me> %s ACK",
        b"SUBSCRIBE <me> %s ACK",
        b"SUBSCRIBE <me> %s ACK PREFETCH ",
        b"ACK <me> ",
        b"NACK <me> ",
    ),
}
COMMANDS[4] = (
    *COMMANDS[3],
    b"CONNECT writer pw",
    b"CONNECT worker pw",
    b"CONNECT ops pw",
    b"CONNECT worker wrong",
    b"CONNECT mallory pw",
    b"CONNECT ",
    b"PUBLISH <me> %s.x ",
    b"PUBLISH <me> %s. ",
    b"SUBSCRIBE <me> %s.dead",
    b"SUBSCRIBE <me> a.%s",
    b"STATS CONNECTIONS",
)
COMMANDS[5] = (*COMMANDS[4], b"HELLO 2", b"HELLO 2", b"HELLO 1", b"HELLO ")
COMMANDS[7] = COMMANDS[6] = (
    *COMMANDS[5],
    b"SUBSCRIBE <me> %s GROUP g1",
    b"SUBSCRIBE <me> %s GROUP g2 ACK",
    b"SUBSCRIBE <me> %s GROUP g1 ACK PREFETCH ",
    b"SUBSCRIBE <me> %s.*",
    b"SUBSCRIBE <me> %s.> GROUP g2",
    b"SUBSCRIBE <me> *.%s",
    b"SUBSCRIBE <me> >",
    b"UNSUBSCRIBE <me> %s GROUP g1",
    b"UNSUBSCRIBE <me> %s.*",
    b"UNSUBSCRIBE <me> %s.> GROUP g2",
    b"DESTROY <me> %s GROUP g1",
    b"DESTROY <me> %s.> GROUP g2",
    b"PUBLISH <me> %s.b ",
    b"PUBLISH <me> b.%s ",
    b"STATS GROUPS",
)
USER_NAMES = sorted(USERS)
MAX_PAYLOADS = (0, 5, 1 << 20)
MAX_BACKLOG_BYTES = (0, 8, 30, 1 << 30)
# how a framed PUB's count relates to its payload: right, one short, one over, missing
FRAME_COUNTS = ("ok", "ok", "short", "long", "none")
TOPICS = (b"a", b"b", "\u00e9".encode())
# reply tokens <handle>.<generation>.<id>: a session's first connections are handles 0 to 2 of generations
# 1 to 3 asking few requests, so most are real; then stale (a later generation, an id not given) and malformed
REPLY_TOKENS = (b"0.1.1", b"0.1.2", b"1.2.1", b"1.2.2", b"2.3.1", b"0.4.1", b"0.1.9", b"x", b"0.1", b"0.1.0")
DEFAULT_PREFETCH = (1, 2, 3, 1000)
# a NACK's delay: none, 0 (at once), a day (never due in a session: the model keeps it for good), broken
NACK_DELAYS = (b"", b"", b" 0", b" 86400000", b" 86400001", b" x")


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

    Format 3 adds two bytes of limits (the default prefetch, max_deliveries),
    the commands SUBSCRIBE ... ACK [PREFETCH], ACK and NACK, and an operation
    that settles tags the connection holds: a byte of flags (NACK, a range,
    backwards, a flush follows), one for the tag (counted back from the last
    one the connection holds), one for the range's length and one for the
    NACK's delay.

    Format 4 adds a byte after the limits (odd: authentication on), the
    commands CONNECT with credentials (tests/harness.USERS, a wrong password,
    an unknown user) and with topics on the patterns' edges, an operation that
    answers the logins asked for (a feed answers them too), and one that
    grants a user to a connection: a byte picks the user.

    Format 5 adds two bytes of limits (max_payload: 0, 5 or 1 MiB; max_backlog_bytes), the commands
    HELLO 2 and HELLO 1, and an operation that sends a framed PUB: a byte for
    the topic, a read for the payload (any bytes), one for how its count
    relates to it (FRAME_COUNTS), one for the line ends (CRLF or LF after the
    header, after the payload) and one for whether a flush follows.
    Format 6 adds the commands of consumer groups and wildcards: SUBSCRIBE and
    UNSUBSCRIBE with GROUP and with patterns (`*`, `>`), DESTROY, PUBLISH to
    topics the patterns match, STATS GROUPS.
    Format 7 adds an operation that sends a request/reply frame: a byte (odd: a
    REQ, else a REPLY), a read for the payload, a byte for the topic (REQ) or
    the token (REPLY_TOKENS), and one for whether a flush follows.
    """

    def __init__(self, data: bytes, version: int = FORMAT) -> None:
        self.data = data
        self.pos = 0
        self.version = version

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
    limits: dict[str, int] = {
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
        "ack_timeout": 0,  # the core's clock, which the model does not read (tests/model.py)
    }
    if source.version >= 3:
        limits["default_prefetch"] = DEFAULT_PREFETCH[source.byte() % len(DEFAULT_PREFETCH)]
        limits["max_deliveries"] = source.byte() % 4
    auth = source.version >= 4 and bool(source.byte() & 1)
    if source.version >= 5:
        limits["max_payload"] = MAX_PAYLOADS[source.byte() % len(MAX_PAYLOADS)]
        limits["max_backlog_bytes"] = MAX_BACKLOG_BYTES[source.byte() % len(MAX_BACKLOG_BYTES)]
    return Session(limits, deferred=deferred, auth=auth)


def step(session: Session, source: Input) -> None:
    """One operation on both brokers."""
    op = source.byte() % OPERATIONS[source.version]
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
    elif op == 19:
        session.answer_logins()
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
    elif op == 18:
        settle(session, peer, source)
    elif op == 20:
        session.grant(peer, USER_NAMES[source.byte() % len(USER_NAMES)])
    elif op == 21:
        publish_frame(session, peer, source)
    elif op == 22:
        request_frame(session, peer, source)
    else:
        commands = COMMANDS[source.version]
        command = commands[source.byte() % len(commands)]
        topic = TOPICS[source.byte() % len(TOPICS)]
        line = (command % topic if b"%s" in command else command) + source.chunk().replace(b"\n", b"") + b"\n"
        if source.byte() & 1:
            session.feed(peer, session.own_id(peer, line))
        else:
            session.read(peer, session.own_id(peer, line))


def publish_frame(session: Session, peer: Peer, source: Input) -> None:
    """A framed PUB with any payload, its count right or wrong or missing."""
    topic = TOPICS[source.byte() % len(TOPICS)]
    payload = source.chunk()
    shape = FRAME_COUNTS[source.byte() % len(FRAME_COUNTS)]
    ends = source.byte()
    count = {"short": max(len(payload) - 1, 0), "long": len(payload) + 1}.get(shape, len(payload))
    head = b"PUB <me> " + topic + (b"" if shape == "none" else b" %d" % count)
    header_end = b"\r\n" if ends & 1 else b"\n"
    payload_end = b"\r\n" if ends & 2 else b"\n"
    frame = session.own_id(peer, head + header_end) + payload + payload_end
    if source.byte() & 1:
        session.feed(peer, frame)
    else:
        session.read(peer, frame)


def request_frame(session: Session, peer: Peer, source: Input) -> None:
    """A REQ frame to a topic, or a REPLY frame with a token that is real, stale or malformed."""
    request = bool(source.byte() & 1)
    payload = source.chunk()
    choice = source.byte()
    if request:
        head = b"REQ <me> %s %d\n" % (TOPICS[choice % len(TOPICS)], len(payload))
    else:
        head = b"REPLY %s %d\n" % (REPLY_TOKENS[choice % len(REPLY_TOKENS)], len(payload))
    frame = session.own_id(peer, head) + payload + b"\n"
    if source.byte() & 1:
        session.feed(peer, frame)
    else:
        session.read(peer, frame)


def settle(session: Session, peer: Peer, source: Input) -> None:
    """ACK or NACK of tags the connection holds (or, when it holds none, of tags it does not)."""
    flags, back, span, delay = source.byte(), source.byte() % 8, source.byte() % 5, source.byte()
    tags = session.outstanding(peer) or [1 + back]
    first = tags[max(0, len(tags) - 1 - back)]
    if not flags & 2:
        spec = b"%d" % first
    elif flags & 4:
        spec = b"%d-%d" % (first + span, first)  # backwards: a usage error unless span is 0
    else:
        spec = b"%d-%d" % (first, first + span)
    line = (
        b"NACK <me> " + spec + NACK_DELAYS[delay % len(NACK_DELAYS)] if flags & 1 else b"ACK <me> " + spec
    ) + b"\n"
    if flags & 8:
        session.feed(peer, session.own_id(peer, line))
    else:
        session.read(peer, session.own_id(peer, line))


def test_one_input(data: bytes, version: int = FORMAT) -> None:
    """One fuzz case: a whole session from the input's bytes (read as ``version`` of the format)."""
    source = Input(data, version)
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
    versions = {b"pigeon-fuzz %d" % version: version for version in (*FORMATS, FORMAT)}
    assert header in versions, f"{path.name} is in format {header!r}: re-encode it"
    test_one_input(rest, versions[header])


def main() -> None:
    """Run the fuzzer with libFuzzer's command line (``-help=1`` lists the flags)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
