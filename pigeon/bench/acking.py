"""The acknowledged work queue the ``ackqueue`` workload drives, as each broker speaks it.

One publisher feeds a queue that K consumers share; each consumer acknowledges every
``batch`` messages at once (Pigeon: one ``ACK <id> <first>-<last>`` line; RabbitMQ: one
``basic.ack`` with ``multiple``; Redis Streams: one ``XACK`` of 100 ids; JetStream, whose
AckExplicit has no ranges: 100 acks in one write) and holds at most ``prefetch`` messages
unacknowledged. A consumer sees its deliveries in large reads and must find what to acknowledge
in them cheaply: Pigeon and RabbitMQ number deliveries per connection (or channel), so the tag
of the last complete delivery in a read settles everything before it; Redis and NATS name each
message, and a compiled regular expression finds the names in the whole read at C speed.

``AckConsumer.feed`` turns bytes read into (messages received, bytes to send back); the
generator (``pigeon.bench.load``) owns the threads and the sockets' reading.

A dialect made with ``durable=True`` keeps the queue on disk and confirms each publish once it
is kept (Pigeon's ``PUBLISHED`` under ``--data-dir``, Redis's reply under ``appendonly``, a
JetStream PubAck from a file stream, a RabbitMQ publisher confirm for a persistent message on a
durable queue); ``confirms()`` counts those confirmations in the publisher's reads, so the
generator can keep a window of unconfirmed messages the same way for every broker.
"""

from __future__ import annotations

import json
import re
import socket
import threading

from pigeon.bench.wire import LineSocket, WireError, resp


class AckConsumer:
    """One consuming connection; ``feed`` and ``finish`` run under ``lock``, as does their sending."""

    def __init__(self, sock: socket.socket, batch: int) -> None:
        self.sock = sock
        self.batch = batch
        self.lock = threading.Lock()
        # deliveries read with the setup's replies (a queue that already held messages)
        self.early = b""

    def start(self) -> bytes:
        """What to send once the reader runs (pull requests, a first read)."""
        return b""

    def feed(self, buf: bytearray, n: int) -> tuple[int, bytes]:
        """Take the ``n`` bytes just read into ``buf``: (messages received, acks and requests to send)."""
        raise NotImplementedError

    def finish(self) -> bytes:
        """Acknowledge whatever is still unacknowledged (the last partial batch)."""
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        """Send ``data``; callers hold ``lock``, so the reader and ``settle`` never interleave writes."""
        if data:
            self.sock.sendall(data)

    def settle(self) -> None:
        """Send the final acknowledgements (called once the queue has gone quiet)."""
        with self.lock:
            self.send(self.finish())


class Confirms:
    """Counts the publish confirmations in a publisher's reads: ``lines`` lines each; a read
    holding one of ``refusals`` is an error."""

    def __init__(self, lines: int, refusals: tuple[bytes, ...]) -> None:
        self._lines = lines
        self._refusals = refusals
        self._carry = 0  # lines of a confirmation whose rest is still to come

    def feed(self, buf: bytearray, n: int) -> int:
        """Confirmations completed by the ``n`` bytes just read into ``buf``."""
        for refusal in self._refusals:
            at = buf.find(refusal, 0, n)
            if at >= 0:
                raise WireError(f"a publish was refused: {bytes(buf[at : min(n, at + 200)])!r}")
        lines = self._carry + buf.count(b"\n", 0, n)
        self._carry = lines % self._lines
        return lines // self._lines


