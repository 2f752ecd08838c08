"""A client connection of a cluster node: commands for topics this node owns go to its core, the
others to their owner over one upstream Pigeon connection per (client connection, owner node).

The owner sees each remote client as a subscriber of its own, so round robin, prefetch, acks and
redelivery are the owner's, exact. This layer splits the client's input into commands (Python work per
command that it routes, only on cluster nodes; runs of lines it does not route are found in C,
``pigeon.cluster._scan``, and go to the core as one slice) and keeps the protocol's promises across
sources:

- replies come back in command order: the connection sends to one source at a time and switches
  only once the previous source has answered everything (deliveries are relayed at once, they may
  come at any time);
- what has no reply (an ``ACK``/``NACK`` of relayed deliveries, a relayed ``REPLY``) is confirmed
  applied by its owner (a ``PING``) before the client's next command for another source, and every
  owner runs the client's ``DISCONNECT`` before the core answers it;
- delivery tags stay one space per connection: the core's own tags are below ``REMOTE_TAG_BASE``, a
  delivery relayed from an owner gets a tag from ``REMOTE_TAG_BASE`` up, mapped back on ACK/NACK;
- protocol 2 (docs/protocol.md): a ``PUB`` frame is one command, routed whole by its topic; each
  upstream of a client speaks the client's protocol (``HELLO 1``/``HELLO 2``), and ``MSG``/``DMSG``
  frames from owners are relayed whole by their length (a ``DMSG`` tag renumbered like ``DELIVER``);
- a wildcard pattern spans slots: ``SUBSCRIBE``/``UNSUBSCRIBE``/``DESTROY`` of one goes to every
  live node (``pigeon.cluster.patterns``), answered once;
- request/reply (docs/cluster.md): a ``REQ`` goes to its topic's owner like a ``PUB``, and its
  ``REQUESTED`` id and ``RMSG`` from an owner are renumbered from ``REMOTE_TAG_BASE`` up like delivery
  tags; a reply token in a ``MSG``/``DMSG`` from an owner gets a suffix naming the upstream it came
  on (``RelayedTokens``), so that a ``REPLY`` with it goes back there with the owner's own token;
- with ``CLUSTER REDIRECT`` a client asks to be told ``ERROR MOVED <slot> <host:port>`` instead of
  being forwarded (docs/cluster.md), the way Redis Cluster clients are;
- with ``CLUSTER REPLICATE <owner>`` another node makes the connection a replication stream
  (``pigeon.cluster.replication``): what follows is its records, not commands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from pigeon._core import INPUT_SLACK_BYTES, Broker
from pigeon.cluster._scan import InputScanner, PlainLines, command_fields, publish_slots
from pigeon.cluster.node import ClusterNode
from pigeon.cluster.patterns import EVERY_NODE, PatternPlacement, ignored_answer
from pigeon.cluster.replication import REPLICATE, ReplicaReceiver, ReplicaStore
from pigeon.cluster.slots import slot_of
from pigeon.server.busiest import PAGE_MAX
from pigeon.server.confirmed import ConfirmedLog
from pigeon.server.logins import Logins
from pigeon.server.protocol import _Connection

log = logging.getLogger("pigeon.cluster")

REMOTE_TAG_BASE = 1 << 40
# ACK/NACKs an upstream sends before it asks its owner to confirm them (a PING), whatever the client
# does next: what it keeps to name the client's tags in an error stays bounded
SETTLES_PER_CONFIRM = 1024
# the requests of a connection waiting for a reply that the core keeps (REQUEST_WINDOW of
# pigeon/core/requests.pxd), and that a node keeps of those its client sent to owners
REQUEST_WINDOW = 4096
# bytes of commands an upstream keeps while it connects (until CONNECTED) before the client's input
# is held: an owner that does not answer must not make this node keep all a client sends
QUEUED_MAX = 256 * 1024
# bytes of a client's commands read but not routed yet (they wait for another source's answers)
# before the node stops reading the client, and reads again below half of it: a client that sends
# faster than its owners answer must not make this node keep all it sends
UNROUTED_MAX = 256 * 1024

# commands whose third field is a topic, and whose reply is one line
_TOPIC_COMMANDS = frozenset((b"PUBLISH", b"PUB", b"REQ", b"SUBSCRIBE", b"UNSUBSCRIBE", b"DESTROY"))
# commands whose third field may be a wildcard pattern (consumer groups), which spans slots
_PATTERN_COMMANDS = frozenset((b"SUBSCRIBE", b"UNSUBSCRIBE", b"DESTROY"))
_WILDCARDS = (b"*", b">")
_SETTLE_COMMANDS = frozenset((b"ACK", b"NACK"))
_LOCAL = ""  # the source name of this node's own core
# the buffer every client connection of this process reads into: what a read leaves unrouted is
# copied out before the next read (_take), so one serves them all, as the core's read buffer does
# (a buffer each cost 64 KiB per connection, idle ones included)
_READ_VIEW = memoryview(bytearray(1 << 16))
# stands in the pending commands for an unfinished one the router refuses (compared by identity)
_INPUT_REFUSED = b"INPUT_REFUSED"
_NO_OWNER = "\0"  # a command for a slot without owner now: it waits (no node name has a NUL: argv cannot)

# Seconds between two looks for the owner of a slot that has none, and how long past the lease TTL a
# command waits for one before it is refused with TRYAGAIN.
OWNER_RETRY = 0.1
OWNER_WAIT_MARGIN = 2.0


def is_pattern(topic: bytes) -> bool:
    """Whether ``topic`` is a wildcard pattern: one of its dot-separated tokens is ``*`` or ``>``."""
    return any(token in _WILDCARDS for token in topic.split(b"."))


def frame_end(data: bytes, start: int, nbytes: int) -> int | None:
    """Where a frame whose payload of ``nbytes`` begins at ``start`` ends, past the line end after
    the payload (``\\n`` or ``\\r\\n``); None while ``data`` does not hold it all, -1 when the byte after
    the payload is no line end (a wrong count)."""
    stop = start + nbytes
    if len(data) <= stop or (data[stop] == 13 and len(data) == stop + 1):
        return None
    if data[stop] == 10:
        return stop + 1
    if data[stop : stop + 2] == b"\r\n":
        return stop + 2
    return -1


# the frames, by the number of fields of their header: PUB <id> <topic> <nbytes>, REQ <id> <topic>
# <nbytes>, REPLY <token> <nbytes>
_FRAME_FIELDS = {b"PUB": 4, b"REQ": 4, b"REPLY": 3}
_FRAME_VERBS = frozenset(_FRAME_FIELDS)
# every verb _classify or _route looks at: a line with none of them goes to the core as it is
_INPUT = InputScanner(
    (*_TOPIC_COMMANDS, *_SETTLE_COMMANDS, b"CLUSTER", b"CONNECT", b"HELLO", b"DISCONNECT"), _FRAME_VERBS
)


def frame_nbytes(header: bytes) -> int | None:
    """The ``<nbytes>`` of a well-formed frame header line (``PUB``, ``REQ``, ``REPLY``; as for the
    core, its verb begins the line), else None (a line that is no frame header, or a malformed one,
    which the core answers ``BAD_FRAME``)."""
    fields = command_fields(header)
    if (
        not fields
        or header[:1] in (b" ", b"\t")
        or _FRAME_FIELDS.get(fields[0].upper()) != len(fields)
        or not fields[-1].isdigit()
    ):
        return None
    return int(fields[-1])


def split_commands(data: bytes, max_payload: int) -> tuple[list[bytes], int, int, bool]:
    """The whole commands at the start of ``data``: each line without its ``\\n``, each well-formed
    ``PUB`` frame as one item (its header line, ``\\n``, the payload and its line end less the last
    ``\\n``, so that items joined by ``\\n`` are the input again). Also how many bytes they take, and
    how many bytes the rest must reach before another command can be whole (0: one more line end),
    and whether the last item is a ``PUB`` over ``max_payload``: its header alone, and the bytes taken
    include its payload (maybe past the end of ``data``), refused and skipped as the core does; what
    follows it is then more input, not an unfinished command.
    A frame not followed by a line end is the last item with all the rest of ``data``: the core it
    goes to answers ``BAD_FRAME`` and closes. Lines are cut in C (``InputScanner``): a run of those
    the router does not route is one ``PlainLines`` item."""
    items: list[bytes] = []
    pos = 0
    while True:
        pos = _INPUT.split_lines(data, pos, items)
        nl = data.find(b"\n", pos)
        if nl < 0:
            return items, pos, 0, False
        nbytes = frame_nbytes(data[pos:nl])  # a line that begins a frame
        if nbytes is None:
            items.append(data[pos:nl])
            pos = nl + 1
            continue
        if nbytes > max_payload:
            items.append(data[pos:nl])
            return items, nl + 1 + nbytes, 0, True
        end = frame_end(data, nl + 1, nbytes)
        if end is None:
            return items, pos, nl + 2 + nbytes - pos, False
        if end < 0:
            items.append(data[pos:])
            return items, len(data), 0, False
        items.append(data[pos : end - 1])
        pos = end


def every_line_starts(chunk: bytes, prefix: bytes) -> bool:
    """Whether every line of ``chunk`` (whole lines, each ending with ``\\n``) begins with ``prefix``."""
    return chunk.startswith(prefix) and chunk.count(b"\n" + prefix) + 1 == chunk.count(b"\n")


def pub_run(data: bytes, prefix: bytes) -> tuple[list[int], int]:
    """The run of whole ``PUB`` frames at the start of ``data`` whose headers all start with ``prefix``
    (``PUB <id> <topic> ``) and end, like their payloads, with a bare ``\\n``: where each begins and
    where the run ends. Only their headers are read: the router's shortcut for a busy publisher."""
    starts: list[int] = []
    pos, skip = 0, len(prefix)
    while data.startswith(prefix, pos):
        nl = data.find(b"\n", pos + skip)
        count = data[pos + skip : nl]
        if nl < 0 or not count.isdigit():
            break
        stop = nl + 1 + int(count)
        if len(data) <= stop or data[stop] != 10:
            break
        starts.append(pos)
        pos = stop + 1
    return starts, pos


