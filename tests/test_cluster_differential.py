"""Differential test of a cluster against one server (docs/cluster.md: a client may connect to any
node and sees the same semantics as with one server).

The same random sessions run over real sockets against one ``pigeon`` and against a 3-node cluster
(a real etcd), with the session's clients spread over the nodes and its topics over the owners:
each client pipelines a few commands at a time (subscriptions plain, acknowledged, with prefetch,
in consumer groups and to wildcard patterns; PUBLISH lines and PUB frames; ACK and NACK of what it
was given; REQ and REPLY to the requests it was given; UNSUBSCRIBE, DESTROY, broken commands;
HELLO 2 and back, deliveries as MSG and DMSG frames or as lines; DISCONNECT, after which it connects
again), and every client must get the same
replies and the same deliveries from both, each topic's in the same order. One server answers a step
completely before the next (a PING of every client ends it); the cluster relays deliveries from
owners when they come, so each client is waited for until it has as many as it had from one server.

Tags are numbers of each broker's own (a cluster node renumbers those it relays), so deliveries and
replies are compared with tags left out; the ``ACK``/``NACK`` of a session names a position among
the client's unsettled deliveries, which each run turns into its own tag, and an error naming a tag
the client sent names it by that position.

``PIGEON_CLUSTER_SESSIONS`` sets the number of sessions (default 12).
"""

from __future__ import annotations

import os
import random
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pigeon.testing import LineClient, ServerProcess
from tests.cluster_kit import Cluster, running_cluster, topic_owned_by

CLIENTS = 6
SESSIONS = int(os.environ.get("PIGEON_CLUSTER_SESSIONS", "12"))
STEPS = 40
WAIT = 10.0  # seconds a client of the cluster may take to get the deliveries one server gave
GROUPS = ("g1", "g2")