class AckDialect:
    """How one broker's acknowledged queue is set up, published to and consumed; ``durable``: kept
    on disk, every publish confirmed (see the module's docstring)."""

    name = ""
    notes = ""  # how the broker is driven, for the report
    durable_notes = ""  # ... with durable=True
    confirm_lines = 1  # lines of one publish confirmation
    refusals: tuple[bytes, ...] = ()  # what marks a refused publish in the publisher's reads

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable

    def confirms(self) -> Confirms:
        """A counter of the publisher's confirmations (durable)."""
        return Confirms(self.confirm_lines, self.refusals)

    def setup(self, host: str, port: int, queue: bytes, consumers: int, prefetch: int) -> None:
        """Create what the queue needs on the broker (a stream, a group, a queue)."""

    def publisher(self, host: str, port: int, queue: bytes, payload: bytes) -> tuple[socket.socket, bytes]:
        """A connected publisher and one framed publish of ``payload``."""
        raise NotImplementedError

    def consumer(
        self, host: str, port: int, queue: bytes, index: int, prefetch: int, batch: int
    ) -> AckConsumer:
        """A subscribed consumer that acknowledges every ``batch`` messages."""
        raise NotImplementedError


def _settled_setup(conn: LineSocket) -> socket.socket:
    # nothing is published before every consumer is set up, so no delivery can be buffered yet
    if conn.buf:
        raise WireError(f"unexpected data after setup: {conn.buf[:80]!r}")
    return conn.sock


class PigeonConsumer(AckConsumer):
    """``DELIVER <topic> <tag> <attempt> <message>`` lines; tags count 1, 2, ... per connection."""

    def __init__(self, sock: socket.socket, batch: int, client_id: bytes) -> None:
        super().__init__(sock, batch)
        self._client_id = client_id
        self._carry = b""  # the incomplete line at the end of the last read
        self._tag = 0  # the last tag received
        self._acked = 0  # every tag up to this one is acknowledged

    def feed(self, buf: bytearray, n: int) -> tuple[int, bytes]:
        lines = buf.count(b"\n", 0, n)
        if not lines:
            self._carry += buf[:n]
            return 0, b""
        last = buf.rfind(b"\n", 0, n)
        before = buf.rfind(b"\n", 0, last)
        line = bytes(buf[before + 1 : last]) if before >= 0 else self._carry + buf[:last]
        self._carry = bytes(buf[last + 1 : n])
        words = line.split(b" ", 4)
        # tags grow by one per delivery, so the last tag also proves every line was a DELIVER
        if words[0] != b"DELIVER" or len(words) < 4 or int(words[2]) != self._tag + lines:
            raise WireError(f"expected DELIVER with tag {self._tag + lines}, got {line[:80]!r}")
        self._tag += lines
        acks = []
        while self._tag - self._acked >= self.batch:
            acks.append(self._ack(self._acked + self.batch))
        return lines, b"".join(acks)

    def _ack(self, last: int) -> bytes:
        line = b"ACK %s %d-%d\n" % (self._client_id, self._acked + 1, last)
        self._acked = last
        return line

    def finish(self) -> bytes:
        return self._ack(self._tag) if self._tag > self._acked else b""


class PigeonAcks(AckDialect):
    """Pigeon: ``SUBSCRIBE <id> <topic> ACK PREFETCH <n>``, ``ACK <id> <first>-<last>`` (docs/protocol.md)."""

    name = "pigeon"
    notes = "SUBSCRIBE ACK PREFETCH, one ACK <first>-<last> range per batch; PUBLISH answered by PUBLISHED"
    durable_notes = "pigeon --data-dir with the --fsync named; PUBLISHED is the confirmation"
    refusals = (b"ERROR ",)

    def publisher(self, host: str, port: int, queue: bytes, payload: bytes) -> tuple[socket.socket, bytes]:
        conn = LineSocket.open(host, port)
        client_id = _pigeon_connect(conn)
        return conn.sock, b"PUBLISH %s %s %s\n" % (client_id, queue, payload)

    def consumer(
        self, host: str, port: int, queue: bytes, index: int, prefetch: int, batch: int
    ) -> AckConsumer:
        conn = LineSocket.open(host, port)
        client_id = _pigeon_connect(conn)
        conn.sock.sendall(b"SUBSCRIBE %s %s ACK PREFETCH %d\n" % (client_id, queue, prefetch))
        conn.expect(b"SUBSCRIBED ")
        consumer = PigeonConsumer(conn.sock, batch, client_id)
        consumer.early = conn.buf
        return consumer


