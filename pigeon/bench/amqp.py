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

from pigeon.bench.acking import AckConsumer, AckDialect, Confirms
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
BASIC_ACK = (60, 80)
BASIC_NACK = (60, 120)
PERSISTENT = 2  # delivery-mode of a message written to disk on a durable queue
DURABLE = 0x02  # queue.declare's flag bits: passive 1, durable 2, exclusive 4, auto-delete 8
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


def publish(queue: bytes, payload: bytes, persistent: bool = False) -> bytes:
    """basic.publish to the default exchange (routing key = queue): transient with no properties,
    or ``persistent`` (delivery-mode 2, the only property)."""
    # property flags (0x1000: delivery-mode only), then the properties present
    properties = struct.pack(">HB", 0x1000, PERSISTENT) if persistent else struct.pack(">H", 0)
    return (
        method(CHANNEL, 60, 40, b"\x00\x00" + shortstr(b"") + shortstr(queue) + b"\x00")
        + frame(HEADER, CHANNEL, struct.pack(">HHQ", 60, 0, len(payload)) + properties)
        + frame(BODY, CHANNEL, payload)
    )


def basic_ack(tag: int) -> bytes:
    """basic.ack of every delivery up to ``tag`` (multiple=true)."""
    return method(CHANNEL, 60, 80, _TAG.pack(tag) + b"\x01")


def complete_frames(data: bytes) -> tuple[list[tuple[tuple[int, int] | None, int, int]], int]:
    """The whole frames at the start of ``data``: (method ids, or None for another kind, start,
    end) each, and the offset where the incomplete rest begins."""
    frames = []
    pos, end = 0, len(data)
    while pos + 7 <= end:
        kind, _, size = _FRAME.unpack_from(data, pos)
        after = pos + 8 + size
        if after > end:
            break
        frames.append((_IDS.unpack_from(data, pos + 7) if kind == METHOD else None, pos, after))
        pos = after
    return frames, pos


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
        frames, rest = complete_frames(data)
        received = 0
        for ids, pos, after in frames:
            if ids == BASIC_DELIVER:
                tag_at = pos + 12 + data[pos + 11]  # after the consumer tag (a short string)
                tag = _TAG.unpack_from(data, tag_at)[0]
                if tag != self._tag + 1:
                    raise WireError(f"rabbitmq: delivery tag {tag} after {self._tag}")
                self._tag = tag
                received += 1
            elif ids in CLOSES:
                raise WireError(f"rabbitmq sent {CLOSES[ids]}: {data[pos + 11 : after][:200]!r}")
        self._carry = data[rest:]
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


class RabbitConfirms(Confirms):
    """Publisher confirms: basic.ack frames from the broker, numbered like the publishes (1, 2, ...
    on the channel), each for one publish or, with multiple, for every one up to its tag."""

    def __init__(self) -> None:
        super().__init__(1, ())
        self._frames = b""
        self._upto = 0  # every publish up to this tag is confirmed
        self._singles: set[int] = set()  # confirmed one by one above _upto

    def feed(self, buf: bytearray, n: int) -> int:
        data = self._frames + buf[:n]
        frames, rest = complete_frames(data)
        confirmed = 0
        for ids, pos, after in frames:
            if ids == BASIC_ACK:
                tag, multiple = struct.unpack_from(">QB", data, pos + 11)
                confirmed += self._ack(tag, bool(multiple & 1))
            elif ids == BASIC_NACK or ids in CLOSES:
                raise WireError(f"rabbitmq refused a publish: {data[pos + 7 : after][:200]!r}")
        self._frames = data[rest:]
        return confirmed

    def _ack(self, tag: int, multiple: bool) -> int:
        if not multiple:
            if tag <= self._upto or tag in self._singles:
                return 0
            self._singles.add(tag)
            return 1
        if tag <= self._upto:
            return 0
        singles = {t for t in self._singles if t <= tag}
        self._singles -= singles
        confirmed = tag - self._upto - len(singles)
        self._upto = tag
        return confirmed


class RabbitAcks(AckDialect):
    """RabbitMQ: a classic queue, manual acks, basic.qos prefetch, basic.ack with multiple; when
    durable, a durable queue, persistent messages and publisher confirms."""

    name = "rabbitmq"
    notes = (
        "raw AMQP 0-9-1 (pigeon/bench/amqp.py); a classic queue, not durable; transient messages "
        "published to the default exchange without publisher confirms; per consumer a channel "
        "with basic.qos prefetch <prefetch> and basic.consume with manual acks; basic.ack "
        "multiple=true every 100 deliveries"
    )
    durable_notes = (
        "raw AMQP 0-9-1; a classic queue declared durable, persistent messages (delivery-mode 2), "
        "publisher confirms (confirm.select; basic.ack from the broker, often with multiple)"
    )

    def confirms(self) -> Confirms:
        return RabbitConfirms()

    def setup(self, host: str, port: int, queue: bytes, consumers: int, prefetch: int) -> None:
        amqp = AmqpSetup(host, port)
        flags = bytes((DURABLE if self.durable else 0,))
        try:
            amqp.call(50, 10, b"\x00\x00" + shortstr(queue) + flags + EMPTY_TABLE)  # queue.declare
        finally:
            amqp.sock.close()

    def publisher(self, host: str, port: int, queue: bytes, payload: bytes) -> tuple[socket.socket, bytes]:
        amqp = AmqpSetup(host, port)
        if self.durable:
            amqp.call(85, 10, b"\x00")  # confirm.select, answered by confirm.select-ok
        return amqp.sock, publish(queue, payload, self.durable)

    def consumer(
        self, host: str, port: int, queue: bytes, index: int, prefetch: int, batch: int
    ) -> AckConsumer:
        amqp = AmqpSetup(host, port)
        amqp.call(60, 10, struct.pack(">IH", 0, prefetch) + b"\x00")  # basic.qos
        amqp.call(60, 20, b"\x00\x00" + shortstr(queue) + shortstr(b"c%d" % index) + b"\x00" + EMPTY_TABLE)
        consumer = RabbitConsumer(amqp.sock, batch)
        consumer.early = amqp.conn.buf
        return consumer