# the kinds of command of a session, and how often each comes
KINDS = (
    "sub",
    "unsub",
    "publish",
    "frame",
    "ack",
    "nack",
    "ping",
    "destroy",
    "broken",
    "hello",
    "req",
    "reply",
    "disconnect",
)
KIND_WEIGHTS = (4, 2, 8, 3, 3, 2, 1, 1, 1, 1, 3, 4, 1)
Command = tuple[str, ...]  # a command of a session, which each run renders with its own id and tags
Step = tuple[int, list[Command]]  # a client and the commands it sends in one write


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three nodes n0, n1, n2 and who serves which slots."""
    with running_cluster() as started:
        yield started


@pytest.fixture(scope="module")
def single() -> Iterator[ServerProcess]:
    """One server, the reference."""
    server = ServerProcess()
    try:
        yield server
    finally:
        assert server.stop() == 0, "".join(server.log)


def _session(rng: random.Random, owned: dict[str, set[int]], seed: int) -> list[Step]:
    """A session's steps, over two topics of each node and a pattern matching those two: a pattern
    that matches topics of several owners has its prefetch and round robin per owner (docs/cluster.md,
    "Wildcard patterns"), which one server does not."""
    topics = [
        topic_owned_by(owned, node, f"s{seed}.{node}.{half}") for node in sorted(owned) for half in "ab"
    ]
    targets = [*topics, *(f"s{seed}.{node}.*" for node in sorted(owned))]
    bodies = iter(range(1 << 30))
    subscribed: list[set[tuple[str, str]]] = [set() for _ in range(CLIENTS)]  # (target, GROUP ...)

    def command(who: int) -> Command:
        kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
        target = rng.choice(targets)
        group = rng.choice(("", *(f"GROUP {name}" for name in GROUPS)))
        if kind == "sub":
            acks = rng.choice(("", "ACK", "ACK PREFETCH 1", "ACK PREFETCH 2"))
            subscribed[who].add((target, group))
            return ("sub", target, f"{group} {acks}".strip())
        if kind == "unsub":
            if subscribed[who] and rng.random() < 0.7:  # mostly its own: what it holds goes to others
                target, group = rng.choice(sorted(subscribed[who]))
            subscribed[who].discard((target, group))
            return ("unsub", target, group)
        if kind in ("publish", "frame", "req"):
            return (kind, rng.choice(topics), f"m{next(bodies)}")
        if kind in ("ack", "nack", "reply"):
            return (kind, str(rng.randrange(4)))
        if kind == "destroy":
            return ("destroy", target, rng.choice(GROUPS))
        if kind == "broken":
            broken = (f"PUBLISH c999999 {topics[0]} x", "SUBSCRIBE {me}", "NOPE", "ACK {me} x")
            return ("raw", rng.choice(broken))
        if kind == "hello":
            return ("hello", rng.choice("12"))
        if kind == "disconnect":
            subscribed[who].clear()
            return ("disconnect",)
        return ("ping",)

    # half the clients start with protocol 2: only their deliveries of a request carry its token
    steps: list[Step] = [(who, [("hello", "2")]) for who in range(0, CLIENTS, 2)]
    for _ in range(STEPS):
        who = rng.randrange(CLIENTS)
        commands = [command(who) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.1:
            # publishes sent so that a node passes them on as one batch (``_step``): to both topics of
            # one node, or of two (then one by one)
            nodes = rng.sample(range(len(owned)), rng.choice((1, 1, 2)))
            chosen = [topic for node in nodes for topic in topics[2 * node : 2 * node + 2]]
            commands = [("batch", rng.choice(chosen), f"m{next(bodies)}") for _ in range(rng.randint(3, 7))]
        if ("disconnect",) in commands:
            # alone in its write: one server runs a write's commands before it delivers what they
            # published, so a DISCONNECT behind a PUBLISH leaves before it could be given the
            # message; a node sends the DISCONNECT only once the owner answered the PUBLISH (and
            # may have delivered it), as one server does when they come in two writes
            commands = [("disconnect",)]
        steps.append((who, commands))
    return steps


@dataclass
class Peer:
    """One client of a run: what it received, deliveries apart from replies (those of each connection
    it makes again after a DISCONNECT too)."""

    client: LineClient
    opener: Callable[[], LineClient]  # a new connection to the same broker (or node)
    deliveries: list[bytes] = field(default_factory=list)  # tags left out
    unsettled: list[tuple[bytes, bytes]] = field(default_factory=list)  # (tag, topic) of each DELIVER
    settled: list[bytes] = field(default_factory=list)  # the tags of the ACKs and NACKs of a step
    requests: list[bytes] = field(default_factory=list)  # the id of each REQUESTED, in order
    tokens: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)  # (token, topic, payload)

    def read(self) -> bytes | None:
        """The next reply line, taking the deliveries before it; None on a read timeout."""
        while True:
            try:
                line = self.client.line()
            except TimeoutError:
                return None
            if line.startswith(b"MESSAGE "):
                self.deliveries.append(line)
            elif line.startswith(b"DELIVER "):
                _, topic, tag, rest = line.split(b" ", 3)
                self.unsettled.append((tag, topic))
                self.deliveries.append(b"DELIVER %s %s" % (topic, rest))
            elif line.startswith((b"MSG ", b"DMSG ", b"RMSG ")):  # a frame, its payload after it
                self.deliveries.append(self._frame(line.split(b" ")))
            elif line.startswith(b"REQUESTED "):
                self.requests.append(line.split(b" ")[1])
                return b"REQUESTED #%d" % (len(self.requests) - 1)
            else:
                return line

    def _frame(self, fields: list[bytes]) -> bytes:
        """A frame whose header is ``fields``, read whole, as it is compared: a reply by its request's
        position, a request's token (which each run makes its own) kept apart as R."""
        waited = self.client.sock.gettimeout()
        self.client.sock.settimeout(WAIT)  # the payload is on its way: no read timeout inside
        try:
            payload = self.client.take(int(fields[-1]) + 1)[:-1]
        finally:
            self.client.sock.settimeout(waited)
        if fields[0] == b"RMSG":
            request = self.requests.index(fields[1]) if fields[1] in self.requests else -1
            return b"RMSG #%d %s" % (request, payload)
        # MSG <topic> [<token>] <nbytes>, DMSG <topic> <tag> <attempt> [<token>] <nbytes>
        token_at = 2 if fields[0] == b"MSG" else 4
        if len(fields) == token_at + 2:
            self.tokens.append((fields[token_at], fields[1], payload))
            fields[token_at] = b"R"
        if fields[0] == b"DMSG":
            self.unsettled.append((fields[2], fields[1]))
            del fields[2]
        return b" ".join([*fields[:-1], payload])

    def render(self, command: Command) -> str:
        """A command as this run sends it: with this client's id and tags."""
        me = self.client.client_id
        kind = command[0]
        if kind == "sub":
            return f"SUBSCRIBE {me} {command[1]} {command[2]}".rstrip()
        if kind == "unsub":
            return f"UNSUBSCRIBE {me} {command[1]} {command[2]}".rstrip()
        if kind in ("publish", "batch"):
            return f"PUBLISH {me} {command[1]} {command[2]}"
        if kind in ("frame", "req"):
            verb = "PUB" if kind == "frame" else "REQ"
            return f"{verb} {me} {command[1]} {len(command[2])}\n{command[2]}"
        if kind == "reply":
            # any token it was given, replied to already or not: the first reply wins, as on one server
            self.tokens.sort(key=lambda token: token[1])  # by topic, as for ACK
            if not self.tokens:
                return "REPLY 0.0.0 1\nx"  # a token of nobody: dropped
            token, _, payload = self.tokens[int(command[1]) % len(self.tokens)]
            return f"REPLY {token.decode()} {len(payload) + 1}\nr{payload.decode()}"
        if kind in ("ack", "nack"):
            if not self.unsettled:
                return f"{kind.upper()} {me} 999999"
            # by topic (stable: in the order each topic's came), as the owners' deliveries interleave
            # in any order on a cluster
            self.unsettled.sort(key=lambda unsettled: unsettled[1])
            tag, _ = self.unsettled.pop(int(command[1]) % len(self.unsettled))
            self.settled.append(tag)
            return f"{kind.upper()} {me} {tag.decode()}"
        if kind == "destroy":
            return f"DESTROY {me} {command[1]} GROUP {command[2]}"
        if kind == "hello":
            return f"HELLO {command[1]}"
        if kind == "raw":
            return command[1].format(me=me)
        if kind == "disconnect":
            return "DISCONNECT"
        return "PING"

    def connect_again(self) -> None:
        """After its DISCONNECTED: a new connection, with nothing of the old one's (a relayed reply
        token of the old one names a closed upstream on a cluster: docs/cluster.md)."""
        assert self.client.sock.recv(1) == b"", "the broker did not close after DISCONNECTED"
        self.client.close()
        self.client = self.opener()
        self.client.connect()
        self.unsettled.clear()
        self.tokens.clear()
        self.requests.clear()  # each connection numbers its requests from 1


