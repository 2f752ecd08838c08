"""``AsyncClient``: the asyncio Pigeon client, on the running event loop.

The protocol's logic is ``ClientBase``'s (pigeon/client/base.py); this module
only moves bytes through an asyncio transport, and reconnects in the
background.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast, overload

from pigeon.client.address import TlsOption, url_keywords
from pigeon.client.base import (
    DEFAULT_MAX_QUEUED,
    DEFAULT_REQUEST_TIMEOUT,
    WINDOW,
    ClientBase,
    ClientOptions,
    UrlOptions,
)
from pigeon.client.codec import Data, Message, Refused
from pigeon.client.session import Pending
from pigeon.client.usage import AsyncUse
from pigeon.errors import ConnectionClosedError, UnknownDeliveryTagError
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack


class _Protocol(asyncio.Protocol):
    """One connection's callbacks, handed straight to its client."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # the client's from now on: the server may speak (and close) before create_connection returns
        self._client._protocol = self

    def data_received(self, data: bytes) -> None:
        self._client._on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._on_closed(self, f"connection lost: {exc}" if exc else "connection closed by the server")

    def pause_writing(self) -> None:
        self._client._writable.clear()

    def resume_writing(self) -> None:
        self._client._writable.set()


class AsyncClient(ClientBase, AsyncUse):
    """An asyncio connection to a Pigeon server.

    Connect with ``async with AsyncClient(...) as client:`` or
    ``client = await AsyncClient(...).connect()``. ``timeout`` bounds each
    wait for a reply, counted from the last reply that came (a publisher
    held by the broker's flow control waits as long as replies keep coming).
    With ``reconnect=True`` a lost connection is re-established in the
    background, for up to ``reconnect_timeout`` seconds, and its
    subscriptions are restored. While more than
    ``max_queued`` deliveries wait to be consumed, the client stops reading,
    so the server's rotation passes it over. ``user``, ``password``, ``tls``, ``seeds``,
    ``redirects`` and ``AsyncClient.from_url`` are as for ``Client``. Many tasks may share one client.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED,
        **options: Unpack[ClientOptions],
    ) -> None:
        super().__init__(host, port, **options)
        self.max_queued = max_queued
        self._reading_paused = False
        self._protocol: _Protocol | None = None
        self._flush_scheduled = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()  # set when deliveries or replies come in, or the connection drops
        self._writable = asyncio.Event()
        self._writable.set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        tls: TlsOption = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        **options: Unpack[UrlOptions],
    ) -> Self:
        """A client (not connected yet) for a ``pigeon://`` or ``pigeons://`` URL, as ``Client.from_url``."""
        return cls(max_queued=max_queued, **url_keywords(url, tls), **options)

    # ------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while the client holds an open connection."""
        return self._protocol is not None

    async def connect(self) -> AsyncClient:
        """Open the connection and send HELLO and CONNECT; returns the client."""
        if self._closed:
            raise self._closed_error()
        if self._protocol is None:
            await self._connect()
        return self

    async def subscribe(
        self,
        topic_or_pattern: str | bytes,
        group: str | bytes | None = None,
        *,
        ack: bool = False,
        prefetch: int | None = None,
    ) -> None:
        """Receive a share of the messages of a topic or pattern, in a group or not; ``group``, ``ack``
        and ``prefetch`` as for ``Client.subscribe``.

        ``ack()`` and ``nack()`` (on the client or on a message) are plain
        methods here too: they only write to the connection.
        """
        await self._subscribe(topic_or_pattern, group, ack, prefetch)

    async def unsubscribe(self, topic_or_pattern: str | bytes, group: str | bytes | None = None) -> None:
        """Stop receiving what a ``subscribe`` with the same topic or pattern and group gave; plain
        deliveries already received stay queued, acknowledged ones are dropped (the broker gives them
        back)."""
        await self._unsubscribe(topic_or_pattern, group)

    async def destroy_group(self, topic_or_pattern: str | bytes, group: str | bytes) -> None:
        """End a named consumer group that has no subscriber now, as ``Client.destroy_group``."""
        await self._destroy_group(topic_or_pattern, group)

    async def publish(self, topic: str | bytes, message: Data, *, wait: bool = True) -> None:
        """Publish one message; waits while the broker holds a publisher (flow control), raises its refusals.

        With ``wait=False`` the command is only queued (written on the next
        loop iteration): many stay in flight, and ``flush()`` waits for every
        reply and reports the refusals. A message whose line is longer than
        the server's limit raises InvalidArgumentError before anything is sent.
        """
        if wait:
            await self._publish(topic, message)
            return
        if self._protocol is None or self._closed:
            await self._ready()
        if self._queue_publish(topic, message):
            self._write(b"")
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
        return await self._flush()

    async def publish_many(self, topic: str | bytes, messages: Iterable[Data]) -> list[Refused]:
        """Publish many messages with many in flight at once; returns the refused ones (by index).

        Every message is checked before anything is sent. A message whose reply
        was lost with the connection is reported with a ConnectionClosedError.
        """
        return await self._publish_many(topic, messages)

    async def request(
        self, topic: str | bytes, message: Data, *, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Message:
        """Send a request to ``topic`` and return the first reply (see ``Client.request``); many may
        be awaited at once on one client."""
        return await self._request(topic, message, timeout)

    async def check_acks(self) -> list[UnknownDeliveryTagError]:
        """Wait until the broker has read every ACK and NACK sent; return its refusals (see ``Client``)."""
        return await self._check_acks()

    async def ping(self) -> float:
        """Round trip to the server, in seconds."""
        return await self._ping()

    @overload
    async def stats(self, section: None = None) -> dict[str, Any]: ...

    @overload
    async def stats(self, section: str) -> list[dict[str, Any]]: ...

    async def stats(self, section: str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """The server's figures (``STATS``), or every entry of a listing: ``"topics"``, ``"connections"``
        or ``"groups"``.

        A section's listing is read page by page until the server says it is complete.
        """
        figures: dict[str, Any] | list[dict[str, Any]] = await self._stats(section)
        return figures

    async def cluster(self) -> dict[str, Any]:
        """As ``Client.cluster``."""
        return await self._cluster()

    async def next_message(self, timeout: float | None = None) -> Message:
        """The next delivery; raises pigeon.TimeoutError when none arrives within ``timeout`` seconds.

        While it waits, it sends PING often enough that the server's idle timeout does not close it.
        """
        message = self._take_message()
        if message is None:
            message = await self._next_message(timeout)
        self._taken()
        return message

    async def close(self) -> None:
        """Send DISCONNECT (after anything queued) and close the connection; safe to call twice."""
        if self._reconnecting is not None and not self._closed:
            self._reconnecting.cancel()
        await self._close()
        self._arrived.set()

    # ------------------------------------------------------------ the primitives, on the event loop

    async def _open_transport(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                ),
                self.timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise self._cannot_connect(exc) from exc
        if self._protocol is None:  # the server closed it at once (e.g. too many connections)
            raise self._lost or ConnectionClosedError("connection closed by the server")

    def _send(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            raise self._lost or ConnectionClosedError("not connected")
        if self._reading_paused:
            self._resume_reading()  # the replies to what is sent must be read
        protocol.transport.write(data)

    def _close_transport(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    def _on_lost(self, failed: list[Pending]) -> None:
        self._reading_paused = False
        self._writable.set()
        for pending in failed:
            _resolve(pending)
        self._arrived.set()
        # reconnect at once only to restore deliveries; a publisher reconnects on its next command
        idle = self._reconnecting is None or self._reconnecting.done()
        if self.reconnect and not self._closed and self._topics and idle:
            self._reconnecting = asyncio.ensure_future(self._reconnect_in_background())

    async def _wait(self, pending: Pending) -> None:
        if pending.done:
            return
        waiter = asyncio.get_running_loop().create_future()
        pending.waiter = waiter
        while True:
            answered = pending.answered
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
                return
            except asyncio.TimeoutError:
                if pending.answered == answered:  # no reply at all within the timeout, not a slow batch
                    raise self._reply_timeout() from None

    async def _wait_for_data(self, until: float | None) -> None:
        self._arrived.clear()
        left = None if until is None else max(until - time.monotonic(), 0.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), left)

    async def _throttle(self, unsent: int) -> None:
        try:
            while self._session.in_flight - unsent > WINDOW and self._protocol is not None:
                self._arrived.clear()
                await asyncio.wait_for(self._arrived.wait(), self.timeout)
            await asyncio.wait_for(self._writable.wait(), self.timeout)
        except asyncio.TimeoutError:
            raise self._reply_timeout() from None

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _restore(self) -> None:
        """Join the reconnection in progress, or start one: many tasks may be waiting for it."""
        task = self._reconnecting
        if task is None or task.done():
            self._lost = None
            task = self._reconnecting = asyncio.ensure_future(self._reconnect_in_background())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # this task was cancelled, not the reconnection (which close() cancels)
        if self._protocol is None and self._lost is not None:
            raise self._lost

    def _poll(self) -> None:
        pass  # the event loop hands over data as it arrives

    # ------------------------------------------------------------ callbacks and background work

    async def _reconnect_in_background(self) -> None:
        try:
            await self._reconnect()
        except ConnectionClosedError as exc:
            self._lost = exc  # raised to whoever waits for the connection
            self._arrived.set()

    def _on_data(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        for pending in self._take_in(data):
            _resolve(pending)
        session = self._session
        if (
            self._protocol is protocol
            and protocol.transport is not None
            and len(session.messages) > self.max_queued
            and not session.in_flight
        ):
            # back pressure: the server's write buffer fills and its rotation skips us
            protocol.transport.pause_reading()
            self._reading_paused = True
        self._arrived.set()

    def _on_closed(self, protocol: _Protocol, reason: str) -> None:
        if protocol is self._protocol:
            self._lose(reason)

    def _taken(self) -> None:
        """A delivery was taken: read again once half of what made the client stop reading is consumed."""
        if self._reading_paused and len(self._session.messages) <= self.max_queued // 2:
            self._resume_reading()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.resume_reading()

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        if self._out and self._protocol is not None:
            self._write(b"")


def _resolve(pending: Pending) -> None:
    waiter = cast("asyncio.Future[None] | None", pending.waiter)
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
