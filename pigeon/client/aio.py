"""``AsyncClient``: the asyncio Pigeon client, on the running event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import cast

from pigeon import errors
from pigeon.client import codec
from pigeon.client.base import (
    CHUNK,
    DEFAULT_MAX_QUEUED,
    DEFAULT_RECONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    OUT_LIMIT,
    RECONNECT_FIRST_DELAY,
    RECONNECT_MAX_DELAY,
    WINDOW,
    ClientBase,
    result,
)
from pigeon.client.codec import Data, Message, Refused
from pigeon.client.session import Pending
from pigeon.errors import ConnectionClosedError, PigeonError, ProtocolError
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT


class _Protocol(asyncio.Protocol):
    """One connection's callbacks, handed straight to its client."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._client._on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._on_lost(self, f"connection lost: {exc}" if exc else "connection closed by the server")

    def pause_writing(self) -> None:
        self._client._writable.clear()

    def resume_writing(self) -> None:
        self._client._writable.set()


class AsyncClient(ClientBase):
    """An asyncio connection to a Pigeon server.

    Connect with ``async with AsyncClient(...) as client:`` or
    ``client = await AsyncClient(...).connect()``. ``timeout`` bounds each
    wait for a reply; with ``reconnect=True`` a lost connection is
    re-established in the background, for up to ``reconnect_timeout``
    seconds, and its subscriptions are restored. While more than ``max_queued``
    deliveries wait to be consumed, the client stops reading, so that the
    server skips it in the rotation and gives the messages to others.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        reconnect: bool = False,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        super().__init__(host, port, timeout, reconnect, reconnect_timeout)
        self.max_queued = max_queued
        self._reading_paused = False
        self._protocol: _Protocol | None = None
        self._out = bytearray()  # publish(wait=False) lines not written yet
        self._flush_scheduled = False
        self._lost: ConnectionClosedError | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()  # set when deliveries or replies come in, or the connection drops
        self._writable = asyncio.Event()
        self._writable.set()

    # ------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while the client holds an open connection."""
        return self._protocol is not None

    async def connect(self) -> AsyncClient:
        """Open the connection and send CONNECT; returns the client."""
        if self._closed:
            raise self._closed_error()
        if self._protocol is None:
            await self._open()
        return self

    async def subscribe(self, topic: str | bytes) -> None:
        """Receive a share of the messages published to ``topic``."""
        name = codec.encode_topic(topic)
        await self._command(b"SUBSCRIBED", lambda: codec.subscribe_line(self._cid, name), retry=True)
        self._topics[name] = None

    async def unsubscribe(self, topic: str | bytes) -> None:
        """Stop receiving ``topic``; deliveries already received stay queued."""
        name = codec.encode_topic(topic)
        try:
            await self._command(b"UNSUBSCRIBED", lambda: codec.unsubscribe_line(self._cid, name), retry=True)
        finally:
            self._topics.pop(name, None)

    async def publish(self, topic: str | bytes, message: Data, *, wait: bool = True) -> None:
        """Publish one message; raises the server's refusal (e.g. BacklogFullError).

        With ``wait=False`` the command is only queued (written on the next
        loop iteration): many stay in flight, and ``flush()`` waits for every
        reply and reports the refusals.
        """
        name = codec.encode_topic(topic)
        data = codec.encode_message(message)
        if wait:
            await self._command(b"PUBLISHED", lambda: codec.publish_line(self._cid, name, data), retry=False)
            return
        protocol = await self._ready()
        self._track_unwaited()
        self._out += codec.publish_line(self._cid, name, data)
        if len(self._out) >= OUT_LIMIT:
            self._write(protocol, b"")
            await self._throttle(0)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    async def flush(self) -> list[Refused]:
        """Wait for the replies to every ``publish(wait=False)`` so far; return the refusals.

        Indexes count those publishes from 0 since the previous flush. A publish
        whose reply was lost with the connection is reported with a
        ConnectionClosedError: it may or may not have been taken.
        """
        self._flush_out()
        for batch in self._unflushed:
            await self._wait(batch)
        return self._take_refusals()

    async def publish_many(self, topic: str | bytes, messages: Iterable[Data]) -> list[Refused]:
        """Publish many messages with many in flight at once; returns the refused ones (by index).

        Every message is checked before anything is sent. A message whose reply
        was lost with the connection is reported with a ConnectionClosedError.
        """
        name = codec.encode_topic(topic)
        data = codec.encode_messages(messages)
        protocol = await self._ready()
        batch = self._session.expect_batch(len(data))
        for start in range(0, len(data), CHUNK):
            if self._protocol is not protocol:
                break  # lost: the batch already lists the rest as refused
            end = start + CHUNK
            self._write(protocol, codec.publish_chunk(self._cid, name, data[start:end]))
            # the batch counts its unsent lines as in flight
            await self._throttle(max(len(data) - end, 0))
        await self._wait(batch)
        return batch.refused

    async def ping(self) -> float:
        """Round trip to the server, in seconds."""
        start = time.perf_counter()
        await self._command(b"PONG", codec.ping_line, retry=True)
        return time.perf_counter() - start

    async def next_message(self, timeout: float | None = None) -> Message:
        """The next delivery; raises pigeon.TimeoutError when none arrives within ``timeout`` seconds."""
        messages = self._session.messages
        deadline = None if timeout is None else time.monotonic() + timeout
        while not messages:
            if self._closed:
                raise self._closed_error()
            if self._protocol is None:
                if not self.reconnect:
                    raise self._lost or ConnectionClosedError("not connected")
                await self._ready()
                continue
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), _left(deadline))
            except asyncio.TimeoutError:
                raise errors.TimeoutError(f"no message within {timeout}s") from None
        if self._reading_paused and len(messages) <= self.max_queued // 2:
            self._resume_reading()
        return messages.popleft()

    async def messages(self, timeout: float | None = None) -> AsyncIterator[Message]:
        """Deliveries as they arrive; the iteration ends after ``timeout`` seconds without one."""
        while True:
            try:
                message = await self.next_message(timeout)
            except errors.TimeoutError:
                return
            yield message

    async def close(self) -> None:
        """Send DISCONNECT (after anything queued) and close the connection; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        protocol = self._protocol
        if protocol is None:
            return
        try:
            await self._roundtrip(protocol, codec.disconnect_line(), b"DISCONNECTED")
        except PigeonError:
            pass  # closing anyway
        finally:
            self._drop(protocol)
            self._arrived.set()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------ connection

    async def _open(self) -> _Protocol:
        """Connect, CONNECT, and restore the subscriptions."""
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self.host, self.port), self.timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or "timed out"
            raise ConnectionClosedError(f"cannot connect to {self.host}:{self.port}: {reason}") from exc
        self._protocol = protocol
        self._lost = None
        try:
            self._connected(await self._roundtrip(protocol, codec.connect_line(), b"CONNECTED"))
            if self._topics:
                pendings = [self._session.expect(b"SUBSCRIBED") for _ in self._topics]
                self._write(protocol, b"".join(codec.subscribe_line(self._cid, n) for n in self._topics))
                for pending in pendings:
                    await self._wait(pending)
                    result(pending)
        except BaseException:
            self._drop(protocol)
            raise
        return protocol

    async def _reconnect(self) -> None:
        deadline = time.monotonic() + self.reconnect_timeout
        delay = RECONNECT_FIRST_DELAY
        while True:
            try:
                await self._open()
            except (ConnectionClosedError, errors.TimeoutError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._lost = ConnectionClosedError(
                        f"could not reconnect to {self.host}:{self.port} in {self.reconnect_timeout}s"
                    )
                    self._lost.__cause__ = exc
                    self._arrived.set()
                    return
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
            else:
                self.reconnects += 1
                return

    async def _ready(self) -> _Protocol:
        """The open connection: reconnects if allowed, else raises why there is none."""
        while True:
            if self._closed:
                raise self._closed_error()
            if self._protocol is not None:
                return self._protocol
            if not self.reconnect:
                raise self._lost or ConnectionClosedError("not connected")
            if self._reconnecting is None or self._reconnecting.done():
                self._lost = None
                self._reconnecting = asyncio.ensure_future(self._reconnect())
            await asyncio.shield(self._reconnecting)
            if self._protocol is None and self._lost is not None:
                raise self._lost

    def _drop(self, protocol: _Protocol) -> None:
        if protocol.transport is not None:
            protocol.transport.abort()
        self._on_lost(protocol, "connection closed by the client")

    def _on_data(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        session = self._session
        for pending in session.receive(data):
            _resolve(pending)
        if session.broken is not None:
            self._lose(protocol, session.broken, ProtocolError)
        elif len(session.messages) > self.max_queued and not session.in_flight and protocol.transport:
            # back pressure: the server's write buffer fills and its rotation skips us
            protocol.transport.pause_reading()
            self._reading_paused = True
        self._arrived.set()

    def _on_lost(self, protocol: _Protocol, reason: str) -> None:
        if protocol is self._protocol:
            self._lose(protocol, reason)

    def _lose(
        self,
        protocol: _Protocol,
        reason: str,
        error_type: type[ConnectionClosedError] = ConnectionClosedError,
    ) -> None:
        """Forget the connection, fail what was awaited, and start reconnecting if asked to."""
        self._protocol = None
        self._reading_paused = False
        self._out.clear()
        self._writable.set()
        if error_type is ProtocolError and protocol.transport is not None:
            protocol.transport.abort()
        failed, self._lost = self._session.lost(reason, error_type)
        for pending in failed:
            _resolve(pending)
        self._arrived.set()
        # reconnect at once only to restore deliveries; a publisher reconnects on its next command
        idle = self._reconnecting is None or self._reconnecting.done()
        if self.reconnect and not self._closed and self._topics and idle:
            self._reconnecting = asyncio.ensure_future(self._reconnect())

    # ------------------------------------------------------------ I/O

    async def _command(self, verb: bytes, line: Callable[[], bytes], *, retry: bool) -> bytes:
        """Send one command and wait for its reply.

        ``line`` builds the command, since a reconnect changes the client id.
        With ``retry`` (commands safe to repeat), a reply lost with the
        connection is asked for again on a new one when reconnecting is on.
        """
        protocol = await self._ready()
        try:
            return await self._roundtrip(protocol, line(), verb)
        except ConnectionClosedError:
            if not (retry and self.reconnect) or self._closed:
                raise
        protocol = await self._ready()
        return await self._roundtrip(protocol, line(), verb)

    async def _roundtrip(self, protocol: _Protocol, line: bytes, verb: bytes) -> bytes:
        pending = self._session.expect(verb)
        self._write(protocol, line)
        await self._wait(pending)
        return result(pending)

    async def _wait(self, pending: Pending) -> None:
        """Until ``pending`` is answered; raises pigeon.TimeoutError after ``timeout``."""
        if pending.done:
            return
        waiter = asyncio.get_running_loop().create_future()
        pending.waiter = waiter
        try:
            await asyncio.wait_for(waiter, self.timeout)
        except asyncio.TimeoutError:
            raise errors.TimeoutError(f"no reply from the server in {self.timeout}s") from None

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.resume_reading()

    def _write(self, protocol: _Protocol, data: bytes) -> None:
        """Write ``data`` after any queued publishes; replies must be read, so reading resumes."""
        if self._reading_paused:
            self._resume_reading()
        if self._out:
            data = bytes(self._out) + data
            self._out.clear()
        if protocol.transport is not None and data:
            protocol.transport.write(data)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        if self._out and self._protocol is not None:
            self._write(self._protocol, b"")

    async def _throttle(self, unsent: int) -> None:
        """Wait while too many replies to sent commands are outstanding, or the socket's buffer is full."""
        try:
            while self._session.in_flight - unsent > WINDOW and self._protocol is not None:
                self._arrived.clear()
                await asyncio.wait_for(self._arrived.wait(), self.timeout)
            await asyncio.wait_for(self._writable.wait(), self.timeout)
        except asyncio.TimeoutError:
            raise errors.TimeoutError(f"no reply from the server in {self.timeout}s") from None


def _resolve(pending: Pending) -> None:
    waiter = cast("asyncio.Future[None] | None", pending.waiter)
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)