def _spelled(command: Command, line: str) -> str:
    """``line`` with its verb spelled one of the ways both brokers take: as it is, in lower case, or
    capitalized after a blank (the router must see a verb it routes however it is written). Chosen
    by the command, so that both runs of a session spell it the same."""
    spelling = zlib.crc32(repr(command).encode()) % 3
    if command[0] in ("raw", "batch") or spelling == 0:
        return line
    verb, sep, rest = line.partition(" ")
    return (verb.lower() if spelling == 1 else " " + verb.capitalize()) + sep + rest


def _normal(reply: bytes, tags: list[bytes]) -> bytes:
    """A reply with the tags the client sent in it named by their order (each broker numbers its own).
    Whole numbers only: a node's tag 1 must not rename the start of its relayed tag 1099511627778."""
    numbers: dict[bytes, int] = {}
    for number, tag in enumerate(tags):
        numbers.setdefault(tag, number)

    def named(match: re.Match[bytes]) -> bytes:
        number = numbers.get(match[1])
        return match[0] if number is None else b"tag #%d" % number

    return re.sub(rb"tag (\d+)", named, reply)


def _by_topic(deliveries: list[bytes]) -> dict[bytes, list[bytes]]:
    """Deliveries by topic, each topic's in the order they came: the order kept across a cluster
    (docs/cluster.md, "Guarantees"; those of topics with different owners interleave in any order)."""
    found: dict[bytes, list[bytes]] = {}
    for delivery in deliveries:
        found.setdefault(delivery.split(b" ", 2)[1], []).append(delivery)
    return found


@dataclass
class Run:
    """A session run against one broker: each step's replies, how many deliveries each client had
    after it, and each client's deliveries at the end."""

    replies: list[list[bytes]] = field(default_factory=list)
    delivered: list[list[int]] = field(default_factory=list)
    deliveries: list[list[bytes]] = field(default_factory=list)