def _pigeon_connect(conn: LineSocket) -> bytes:
    conn.sock.sendall(b"CONNECT\n")
    return conn.expect(b"CONNECTED ").split(b" ", 1)[1]


# one stream entry of an XREADGROUP reply: *2 $<n> <id> *2 $1 f $<n> <payload>
_STREAM_ID = re.compile(rb"\*2\r\n\$\d+\r\n(\d+-\d+)\r\n")
_GROUP = b"workers"


class RedisStreamConsumer(AckConsumer):
    """One ``XREADGROUP COUNT <prefetch>`` outstanding; ``XACK`` of ``batch`` ids with the next read."""

    def __init__(
        self, conn: LineSocket, address: tuple[str, int], batch: int, stream: bytes, name: bytes, count: int
    ) -> None:
        super().__init__(_settled_setup(conn), batch)
        self._address = address
        self._stream = stream
        self._read = resp(
            b"XREADGROUP", b"GROUP", _GROUP, name, b"COUNT", b"%d" % count, b"BLOCK", b"0", b"STREAMS",
            stream, b">",
        )  # fmt: skip
        self._pending = bytearray()
        self._xack_replies = 0  # ":<n>" replies to skip before the next XREADGROUP reply
        self._ids: list[bytes] = []

    def start(self) -> bytes:
        return self._read

    def feed(self, buf: bytearray, n: int) -> tuple[int, bytes]:
        pending = self._pending
        pending += buf[:n]
        while self._xack_replies:
            end = pending.find(b"\n")
            if end < 0:
                return 0, b""
            if pending[:1] != b":":
                raise WireError(f"XACK: {bytes(pending[:end])!r}")
            del pending[: end + 1]
            self._xack_replies -= 1
        # *1 *2 $<n> <stream> *<entries>, then 8 lines an entry; nothing follows the reply
        if pending[:1] == b"-":
            raise WireError(f"XREADGROUP: {bytes(pending[:200])!r}")
        lines = pending.count(b"\n")
        if lines < 5:
            return 0, b""
        header_end = 0
        for _ in range(4):
            header_end = pending.index(b"\n", header_end) + 1
        entries = int(pending[header_end + 1 : pending.index(b"\r", header_end)])
        if lines < 5 + 8 * entries:
            return 0, b""
        ids = _STREAM_ID.findall(pending)
        if len(ids) != entries:
            raise WireError(f"XREADGROUP: {len(ids)} ids in a reply of {entries} entries")
        pending.clear()
        self._ids += ids
        out = []
        while len(self._ids) >= self.batch:
            out.append(self._xack(self._ids[: self.batch]))
            del self._ids[: self.batch]
        out.append(self._read)
        return entries, b"".join(out)

    def _xack(self, ids: list[bytes]) -> bytes:
        self._xack_replies += 1
        return resp(b"XACK", self._stream, _GROUP, *ids)

    def finish(self) -> bytes:
        ids, self._ids = self._ids, []
        return self._xack(ids) if ids else b""

    def settle(self) -> None:
        """The last XACK on a connection of its own.

        This one is blocked in its XREADGROUP (BLOCK 0) once the stream is drained, and Redis
        leaves a blocked client's further commands unread until the block ends.
        """
        with self.lock:
            xack = self.finish()
        if not xack:
            return
        conn = LineSocket.open(*self._address)
        try:
            conn.sock.sendall(xack)
            conn.expect(b":")
        finally:
            conn.sock.close()


