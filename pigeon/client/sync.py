"""``Client``: the blocking Pigeon client, one socket and no threads."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType

from pigeon import errors
from pigeon.client import codec
from pigeon.client.base import (
    CHUNK,
    DEFAULT_RECONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    OUT_LIMIT,
    RECONNECT_FIRST_DELAY,
    RECONNECT_MAX_DELAY,
    RECV_SIZE,
    WINDOW,
    ClientBase,
    result,
)
from pigeon.client.codec import Data, Message, Refused
from pigeon.client.session import Pending
from pigeon.errors import ConnectionClosedError, ProtocolError
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT


class Client(ClientBase):
    """A blocking connection to a Pigeon server; connects (and sends CONNECT) when created.

    ``timeout`` bounds each wait for a reply (None waits for ever). With
    ``reconnect=True`` a lost connection is re-established on next use, for up
    to ``reconnect_timeout`` seconds, and its subscriptions are restored.
    Not thread-safe: use one client per thread.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        reconnect: bool = False,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ) -> None:
        super().__init__(host, port, timeout, reconnect, reconnect_timeout)
        self._sock: socket.socket | None = None
        self._sock_timeout: float | None = None
        self._out = bytearray()  # publish(wait=False) lines not sent yet
        self._lost: ConnectionClosedError | None = None
        self._open()

    # ------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while the client holds an open connection."""
        return self._sock is not None

    def subscribe(self, topic: str | bytes) -> None:
        """Receive a share of the messages published to ``topic``."""
        name = codec.encode_topic(topic)
        self._command(b"SUBSCRIBED", lambda: codec.subscribe_line(self._cid, name), retry=True)
        self._topics[name] = None

    def unsubscribe(self, topic: str | bytes) -> None:
        """Stop receiving ``topic``; deliveries already received stay queued."""
        name = codec.encode_topic(topic)
        try:
            self._command(b"UNSUBSCRIBED", lambda: codec.unsubscribe_line(self._cid, name), retry=True)
        finally:
            self._topics.pop(name, None)

    def publish(self, topic: str | bytes, message: Data, *, wait: bool = True) -> None:
        """Publish one message; raises the server's refusal (e.g. BacklogFullError).

        With ``wait=False`` the command is only queued: many stay in flight, and
        ``flush()`` sends what is left, waits for every reply and reports the refusals.
        """
        name = codec.encode_topic(topic)
        data = codec.encode_message(message)
        if wait:
            self._command(b"PUBLISHED", lambda: codec.publish_line(self._cid, name, data), retry=False)
            return
        if self._sock is None or self._closed:
            self._ready()
        self._track_unwaited()
        self._out += codec.publish_line(self._cid, name, data)
        try:
            if len(self._out) >= OUT_LIMIT:
                self._send(b"")
            while self._session.in_flight > WINDOW:
                self._read(self._deadline())
        except ConnectionClosedError:
            pass  # flush() reports the messages whose replies were lost

    def flush(self) -> list[Refused]:
        """Send queued ``publish(wait=False)`` commands, wait for their replies, return the refusals.

        Indexes count those publishes from 0 since the previous flush. A publish
        whose reply was lost with the connection is reported with a
        ConnectionClosedError: it may or may not have been taken.
        """
        try:
            if self._sock is not None:
                if self._out:
                    self._send(b"")
                for batch in self._unflushed:
                    self._wait(batch)
        except ConnectionClosedError:
            pass  # the lost replies are in the refusals
        return self._take_refusals()

    def publish_many(self, topic: str | bytes, messages: Iterable[Data]) -> list[Refused]:
        """Publish many messages with many in flight at once; returns the refused ones (by index).

        Every message is checked before anything is sent. A message whose reply
        was lost with the connection is reported with a ConnectionClosedError.
        """
        name = codec.encode_topic(topic)
        data = codec.encode_messages(messages)
        self._ready()
        batch = self._session.expect_batch(len(data))
        try:
            for start in range(0, len(data), CHUNK):
                end = start + CHUNK
                self._send(codec.publish_chunk(self._cid, name, data[start:end]))
                # the batch counts its unsent lines as in flight
                while self._session.in_flight - max(len(data) - end, 0) > WINDOW:
                    self._read(self._deadline())
            self._wait(batch)
        except ConnectionClosedError:
            pass  # the batch lists the lost replies among its refusals
        return batch.refused

    def ping(self) -> float:
        """Round trip to the server, in seconds."""
        start = time.perf_counter()
        self._command(b"PONG", codec.ping_line, retry=True)
        return time.perf_counter() - start

    def next_message(self, timeout: float | None = None) -> Message:
        """The next delivery; raises pigeon.TimeoutError when none arrives within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        messages = self._session.messages
        while not messages:
            if self._closed or self._sock is None:
                self._ready()  # a reconnect may bring deliveries: check again before reading
                continue
            try:
                self._read(deadline)
            except ConnectionClosedError:
                if not self.reconnect:
                    raise
        return messages.popleft()

    def messages(self, timeout: float | None = None) -> Iterator[Message]:
        """Deliveries as they arrive; the iteration ends after ``timeout`` seconds without one."""
        while True:
            try:
                message = self.next_message(timeout)
            except errors.TimeoutError:
                return
            yield message

    def close(self) -> None:
        """Send DISCONNECT (after anything queued) and close the socket; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._sock is None:
            return
        try:
            self._roundtrip(codec.disconnect_line(), b"DISCONNECTED")
        except errors.PigeonError:
            pass  # closing anyway
        finally:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ connection

    def _open(self) -> None:
        """Connect, CONNECT, and restore the subscriptions."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise ConnectionClosedError(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._sock_timeout = self.timeout
        self._lost = None
        try:
            self._connected(self._roundtrip(codec.connect_line(), b"CONNECTED"))
            if self._topics:
                self._resubscribe()
        except BaseException:
            self._drop()
            raise

    def _resubscribe(self) -> None:
        pendings = [self._session.expect(b"SUBSCRIBED") for _ in self._topics]
        self._send(b"".join(codec.subscribe_line(self._cid, name) for name in self._topics))
        for pending in pendings:
            self._wait(pending)
            result(pending)

    def _reconnect(self) -> None:
        deadline = time.monotonic() + self.reconnect_timeout
        delay = RECONNECT_FIRST_DELAY
        while True:
            try:
                self._open()
            except (ConnectionClosedError, errors.TimeoutError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionClosedError(
                        f"could not reconnect to {self.host}:{self.port} in {self.reconnect_timeout}s"
                    ) from exc
                time.sleep(min(delay, left))
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
            else:
                self.reconnects += 1
                return

    def _ready(self) -> None:
        """Make sure a connection is open: reconnect if allowed, else raise why there is none."""
        if self._closed:
            raise self._closed_error()
        if self._sock is None:
            if not self.reconnect:
                raise self._lost or ConnectionClosedError("not connected")
            self._reconnect()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._out.clear()

    def _lose(
        self, reason: str, error_type: type[ConnectionClosedError] = ConnectionClosedError
    ) -> ConnectionClosedError:
        """The connection is gone: fail what was awaited and return the error to raise."""
        self._drop()
        _, error = self._session.lost(reason, error_type)
        self._lost = error
        return error

    # ------------------------------------------------------------ I/O

    def _command(self, verb: bytes, line: Callable[[], bytes], *, retry: bool) -> bytes:
        """Send one command and wait for its reply; a lost connection is noticed before sending.

        ``line`` builds the command, since a reconnect changes the client id.
        With ``retry`` (commands safe to repeat), a reply lost with the
        connection is asked for again on a new one when reconnecting is on.
        """
        self._ready()
        try:
            self._read_ready()
        except ConnectionClosedError:
            self._ready()
        try:
            return self._roundtrip(line(), verb)
        except ConnectionClosedError:
            if not (retry and self.reconnect) or self._closed:
                raise
        self._ready()
        return self._roundtrip(line(), verb)

    def _roundtrip(self, line: bytes, verb: bytes) -> bytes:
        pending = self._session.expect(verb)
        self._send(line)
        self._wait(pending)
        return result(pending)

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _wait(self, pending: Pending) -> None:
        """Read until ``pending`` is answered; each read may take up to ``timeout``."""
        while not pending.done:
            self._read(self._deadline())

    def _send(self, data: bytes) -> None:
        """Send ``data`` after any queued publishes."""
        sock = self._sock
        if sock is None:
            raise self._lost or ConnectionClosedError("not connected")
        if self._out:
            data = bytes(self._out) + data
            self._out.clear()
        self._set_timeout(self.timeout)
        try:
            sock.sendall(data)
        except OSError as exc:
            # a partial send leaves the stream unusable, a timeout included
            raise self._lose(f"send failed: {exc}") from exc

    def _read_ready(self) -> None:
        """Take in whatever has already arrived, without waiting."""
        with contextlib.suppress(errors.TimeoutError):
            self._read(time.monotonic())

    def _read(self, deadline: float | None) -> None:
        """Wait until bytes arrive (at most until ``deadline``) and take them in."""
        if self._out:
            self._send(b"")
        sock = self._sock
        if sock is None:
            raise self._lost or ConnectionClosedError("not connected")
        self._set_timeout(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        try:
            data = sock.recv(RECV_SIZE)
        except (TimeoutError, BlockingIOError):
            raise errors.TimeoutError("no reply or message from the server in time") from None
        except OSError as exc:
            raise self._lose(f"connection lost: {exc}") from exc
        if not data:
            raise self._lose("connection closed by the server")
        self._session.receive(data)
        broken = self._session.broken
        if broken is not None:
            raise self._lose(broken, ProtocolError)

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._sock_timeout and self._sock is not None:
            self._sock.settimeout(timeout)
            self._sock_timeout = timeout