def _connected(openers: list[Callable[[], LineClient]]) -> list[Peer]:
    peers = [Peer(opener(), opener) for opener in openers]
    for peer in peers:
        peer.client.connect()
    return peers


def _step(peers: list[Peer], step: Step) -> list[bytes]:
    """Send a step's commands in one write, then a PING: the replies before its PONG. A step that ends
    with DISCONNECT has no PING: the replies before DISCONNECTED; then the client connects again.
    A step of ``batch`` publishes is sent in three writes, each once the one before is answered: the
    first publish (a node routes it by itself, to its topic's owner), the others (to topics of the
    same node: passed on whole, ``publish_slots``), then the PING."""
    who, commands = step
    peer = peers[who]
    peer.settled.clear()
    replies: list[bytes] = []
    if commands[0][0] == "batch":
        for write in (commands[:1], commands[1:]):
            peer.client.send("".join(peer.render(command) + "\n" for command in write).encode())
            for _ in write:
                line = peer.read()
                assert line is not None, f"no reply to a publish after {replies}"
                replies.append(_normal(line, peer.settled))
        commands = []
    disconnects = bool(commands) and commands[-1] == ("disconnect",)
    peer.client.send(
        "".join(_spelled(command, peer.render(command)) + "\n" for command in commands)
        + ("" if disconnects else "PING\n")
    )
    last = b"DISCONNECTED" if disconnects else b"PONG"
    ends = 1 if disconnects else sum(command == ("ping",) for command in commands) + 1
    while ends:
        line = peer.read()
        assert line is not None, f"no {last.decode()} after {replies}"
        ends -= line == last
        replies.append(_normal(line, peer.settled))
    if disconnects:
        peer.connect_again()
    return replies[:-1]


def _run_single(server: ServerProcess, session: list[Step]) -> Run:
    run = Run()
    peers = _connected([_opener(server)] * CLIENTS)
    for step in session:
        run.replies.append(_step(peers, step))
        for peer in peers:  # one server: every delivery the step made comes before this PONG
            peer.client.send("PING\n")
            assert peer.read() == b"PONG"
        run.delivered.append([len(peer.deliveries) for peer in peers])
    run.deliveries = [peer.deliveries for peer in peers]
    for peer in peers:
        peer.client.close()
    return run


def _opener(node: ServerProcess) -> Callable[[], LineClient]:
    return lambda: node.client(timeout=WAIT)


def _wait_for_deliveries(peer: Peer, count: int, context: str) -> None:
    """Read ``peer`` until it holds ``count`` deliveries (a reply meanwhile fails the test)."""
    deadline = time.monotonic() + WAIT
    peer.client.sock.settimeout(0.05)
    try:
        while len(peer.deliveries) < count:
            assert time.monotonic() < deadline, f"{context}: only {peer.deliveries}"
            stray = peer.read()
            assert stray is None, f"{context}: got {stray!r}"
    finally:
        peer.client.sock.settimeout(WAIT)


def test_sessions_see_the_same_on_a_cluster_as_on_one_server(cluster: Cluster, single: ServerProcess) -> None:
    nodes, owned = cluster
    names = sorted(nodes)
    for seed in range(SESSIONS):
        session = _session(random.Random(seed), owned, seed)
        expected = _run_single(single, session)
        peers = _connected([_opener(nodes[names[i % len(names)]]) for i in range(CLIENTS)])
        for number, step in enumerate(session):
            context = f"session {seed}, step {number}: client {step[0]} sent {step[1]}"
            assert _step(peers, step) == expected.replies[number], context
            for who, peer in enumerate(peers):
                count = expected.delivered[number][who]
                _wait_for_deliveries(peer, count, f"{context}; client {who}")
                assert _by_topic(peer.deliveries) == _by_topic(expected.deliveries[who][:count]), (
                    f"{context}; client {who}"
                )
        for who, peer in enumerate(peers):  # nothing more: then close (which redelivers what is unsettled)
            assert peer.client.quiet(0.3), f"session {seed}: client {who} got more: {peer.client.buf!r}"
        for peer in peers:
            peer.client.close()