class RedisStreamAcks(AckDialect):
    """Redis Streams: one stream, a consumer group, ``XREADGROUP`` and ``XACK``."""

    name = "redis"
    confirm_lines = 2  # $<n>, then the entry's id
    refusals = (b"\n-", b"-ERR", b"-OOM", b"-MISCONF")
    durable_notes = (
        "redis-server --appendonly yes with the appendfsync named; XADD's reply is the confirmation"
    )
    notes = (
        "one stream, XGROUP CREATE ... MKSTREAM, XADD <stream> * f <payload> pipelined (answered by the id), "
        "per consumer one XREADGROUP GROUP COUNT <prefetch> BLOCK 0 outstanding, XACK of 100 ids sent "
        "with the next XREADGROUP; acknowledged entries stay in the stream (no XDEL or trimming)"
    )

    def setup(self, host: str, port: int, queue: bytes, consumers: int, prefetch: int) -> None:
        conn = LineSocket.open(host, port)
        try:
            conn.sock.sendall(resp(b"XGROUP", b"CREATE", queue, _GROUP, b"$", b"MKSTREAM"))
            conn.expect(b"+OK")
        finally:
            conn.sock.close()

    def publisher(self, host: str, port: int, queue: bytes, payload: bytes) -> tuple[socket.socket, bytes]:
        return LineSocket.open(host, port).sock, resp(b"XADD", queue, b"*", b"f", payload)

    def consumer(
        self, host: str, port: int, queue: bytes, index: int, prefetch: int, batch: int
    ) -> AckConsumer:
        conn = LineSocket.open(host, port)
        return RedisStreamConsumer(conn, (host, port), batch, queue, b"c%d" % index, prefetch)


# a JetStream delivery at the start of a line: MSG <inbox> <sid> <ack subject> <size>, then the
# payload (no CR or LF in it)
_JS_MESSAGE = re.compile(rb"(?<![^\n])MSG [^ ]+ [^ ]+ ([^ ]+) \d+\r\n[^\r\n]*\r\n")
_JS_PULLS = 2  # pull requests kept outstanding per consumer, so a batch is always on its way


class JetStreamConsumer(AckConsumer):
    """Pull requests of ``prefetch`` messages, two outstanding; one ack per message, ``batch`` per write."""

    def __init__(self, sock: socket.socket, batch: int, pull: bytes, pull_size: int) -> None:
        super().__init__(sock, batch)
        self._pull = pull
        self._pull_size = pull_size
        self._pending = b""
        self._received = 0  # messages of the pull requests not yet renewed
        self._replies: list[bytes] = []

    def start(self) -> bytes:
        return self._pull * _JS_PULLS

    def feed(self, buf: bytearray, n: int) -> tuple[int, bytes]:
        data = self._pending + buf[:n]
        out = []
        if b"PING\r\n" in data:  # the server's keep-alive; never inside a payload of x
            out.append(b"PONG\r\n" * data.count(b"PING\r\n"))
            data = data.replace(b"PING\r\n", b"")
        for problem in (b"-ERR", b"HMSG"):  # an error, or a status such as 409 Exceeded MaxWaiting
            if problem in data:
                raise WireError(f"nats: {data[data.index(problem) :][:200]!r}")
        consumed = 0
        received = 0
        for match in _JS_MESSAGE.finditer(data):
            self._replies.append(match.group(1))
            consumed = match.end()
            received += 1
        self._pending = data[consumed:]
        while len(self._replies) >= self.batch:
            out.append(self._acks(self._replies[: self.batch]))
            del self._replies[: self.batch]
        self._received += received
        while self._received >= self._pull_size:
            out.append(self._pull)
            self._received -= self._pull_size
        return received, b"".join(out)

    @staticmethod
    def _acks(replies: list[bytes]) -> bytes:
        # an empty message to the delivery's reply subject is +ACK
        return b"".join(b"PUB %s 0\r\n\r\n" % r for r in replies)

    def finish(self) -> bytes:
        replies, self._replies = self._replies, []
        return self._acks(replies)