def msg_run_end(data: bytes, pos: int) -> int:
    """Where the run of whole ``MSG`` frames without reply token that starts at ``pos`` ends (``pos``
    when none does): they pass on as one slice, only their headers read."""
    while data.startswith(b"MSG ", pos):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        try:  # what follows the topic: the count, or a reply token and the count
            stop = nl + 1 + int(data[data.find(b" ", pos + 4, nl) + 1 : nl])
        except ValueError:  # a request's: its token is rewritten (Upstream._relayed_header)
            break
        if len(data) <= stop:
            break
        pos = stop + 1
    return pos


def is_whole_frame(item: bytes) -> bool:
    """Whether an item of ``split_commands`` is a well-formed frame (``PUB``, ``REQ``, ``REPLY``; not a
    malformed header, nor a frame whose count was wrong), which may be routed."""
    header, sep, body = item.partition(b"\n")
    nbytes = frame_nbytes(header)
    return bool(sep) and nbytes is not None and body[nbytes:] in (b"", b"\r")


def parse_tags(spec: bytes) -> tuple[int, int] | None:
    """``<tag>`` or ``<first>-<last>`` as (first, last), or None when it is not that."""
    first, sep, last = spec.partition(b"-")
    if not first.isdigit() or (sep and not last.isdigit()):
        return None
    return int(first), int(last if sep else first)


def is_core_token(token: bytes) -> bool:
    """Whether ``token`` is a reply token a core takes: ``<handle>.<generation>.<id>``, three decimal
    numbers in range, the id not 0 (``_parse_token`` in pigeon/core/requests.pxi)."""
    fields = token.split(b".")
    if len(fields) != 3 or not all(field.isdigit() and len(field) < 20 for field in fields):
        return False
    handle, generation, request_id = (int(field) for field in fields)
    return handle <= 0x7FFFFFFF and generation <= 0xFFFFFFFF and 0 < request_id < 1 << 64


class RelayedTokens:
    """The upstream connections of this process that relayed reply tokens to clients, by serial.

    A token an owner put in a ``MSG``/``DMSG`` names a connection of the owner's core, so a client of
    this node gets it as ``<owner's token>@<nonce>.<serial>``: the serial names the upstream it came
    on, the nonce (random per process) makes a token of another node, or of this node before a
    restart, name nothing here. A ``REPLY`` with it goes to that owner, over that upstream, with the
    owner's token; one naming an upstream that has closed is dropped, as a reply to a requester that
    has gone is on one server."""

    def __init__(self) -> None:
        self.nonce = os.urandom(4).hex().encode()  # (secrets would import hashlib and more at start)
        self._next_serial = 1
        self._upstreams: dict[int, Upstream] = {}

    def suffix(self, upstream: Upstream) -> bytes:
        """The suffix of the tokens relayed by ``upstream`` (given it a serial on first use)."""
        if upstream.token_serial == 0:
            upstream.token_serial = self._next_serial
            self._next_serial += 1
            self._upstreams[upstream.token_serial] = upstream
        return b"@%s.%d" % (self.nonce, upstream.token_serial)

    def forget(self, upstream: Upstream) -> None:
        """``upstream`` has closed: the tokens it relayed name nothing any more."""
        self._upstreams.pop(upstream.token_serial, None)

    def is_relayed(self, token: bytes) -> bool:
        """Whether ``token`` has the form of a relayed one (of this process or not): an owner's token,
        then ``@<nonce>.<serial>`` for each node that relayed it (two when the node a request went to
        had just lost the topic's slot and passed the request on to its new owner)."""
        owner_token, *suffixes = token.split(b"@")
        return bool(suffixes) and is_core_token(owner_token) and all(map(_is_token_suffix, suffixes))

    def route(self, token: bytes) -> tuple[Upstream, bytes] | None:
        """The open upstream a relayed ``token`` names and the token it had there (the owner's, or
        one the next node relayed), or None (another process's token, or its upstream has closed)."""
        inner, _, suffix = token.rpartition(b"@")
        nonce, _, serial = suffix.partition(b".")
        upstream = self._upstreams.get(int(serial)) if nonce == self.nonce else None
        if upstream is None or upstream.transport is None or upstream.transport.is_closing():
            return None
        return upstream, inner


def _is_token_suffix(suffix: bytes) -> bool:
    """Whether ``suffix`` is ``<nonce>.<serial>``, the part a node adds to a token it relays."""
    nonce, dot, serial = suffix.partition(b".")
    return bool(dot) and len(nonce) == 8 and serial.isdigit()


RELAYED_TOKENS = RelayedTokens()


class KeptAnswer:
    """An answer an upstream keeps instead of relaying it to the client: to a command this node sent
    on its own behalf (``Upstream.capture``, ``Upstream.disconnect``), or to a relayed ``REPLY``
    (``Upstream.send_reply``)."""

    __slots__ = ("before", "take")

    def __init__(self, before: int, take: Callable[[bytes | None], bool]) -> None:
        self.before = before  # replies owed to the client that come before it (after the one kept before)
        self.take = take  # given each line of it (None: the connection is lost); True once it is whole


def _one_line(answered: Callable[[bytes | None], None]) -> Callable[[bytes | None], bool]:
    """A ``KeptAnswer.take`` for an answer of one line, which goes to ``answered``."""

    def take(line: bytes | None) -> bool:
        answered(line)
        return True

    return take


