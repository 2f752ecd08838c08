"""What ``Client`` and ``AsyncClient`` share, written once: greeting the server, retry and backoff,
resubscribing, pipelining, keepalive, STATS paging.

``ClientBase`` holds this logic as coroutines that do no I/O of their own:
they call a few primitives each client provides (open a connection, send,
wait for a reply, wait for data, throttle, sleep). ``AsyncClient`` awaits
them on its event loop. ``Client``'s primitives block and never suspend, so
``run_blocking`` runs a coroutine of the shared logic to its end in one step.
So the protocol's logic exists once, and each client only moves bytes.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, cast

from pigeon import errors
from pigeon.client import codec
from pigeon.client.address import TlsOption, check_credentials, tls_context, url_keywords
from pigeon.client.codec import Data, Link, Message, Refused, ServerInfo, SubscribeOptions
from pigeon.client.session import Pending, Session
from pigeon.errors import (
    AuthFailedError,
    CommandError,
    ConnectionClosedError,
    FeatureNotSupportedError,
    IdleTimeoutError,
    InvalidArgumentError,
    PigeonError,
    ProtocolError,
    StaleDeliveryError,
    UnknownDeliveryTagError,
)
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_REQUEST_TIMEOUT = 5.0  # seconds request() waits for a reply
DEFAULT_RECONNECT_TIMEOUT = 30.0
DEFAULT_MAX_QUEUED = 10_000  # deliveries an AsyncClient holds before it stops reading

# Pipelining: commands go out in buffers of codec.CHUNK lines, and the sender waits for
# replies while more than WINDOW are outstanding, so neither side buffers without bound.
WINDOW = 16384
RECV_SIZE = 256 * 1024
OUT_LIMIT = 64 * 1024  # buffered publish(wait=False) bytes that trigger a send

RECONNECT_FIRST_DELAY = 0.05
RECONNECT_MAX_DELAY = 1.0

# A client waiting for deliveries sends PING after this share of the server's
# idle timeout without sending anything, so the server does not close it.
KEEPALIVE_SHARE = 0.5


def run_blocking(steps: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine of the shared logic whose primitives block: it ends without ever suspending."""
    try:
        steps.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    steps.close()
    raise RuntimeError("a step of the blocking client tried to suspend")


class UrlOptions(TypedDict, total=False):
    """The keywords of ``Client`` and ``AsyncClient`` that a URL does not give (see ``Client``)."""

    timeout: float | None
    reconnect: bool
    reconnect_timeout: float
    seeds: Sequence[tuple[str, int]]
    redirects: bool


class ClientOptions(UrlOptions, total=False):
    """Every keyword of ``Client`` and ``AsyncClient`` but the asyncio client's ``max_queued``."""

    user: str | None
    password: str | None
    tls: TlsOption


