"""The wire dialects the load generator speaks: Pigeon, and NATS and Redis for comparison.

A dialect knows how to open a connection, subscribe, and frame one PUBLISH.
The generator never parses deliveries: it counts newlines, so each dialect says
how many lines one delivered message and one publish acknowledgement take.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field

DIALECTS = ("pigeon", "pigeon2", "nats", "redis")


class WireError(RuntimeError):
    """The server answered a setup command with something unexpected."""


@dataclass
class LineSocket:
    """A blocking TCP socket with a line reader, for the setup phase only."""

    sock: socket.socket
    buf: bytes = field(default=b"")

    @classmethod
    def open(
        cls, host: str, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None
    ) -> LineSocket:
        """Connect with TCP_NODELAY, as every client of a latency-sensitive broker should; with
        ``tls``, over TLS from the first byte."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(sock)
        if tls is not None:
            conn.start_tls(tls, host)
        return conn

    def start_tls(self, tls: ssl.SSLContext, host: str) -> None:
        """Run the TLS handshake on this connection (nothing may be left unread)."""
        if self.buf:
            raise WireError(f"bytes before the TLS handshake: {self.buf!r}")
        self.sock = tls.wrap_socket(self.sock, server_hostname=host)

    def line(self) -> bytes:
        """The next line without its line ending; raises WireError at EOF."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WireError(f"connection closed during setup; got {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def expect(self, prefix: bytes) -> bytes:
        """The next line, which must start with ``prefix``."""
        line = self.line()
        if not line.startswith(prefix):
            raise WireError(f"expected {prefix!r}..., got {line!r}")
        return line


class Dialect:
    """Pigeon's own protocol (see docs/protocol.md)."""

    name = "pigeon"
    lines_per_message = 1  # MESSAGE <topic> <message>
    lines_per_ack = 1  # PUBLISHED <topic>
    has_queue_groups = True

    def connect(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> LineSocket:
        """A new connection, over TLS with ``tls``; ``handshake`` then opens the session."""
        return LineSocket.open(host, port, tls=tls)

    def handshake(self, conn: LineSocket) -> bytes:
        """Open the session; returns the client id to put in commands."""
        conn.sock.sendall(b"CONNECT\n")
        return conn.expect(b"CONNECTED ").split(b" ", 1)[1]

    def subscribe(self, conn: LineSocket, client_id: bytes, topic: bytes, group: bool) -> None:
        """Subscribe and wait for the confirmation (Pigeon topics always share round robin)."""
        conn.sock.sendall(b"SUBSCRIBE %s %s\n" % (client_id, topic))
        conn.expect(b"SUBSCRIBED ")

    def subscribe_fanout(self, conn: LineSocket, client_id: bytes, topic: bytes, index: int) -> None:
        """Subscribe so that every subscriber of the topic gets every message: a consumer group of
        its own per subscriber (Pigeon's topics share among their plain subscribers)."""
        conn.sock.sendall(b"SUBSCRIBE %s %s GROUP g%d\n" % (client_id, topic, index))
        conn.expect(b"SUBSCRIBED ")

    def publish(self, client_id: bytes, topic: bytes, payload: bytes) -> bytes:
        """One PUBLISH command, framed."""
        return b"PUBLISH %s %s %s\n" % (client_id, topic, payload)


class Pigeon2Dialect(Dialect):
    """Pigeon's protocol 2: framed PUB, and MSG frames after HELLO 2 (the payloads here hold no newline)."""

    name = "pigeon2"
    lines_per_message = 2  # MSG <topic> <nbytes>, then the payload

    def handshake(self, conn: LineSocket) -> bytes:
        conn.sock.sendall(b"HELLO 2\nCONNECT\n")
        conn.expect(b'HELLO {"protocol":2')
        return conn.expect(b"CONNECTED ").split(b" ", 1)[1]

    def publish(self, client_id: bytes, topic: bytes, payload: bytes) -> bytes:
        return b"PUB %s %s %d\n%s\n" % (client_id, topic, len(payload), payload)


class NatsDialect(Dialect):
    """NATS with verbose off: PUBLISH gets no reply; queue groups share a subject."""

    name = "nats"
    lines_per_message = 2  # MSG <subject> <sid> <len>, then the payload
    lines_per_ack = 0

    def connect(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> LineSocket:
        """NATS greets in plain text (INFO), then the client starts TLS when the server wants it."""
        conn = LineSocket.open(host, port)
        conn.expect(b"INFO ")
        if tls is not None:
            conn.start_tls(tls, host)
        return conn

    def handshake(self, conn: LineSocket) -> bytes:
        conn.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        conn.expect(b"PONG")
        return b""

    def subscribe(self, conn: LineSocket, client_id: bytes, topic: bytes, group: bool) -> None:
        queue = b" workers" if group else b""
        conn.sock.sendall(b"SUB %s%s 1\r\nPING\r\n" % (topic, queue))
        conn.expect(b"PONG")

    def subscribe_fanout(self, conn: LineSocket, client_id: bytes, topic: bytes, index: int) -> None:
        """A plain subscription: every one gets every message."""
        self.subscribe(conn, client_id, topic, False)

    def publish(self, client_id: bytes, topic: bytes, payload: bytes) -> bytes:
        return b"PUB %s %d\r\n%s\r\n" % (topic, len(payload), payload)


def resp(*parts: bytes) -> bytes:
    """One RESP command: an array of bulk strings."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class RedisDialect(Dialect):
    """Redis pub/sub: PUBLISH is answered with the receiver count; no queue groups."""

    name = "redis"
    lines_per_message = 7  # *3, $7, message, $n, <channel>, $n, <payload>
    lines_per_ack = 1  # :<receivers>
    has_queue_groups = False

    def handshake(self, conn: LineSocket) -> bytes:
        return b""

    def subscribe(self, conn: LineSocket, client_id: bytes, topic: bytes, group: bool) -> None:
        conn.sock.sendall(resp(b"SUBSCRIBE", topic))
        for _ in range(6):  # *3, $9, subscribe, $n, <channel>, :<count>
            conn.line()

    def subscribe_fanout(self, conn: LineSocket, client_id: bytes, topic: bytes, index: int) -> None:
        """Pub/sub channels fan out by themselves."""
        self.subscribe(conn, client_id, topic, False)

    def publish(self, client_id: bytes, topic: bytes, payload: bytes) -> bytes:
        return resp(b"PUBLISH", topic, payload)


def dialect(name: str) -> Dialect:
    """The dialect called ``name`` (one of DIALECTS)."""
    if name == "nats":
        return NatsDialect()
    if name == "redis":
        return RedisDialect()
    if name == "pigeon":
        return Dialect()
    if name == "pigeon2":
        return Pigeon2Dialect()
    raise ValueError(f"unknown dialect {name!r}; choose from {', '.join(DIALECTS)}")
