"""``Client``: the blocking Pigeon client, one socket and no threads.

The protocol's logic is ``ClientBase``'s (pigeon/client/base.py); this module
only does the socket work, blocking, and runs that logic with ``run_blocking``.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, overload

from pigeon import errors
from pigeon.client.base import (
    DEFAULT_REQUEST_TIMEOUT,
    RECV_SIZE,
    WINDOW,
    ClientBase,
    ClientOptions,
    run_blocking,
)
from pigeon.client.codec import Data, Message, Refused
from pigeon.client.session import Pending
from pigeon.client.usage import BlockingUse
from pigeon.errors import ConnectionClosedError, UnknownDeliveryTagError
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    from typing_extensions import Unpack

POLL_READS = 16  # at most this many reads of what has already arrived before a command


class Client(ClientBase, BlockingUse):
    """A blocking connection to a Pigeon server; connects (HELLO and CONNECT) when created.

    ``timeout`` bounds each wait for a reply, counted from the last bytes that
    came (None waits for ever; see docs/client.md for a publisher held by the
    broker's flow control). With
    ``reconnect=True`` a lost connection is re-established on next use, for up
    to ``reconnect_timeout`` seconds, and its subscriptions are restored; with ``seeds``
    (other nodes of a cluster, ``(host, port)`` pairs) each failed attempt tries the next node.
    ``user`` and ``password`` are sent with CONNECT (on every connection);
    ``tls`` is an ``ssl.SSLContext``, or True for the system's default one. With ``redirects``
    (a cluster node: ``CLUSTER REDIRECT``), a command for a topic another node owns raises MovedError,
    naming the owner, instead of being forwarded there (``ClusterClient`` follows them).
    ``Client.from_url("pigeons://user:password@host:3333")`` says it all in one.
    Not thread-safe: use one client per thread.
    """

    def __init__(
        self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **options: Unpack[ClientOptions]
    ) -> None:
        super().__init__(host, port, **options)
        self._sock: socket.socket | None = None
        self._sock_timeout: float | None = None
        run_blocking(self._connect())

    # ------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while the client holds an open connection."""
        return self._sock is not None

    def subscribe(
        self,
        topic_or_pattern: str | bytes,
        group: str | bytes | None = None,
        *,
        ack: bool = False,
        prefetch: int | None = None,
    ) -> None:
        """Receive a share of the messages published to a topic, or to every topic a pattern matches.

        A pattern has ``*`` tokens (one token each) or ends with ``>`` (one or
        more tokens): ``orders.*``, ``orders.>``. Every group of subscribers
        gets each message once, shared round robin among its members: with
        ``group`` this client joins that named group (its messages wait in
        the group's own backlog while no member can take them), without it
        the topic's (or pattern's) default group. With ``ack=True`` every
        delivery must be acknowledged (``ack()``) or given back (``nack()``),
        and the broker redelivers what this client leaves unsettled;
        ``prefetch`` (1 to 1,000,000; default the broker's
        ``--default-prefetch``) bounds the unacknowledged messages it holds.
        Subscribing again the same way changes the mode and prefetch.
        """
        run_blocking(self._subscribe(topic_or_pattern, group, ack, prefetch))

    def unsubscribe(self, topic_or_pattern: str | bytes, group: str | bytes | None = None) -> None:
        """Stop receiving what a ``subscribe`` with the same topic or pattern and group gave; plain
        deliveries already received stay queued, acknowledged ones are dropped (the broker gives them
        back)."""
        run_blocking(self._unsubscribe(topic_or_pattern, group))

    def destroy_group(self, topic_or_pattern: str | bytes, group: str | bytes) -> None:
        """End a named consumer group that has no subscriber now, dropping its backlog (before its
        ``--group-ttl``); NoSuchGroupError or GroupInUseError when it cannot."""
        run_blocking(self._destroy_group(topic_or_pattern, group))

    def publish(self, topic: str | bytes, message: Data, *, wait: bool = True) -> None:
        """Publish one message; waits while the broker holds a publisher (flow control), raises its refusals.

        With ``wait=False`` the command is only queued: many stay in flight, and
        ``flush()`` sends what is left, waits for every reply and reports the refusals.
        A message whose line is longer than the server's limit raises
        InvalidArgumentError before anything is sent.
        """
        if wait:
            run_blocking(self._publish(topic, message))
            return
        if self._sock is None or self._closed:
            run_blocking(self._ready())
        if self._queue_publish(topic, message):
            try:
                self._write(b"")
                run_blocking(self._throttle(0))
            except ConnectionClosedError:
                pass  # flush() reports the messages whose replies were lost

    def flush(self) -> list[Refused]:
        """Send queued ``publish(wait=False)`` commands, wait for their replies, return the refusals.

        Indexes count those publishes from 0 since the previous flush. A publish
        whose reply was lost with the connection is reported with a
        ConnectionClosedError: it may or may not have been taken.
        """
        return run_blocking(self._flush())

    def publish_many(self, topic: str | bytes, messages: Iterable[Data]) -> list[Refused]:
        """Publish many messages with many in flight at once; returns the refused ones (by index).

        Every message is checked before anything is sent. A message whose reply
        was lost with the connection is reported with a ConnectionClosedError.
        """
        return run_blocking(self._publish_many(topic, messages))

    def request(
        self, topic: str | bytes, message: Data, *, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Message:
        """Send a request to ``topic`` and return the first reply, as a Message (its topic the request's).

        The request is routed like a publish (one subscriber of each group);
        a subscriber answers with ``message.respond(data)``. Raises
        RequestTimeoutError when no reply comes within ``timeout`` seconds;
        a later reply is dropped. Deliveries arriving meanwhile stay queued.
        """
        return run_blocking(self._request(topic, message, timeout))

    def check_acks(self) -> list[UnknownDeliveryTagError]:
        """Wait until the broker has read every ACK and NACK sent (a PING round trip); return its refusals.

        Each is an UnknownDeliveryTagError, received since the previous call
        (the latest 1,000 are kept): a tag that was settled already, or given
        back (its ack timeout passed) and so will be delivered again.
        """
        return run_blocking(self._check_acks())

    def ping(self) -> float:
        """Round trip to the server, in seconds."""
        return run_blocking(self._ping())

    @overload
    def stats(self, section: None = None) -> dict[str, Any]: ...

    @overload
    def stats(self, section: str) -> list[dict[str, Any]]: ...

    def stats(self, section: str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """The server's figures (``STATS``), or every entry of a listing: ``"topics"``, ``"connections"``
        or ``"groups"``.

        A section's listing is read page by page until the server says it is complete.
        """
        figures: dict[str, Any] | list[dict[str, Any]] = run_blocking(self._stats(section))
        return figures

    def cluster(self) -> dict[str, Any]:
        """The cluster as the node this client is connected to sees it (``CLUSTER STATUS``,
        docs/cluster.md); raises CommandError from a broker that is no cluster node."""
        return run_blocking(self._cluster())

    def next_message(self, timeout: float | None = None) -> Message:
        """The next delivery; raises pigeon.TimeoutError when none arrives within ``timeout`` seconds.

        While it waits, it sends PING often enough that the server's idle timeout does not close it.
        """
        message = self._take_message()
        return run_blocking(self._next_message(timeout)) if message is None else message

    def close(self) -> None:
        """Send DISCONNECT (after anything queued) and close the socket; safe to call twice."""
        run_blocking(self._close())

    # ------------------------------------------------------------ the primitives, blocking

    async def _open_transport(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise self._cannot_connect(exc) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                # the handshake, within the connection's timeout
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            except OSError as exc:  # ssl.SSLError included
                sock.close()
                raise self._cannot_connect(exc) from exc
        self._sock = sock
        self._sock_timeout = self.timeout

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise self._lost or ConnectionClosedError("not connected")
        self._set_timeout(self.timeout)
        unsent = memoryview(data)
        try:
            while unsent:
                unsent = unsent[sock.send(unsent) :]  # each send waits up to timeout for room
        except TimeoutError:
            # the server took nothing for `timeout` seconds (flow control holds this publisher): the rest
            # goes out before anything else, so the stream stays whole and the connection usable
            self._out[:0] = unsent
            raise errors.TimeoutError(f"the server took nothing for {self.timeout}s") from None
        except OSError as exc:
            raise self._lose(f"send failed: {exc}") from exc

    def _close_transport(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _on_lost(self, failed: list[Pending]) -> None:
        pass  # nothing waits in the background: the failed commands are seen when next looked at

    async def _wait(self, pending: Pending) -> None:
        while not pending.done:
            if not self._receive(self.timeout):
                raise self._reply_timeout()

    async def _wait_for_data(self, until: float | None) -> None:
        self._receive(None if until is None else max(until - time.monotonic(), 0.0))

    async def _throttle(self, unsent: int) -> None:
        while self._session.in_flight - unsent > WINDOW:
            if not self._receive(self.timeout):
                raise self._reply_timeout()

    async def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def _restore(self) -> None:
        await self._reconnect()

    def _poll(self) -> None:
        try:
            for _ in range(POLL_READS):
                if self._sock is None or not self._receive(0.0, send_queued=False):
                    return
        except ConnectionClosedError:
            pass  # noticed: the caller finds no connection

    # ------------------------------------------------------------ reading

    def _receive(self, timeout: float | None, send_queued: bool = True) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever) for bytes, and take them in.

        Returns False when nothing came in time; raises ConnectionClosedError
        when the connection is lost. With ``send_queued``, what waits to be
        sent goes first: the replies awaited may be to those commands.
        """
        if send_queued:
            self._write(b"")
        sock = self._sock
        if sock is None:
            raise self._lost or ConnectionClosedError("not connected")
        self._set_timeout(timeout)
        try:
            data = sock.recv(RECV_SIZE)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False  # nothing yet (over TLS, not a whole record yet)
        except OSError as exc:
            raise self._lose(f"connection lost: {exc}") from exc
        if not data:
            raise self._lose("connection closed by the server")
        self._take_in(data)
        if self._sock is None:
            raise self._lost or ConnectionClosedError("not connected")
        return True

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._sock_timeout and self._sock is not None:
            self._sock.settimeout(timeout)
            self._sock_timeout = timeout
