"""Just enough AMQP 0-9-1 to drive RabbitMQ's acknowledged queue at full speed, without a client library.

A Python AMQP client (pika) decodes every frame into objects and would cap the figures well
below what RabbitMQ itself can do; prebuilt publish frames and a consumer that only walks frame
headers leave RabbitMQ as the bottleneck, as the other brokers are. Frames:
``type(1) channel(2) size(4) payload frame-end(0xCE)``; a method payload starts with its class and
method ids. Everything runs on channel 1, as user guest from the loopback address, heartbeats off.
"""

from __future__ import annotations

import socket
import struct

from pigeon.bench.acking import AckConsumer, AckDialect
from pigeon.bench.wire import LineSocket, WireError

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE
METHOD, HEADER, BODY = 1, 2, 3
CHANNEL = 1
EMPTY_TABLE = b"\x00\x00\x00\x00"
_FRAME = struct.Struct(">BHI")
_IDS = struct.Struct(">HH")
_TAG = struct.Struct(">Q")
BASIC_DELIVER = (60, 60)
CLOSES = {(10, 50): "connection.close", (20, 40): "channel.close"}


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    """One frame."""
    return _FRAME.pack(kind, channel, len(payload)) + payload + bytes((FRAME_END,))


def method(channel: int, class_id: int, method_id: int, args: bytes = b"") -> bytes:
    """One method frame."""
    return frame(METHOD, channel, _IDS.pack(class_id, method_id) + args)


def shortstr(value: bytes) -> bytes:
    """An AMQP short string."""
    return bytes((len(value),)) + value


def longstr(value: bytes) -> bytes:
    """An AMQP long string."""
    return struct.pack(">I", len(value)) + value


def publish(queue: bytes, payload: bytes) -> bytes:
    """basic.publish to the default exchange (routing key = queue), transient, no properties."""
    return (
        method(CHANNEL, 60, 40, b"\x00\x00" + shortstr(b"") + shortstr(queue) + b"\x00")
        + frame(HEADER, CHANNEL, struct.pack(">HHQH", 60, 0, len(payload), 0))
        + frame(BODY, CHANNEL, payload)
    )


def basic_ack(tag: int) -> bytes:
    """basic.ack of every delivery up to ``tag`` (multiple=true)."""
    return method(CHANNEL, 60, 80, _TAG.pack(tag) + b"\x01")


class AmqpSetup:
    """A blocking connection for the handshake and the synchronous methods before the data flows."""

    def __init__(self, host: str, port: int) -> None:
        self.conn = LineSocket.open(host, port)
        self.sock = self.conn.sock
        self.sock.sendall(PROTOCOL_HEADER)
        self.expect(10, 10)  # connection.start
        self.sock.sendall(
            method(
                0,
                10,
                11,
                EMPTY_TABLE + shortstr(b"PLAIN") + longstr(b"\x00guest\x00guest") + shortstr(b"en_US"),
            )
        )
        tune = self.expect(10, 30)
        channel_max, frame_max, _ = struct.unpack_from(">HIH", tune)
        self.sock.sendall(method(0, 10, 31, struct.pack(">HIH", channel_max, frame_max, 0)))
        self.sock.sendall(method(0, 10, 40, shortstr(b"/") + shortstr(b"") + b"\x00"))
        self.expect(10, 41)
        self.sock.sendall(method(CHANNEL, 20, 10, shortstr(b"")))
        self.expect(20, 11)

    def _read(self, size: int) -> bytes:
        while len(self.conn.buf) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WireError("rabbitmq closed the connection during setup")
            self.conn.buf += chunk
        data, self.conn.buf = self.conn.buf[:size], self.conn.buf[size:]
        return data

    def expect(self, class_id: int, method_id: int) -> bytes:
        """The arguments of the next method frame, which must be ``class_id.method_id``."""
        kind, _, size = _FRAME.unpack(self._read(7))
        payload = self._read(size + 1)[:-1]
        ids = _IDS.unpack_from(payload) if kind == METHOD else None
        if ids != (class_id, method_id):
            raise WireError(
                f"expected AMQP method {class_id}.{method_id}, got frame {kind} {payload[:120]!r}"
            )
        return payload[4:]

    def call(self, class_id: int, method_id: int, args: bytes) -> bytes:
        """A synchronous method on the channel; returns the arguments of its -ok."""
        self.sock.sendall(method(CHANNEL, class_id, method_id, args))
        return self.expect(class_id, method_id + 1)