class JetStreamAcks(AckDialect):
    """NATS JetStream: a work-queue stream in memory (on file when durable), a durable pull consumer
    with AckExplicit."""

    name = "nats"
    notes = (
        "nats-server -js; a stream with retention workqueue and storage memory; one durable pull "
        "consumer, ack_policy explicit, max_ack_pending <prefetch> x <consumers> (the limit is the "
        "consumer's, shared by its clients; Pigeon and RabbitMQ count prefetch per subscriber); each "
        "client keeps 2 pull requests of <prefetch> messages outstanding and acks each message "
        "(AckExplicit has no ranges), 100 acks per write; core PUB to the stream's subject, no "
        "publish acknowledgements"
    )
    durable_notes = (
        "nats-server -js; a stream with retention workqueue and storage file (default sync_interval: "
        "nats-server 2.9 acknowledges a publish once written, and syncs every 2 minutes); each PUB "
        "carries a reply subject, and the PubAck is the confirmation"
    )
    confirm_lines = 2  # MSG <inbox> <sid> <size>, then the PubAck's JSON
    refusals = (b'"error"',)

    def setup(self, host: str, port: int, queue: bytes, consumers: int, prefetch: int) -> None:
        stream = _stream_name(queue)
        conn = LineSocket.open(host, port)
        try:
            _nats_connect(conn)
            conn.sock.sendall(b"SUB _INBOX.setup 1\r\n")
            _nats_request(conn, b"$JS.API.STREAM.CREATE." + stream, {
                "name": stream.decode(), "subjects": [queue.decode()], "retention": "workqueue",
                "storage": "file" if self.durable else "memory",
            })  # fmt: skip
            if not consumers:
                return
            _nats_request(conn, b"$JS.API.CONSUMER.DURABLE.CREATE.%s.%s" % (stream, _GROUP), {
                "stream_name": stream.decode(),
                "config": {
                    "durable_name": _GROUP.decode(), "deliver_policy": "all", "ack_policy": "explicit",
                    "ack_wait": 30_000_000_000, "max_ack_pending": prefetch * consumers,
                    "replay_policy": "instant",
                },
            })  # fmt: skip
        finally:
            conn.sock.close()

    def publisher(self, host: str, port: int, queue: bytes, payload: bytes) -> tuple[socket.socket, bytes]:
        conn = LineSocket.open(host, port)
        _nats_connect(conn)
        if not self.durable:
            return _settled_setup(conn), b"PUB %s %d\r\n%s\r\n" % (queue, len(payload), payload)
        conn.sock.sendall(b"SUB _INBOX.pub 1\r\nPING\r\n")
        conn.expect(b"PONG")
        return _settled_setup(conn), b"PUB %s _INBOX.pub %d\r\n%s\r\n" % (queue, len(payload), payload)

    def consumer(
        self, host: str, port: int, queue: bytes, index: int, prefetch: int, batch: int
    ) -> AckConsumer:
        conn = LineSocket.open(host, port)
        _nats_connect(conn)
        inbox = b"_INBOX.c%d" % index
        conn.sock.sendall(b"SUB %s 1\r\nPING\r\n" % inbox)
        conn.expect(b"PONG")
        body = b'{"batch":%d}' % prefetch
        subject = b"$JS.API.CONSUMER.MSG.NEXT.%s.%s" % (_stream_name(queue), _GROUP)
        pull = b"PUB %s %s %d\r\n%s\r\n" % (subject, inbox, len(body), body)
        return JetStreamConsumer(_settled_setup(conn), batch, pull, prefetch)


def _stream_name(queue: bytes) -> bytes:
    # stream names may not hold dots
    return queue.replace(b".", b"_").upper()


def _nats_connect(conn: LineSocket) -> None:
    conn.expect(b"INFO ")
    conn.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
    conn.expect(b"PONG")


def _nats_request(conn: LineSocket, subject: bytes, request: dict[str, object]) -> None:
    """A JetStream API request answered on _INBOX.setup; raises WireError with the API's error."""
    body = json.dumps(request).encode()
    conn.sock.sendall(b"PUB %s _INBOX.setup %d\r\n%s\r\n" % (subject, len(body), body))
    conn.expect(b"MSG _INBOX.setup ")
    reply = json.loads(conn.line())
    if "error" in reply:
        raise WireError(f"{subject.decode()}: {reply['error']}")