class ClientBase(abc.ABC):
    """The state and the protocol logic of one client; a subclass supplies the I/O primitives."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        reconnect: bool = False,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        user: str | None = None,
        password: str | None = None,
        tls: TlsOption = None,
        seeds: Sequence[tuple[str, int]] = (),
        redirects: bool = False,
    ) -> None:
        check_credentials(user, password)
        self.host = host
        self.port = port
        # the nodes of a cluster to try in turn when reconnecting: this one first, then the seeds
        self.seeds = [(host, port), *((h, p) for h, p in seeds if (h, p) != (host, port))]
        self.timeout = timeout
        # ask a cluster node for ERROR MOVED instead of forwarding (CLUSTER REDIRECT), on every connection
        self.redirects = redirects
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.user = user
        self._password = password
        self.tls = tls_context(tls)  # None: plain text
        self.client_id = ""
        self.reconnects = 0  # how many times the connection was re-established
        self.server_info: ServerInfo | None = None  # from HELLO; None for a server older than HELLO
        self._max_line: int | None = None  # the longest command line the server takes, when HELLO said
        self._max_payload: int | None = None  # the largest framed payload it takes, when HELLO said
        self._framed = False  # the connection speaks protocol 2: framed publishes and deliveries
        self._cid = b""
        self._session = Session(self)
        # (topic or pattern, group) -> options, in order, re-subscribed after a reconnect
        self._topics: dict[tuple[bytes, bytes | None], SubscribeOptions] = {}
        self._unflushed: list[Pending] = []  # publish(wait=False) batches since the last flush
        self._out = bytearray()  # publish(wait=False) lines not sent yet
        self._lost: ConnectionClosedError | None = None  # why the last connection ended
        self._generation = 0  # connections opened so far: a pipelined batch stops when it changes
        self._last_sent = 0.0  # time.monotonic() of the last send, for the keepalive
        self._closed = False

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The topics and patterns this client is subscribed to (once per group it joined there)."""
        return tuple(topic.decode() for topic, _ in self._topics)

    @classmethod
    def from_url(cls, url: str, *, tls: TlsOption = None, **options: Unpack[UrlOptions]) -> Self:
        """A client for ``pigeon://[user:password@]host[:port]``, or ``pigeons://`` for TLS (with
        ``tls``, a context, when the server's certificate is not signed by a CA the system trusts);
        the other keywords as for the class itself. ``Client`` connects at once, ``AsyncClient`` on
        ``connect()``."""
        return cls(**url_keywords(url, tls), **options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} id={self.client_id or '-'}>"

    # ------------------------------------------------------------ the primitives each client provides

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the client holds an open connection."""

    @abc.abstractmethod
    async def _open_transport(self) -> None:
        """Open a connection; raises ConnectionClosedError (see ``_cannot_connect``) when that fails."""

    @abc.abstractmethod
    def _send(self, data: bytes) -> None:
        """Hand ``data`` to the connection; raises ConnectionClosedError when there is none or it fails."""

    @abc.abstractmethod
    def _close_transport(self) -> None:
        """Close the connection at once, if there is one."""

    @abc.abstractmethod
    def _on_lost(self, failed: list[Pending]) -> None:
        """The connection was lost and ``failed`` are the commands whose replies will never come."""

    @abc.abstractmethod
    async def _wait(self, pending: Pending) -> None:
        """Until ``pending`` is answered (or failed); raises pigeon.TimeoutError after ``timeout``
        seconds without a reply to it."""

    @abc.abstractmethod
    async def _wait_for_data(self, until: float | None) -> None:
        """Until something arrives or the connection is lost, or ``time.monotonic()`` passes ``until``."""

    @abc.abstractmethod
    async def _throttle(self, unsent: int) -> None:
        """Wait while more than WINDOW replies to sent commands (``in_flight - unsent``) are outstanding."""

    @abc.abstractmethod
    async def _sleep(self, seconds: float) -> None:
        """Pause (between reconnection attempts)."""

    @abc.abstractmethod
    async def _restore(self) -> None:
        """Re-establish a lost connection (``_reconnect``); raises ConnectionClosedError on giving up."""

    @abc.abstractmethod
    def _poll(self) -> None:
        """Take in what has already arrived, without waiting, so that a closed connection is noticed."""

    # ------------------------------------------------------------ connection

    async def _connect(self) -> None:
        """Open a connection, send HELLO and CONNECT (pipelined, with the credentials), and restore the
        subscriptions. Raises AuthFailedError (not retried) when the server refuses the credentials."""
        await self._open_transport()
        self._lost = None
        self._generation += 1
        self._session.link = Link(self)
        try:
            self._write(codec.hello_line(2) + codec.connect_line(self.user, self._password))
            hello = self._session.expect(b"HELLO")
            connected = self._session.expect(b"CONNECTED")
            await self._wait(hello)
            if isinstance(hello.error, errors.UsageError):
                # a server older than protocol 2 refuses HELLO 2: ask for its v1 answer
                hello = await self._ask_hello()
            self._take_hello(hello)
            await self._wait(connected)
            self._take_id(result(connected))
            if self.redirects:
                # after CONNECTED, not pipelined with it: nodes of earlier versions answered CLUSTER
                # at once, even while the core was still checking the login's password
                redirect = await self._ask_redirects()
                # a broker that is no cluster node does not know CLUSTER: it owns every topic
                if not isinstance(redirect.error, errors.UnknownCommandError):
                    result(redirect)
            if self._topics:
                await self._resubscribe()
        except BaseException as exc:
            if self.connected:
                self._lose("connection closed by the client")
            if isinstance(exc, ConnectionClosedError) and isinstance(exc.error, AuthFailedError):
                # the refusal itself, not the closed connection that follows it: no reconnection retries it
                raise exc.error from exc
            raise

    async def _ask_redirects(self) -> Pending:
        """``CLUSTER REDIRECT``, and its answer."""
        redirect = self._session.expect(b"CLUSTER")
        self._write(codec.redirect_line())
        await self._wait(redirect)
        return redirect

    async def _ask_hello(self) -> Pending:
        """A plain HELLO, sent once the CONNECT before it is answered, and its answer."""
        hello = self._session.expect(b"HELLO")
        self._write(codec.hello_line())
        await self._wait(hello)
        return hello

    def _take_hello(self, hello: Pending) -> None:
        """Keep the server's limits and protocol from its HELLO reply: an old server refuses it."""
        if isinstance(hello.error, CommandError):
            self.server_info = self._max_line = self._max_payload = None  # unknown: it still enforces them
            self._framed = False
            return
        self.server_info = info = self._parse(codec.parse_hello, result(hello))
        self._max_line = info.max_line
        self._max_payload = info.max_payload
        self._framed = info.protocol >= 2 and "binary" in info.features

    def _take_id(self, reply: bytes) -> None:
        """Take the id from a CONNECTED reply."""
        if not reply or b" " in reply:
            raise self._lose(f"bad CONNECTED reply: {reply!r}", ProtocolError)
        self._cid = reply
        self.client_id = reply.decode()

    async def _resubscribe(self) -> None:
        """Subscribe again to every topic, each as before (acknowledged ones with their prefetch)."""
        lines = [codec.subscribe_line(self._cid, name, how) for (name, _), how in self._topics.items()]
        self._write(b"".join(lines))
        pendings = [self._session.expect(b"SUBSCRIBED") for _ in self._topics]
        for pending in pendings:
            await self._wait(pending)
            result(pending)

    async def _reconnect(self) -> None:
        """Connect again, retrying with backoff for up to ``reconnect_timeout`` seconds."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = RECONNECT_FIRST_DELAY
        while True:
            try:
                await self._connect()
            except (ConnectionClosedError, errors.TimeoutError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionClosedError(
                        f"could not reconnect to {self.host}:{self.port} in {self.reconnect_timeout}s"
                    ) from exc
                self._next_seed()
                await self._sleep(min(delay, left))
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
            else:
                self.reconnects += 1
                return

    def _next_seed(self) -> None:
        """Aim the next connection attempt at the next node of ``seeds`` (a cluster's other nodes)."""
        at = self.seeds.index((self.host, self.port)) if (self.host, self.port) in self.seeds else -1
        self.host, self.port = self.seeds[(at + 1) % len(self.seeds)]

    def _poll_connected(self) -> bool:
        """Whether the connection is still open, once what has arrived is taken in."""
        self._poll()
        return self.connected

    async def _ready(self) -> None:
        """Make sure a connection is open: reconnect if allowed, else raise why there is none."""
        while True:
            if self._closed:
                raise self._closed_error()
            if self._poll_connected():
                return
            if not self.reconnect:
                raise self._lost or ConnectionClosedError("not connected")
            await self._restore()

    def _lose(
        self, reason: str, error_type: type[ConnectionClosedError] = ConnectionClosedError
    ) -> ConnectionClosedError:
        """The connection is gone: close it, fail what was awaited, and return the error that says why."""
        self._close_transport()
        self._out.clear()
        failed, self._lost = self._session.lost(reason, error_type)
        self._on_lost(failed)
        return self._lost

    def _take_in(self, data: bytes) -> list[Pending]:
        """Give bytes read from the connection to the session; returns the commands they answered.

        Nonsense from the server, or an error after which it closes the
        connection, ends the connection here.
        """
        completed = self._session.receive(data)
        if self._session.broken is not None:
            self._lose(self._session.broken, ProtocolError)
        elif self._session.closing:
            self._lose("connection closed by the server")
        return completed

    def _cannot_connect(self, exc: BaseException) -> ConnectionClosedError:
        reason = getattr(exc, "strerror", None) or str(exc) or "timed out"
        return ConnectionClosedError(f"cannot connect to {self.host}:{self.port}: {reason}")

    def _closed_error(self) -> ConnectionClosedError:
        return ConnectionClosedError("the client is closed")

    def _reply_timeout(self) -> errors.TimeoutError:
        return errors.TimeoutError(f"no reply from the server in {self.timeout}s")

    async def _close(self) -> None:
        """Send DISCONNECT (after anything queued) and close the connection; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if not self.connected:
            return
        try:
            await self._roundtrip(codec.disconnect_line(), b"DISCONNECTED")
        except PigeonError:
            pass  # closing anyway
        finally:
            self._lose("connection closed by the client")

    # ------------------------------------------------------------ commands

    async def _command(self, verb: bytes, line: Callable[[], bytes], *, retry: bool) -> bytes:
        """Send one command and wait for its reply; a lost connection is noticed before sending.

        ``line`` builds the command, since a reconnect changes the client id.
        With ``retry`` (commands safe to repeat), a reply lost with the
        connection is asked for again on a new one when reconnecting is on;
        so is any command cut off by the server's idle timeout.
        """
        if self._closed or not self._poll_connected():
            await self._ready()
        try:
            return await self._roundtrip(line(), verb)
        except ConnectionClosedError as exc:
            # The server reads nothing after its idle timeout fired (any byte read would have reset
            # it), so a command cut off by that close never ran: sending it again is safe.
            repeat = retry or isinstance(exc.error, IdleTimeoutError)
            if not (repeat and self.reconnect) or self._closed:
                raise
        await self._ready()
        return await self._roundtrip(line(), verb)

    async def _roundtrip(self, line: bytes, verb: bytes) -> bytes:
        pending = self._session.expect(verb)  # first: a send that stalls still sends the line later
        self._write(line)
        await self._wait(pending)
        return result(pending)

    def _write(self, data: bytes) -> None:
        """Send ``data`` after any queued publishes.

        A blocking client whose send stalls for ``timeout`` keeps the rest
        queued (sent first next time) and raises pigeon.TimeoutError.
        """
        if self._out:
            data = bytes(self._out) + data
            self._out.clear()
        if data:
            self._send(data)
            self._last_sent = time.monotonic()

    async def _subscribe(
        self, topic: str | bytes, group: str | bytes | None, ack: bool, prefetch: int | None
    ) -> None:
        name = codec.encode_topic(topic)
        gname = None if group is None else codec.encode_group(group)
        how = SubscribeOptions(ack, prefetch, gname)
        await self._command(b"SUBSCRIBED", lambda: self._subscribe_line(name, how), retry=True)
        self._topics[name, gname] = how

    def _subscribe_line(self, name: bytes, how: SubscribeOptions) -> bytes:
        """The SUBSCRIBE line; FeatureNotSupportedError (nothing is sent) for a group or a pattern
        that the server's HELLO does not list."""
        if how.group is not None:
            self._require("groups", "consumer groups")
        if codec.is_pattern(name):
            self._require("wildcards", "wildcard patterns")
        return codec.subscribe_line(self._cid, name, how)

    async def _unsubscribe(self, topic: str | bytes, group: str | bytes | None) -> None:
        name = codec.encode_topic(topic)
        gname = None if group is None else codec.encode_group(group)
        try:
            await self._command(
                b"UNSUBSCRIBED", lambda: codec.unsubscribe_line(self._cid, name, gname), retry=True
            )
        finally:
            self._topics.pop((name, gname), None)
        # the server gave this subscription's unacknowledged messages back: the queued ones would come
        # again (the deliveries of a pattern are told apart from others of the same topics by no more
        # than their topic)
        text = name.decode()
        self._session.drop_acked(lambda message: codec.topic_matches(text, message.topic))

    async def _destroy_group(self, topic: str | bytes, group: str | bytes) -> None:
        name = codec.encode_topic(topic)
        gname = codec.encode_group(group)

        def line() -> bytes:
            self._require("groups", "consumer groups")
            return codec.destroy_line(self._cid, name, gname)

        await self._command(b"DESTROYED", line, retry=True)

    # ------------------------------------------------------------ acknowledgements

    def ack(self, messages: Iterable[Message]) -> None:
        """Acknowledge deliveries of acknowledged subscriptions: the broker forgets them.

        Sent at once, without waiting (the broker does not reply to an ACK),
        as few lines as the tags allow: one ``ACK <first>-<last>`` per run of
        consecutive tags. Raises StaleDeliveryError for messages that came on
        an earlier connection (after settling the others), InvalidArgumentError
        for a message of a plain subscription or another client (then nothing
        is sent). A tag the broker no longer holds is reported by ``check_acks()``.
        """
        self._settle(b"ACK", messages, b"")

    def nack(self, messages: Iterable[Message], delay: float | None = None) -> None:
        """Give deliveries back to the broker for redelivery (attempt + 1), after ``delay`` seconds if given.

        Sent as ``ack()`` is, with the same errors; ``delay`` is 0 to 86,400
        seconds, sent in whole milliseconds.
        """
        self._settle(b"NACK", messages, codec.nack_suffix(delay))

    def _settle(self, verb: bytes, messages: Iterable[Message], suffix: bytes) -> None:
        """Send ``verb`` (ACK or NACK) lines for the tags of ``messages`` that are this connection's."""
        batch = messages if isinstance(messages, (list, tuple)) else list(messages)
        self._poll()  # a connection the server has closed is noticed: its tags are dead
        link = self._session.link
        tags = [message._tag for message in batch if message._link is link] if link is not None else []
        stale: list[Message] = []
        if len(tags) != len(batch):
            for message in batch:
                if message._link is None:
                    raise InvalidArgumentError(f"{message!r} is from a plain subscription: nothing to settle")
                if message._link.client is not self:
                    raise InvalidArgumentError(f"{message!r} was delivered to another client")
            stale = [message for message in batch if message._link is not link]
        if tags:
            try:
                self._write(codec.settle_lines(verb, self._cid, cast("list[int]", tags), suffix))
            except errors.TimeoutError:
                pass  # the server is not reading now: the lines stay queued, sent before anything else
            except ConnectionClosedError as exc:
                raise StaleDeliveryError(
                    f"cannot {verb.decode()}: {exc}; the broker gives the messages back", list(batch)
                ) from exc
        if stale:
            raise stale_error(stale)

    async def _check_acks(self) -> list[UnknownDeliveryTagError]:
        """A PING round trip, so that the broker has read every ACK and NACK sent; then the refusals."""
        if self._closed:
            raise self._closed_error()
        if not self._poll_connected():
            raise self._lost or ConnectionClosedError("not connected")
        await self._roundtrip(codec.ping_line(), b"PONG")
        return self._session.take_unknown_tags()

    async def _ping(self) -> float:
        start = time.perf_counter()
        await self._command(b"PONG", codec.ping_line, retry=True)
        return time.perf_counter() - start

    def _publish(self, topic: str | bytes, message: Data) -> Coroutine[Any, Any, bytes]:
        """The command that publishes one message and waits for its reply (checked at once)."""
        name = codec.encode_topic(topic)
        data = codec.payload_bytes(message)
        return self._command(b"PUBLISHED", partial(self._publish_line, name, data), retry=False)

    def _publish_line(self, name: bytes, data: bytes) -> bytes:
        """The framed PUB; to a server older than protocol 2, a PUBLISH line when the payload is text
        that fits one, else FeatureNotSupportedError (nothing is sent)."""
        if self._framed:
            codec.check_payload(data, self._max_payload)
            return codec.pub_frame(self._cid, name, data)
        return codec.publish_line(self._cid, name, _text_only(data), self._max_line)

    def _queue_publish(self, topic: str | bytes, message: Data) -> bool:
        """Queue one ``publish(wait=False)`` (connected); True when enough is queued to send it now."""
        name = codec.encode_topic(topic)
        line = self._publish_line(name, codec.payload_bytes(message))
        batch = self._session.expect_unwaited()
        if not self._unflushed or self._unflushed[-1] is not batch:
            self._unflushed.append(batch)
        self._out += line
        return len(self._out) >= OUT_LIMIT

    async def _flush(self) -> list[Refused]:
        try:
            if self.connected:
                self._write(b"")
                for batch in self._unflushed:
                    await self._wait(batch)
        except ConnectionClosedError:
            pass  # the lost replies are in the refusals
        refused: list[Refused] = []
        offset = 0
        for batch in self._unflushed:
            refused.extend(Refused(offset + r.index, r.error) for r in batch.refused)
            offset += batch.total
        self._unflushed = []
        return refused

    async def _publish_many(self, topic: str | bytes, messages: Iterable[Data]) -> list[Refused]:
        name = codec.encode_topic(topic)
        await self._ready()
        if self._framed:
            data = codec.framed_payloads(messages, self._max_payload)
            encode: Callable[[bytes, bytes, list[codec.Bytes]], bytes] = codec.pub_frames
        else:
            data = codec.checked_messages(self._cid, name, map(_text_only_data, messages), self._max_line)
            encode = codec.publish_chunk
        batch = self._session.expect_batch(len(data))
        generation = self._generation
        sent = 0
        try:
            for start in range(0, len(data), codec.CHUNK):
                if self._generation != generation:
                    break  # lost and connected again: the batch already lists the rest as refused
                end = start + codec.CHUNK
                sent = min(end, len(data))  # even if the send stalls: the rest of it stays queued
                self._write(encode(self._cid, name, data[start:end]))
                await self._throttle(len(data) - sent)  # the batch counts its unsent lines
            await self._wait(batch)
        except ConnectionClosedError:
            pass  # the batch lists the lost replies among its refusals
        except errors.TimeoutError as exc:
            # held by flow control (or a stalled server) for longer than the timeout: the lines not
            # sent never will be, and the sent ones may still be taken; the batch waits for those only
            self._poll()  # the replies that have come count
            return self._session.cut_batch(batch, sent, exc)
        except BaseException:
            self._session.cut_batch(batch, sent, errors.TimeoutError("interrupted"))
            raise
        return batch.refused

    # ------------------------------------------------------------ request/reply

    async def _request(self, topic: str | bytes, message: Data, timeout: float) -> Message:
        """Send a request (``REQ``) and wait up to ``timeout`` seconds for its reply (``RMSG``).

        The reply comes to this connection only: a connection lost meanwhile
        loses it, so that raises ConnectionClosedError (the request may have
        been answered). Deliveries arriving while waiting stay queued.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgumentError(f"timeout must be a number of seconds over 0, not {timeout!r}")
        name = codec.encode_topic(topic)
        data = codec.payload_bytes(message)
        deadline = time.monotonic() + timeout
        await self._ready()
        self._require("request", "request/reply")
        codec.check_payload(data, self._max_payload)
        reply = await self._command(b"REQUESTED", lambda: codec.req_frame(self._cid, name, data), retry=False)
        request_id = int(reply)
        session = self._session
        generation = self._generation
        try:
            while request_id not in session.replies:
                if self._generation != generation or not self.connected:
                    raise ConnectionClosedError("the connection was lost before the reply to a request came")
                if time.monotonic() >= deadline:
                    raise errors.RequestTimeoutError(
                        f"no reply to a request on {name.decode('utf-8', 'replace')!r} within {timeout}s"
                    )
                await self._wait_for_data(deadline)
            return Message(name.decode(), session.replies.pop(request_id))
        finally:
            session.awaited.discard(request_id)  # a reply after the timeout is dropped

    def reply(self, token: bytes, data: Data) -> None:
        """Send ``REPLY <token>`` with ``data`` (``Message.respond``), at once and without waiting."""
        self._require("request", "request/reply")
        payload = codec.payload_bytes(data)
        codec.check_payload(payload, self._max_payload)
        self._write(codec.reply_frame(token, payload))

    def _require(self, feature: str, what: str) -> None:
        """FeatureNotSupportedError unless the server speaks protocol 2 and its HELLO lists ``feature``."""
        info = self.server_info
        if not self._framed or info is None or feature not in info.features:
            raise FeatureNotSupportedError(
                feature, f"the server does not support {what} (no {feature!r} in its HELLO)"
            )

    # ------------------------------------------------------------ deliveries

    def _take_message(self) -> Message | None:
        """A delivery already received, if any: the fast path of ``next_message``, with no waiting."""
        self._keep_alive()
        messages = self._session.messages
        return messages.popleft() if messages else None

    async def _next_message(self, timeout: float | None) -> Message:
        """Wait for the next delivery (once ``_take_message`` has found none), sending keepalives."""
        deadline = None if timeout is None else time.monotonic() + timeout
        messages = self._session.messages
        while not messages:
            if self._closed or not self.connected:
                await self._ready()  # a reconnect may bring deliveries: check again before waiting
                continue
            try:
                await self._wait_for_data(earliest(deadline, self._keepalive_due()))
            except ConnectionClosedError:
                if not self.reconnect:
                    raise
            self._keep_alive()
            if not messages and deadline is not None and time.monotonic() >= deadline:
                raise errors.TimeoutError(f"no message within {timeout}s")
        return messages.popleft()

    def _keepalive_due(self) -> float | None:
        """When (``time.monotonic()``) to send PING so that the server's idle timeout spares this client."""
        info = self.server_info
        if info is None or not info.idle_timeout:
            return None
        return self._last_sent + info.idle_timeout * KEEPALIVE_SHARE

    def _keep_alive(self) -> None:
        """Send PING, without waiting for its PONG, if the keepalive is due; a lost connection is left
        for the caller to notice."""
        due = self._keepalive_due()
        if due is None or not self.connected or time.monotonic() < due:
            return
        try:
            self._write(codec.ping_line())
        except ConnectionClosedError:
            return
        except errors.TimeoutError:
            pass  # queued: it goes out before anything else
        self._session.expect(b"PONG")  # matched and dropped when it comes, like any reply

    # ------------------------------------------------------------ STATS

    async def _stats(self, section: str | None) -> Any:
        if section is None:
            reply = await self._command(b"STATS", codec.stats_line, retry=True)
            return self._parse(codec.parse_stats, reply)
        key = section.lower()
        if key not in codec.STATS_SECTIONS:
            raise InvalidArgumentError(f"no STATS section {section!r}; choose from {codec.STATS_SECTIONS}")
        entries: list[dict[str, Any]] = []
        cursor = 0
        while True:
            reply = await self._command(b"STATS", partial(codec.stats_line, key, cursor), retry=True)
            page, cursor = self._parse(partial(codec.parse_stats_page, key), reply)
            entries.extend(page)
            if not cursor:
                return entries

    async def _cluster(self) -> dict[str, Any]:
        reply = await self._command(b"CLUSTER", codec.cluster_line, retry=True)
        return self._parse(codec.parse_cluster, reply)

    def _parse(self, parse: Callable[[bytes], T], reply: bytes) -> T:
        """``parse(reply)``; a reply it cannot read is a ProtocolError, and ends the connection."""
        try:
            return parse(reply)
        except ValueError as exc:
            raise self._lose(str(exc), ProtocolError) from None


def _text_only(data: bytes) -> bytes:
    """A payload for a PUBLISH line (a server older than protocol 2): FeatureNotSupportedError when it
    is not text that fits one line."""
    if b"\n" in data or data.endswith(b"\r"):
        raise FeatureNotSupportedError(
            "binary",
            "the server does not take binary payloads (its HELLO lists no 'binary'), and this one "
            "cannot be a text line: it holds a newline or ends in a carriage return",
        )
    return data


def _text_only_data(message: Data) -> Data:
    """_text_only for any message, as ``checked_messages`` takes them."""
    return _text_only(codec.payload_bytes(message))


def stale_error(stale: list[Message]) -> StaleDeliveryError:
    """The error for an ack or nack of messages that came on a connection that has closed since."""
    return StaleDeliveryError(
        f"{len(stale)} of the messages came on a connection that has closed since: their tags are "
        "dead, and the broker gave them back for redelivery",
        stale,
    )


def result(pending: Pending) -> bytes:
    """A single command's reply text after its verb; raises the server's refusal."""
    if pending.error is not None:
        raise pending.error
    return pending.reply


def earliest(first: float | None, second: float | None) -> float | None:
    """The earlier of two deadlines, either of which may be None (none)."""
    if first is None:
        return second
    return first if second is None else min(first, second)