class Upstream(asyncio.Protocol):
    """One connection from this node to a topic's owner, on behalf of one client connection."""

    def __init__(self, router: RoutedConnection, node: str) -> None:
        self.router = router
        self.node = node
        self.client_id: bytes | None = None
        self.transport: asyncio.Transport | None = None
        self.opening: asyncio.Task[Any] | None = None  # the connect, until it is done
        self.outstanding = 0  # replies owed to the client
        self._queued: list[tuple[bytes, bytes]] = []  # (verb, rest) until CONNECTED
        self._queued_bytes = 0  # their size, held at QUEUED_MAX
        self._inbuf = bytearray()
        self._wanted = 0  # bytes _inbuf must hold before a frame in it is whole
        self.protocol = router.protocol  # the client's, which this connection speaks too
        self._hellos = 0  # HELLO replies to swallow: this node asked, not the client
        self.forwarded = False  # whether the client's own commands went here (not only its patterns)
        # answers this node keeps instead of relaying them to the client, oldest first (_takes)
        self._kept_answers: deque[KeptAnswer] = deque()
        self.token_serial = 0  # how the reply tokens it relays name it (RelayedTokens), once they do
        self.requests: dict[int, int] = {}  # the owner's id of each request waiting -> the client's
        # whether a REQ went this way: only then can a REQUESTED come, which the shortcut looks for
        self.sent_requests = False
        # the owner's tags of each ACK/NACK sent -> the client's, per PING that confirms them (the
        # last: those sent since the last PING), to name the client's tags in an error
        self._settled: deque[dict[bytes, bytes]] = deque([{}])
        self._confirming = 0  # those PINGs sent, not answered yet
        self.released = False  # sent the client's DISCONNECT: its end here is expected (``disconnect``)
        self.refusal: bytes | None = None  # the owner's ERROR instead of CONNECTED, which ends this

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.router.gone():
            # the client went while this connected: nothing of it may reach the owner (a
            # subscription there would take messages that nobody reads)
            self.transport.close()
            return
        self.transport.write(self.router.login_line() + b"CLUSTER UPSTREAM\n")
        # its answer is the first after CONNECTED: taken here, before any reply owed to the client
        self._kept_answers.appendleft(KeptAnswer(0, _one_line(ignored_answer)))
        if self.protocol != 1:
            self.set_protocol(self.protocol)

    def _opening_hold(self) -> str:
        """How the client's input is held while this connection opens with QUEUED_MAX queued."""
        return f"{self.node} opening"

    def set_protocol(self, protocol: int) -> None:
        """Speak ``protocol`` (``HELLO 1``/``HELLO 2``), the client's, so that deliveries come in its form."""
        self.protocol = protocol
        if self.transport is not None:
            self._hellos += 1
            self.transport.write(b"HELLO %d\n" % protocol)

    def send(self, verb: bytes, rest: bytes, replies: int) -> None:
        """Send ``<verb> <id> <rest>`` with this connection's own client id at the owner."""
        self.outstanding += replies
        self.sent_requests = self.sent_requests or verb == b"REQ"
        if self.client_id is None or self.transport is None:
            self._queued.append((verb, rest))
            self._queued_bytes += len(verb) + len(rest)
            if self._queued_bytes >= QUEUED_MAX:
                self.router.pause_input(self._opening_hold())
        else:
            self.transport.write(b"%s %s %s\n" % (verb, self.client_id, rest))

    def data_received(self, data: bytes) -> None:
        self._inbuf += data
        if len(self._inbuf) < self._wanted:
            return  # a frame still arriving: do not look at it again for every read
        data = bytes(self._inbuf)
        end = data.rfind(b"\n") + 1
        if (
            end
            and self.client_id is not None
            and not self._hellos
            and not self._kept_answers
            and self._relay_whole(data[:end])
        ):
            self._inbuf = bytearray(data[end:])
            self._wanted = 0
            return
        out: list[bytes] = []
        pos = 0
        self._wanted = 0
        while (nl := data.find(b"\n", pos)) >= 0:
            run_end = msg_run_end(data, pos)
            if run_end > pos:
                out.append(data[pos:run_end])
                pos = run_end
                continue
            line = data[pos:nl]
            if line.startswith(b"MSG ") or line.startswith(b"DMSG ") or line.startswith(b"RMSG "):
                # a frame: relayed whole by its length, whatever its payload holds
                stop = nl + 1 + int(line.rsplit(b" ", 1)[1])
                if len(data) <= stop:
                    self._wanted = stop + 1 - pos
                    break
                header = self._relayed_header(line)
                if header is not None:
                    out.append(header + data[nl : stop + 1])
                pos = stop + 1
                continue
            pos = nl + 1
            if line.startswith(b"DELIVER "):
                out.append(self.router.relayed_delivery(self, line) + b"\n")
            elif line.startswith(b"MESSAGE "):
                out.append(line + b"\n")
            elif line.startswith(b"ERROR UNKNOWN_DELIVERY_TAG"):  # to an ACK/NACK: no reply counted
                out.append(self._with_client_tags(line) + b"\n")
            elif self._hellos and line.startswith(b"HELLO "):
                self._hellos -= 1  # the answer to this node's own HELLO
            elif self.client_id is None and line.startswith(b"ERROR "):
                # the owner refused the login or the connection (TOO_MANY_CONNECTIONS, AUTH_FAILED,
                # AUTH_REQUIRED, which leaves it open): nothing of the client's can go this way
                self.refusal = line
                assert self.transport is not None
                self.transport.close()
                break
            elif self.client_id is None and line.startswith(b"CONNECTED "):
                self.client_id = line[len(b"CONNECTED ") :]
                assert self.transport is not None
                queued = (b"%s %s %s\n" % (verb, self.client_id, rest) for verb, rest in self._queued)
                self.transport.write(b"".join(queued))
                self._queued.clear()
                if self._queued_bytes >= QUEUED_MAX:
                    self.router.resume_input(self._opening_hold())
                self._queued_bytes = 0
            elif self._kept_answers and self._takes(line, out):
                continue
            elif line.startswith(b"REQUESTED "):  # after _takes: a reply owed to the client, counted
                out.append(self.router.relayed_request(self, line) + b"\n")
                self.outstanding -= 1
            else:
                out.append(line + b"\n")
                self.outstanding -= 1
        self._inbuf = bytearray(data[pos:])
        if out:
            self.router.relay_chunk(b"".join(out))
        if self.outstanding == 0:
            self.router.source_idle(self.node)

    def capture(self, verb: bytes, rest: bytes, answered: Callable[[bytes | None], None]) -> None:
        """Send ``<verb> <id> <rest>`` on this node's own behalf: its reply goes to ``answered``, not
        to the client (None if the connection is lost first)."""
        self._keep(_one_line(answered))
        self.send(verb, rest, 0)

    def disconnect(self, answered: Callable[[Upstream], None]) -> bool:
        """Send ``DISCONNECT``, kept here: the owner takes back the client's unacknowledged messages
        before it answers (or closes); then ``answered(self)``. False, with nothing sent, while the
        connection is not open yet: then the owner holds nothing of the client's."""
        if self.transport is None or self.client_id is None:
            return False
        self.released = True
        self._keep(_one_line(lambda _line: answered(self)))
        self.transport.write(b"DISCONNECT\n")
        return True

    def settle(self, verb: bytes, spec: bytes, client_spec: bytes, delay: bytes) -> None:
        """Send ``ACK``/``NACK`` of the owner's tags ``spec`` (the client's ``client_spec``, with its
        ``NACK`` delay): it has no reply, so ``confirm_unanswered`` asks the owner to confirm it."""
        self._settled[-1][spec] = client_spec
        self.send(verb, (spec + b" " + delay).rstrip(), 0)
        if len(self._settled[-1]) >= SETTLES_PER_CONFIRM:
            self.confirm_unanswered()

    def confirm_unanswered(self) -> None:
        """Send a ``PING``, kept here: its ``PONG`` comes once the owner has run every ``ACK``/``NACK``
        sent before (and answered those it refused); then ``RoutedConnection.unanswered_applied``."""
        if not self._settled[-1]:
            return  # a PING in flight covers them all
        assert self.transport is not None  # tags came over it, after CONNECTED: nothing is queued
        self._settled.append({})
        self._confirming += 1
        self._keep(self._settles_confirmed)
        self.transport.write(b"PING\n")

    def _settles_confirmed(self, line: bytes | None) -> bool:
        self._settled.popleft()
        self._confirming -= 1
        if not self._confirming and not self._settled[-1]:
            self.router.unanswered_applied(self)
        return True

    def _with_client_tags(self, error: bytes) -> bytes:
        """An owner's ``ERROR UNKNOWN_DELIVERY_TAG`` naming the tags as the client sent them."""
        head, _, spec = error.rpartition(b" ")
        for specs in self._settled:
            client_spec = specs.get(spec)  # kept: the PING that confirms them is still to be sent
            if client_spec is not None:
                return b"%s %s" % (head, client_spec)
        return error

    def send_reply(self, frame: bytes, applied: Callable[[], None]) -> None:
        """Send a ``REPLY`` frame (with the owner's token), then a ``PING``. The owner answers nothing to
        a ``REPLY`` it takes but an error to one it cannot (over its ``--max-payload``, its memory
        full): the ``PONG`` ends what answers it, and this node keeps both (``_reply_answer``), so that
        neither is taken for the reply to a command of this connection's client. The ``PONG`` also
        shows the ``REPLY`` applied: then ``applied()`` (of whichever client of this node sent it; also
        once the connection is lost)."""
        assert self.transport is not None  # the token came over it, after CONNECTED: nothing is queued
        self._keep(lambda line: self._reply_answer(line, applied))
        self.transport.write(frame + b"PING\n")

    def _keep(self, take: Callable[[bytes | None], bool]) -> None:
        """Keep the answer to what is sent next, counting the replies owed to the client before it
        (after the answer kept before it, if any): the two kinds interleave on the connection."""
        before = self.outstanding - sum(kept.before for kept in self._kept_answers)
        self._kept_answers.append(KeptAnswer(before, take))

    def _takes(self, line: bytes, out: list[bytes]) -> bool:
        """Whether reply ``line`` belongs to the oldest answer this node keeps: then it is handed over
        (after the lines relayed before it). False for a reply owed to the client, counted."""
        head = self._kept_answers[0]
        if head.before:
            head.before -= 1
            return False
        self._kept_answers.popleft()
        if out:
            self.router.relay_chunk(b"".join(out))
            out.clear()
        if not head.take(line):
            self._kept_answers.appendleft(head)  # more of its answer is to come
        return True

    def fail_kept_answers(self) -> None:
        """The connection is lost: every answer still kept for is given None."""
        kept_answers, self._kept_answers = self._kept_answers, deque()
        for kept in kept_answers:
            kept.take(None)

    def _reply_answer(self, line: bytes | None, applied: Callable[[], None]) -> bool:
        """A line that answers a relayed ``REPLY``: its ``PONG`` (the end), or the error before it
        (logged: the replier is not told, as it is not of a reply that is dropped)."""
        if line is None or line == b"PONG":
            applied()
            return True
        log.info("%s refused a reply relayed to it: %s", self.node, line.decode(errors="replace"))
        return False

    def _relayed_header(self, line: bytes) -> bytes | None:
        """A frame header from the owner as the client gets it: a ``DMSG`` tag renumbered, a reply
        token with this upstream's suffix (RelayedTokens), an ``RMSG`` with the client's request id
        (None: an ``RMSG`` for a request the client no longer waits for, dropped)."""
        if line.startswith(b"RMSG "):
            return self.router.relayed_reply(self, line)
        if line.startswith(b"DMSG "):
            line = self.router.relayed_delivery(self, line)
        fields = line.split(b" ")
        if len(fields) == (4 if fields[0] == b"MSG" else 6):  # MSG/DMSG of a request: with its token
            fields[-2] += RELAYED_TOKENS.suffix(self)
            return b" ".join(fields)
        return line

    def _relay_whole(self, chunk: bytes) -> bool:
        """Relay whole lines at once, without splitting them, when they are only ``MESSAGE`` lines or
        only replies (``PUBLISHED`` and the like): the common case of a busy publisher or
        subscriber. False when the chunk needs looking at line by line."""
        lines = chunk.count(b"\n")
        if chunk.startswith(b"MESSAGE ") and chunk.count(b"\nMESSAGE ") + 1 == lines:
            self.router.relay_chunk(chunk)
            return True
        if (
            b"MESSAGE " in chunk
            or b"DELIVER " in chunk
            or b"MSG " in chunk
            or b"ERROR UNKNOWN_DELIVERY_TAG" in chunk
            or (self.sent_requests and b"REQUESTED " in chunk)
        ):
            return False
        self.outstanding -= lines
        self.router.relay_chunk(chunk)
        if self.outstanding == 0:
            self.router.source_idle(self.node)
        return True

    def send_chunk(self, chunk: bytes, prefix: bytes, verb: bytes) -> None:
        """Send pipelined lines that all start with ``prefix`` (``<verb> <client's id> <topic> ``) with
        this connection's own id instead: one replace, no split."""
        assert self.client_id is not None and self.transport is not None
        mine = b"%s %s %s" % (verb, self.client_id, prefix[len(verb) + 1 :].split(b" ", 1)[1])
        self.outstanding += chunk.count(b"\n")
        self.transport.write(mine + chunk[len(prefix) :].replace(b"\n" + prefix, b"\n" + mine))

    def send_frames(self, data: bytes, starts: list[int], end: int, prefix: bytes) -> None:
        """Send the whole ``PUB`` frames of ``data`` that begin at ``starts`` (the last ending at
        ``end``) and all start with ``prefix`` (``PUB <client's id> <topic> ``) with this connection's
        own id instead."""
        assert self.client_id is not None and self.transport is not None
        mine = b"PUB %s %s " % (self.client_id, prefix.split(b" ", 3)[2])
        self.outstanding += len(starts)
        skip = len(prefix)
        pieces: list[bytes] = []
        for start, stop in zip(starts, [*starts[1:], end], strict=True):
            pieces += (mine, data[start + skip : stop])
        self.transport.write(b"".join(pieces))

    def pause_writing(self) -> None:
        self.router.pause_input(self.node)

    def resume_writing(self) -> None:
        self.router.resume_input(self.node)

    def connection_lost(self, exc: Exception | None) -> None:
        RELAYED_TOKENS.forget(self)
        self.router.upstream_lost(self)
        # nothing kept is answered now; among it may be REPLYs that other clients of this node relayed
        # here, which wait for their answer
        self.fail_kept_answers()


