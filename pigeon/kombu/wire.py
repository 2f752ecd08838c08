"""One Pigeon connection as the kombu transport needs it: a non-blocking socket (plain or TLS) an event
loop can watch.

kombu's event loop (Celery's worker hub) and ``drain_events`` wait on file
descriptors and then ask the transport to take what arrived, so this
connection never blocks in a read: ``read_available`` takes what the socket
holds and returns. Matching replies to commands and parsing deliveries is
the client library's ``Session`` and ``codec``, shared with ``pigeon.Client``.

Publishing is pipelined: a ``PUBLISH`` is sent at once and its reply is not
waited for; replies are taken whenever the socket is read, and a refusal is
raised by the next ``publish`` or ``sync``. While a send cannot go out (the
broker holds a publisher by flow control, or is busy), replies and deliveries
are read meanwhile, so the broker never stops reading this connection because
its output is not being taken.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pigeon import errors
from pigeon.client import codec
from pigeon.client.base import RECV_SIZE, WINDOW
from pigeon.client.codec import Message, ServerInfo, SubscribeOptions
from pigeon.client.session import Pending, Session
from pigeon.errors import AuthFailedError, CommandError, ConnectionClosedError, PigeonError, ProtocolError
from pigeon.kombu.address import BrokerAddress

PREFETCH_MAX = codec.PREFETCH_MAX
# a non-blocking socket with no bytes or no room: a TLS socket says so with its own errors
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Wire:
    """A connection to a Pigeon broker (TLS if the address says so, then HELLO and CONNECT with its
    credentials), read without blocking.

    ``timeout`` bounds every wait for the broker without progress: the TLS
    handshake, a reply, or room in the socket for a send. Refused credentials
    raise AuthFailedError (the server closes the connection: retrying cannot help).
    """

    def __init__(self, address: BrokerAddress, timeout: float = 10.0) -> None:
        self.timeout = timeout
        where = f"{address.host}:{address.port}"
        try:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
        except OSError as exc:
            raise ConnectionClosedError(f"cannot connect to {where}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if address.tls is not None:
            try:
                sock = address.tls.wrap_socket(sock, server_hostname=address.host)  # the handshake
            except OSError as exc:  # ssl.SSLError included
                sock.close()
                raise ConnectionClosedError(f"TLS with {where} failed: {exc}") from exc
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self._fileno = sock.fileno()
        self._session = Session()
        self._out = bytearray()  # what the socket has not taken yet
        self._acks: list[int] = []  # tags to acknowledge with the next flush_acks()
        self._refused: deque[CommandError | Exception] = deque()  # pipelined publishes the broker refused
        self.last_sent = self.last_received = time.monotonic()  # for heartbeats
        try:
            hello = self._session.expect(b"HELLO")
            connected = self._session.expect(b"CONNECTED")
            self._send(codec.hello_line() + codec.connect_line(address.user, address.password))
            self._wait(connected)
            self.info: ServerInfo = codec.parse_hello(self._reply(hello))
            self.client_id = self._reply(connected)
        except ConnectionClosedError as exc:
            self._drop()
            if isinstance(exc.error, AuthFailedError):
                raise exc.error from exc  # the refusal itself, which kombu does not retry
            raise
        except BaseException:
            self._drop()  # e.g. AUTH_REQUIRED, after which the broker keeps the connection open
            raise

    def fileno(self) -> int:
        """The socket's file descriptor (kept after close, so it can be unregistered)."""
        return self._fileno

    # ------------------------------------------------------------ commands

    def command(self, line: bytes, verb: bytes) -> bytes:
        """Send one command (after the queued acks) and wait for its reply; returns what follows ``verb``,
        raises its ERROR."""
        self.flush_acks()
        pending = self._session.expect(verb)
        self._send(line)
        self._wait(pending)
        return self._reply(pending)

    def subscribe(self, topic: str, ack: bool, prefetch: int | None, group: str | None = None) -> None:
        """SUBSCRIBE to a topic or pattern (acknowledged with a window of ``prefetch``, or plain), in
        consumer group ``group`` or the default one; again changes the window."""
        options = SubscribeOptions(
            ack, prefetch if ack else None, codec.encode_group(group) if group else None
        )
        self.command(codec.subscribe_line(self.client_id, codec.encode_topic(topic), options), b"SUBSCRIBED")

    def unsubscribe(
        self, topic: str, group: str | None = None, taken: Callable[[str], bool] | None = None
    ) -> int:
        """UNSUBSCRIBE from a topic or pattern (in ``group``), and drop the deliveries not taken yet that
        were its own (whose topic is ``topic``, or for which ``taken`` says so); returns how many.

        Acknowledged ones go back to the topic (the broker redelivers what an
        unsubscribing connection held); plain ones are gone, as in AMQP's no-ack mode.
        """
        encoded_group = codec.encode_group(group) if group else None
        line = codec.unsubscribe_line(self.client_id, codec.encode_topic(topic), encoded_group)
        self.command(line, b"UNSUBSCRIBED")
        own = taken or topic.__eq__
        messages = self._session.messages
        kept = [message for message in messages if not own(message.topic)]
        dropped = len(messages) - len(kept)
        messages.clear()
        messages.extend(kept)
        return dropped

    def publish(self, topic: str, data: bytes) -> None:
        """Send a PUBLISH without waiting for its reply; raises the refusal of an earlier one whose reply
        has been read, if any."""
        # A pipelined publish is not waited for, so one written into a connection the broker has
        # already closed (its --idle-timeout, a restart) would be lost without an error: reading first
        # (one system call) sees the close, raises a connection error, and kombu publishes again on
        # a new connection.
        self.read_available()
        self.raise_refused()
        line = codec.publish_line(
            self.client_id, codec.encode_topic(topic), codec.encode_message(data), self.info.max_line
        )
        self._session.expect_unwaited()
        self._send(self._take_ack_lines() + line)  # the queued acks go first, in the same send
        if self._session.in_flight > WINDOW:
            self._read_until(lambda: self._session.in_flight <= WINDOW // 2)

    def sync(self) -> None:
        """Wait until the broker has answered everything sent (a PING round trip); raise a refusal."""
        self.command(codec.ping_line(), b"PONG")
        self.raise_refused()

    def heartbeat(self, interval: float) -> None:
        """Send a ``PING`` when nothing was sent or nothing received for ``interval`` seconds, so that
        the broker's ``--idle-timeout`` never closes a quiet connection and a live broker always answers
        something; raise ConnectionClosedError when nothing came for two intervals (it is gone or hung)."""
        self.read_available()  # the answer to the last PING, when no event loop took it yet
        now = time.monotonic()
        if now - self.last_received > 2 * interval:
            raise self._lose(f"no heartbeat from the broker for {now - self.last_received:.1f}s")
        if now - self.last_sent >= interval or now - self.last_received >= interval:
            self._session.expect(b"PONG")  # its reply is matched in order, and not waited for
            self._send(self._take_ack_lines() + codec.ping_line())

    def raise_refused(self) -> None:
        """Raise the first refusal of a pipelined publish not reported yet."""
        if self._refused:
            error = self._refused.popleft()
            raise error

    def ack(self, tag: int) -> None:
        """Acknowledge a delivery with the next ``flush_acks`` or command (consecutive tags: one range)."""
        self._acks.append(tag)

    @property
    def acks_queued(self) -> int:
        """Acknowledgements queued and not sent yet."""
        return len(self._acks)

    def ack_through(self, tag: int) -> None:
        """Acknowledge every outstanding delivery up to ``tag`` now (AMQP's ``multiple=True``)."""
        self.flush_acks()
        self._send(b"ACK %s 1-%d\n" % (self.client_id, tag))

    def nack(self, tag: int) -> None:
        """Give a delivery back to the head of its topic now (after the acks queued before it)."""
        self.flush_acks()
        self._send(codec.settle_lines(b"NACK", self.client_id, [tag]))

    def flush_acks(self) -> None:
        """Send the queued acknowledgements, as few ``ACK`` lines as their tags allow."""
        if self._acks and self.sock is not None:
            self._send(self._take_ack_lines())

    def _take_ack_lines(self) -> bytes:
        """The ``ACK`` lines of the queued acknowledgements (empty if none), which are then unqueued."""
        if not self._acks:
            return b""
        tags, self._acks = self._acks, []
        return codec.settle_lines(b"ACK", self.client_id, tags)

    def destroy_group(self, pattern: str, group: str) -> None:
        """DESTROY a consumer group with no subscriber (its backlog goes with it)."""
        line = codec.destroy_line(self.client_id, codec.encode_topic(pattern), codec.encode_group(group))
        self.command(line, b"DESTROYED")

    def stats_group(self, pattern: str, group: str) -> dict[str, Any] | None:
        """The ``STATS GROUPS`` entry of ``group`` on ``pattern``, or None when the broker holds none."""
        return self._find_entry(
            "groups", lambda entry: entry.get("pattern") == pattern and entry.get("group") == group
        )

    def group_matches(self, topic: str) -> bool:
        """Whether the broker holds a consumer group whose pattern matches ``topic``."""
        return (
            self._find_entry("groups", lambda entry: codec.topic_matches(str(entry.get("pattern")), topic))
            is not None
        )

    def stats_topic(self, topic: str) -> dict[str, Any] | None:
        """The ``STATS TOPICS`` entry of ``topic``, or None when the broker holds no such topic.

        The listing has no lookup by name: its pages are walked until the topic is found.
        """
        return self._find_entry("topics", lambda entry: entry.get("name") == topic)

    def _find_entry(self, section: str, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        cursor = 0
        while True:
            reply = self.command(codec.stats_line(section, cursor), b"STATS")
            entries, cursor = codec.parse_stats_page(section, reply)
            for entry in entries:
                if wanted(entry):
                    return entry
            if cursor == 0:
                return None

    # ------------------------------------------------------------ deliveries

    def take_deliveries(self) -> list[Message]:
        """The deliveries read so far, oldest first."""
        messages = self._session.messages
        if not messages:
            return []
        taken = list(messages)
        messages.clear()
        return taken

    @property
    def has_deliveries(self) -> bool:
        """Deliveries were read and not taken yet."""
        return bool(self._session.messages)

    def read_available(self) -> None:
        """Take in whatever the socket holds now, without waiting; raises ConnectionClosedError when lost.

        It reads until the socket has nothing more (one read more than the bytes need), so that a
        close right behind the last bytes (the broker's reply, then its end) is seen now, and not
        after the next publish went into the dead connection.
        """
        while self._read_once():
            pass

    def wait_readable(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for bytes to read."""
        readable, _, _ = select.select([self._fileno], [], [], timeout)
        return bool(readable)

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        """Send the queued acks and DISCONNECT, wait briefly for the reply, close; safe to call twice.

        Waiting for ``DISCONNECTED`` means the broker has read every PUBLISH sent
        before: a process that publishes and exits loses nothing.
        """
        if self.sock is None:
            return
        try:
            self.command(codec.disconnect_line(), b"DISCONNECTED")
        except (PigeonError, OSError):
            pass  # closing anyway: the broker gives back what this connection held
        finally:
            self._drop()

    # ------------------------------------------------------------ bytes

    def _reply(self, pending: Pending) -> bytes:
        if pending.error is not None:
            raise pending.error
        return pending.reply

    def _send(self, data: bytes) -> None:
        """Send ``data`` after anything unsent; while the socket has no room, read what arrives."""
        self.last_sent = time.monotonic()
        if not self._out:  # the usual case, an ACK line or a PUBLISH: one system call
            sent = self._send_some(data)
            if sent == len(data):
                return
            data = data[sent:]
        self._out += data
        deadline = time.monotonic() + self.timeout
        while self._out:
            sent = self._send_some(self._out)
            if sent:
                del self._out[:sent]
                deadline = time.monotonic() + self.timeout
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.TimeoutError(f"the broker took nothing for {self.timeout}s")
            readable, _, _ = select.select([self._fileno], [self._fileno], [], remaining)
            if readable:
                self.read_available()

    def _send_some(self, data: bytes | bytearray) -> int:
        """Bytes of ``data`` the socket took now (0: no room)."""
        try:
            return self._socket().send(data)
        except WOULD_BLOCK:
            return 0
        except OSError as exc:
            raise self._lose(f"send failed: {exc}") from exc

    def _wait(self, pending: Pending) -> None:
        self._read_until(lambda: pending.done)

    def _read_until(self, done: Callable[[], bool]) -> None:
        """Read until ``done()`` is true; raises pigeon.TimeoutError after ``timeout`` s without bytes."""
        while not done():
            if not self.wait_readable(self.timeout):
                raise errors.TimeoutError(f"no reply from the broker within {self.timeout}s")
            self.read_available()

    def _read_once(self) -> bool:
        sock = self._socket()
        try:
            data = sock.recv(RECV_SIZE)
        except WOULD_BLOCK:
            return False
        except OSError as exc:
            raise self._lose(f"connection lost: {exc}") from exc
        if not data:
            raise self._lose("connection closed by the broker")
        self.last_received = time.monotonic()
        session = self._session
        for entry in session.receive(data):
            self._refused.extend(refusal.error for refusal in entry.refused)
        if session.broken is not None:
            raise self._lose(session.broken, ProtocolError)
        if session.closing:
            raise self._lose("the broker closed the connection")
        return True

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise ConnectionClosedError("the connection is closed")
        return self.sock

    def _lose(
        self, reason: str, kind: type[ConnectionClosedError] = ConnectionClosedError
    ) -> ConnectionClosedError:
        _, error = self._session.lost(reason, kind)
        self._drop()
        return error

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._out.clear()