class RabbitConsumer(AckConsumer):
    """Walks frame headers only; deliveries are numbered 1, 2, ... per channel, acked with multiple."""

    def __init__(self, sock: socket.socket, batch: int) -> None:
        super().__init__(sock, batch)
        self._carry = b""
        self._tag = 0
        self._acked = 0

    def feed(self, buf: bytearray, n: int) -> tuple[int, bytes]:
        data = self._carry + buf[:n]
        pos, end, received = 0, len(data), 0
        while pos + 7 <= end:
            kind, _, size = _FRAME.unpack_from(data, pos)
            after = pos + 8 + size
            if after > end:
                break
            if kind == METHOD:
                ids = _IDS.unpack_from(data, pos + 7)
                if ids == BASIC_DELIVER:
                    tag_at = pos + 12 + data[pos + 11]  # after the consumer tag (a short string)
                    tag = _TAG.unpack_from(data, tag_at)[0]
                    if tag != self._tag + 1:
                        raise WireError(f"rabbitmq: delivery tag {tag} after {self._tag}")
                    self._tag = tag
                    received += 1
                elif ids in CLOSES:
                    raise WireError(f"rabbitmq sent {CLOSES[ids]}: {data[pos + 11 : after][:200]!r}")
            pos = after
        self._carry = data[pos:]
        acks = []
        while self._tag - self._acked >= self.batch:
            self._acked += self.batch
            acks.append(basic_ack(self._acked))
        return received, b"".join(acks)

    def finish(self) -> bytes:
        if self._tag == self._acked:
            return b""
        self._acked = self._tag
        return basic_ack(self._tag)


class RabbitAcks(AckDialect):
    """RabbitMQ: a classic queue, manual acks, basic.qos prefetch, basic.ack with multiple."""

    name = "rabbitmq"
    notes = (
        "raw AMQP 0-9-1 (pigeon/bench/amqp.py); a classic queue, not durable; transient messages "
        "published to the default exchange without publisher confirms; per consumer a channel "
        "with basic.qos prefetch <prefetch> and basic.consume with manual acks; basic.ack "
        "multiple=true every 100 deliveries"
    )

    def setup(self, host: str, port: int, queue: bytes, consumers: int, prefetch: int) -> None:
        amqp = AmqpSetup(host, port)
        try:
            amqp.call(50, 10, b"\x00\x00" + shortstr(queue) + b"\x00" + EMPTY_TABLE)  # queue.declare
        finally:
            amqp.sock.close()

    def publisher(self, host: str, port: int, queue: bytes, payload: bytes) -> tuple[socket.socket, bytes]:
        return AmqpSetup(host, port).sock, publish(queue, payload)

    def consumer(
        self, host: str, port: int, queue: bytes, index: int, prefetch: int, batch: int
    ) -> AckConsumer:
        amqp = AmqpSetup(host, port)
        amqp.call(60, 10, struct.pack(">IH", 0, prefetch) + b"\x00")  # basic.qos
        amqp.call(60, 20, b"\x00\x00" + shortstr(queue) + shortstr(b"c%d" % index) + b"\x00" + EMPTY_TABLE)
        if amqp.conn.buf:
            raise WireError(f"unexpected data after setup: {amqp.conn.buf[:80]!r}")
        return RabbitConsumer(amqp.sock, batch)