class RoutedConnection(_Connection):
    """A client socket on a cluster node: routes each command to this node's core or an owner."""

    __slots__ = (
        "_cluster",
        "_confirmed",
        "_eof",
        "_held_input",
        "_holds",
        "_input_refused",
        "_last_publish",
        "_last_slot",
        "_log_wait",
        "_login",
        "_next_remote_request",
        "_next_remote_tag",
        "_node_upstream",
        "_owner_wait_since",
        "_partial",
        "_patterns",
        "_pending",
        "_receiver",
        "_redirect",
        "_releasing",
        "_remote_requests",
        "_remote_tags",
        "_replicas",
        "_skip",
        "_source",
        "_unconfirmed",
        "_unconfirmed_replies",
        "_unrouted",
        "_unrouted_full",
        "_upstreams",
        "_wanted",
        "protocol",
    )

    def __init__(
        self,
        broker: Broker,
        connections: dict[int, _Connection],
        write_timeout: float,
        logins: Logins | None,
        cluster: ClusterNode,
        replicas: ReplicaStore | None = None,
        confirmed: ConfirmedLog | None = None,
    ) -> None:
        super().__init__(broker, connections, write_timeout, logins)
        self._cluster = cluster
        self._replicas = replicas
        # given when the core holds PUBLISHED until the log is confirmed (--fsync always, --replicas):
        # a reply it holds must go before any the router makes or relays after it
        self._confirmed = confirmed
        self._log_wait: asyncio.Future[None] | None = None  # while input waits for that
        self._receiver: ReplicaReceiver | None = None  # once another node replicates over this one
        self._partial = bytearray()  # an unfinished command
        self._wanted = 0  # bytes _partial must hold before the frame in it is whole
        self._skip = 0  # bytes still to drop of a payload over --max-payload
        self._held_input = 0  # bytes of _partial counted against --max-memory (Broker.hold_input)
        # the ERROR that refuses an unfinished command (too long, memory full): the input ends there
        self._input_refused: bytes | None = None
        self.protocol = 1  # the client's protocol (HELLO 1 or 2), which its upstreams speak too
        self._last_publish = b""  # "PUBLISH <id> <topic> " (or "PUB ...") of the last one routed
        self._last_slot = 0  # and its topic's slot
        self._pending: deque[bytes] = deque()  # whole lines not routed yet
        self._unrouted = 0  # their bytes
        self._unrouted_full = False  # whether the client is not read for that (UNROUTED_MAX)
        self._source = _LOCAL  # where the last command went
        self._upstreams: dict[str, Upstream] = {}
        self._remote_tags: dict[int, tuple[Upstream, int]] = {}  # client tag -> (owner, owner's tag)
        self._next_remote_tag = REMOTE_TAG_BASE
        # the client's id of each request waiting at an owner -> (that owner, its id), oldest first
        self._remote_requests: dict[int, tuple[Upstream, int]] = {}
        self._next_remote_request = REMOTE_TAG_BASE
        self._holds: set[str] = set()  # why input is not processed: "core", "client", "sync", an owner
        self._redirect = False
        self._node_upstream = False  # another node's connection on behalf of its client (CLUSTER UPSTREAM)
        self._login: bytes | None = None  # the client's CONNECT <user> <password>, for its upstreams
        self._eof = False
        self._owner_wait_since = 0.0  # when a command began to wait for its slot's owner
        self._patterns = PatternPlacement(self)  # its pattern subscriptions, on every node
        # owners sent ACK/NACKs of the client's that no reply since has shown applied
        self._unconfirmed: set[Upstream] = set()
        # REPLYs relayed to owners, over whichever client's upstream their token names, not shown
        # applied yet (Upstream.send_reply)
        self._unconfirmed_replies = 0
        self._releasing: set[Upstream] = set()  # owners asked to end the client's connection (DISCONNECT)

    # -- input -----------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self._broker.note_input(self._handle)  # what goes to owners is input too (--idle-timeout)
        self._take(_READ_VIEW[:nbytes])

    def _take(self, incoming: bytes | memoryview) -> None:
        """Route the whole commands that ``incoming`` completes; keep the rest for the next read."""
        if self._receiver is not None:
            self._receiver.take(incoming)
            return
        if self._input_refused is not None:
            return
        if self._skip:
            dropped = min(self._skip, len(incoming))
            self._skip -= dropped
            incoming = incoming[dropped:]
        self._partial += incoming
        if not self._partial or len(self._partial) < self._wanted:
            # a PUB frame still arriving: do not parse it again for every read
            if not self._hold_partial():
                self._route()
            return
        data = bytes(self._partial)
        if self._last_publish.startswith(b"PUBLISH "):
            end = data.rfind(b"\n") + 1
            if end and self._batch(data[:end]):
                self._partial = bytearray(data[end:])
                if not self._hold_partial():
                    self._route()
                return
        elif self._last_publish.startswith(b"PUB "):
            starts, end = pub_run(data, self._last_publish)
            if starts and self._batch_frames(data, starts, end):
                data = data[end:]
        limits = self._broker.limits
        items, used, self._wanted, too_large = split_commands(data, limits["max_payload"])
        self._partial = bytearray() if too_large else bytearray(data[used:])
        self._skip = max(0, used - len(data))
        if items:
            self._pending.extend(items)
            self._unrouted += sum(map(len, items))
        if not self._wanted and len(self._partial) > limits["max_line"]:
            self._end_input(b"ERROR LINE_TOO_LONG line too long (limit %d bytes)" % limits["max_line"])
        if self._input_refused is not None or not self._hold_partial() or items:
            self._route()
        if too_large and used < len(data):
            self._take(data[used:])  # what follows the skipped payload

    def _hold_partial(self) -> bool:
        """Count the unfinished command kept in ``_partial`` against ``--max-memory``, as the core
        counts the input it keeps (``Broker.hold_input``); False when that would pass the limit: the
        input ends there (``_end_input``, MEMORY_FULL)."""
        held = len(self._partial)
        if held <= INPUT_SLACK_BYTES and not self._held_input:
            return True
        if self._broker.hold_input(self._handle, held):
            self._held_input = held
            return True
        self._end_input(b"ERROR MEMORY_FULL memory limit reached: cannot hold %d bytes of input" % held)
        return False

    def _end_input(self, error: bytes) -> None:
        """Refuse the client's unfinished command, as the core does: ``error`` answers it once the
        commands before it have their answers, then the connection closes; nothing more is read."""
        self._input_refused = error
        self._partial = bytearray()
        if self._held_input:
            self._broker.hold_input(self._handle, 0)
            self._held_input = 0
        self._pending.append(_INPUT_REFUSED)
        self._unrouted += len(_INPUT_REFUSED)

    def _batch(self, chunk: bytes) -> bool:
        """Route a whole batch of lines at once when every one is a ``PUBLISH`` of the client's, with
        nothing waiting, and the topics they name are all served where the last command went: to the
        core as it is when that is this node, else to the owner with one replace. False when the
        lines need routing one by one."""
        prefix = self._last_publish
        if not prefix or self._pending or self._holds or self._unanswered():
            return False
        if every_line_starts(chunk, prefix):
            slots = [self._last_slot]  # all to the topic of the last one routed
        else:
            prefix = prefix[: prefix.index(b" ", len(b"PUBLISH ")) + 1]  # PUBLISH <id>
            if not every_line_starts(chunk, prefix):
                return False
            found = publish_slots(chunk, len(prefix))
            if found is None:
                return False
            slots = found
        return self._send_batch(chunk, slots, lambda upstream: upstream.send_chunk(chunk, prefix, b"PUBLISH"))

    def _send_batch(self, chunk: bytes, slots: list[int], to_owner: Callable[[Upstream], None]) -> bool:
        """Send a batch of publishes to topics of ``slots`` at once, when the last command went where
        all of them are served: ``chunk`` to the core as it is when that is this node, else
        ``to_owner(the owner's upstream)``. False when its commands must be routed one by one (they
        go elsewhere, or to several places, the owner changed, its connection is not ready)."""
        if self._source == _LOCAL:
            if not all(map(self._cluster.serves, slots)):
                return False
            self._broker.feed(self._handle, chunk)
            return True
        upstream = self._upstreams.get(self._source)
        if (
            upstream is None
            or upstream.client_id is None
            or any(self._cluster.owner(slot) != self._source for slot in slots)
        ):
            return False
        to_owner(upstream)
        return True

    def _batch_frames(self, data: bytes, starts: list[int], end: int) -> bool:
        """Like ``_batch`` for the run of whole ``PUB`` frames of ``pub_run`` (to the topic of the last
        one routed) at the start of ``data``: to the core as it is, or to the owner with only each
        header's client id rewritten."""
        if self._pending or self._holds or self._unanswered():
            return False
        prefix = self._last_publish
        return self._send_batch(
            data[:end], [self._last_slot], lambda upstream: upstream.send_frames(data, starts, end, prefix)
        )

    def eof_received(self) -> bool:
        self._eof = True
        self._route()
        # A plain socket stays open for the replies other nodes still owe (a half-closed peer may
        # read them). A TLS transport shuts down after the peer's close_notify whatever is
        # returned, and warns on every connection that asks to stay open.
        return self._transport is None or self._transport.get_extra_info("sslcontext") is None

    def _route(self) -> None:
        """Send the pending lines to their sources, in order, while nothing holds them."""
        if self.gone():
            return  # an answer that comes after must not start anything
        local: list[bytes] = []
        while self._pending and not self._holds:
            line = self._pending[0]
            source, verb, rest = self._classify(line)
            if source == _NO_OWNER:
                self.pause_input(_NO_OWNER)
                asyncio.get_running_loop().call_later(OWNER_RETRY, self.resume_input, _NO_OWNER)
                break
            if (source != self._source or source == EVERY_NODE) and not self._source_idle(
                self._source, local
            ):
                break
            if self._unanswered() and not self._may_pass_unanswered(source, verb, rest):
                break
            if verb == b"DISCONNECT" and self._releases_upstreams(line):
                break
            self._unrouted -= len(self._pending.popleft())
            if source == _LOCAL:
                if verb == b"HELLO":
                    self._hello(line)
                local.append(line)
                if verb == b"CONNECT":
                    # the id it gives (or the hold while its password is checked) decides where the
                    # commands read with it go: the core must have run it before they are classified
                    self._feed_local(local)
            elif source is None:
                self._feed_local(local)
                self._hand_over_core_output()
                self._answer(verb, rest)
            elif source == EVERY_NODE:
                self._feed_local(local)
                self._patterns.start(verb, rest, line)
            else:
                self._feed_local(local)
                self._forward(source, verb, rest)
            self._source = source if source is not None else _LOCAL
        self._feed_local(local)
        self._limit_unrouted()
        if self._eof and not self._pending and not self._holds and self._all_idle():
            self._eof = False
            super().eof_received()

    def _limit_unrouted(self) -> None:
        """Stop reading the client while UNROUTED_MAX bytes of its commands wait to be routed; read
        it again once they are below half of that (and nothing else holds it)."""
        if self._transport is None or self._transport.is_closing():
            return
        if not self._unrouted_full and self._unrouted >= UNROUTED_MAX:
            self._unrouted_full = True
            self._transport.pause_reading()
        elif self._unrouted_full and self._unrouted < UNROUTED_MAX // 2:
            self._unrouted_full = False
            if not self._holds:
                self._transport.resume_reading()

    def gone(self) -> bool:
        """Whether the client's connection is closed or closing: nothing more is routed for it."""
        return self._transport is None or self._transport.is_closing()

    def _may_pass_unanswered(self, source: str | None, verb: bytes, rest: bytes) -> bool:
        """Whether a command for ``source`` may go on after the client's commands sent to owners that
        have no reply (``ACK``/``NACK``, a relayed ``REPLY``): any reply after them must mean they
        are applied, as on one server. Another of them that only owners see, or a command for that
        same owner (which runs them first), goes at once; before any other, each owner confirms
        them (``Upstream.confirm_unanswered``)."""
        if source is None and verb in _SETTLE_COMMANDS:
            tags = parse_tags(command_fields(rest, 1)[0])
            if tags is not None and tags[0] >= REMOTE_TAG_BASE and self._relayed_tags(*tags):
                return True
        if source is None and verb == b"REPLY" and b"\n" in rest:  # relayed (not one over the limit)
            return True
        for upstream in list(self._unconfirmed):
            if upstream.node == source:
                self._unconfirmed.discard(upstream)
            else:
                upstream.confirm_unanswered()
        return not self._unanswered()

    def _unanswered(self) -> bool:
        """Whether commands sent to owners without a reply wait to be shown applied."""
        return bool(self._unconfirmed or self._unconfirmed_replies)

    def unanswered_applied(self, upstream: Upstream) -> None:
        """``upstream``'s owner has run every command without a reply sent to it: input held for that
        goes on."""
        self._unconfirmed.discard(upstream)
        self.source_idle(upstream.node)

    def _releases_upstreams(self, line: bytes) -> bool:
        """Before the core answers the client's ``DISCONNECT`` (``line``): each owner ends the
        client's connection there first, taking back its unacknowledged messages, as one server does
        before it answers. True (the input held) while their answers are awaited."""
        if len(command_fields(line)) == 1 and self._broker.client_id(self._handle) is not None:
            for upstream in self._upstreams.values():
                if not upstream.released and upstream.disconnect(self._upstream_released):
                    self._releasing.add(upstream)
        if self._releasing:
            self.pause_input("disconnect")
        return bool(self._releasing)

    def _upstream_released(self, upstream: Upstream) -> None:
        self._releasing.discard(upstream)
        if not self._releasing:
            self.resume_input("disconnect")

    def _hello(self, line: bytes) -> None:
        """The client chose its protocol (``HELLO 1``/``HELLO 2``; the core answers it): its upstreams
        switch too, so that deliveries relayed from owners come in the client's form."""
        fields = command_fields(line)
        if len(fields) == 2 and fields[1] in (b"1", b"2"):
            self.protocol = int(fields[1])
            for upstream in self._upstreams.values():
                upstream.set_protocol(self.protocol)

    def _source_idle(self, source: str, local: list[bytes]) -> bool:
        if source == EVERY_NODE:
            # answered, then run in the core (or answered here): the core is the last source
            return not self._patterns.busy and self._source_idle(_LOCAL, local)
        if source == _LOCAL:
            self._feed_local(local)
            return "core" not in self._holds and not self._core_waits_for_log()
        upstream = self._upstreams.get(source)
        return upstream is None or upstream.outstanding == 0

    def _hand_over_core_output(self) -> None:
        """Before the router writes a reply of its own: the core's replies to the commands before it
        (a ``CONNECTED`` just granted, say) are handed over first. The core flushes once per loop pass,
        so they may still be in its buffers although it has answered them."""
        self._broker.flush()

    def _core_waits_for_log(self) -> bool:
        """Whether the core holds a reply of this connection until the log is confirmed up to its
        record (a ``PUBLISHED``): then hold the input until it is. Asked only when the commands switch
        from the core to another source; other connections' held replies do not matter."""
        if self._confirmed is None:
            return False
        position = self._broker.log_wait(self._handle)
        if position <= self._confirmed.position:  # 0: nothing held
            return False
        self.pause_input("sync")
        self._log_wait = self._confirmed.wait_for(position)
        self._log_wait.add_done_callback(self._log_confirmed)
        return True

    def _log_confirmed(self, waited: asyncio.Future[None]) -> None:
        if waited is self._log_wait:  # else the connection has gone meanwhile
            self._log_wait = None
            self.resume_input("sync")

    def _all_idle(self) -> bool:
        return (
            self._may_pass_unanswered(None, b"", b"")
            and not self._patterns.busy
            and all(upstream.outstanding == 0 for upstream in self._upstreams.values())
        )

    def _feed_local(self, lines: list[bytes]) -> None:
        if lines:
            self._broker.feed(self._handle, b"\n".join(lines) + b"\n")
            lines.clear()

    def _classify(self, line: bytes) -> tuple[str | None, bytes, bytes]:
        """Where ``line`` goes: ``_LOCAL``, an owner's name, or None (answered here), with its verb and
        the rest after the client id."""
        if line is _INPUT_REFUSED:
            return None, line, b""
        if type(line) is PlainLines:
            return _LOCAL, b"", b""
        fields = command_fields(line, 2)
        verb = fields[0].upper() if fields else b""
        if verb == b"CLUSTER":
            return None, verb, line.lstrip(b" \t")[len(fields[0]) :].strip()
        if verb == b"CONNECT" and len(fields) == 3 and self._login is None:
            # the first login: a wrong one closes the connection, a later CONNECT is refused
            self._login = line
        if verb in _FRAME_VERBS and b"\n" not in line and frame_nbytes(line) is not None:
            # over --max-payload (split_commands): refused here, whoever sent it, as the router (not
            # the core) skips its payload
            return None, verb, line
        if verb == b"REPLY":
            return self._reply_source(fields[1] if len(fields) > 1 else b"", line), verb, line
        if len(fields) < 3 or (verb not in _TOPIC_COMMANDS and verb not in _SETTLE_COMMANDS):
            return _LOCAL, verb, b""
        own_id = self._broker.client_id(self._handle)
        if own_id is None or fields[1] != own_id.encode():
            return _LOCAL, verb, b""  # the core answers NOT_CONNECTED or WRONG_CLIENT_ID
        if verb in _FRAME_VERBS and not is_whole_frame(line):
            return _LOCAL, verb, b""  # the core answers BAD_FRAME and closes
        rest = fields[2]
        if verb in _SETTLE_COMMANDS:
            tags = parse_tags(command_fields(rest, 1)[0])
            if tags is None or tags[1] < REMOTE_TAG_BASE:
                return _LOCAL, verb, b""
            return None, verb, rest
        topic = command_fields(rest, 1)[0]
        slot = slot_of(topic)
        if verb in _PATTERN_COMMANDS and is_pattern(topic):
            # a client that follows redirects places it on every node itself (ClusterClient), and a
            # node placing its client's pattern here places it on the other nodes itself
            return (_LOCAL if self._redirect or self._node_upstream else EVERY_NODE), verb, rest
        if verb in (b"PUBLISH", b"PUB"):
            # what _batch compares the next batches with (only this exact spelling takes the shortcut)
            prefix = b"%s %s %s " % (verb, fields[1], topic)
            self._last_publish = prefix if line.startswith(prefix) else b""
            self._last_slot = slot
        if self._cluster.serves(slot):
            return _LOCAL, verb, b""
        owner = self._cluster.owner(slot)
        if owner is None or self._cluster.address_of(owner) is None:
            return (None if self._waited_for_owner() else _NO_OWNER), verb, rest
        self._owner_wait_since = 0.0
        if self._redirect:
            return None, verb, rest
        return owner, verb, rest

    def _waited_for_owner(self) -> bool:
        """Whether a command for a slot without owner has waited long enough to be refused (TRYAGAIN):
        the slot of a node that just died has none until its lease expires, so wait that long."""
        now = time.monotonic()
        if not self._owner_wait_since:
            self._owner_wait_since = now
        return now - self._owner_wait_since > self._cluster.ttl + OWNER_WAIT_MARGIN

    # -- commands answered here ------------------------------------------------------------------

    def _answer(self, verb: bytes, rest: bytes) -> None:
        if verb == b"CLUSTER":
            self._cluster_command(rest)
        elif verb in _SETTLE_COMMANDS:
            self._settle_remote(verb, rest)
        elif verb in _FRAME_VERBS and b"\n" not in rest:
            self._reply(
                b"ERROR PAYLOAD_TOO_LARGE payload of %d bytes is over the limit of %d bytes"
                % (frame_nbytes(rest) or 0, self._broker.limits["max_payload"])
            )
        elif verb == b"REPLY":
            self._relay_reply(rest)
        elif verb is _INPUT_REFUSED:
            assert self._input_refused is not None
            self._reply(self._input_refused)
            self.close_after_output()
        else:
            topic = command_fields(rest, 1)[0]
            slot = slot_of(topic)
            owner = self._cluster.owner(slot)
            address = None if owner is None else self._cluster.address_of(owner)
            if address is None:
                self._owner_wait_since = 0.0  # the next command waits afresh
                self._reply(b"ERROR TRYAGAIN slot %d of '%s' has no owner yet: retry" % (slot, topic))
            else:
                self._reply(b"ERROR MOVED %d %s" % (slot, address.encode()))

    # -- request/reply across nodes (docs/cluster.md) -------------------------------------------------

    def _reply_source(self, token: bytes, frame: bytes) -> str | None:
        """Where a ``REPLY`` goes: None (``_relay_reply``) for a well-formed frame with a token an owner's
        delivery carried (RelayedTokens) from a connected client; else the core, with this node's
        own tokens and what it refuses as on one server (not connected, a bad frame or token)."""
        if (
            b"@" not in token
            or self._broker.client_id(self._handle) is None
            or not is_whole_frame(frame)
            or not RELAYED_TOKENS.is_relayed(token)
        ):
            return _LOCAL
        return None

    def _relay_reply(self, frame: bytes) -> None:
        """A ``REPLY`` with a relayed token: to the owner, over the upstream the token came on, with the
        owner's own token (no answer, as for any ``REPLY``); dropped when that upstream has closed or
        the token is another process's, as a reply to a requester that has gone is on one server."""
        header, _, payload = frame.partition(b"\n")
        _, token, nbytes = command_fields(header)
        route = RELAYED_TOKENS.route(token)
        if route is None:
            log.debug("dropped a reply to %r: its upstream has closed", token)
            return
        upstream, owner_token = route
        self._unconfirmed_replies += 1
        upstream.send_reply(b"REPLY %s %s\n%s\n" % (owner_token, nbytes, payload), self._reply_applied)

    def _reply_applied(self) -> None:
        """A ``REPLY`` relayed to an owner is applied (or its connection lost): input held for it goes on."""
        self._unconfirmed_replies -= 1
        if not self._unconfirmed_replies:
            self.source_idle(_LOCAL)

    def relayed_request(self, upstream: Upstream, line: bytes) -> bytes:
        """``REQUESTED <id>`` from an owner with an id of this connection instead, from
        ``REMOTE_TAG_BASE`` up like a relayed delivery's tag (the core's own ids are below it). Past
        ``REQUEST_WINDOW`` requests waiting at owners the oldest is forgotten (its reply is dropped),
        as the core forgets its own."""
        owner_id = int(line[len(b"REQUESTED ") :])
        client_id = self._next_remote_request
        self._next_remote_request += 1
        self._remote_requests[client_id] = (upstream, owner_id)
        upstream.requests[owner_id] = client_id
        if len(self._remote_requests) > REQUEST_WINDOW:
            oldest_upstream, oldest_id = self._remote_requests.pop(next(iter(self._remote_requests)))
            del oldest_upstream.requests[oldest_id]
        return b"REQUESTED %d" % client_id

    def relayed_reply(self, upstream: Upstream, header: bytes) -> bytes | None:
        """An ``RMSG <id> <nbytes>`` header from an owner with the client's id of that request, which
        waits no more; None when the client does not wait for it (forgotten: the reply is dropped)."""
        _, owner_id, nbytes = header.split(b" ")
        client_id = upstream.requests.pop(int(owner_id), None)
        if client_id is None:
            return None
        del self._remote_requests[client_id]
        return b"RMSG %d %s" % (client_id, nbytes)

    def login_line(self) -> bytes:
        """The CONNECT an upstream of this client sends: with ``--users``, the client's own (so the
        owner checks that user's password and permissions, docs/cluster.md), else a bare one."""
        if self._logins is None or self._login is None:
            return b"CONNECT\n"
        return self._login + b"\n"

    def _cluster_command(self, rest: bytes) -> None:
        word = rest.upper()
        if self._logins is not None and self._broker.client_id(self._handle) is None:
            self._reply(b"ERROR NOT_CONNECTED not connected: send CONNECT first")
        elif word in (b"", b"STATUS"):
            self._reply(b"CLUSTER " + json.dumps(self._cluster.status(), separators=(",", ":")).encode())
        elif word == b"REDIRECT":
            self._redirect = True
            self._reply(b"CLUSTER REDIRECT")
        elif word == b"UPSTREAM":
            self._node_upstream = True
            self._broker.keep_open_when_idle(self._handle)
            self._reply(b"CLUSTER UPSTREAM")
        elif word.startswith(b"REPLICATE ") and len(rest.split()) == 2:
            self._replicate(rest.split()[1].decode(errors="replace"))
        else:
            self._reply(b"ERROR USAGE usage: CLUSTER [STATUS|REDIRECT]")

    def _replicate(self, owner: str) -> None:
        """Another node's replication stream: from now on this connection carries its records."""
        if self._replicas is None:
            self._reply(b"ERROR USAGE this node keeps no replicas (start it with --replicas 1)")
            return
        if self._logins is not None and not self._may_replicate():
            self._reply(b"ERROR PERMISSION_DENIED permission denied: CLUSTER REPLICATE is for node users")
            return
        self._receiver = ReplicaReceiver(self._replicas, owner, self._reply_bytes, self.abort)
        self._broker.keep_open_when_idle(self._handle)  # it carries nothing while no one publishes
        self._reply(b"%s %s" % (REPLICATE, owner.encode()))

    def _may_replicate(self) -> bool:
        """With logins, only a node user may feed this node's replicas (docs/security.md)."""
        assert self._logins is not None
        user = self._logins.user_of(self._handle)
        return user is not None and user.may_replicate

    def _reply_bytes(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _settle_remote(self, verb: bytes, rest: bytes) -> None:
        """ACK or NACK of tags at or above REMOTE_TAG_BASE (and of the core's below it, if a range
        spans both): each owner gets its own tags, in ranges where they are consecutive."""
        spec, _, delay = rest.partition(b" ")
        tags = parse_tags(spec)
        assert tags is not None
        first, last = tags
        if first < REMOTE_TAG_BASE:
            own_id = self._broker.client_id(self._handle) or ""
            local = b"%s %s %d-%d %s" % (verb, own_id.encode(), first, REMOTE_TAG_BASE - 1, delay)
            self._broker.feed(self._handle, local.rstrip() + b"\n")
        found = self._relayed_tags(first, last)
        if not found and first >= REMOTE_TAG_BASE:
            self._reply(b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag %s" % spec)
            return
        by_owner: dict[Upstream, list[int]] = {}
        for tag in found:
            upstream, owner_tag = self._remote_tags.pop(tag)
            by_owner.setdefault(upstream, []).append(owner_tag)
        for upstream, owner_tags in by_owner.items():
            for low, high in _ranges(sorted(owner_tags)):
                upstream.settle(verb, b"%d" % low if low == high else b"%d-%d" % (low, high), spec, delay)
            self._unconfirmed.add(upstream)

    def _relayed_tags(self, first: int, last: int) -> list[int]:
        """The tags from ``first`` to ``last`` of deliveries relayed from owners, not settled yet."""
        if first == last:
            return [first] if first in self._remote_tags else []
        return [tag for tag in self._remote_tags if first <= tag <= last]

    def reply(self, line: bytes) -> None:
        """Answer the client from this node (not its core, not an owner)."""
        self._reply(line)

    def _reply(self, line: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(line + b"\n")

    # -- forwarding ------------------------------------------------------------------------------

    def _forward(self, node: str, verb: bytes, rest: bytes) -> None:
        upstream = self.upstream_to(node)
        upstream.forwarded = True
        upstream.send(verb, rest, 1)

    def upstream_to(self, node: str) -> Upstream:
        """This client's connection to ``node``, opened on first use."""
        upstream = self._upstreams.get(node)
        if upstream is None:
            upstream = Upstream(self, node)
            self._upstreams[node] = upstream
            self._cluster.upstreams_opened += 1
            upstream.opening = self._cluster.connect(node, lambda: upstream)
            upstream.opening.add_done_callback(lambda done: self._connected(upstream, done))
        return upstream

    def _connected(self, upstream: Upstream, done: asyncio.Task[Any]) -> None:
        upstream.opening = None
        if done.cancelled():
            log.warning("gave up connecting to %s for a client: it left the cluster", upstream.node)
            self.upstream_lost(upstream)
        elif done.exception() is not None:
            log.warning("cannot reach %s for a client: %s", upstream.node, done.exception())
            self.upstream_lost(upstream)

    def relayed_delivery(self, upstream: Upstream, line: bytes) -> bytes:
        """``DELIVER <topic> <tag> ...`` (or a ``DMSG <topic> <tag> ...`` header) from an owner, with
        a tag of this connection instead."""
        verb, topic, tag, rest = line.split(b" ", 3)
        client_tag = self._next_remote_tag
        self._next_remote_tag += 1
        self._remote_tags[client_tag] = (upstream, int(tag))
        return b"%s %s %d %s" % (verb, topic, client_tag, rest)

    def relay_chunk(self, chunk: bytes) -> None:
        """Hand the client whole lines that came from an owner."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(chunk)

    def source_idle(self, node: str) -> None:
        """An owner has answered every command sent to it: input held for it may go on (and a
        client that sent its FIN gets its end once every reply is in)."""
        if self._pending or self._eof:
            self._route()

    def pause_input(self, why: str) -> None:
        """Stop processing (and reading) the client's input until ``resume_input(why)``."""
        self._holds.add(why)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_input(self, why: str) -> None:
        """Take up the client's input again once nothing else holds it."""
        self._holds.discard(why)
        if why == "core" and self._transport is not None and not self._transport.is_closing():
            self._patterns.core_resumed()
        if not self._holds:
            if self._transport is not None and not self._transport.is_closing() and not self._unrouted_full:
                self._transport.resume_reading()
            self._route()

    def upstream_lost(self, upstream: Upstream) -> None:
        """An owner's connection is gone: so is what this client had there (its subscriptions, its
        deliveries: the owner redelivers them). Close the client, which reconnects and subscribes
        again, rather than let it wait for messages that will not come; unless the connection only
        carried its pattern subscriptions (``_lost_patterns_only``). One that the client's
        ``DISCONNECT`` ended is expected to go."""
        if upstream.released:
            return
        if self._upstreams.get(upstream.node) is upstream and not upstream.forwarded:
            self._lost_patterns_only(upstream)
        elif self._upstreams.get(upstream.node) is upstream and self._transport is not None:
            if upstream.refusal is None:
                log.info("lost %s: closing client %s so that it reconnects", upstream.node, self.peer)
                self._transport.abort()
                return
            # the client is told why, after every reply it is owed before (the owner was its source)
            refusal = b"%s (node %s)" % (upstream.refusal, upstream.node.encode())
            log.warning("closing client %s: %s", self.peer, refusal.decode(errors="replace"))
            self._hand_over_core_output()
            self._reply_bytes(refusal + b"\n")
            self.close_after_output()

    # -- wildcard patterns (pigeon.cluster.patterns) ----------------------------------------------

    def _lost_patterns_only(self, upstream: Upstream) -> None:
        """A node that only held this client's pattern subscriptions is gone (dead, or the link
        broke): the nodes that take its slots hold them too, so the client goes on. Its deliveries
        from there can no longer be settled; the patterns are placed there again if it is still a
        member (``PatternPlacement.lost``)."""
        del self._upstreams[upstream.node]
        self._unconfirmed.discard(upstream)
        for tag in [tag for tag, (source, _) in self._remote_tags.items() if source is upstream]:
            del self._remote_tags[tag]
        self._patterns.lost(upstream.node)
        upstream.fail_kept_answers()  # after: a pattern command answered now may open a new upstream there

    def remote_members(self) -> list[str]:
        """The live members other than this node, which a pattern subscription is placed on."""
        return [node for node in sorted(self._cluster.members) if node != self._cluster.name]

    def feed_core(self, line: bytes) -> None:
        """Run one of the client's command lines in this node's core, which answers it."""
        self._broker.feed(self._handle, line + b"\n")

    def core_takes_input(self) -> bool:
        """Whether this node's core runs a line fed to it at once: the connection is not paused (its
        transport full) and no publish of it waits for flow control (which hold its input)."""
        page = self._broker.connections(self._handle, 1)["connections"]
        return (
            bool(page) and page[0]["handle"] == self._handle and not page[0]["paused"] and not page[0]["held"]
        )

    def core_subscribed(self, pattern: bytes, group: bytes | None) -> bool:
        """Whether this node's core holds the client's subscription to ``pattern`` (in ``group``)."""
        return self._broker.subscribed(self._handle, pattern, group)

    def core_holds_group(self, pattern: bytes, group: bytes) -> bool:
        """Whether this node's core holds the consumer group ``group`` of ``pattern``."""
        wanted = (pattern.decode(errors="replace"), group.decode(errors="replace"))
        cursor = 0
        while True:
            page = self._broker.groups(cursor, PAGE_MAX)
            if any((entry["pattern"], entry["group"]) == wanted for entry in page["groups"]):
                return True
            cursor = page["next"]
            if cursor == 0:
                return False

    def members_changed(self) -> None:
        """The member set was read again: connections to nodes that left it are given up, as if they
        broke (a node frozen or cut off sends no reset: its lease running out is how this node
        learns that it is gone; one still connecting, unanswered, may wait minutes for the kernel to
        give up), and the client's patterns go to the members that lack them."""
        if self.gone():
            return
        for upstream in list(self._upstreams.values()):
            if upstream.node in self._cluster.members:
                continue
            if upstream.transport is not None:
                upstream.transport.abort()
            elif upstream.opening is not None:
                upstream.opening.cancel()
        self._patterns.place()

    def fan_out_done(self) -> None:
        """A pattern command has its answer: the client's input goes on."""
        if self._pending or self._eof:
            self._route()

    # -- the core's side -------------------------------------------------------------------------

    def set_reading(self, reading: bool) -> None:
        """The core stops (or restarts) taking this connection's input: flow control."""
        if reading:
            # the core says so from inside its flush, while it runs this connection's held input:
            # feed it more only once that is done
            asyncio.get_running_loop().call_soon(self.resume_input, "core")
        else:
            self.pause_input("core")

    def pause_writing(self) -> None:
        super().pause_writing()
        for upstream in self._upstreams.values():
            if upstream.transport is not None:
                upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        for upstream in self._upstreams.values():
            if upstream.transport is not None:
                upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._log_wait is not None:
            self._log_wait.cancel()  # its callback may be on its way already: it sees the None
            self._log_wait = None
        upstreams = list(self._upstreams.values())
        self._upstreams.clear()
        for upstream in upstreams:
            if upstream.transport is not None:
                upstream.transport.close()
        super().connection_lost(exc)


def _ranges(tags: list[int]) -> list[tuple[int, int]]:
    """Sorted tags as runs of consecutive ones: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for tag in tags:
        if runs and runs[-1][1] == tag - 1:
            runs[-1] = (runs[-1][0], tag)
        else:
            runs.append((tag, tag))
    return runs
