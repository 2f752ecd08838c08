"""The kombu transport: kombu's channels, exchanges and acknowledgements on Pigeon's topics.

A kombu queue is a Pigeon topic of the same name; each channel is one Pigeon
connection (``Wire``). What maps to what, and why, is in docs/celery.md:

- consuming a queue is ``SUBSCRIBE <queue> ACK PREFETCH <n>`` (plain ``SUBSCRIBE`` with
  ``no_ack``); ``basic_qos(prefetch_count)`` is that ``n`` (0, unlimited, is the largest window);
- ``basic_ack`` is ``ACK``, sent in ranges: in an event loop once ``ack_delay`` has passed or half
  the prefetch window is queued, and before any other command on the channel; ``multiple``
  acknowledges every tag up to the one given; ``basic_reject(requeue=True)`` is ``NACK`` (the
  message goes back to the head of its queue), ``requeue=False`` is ``ACK``: the message is
  dropped, as RabbitMQ does without a dead-letter exchange. The broker moves a message that keeps
  coming back to ``<queue>.dead`` after ``--max-deliveries`` attempts;
- publishing is pipelined; exchanges and bindings map to topics and consumer groups as
  pigeon.kombu.routes says (a queue bound to a fanout exchange is a group on the exchange's topic);
- the broker keeps the unacknowledged messages and redelivers them when a connection goes, so the
  channel keeps none and restores none.

Deliveries wake the consumer through its socket: ``drain_events`` polls the channels' sockets,
and in Celery's worker ``register_with_event_loop`` puts them in the worker's event loop.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from typing import Any

from kombu.transport import virtual

from pigeon._version import __version__
from pigeon.client import codec
from pigeon.errors import CommandError, ConnectionClosedError
from pigeon.kombu import envelope, routes
from pigeon.kombu.address import broker_address
from pigeon.kombu.wire import PREFETCH_MAX, Wire
from pigeon.protocol import DEFAULT_PORT

# errors that a new connection may not have: kombu's ensure_connection and Celery retry these
CONNECTION_ERRORS = (*virtual.Transport.connection_errors, ConnectionClosedError, OSError)

logger = logging.getLogger(__name__)

DEFAULT_REPLY_TIMEOUT = 10.0  # seconds to wait for the broker without progress
# In an event loop, acknowledgements wait up to this long (seconds) to go out together: one send for
# several tasks instead of one per turn of the loop (a prefork worker gets a turn for nearly each task).
DEFAULT_ACK_DELAY = 0.002
ACK_BATCH_MAX = 64
# seconds a fanout or topic exchange's publisher trusts what it learnt of the bound groups
ROUTES_TTL = 1.0  # queued acknowledgements sent at once, without waiting for the delay


class QoS(virtual.QoS):  # type: ignore[misc]
    """Nothing to keep: the broker holds the prefetch window and the unacknowledged messages."""

    def can_consume(self) -> bool:
        """Always: the broker stops delivering when the window is full."""
        return True

    def append(self, message: Any, delivery_tag: Any) -> None:
        """Nothing to note (kombu calls this for every delivery of an acknowledged consumer)."""

    def restore_unacked_once(self, stderr: Any = None) -> None:
        """Nothing to restore: the broker redelivers what a closed connection held."""


class Channel(virtual.Channel):  # type: ignore[misc]
    """A kombu channel on its own Pigeon connection.

    Transport options: ``confirm_publish`` (wait for the broker's reply to
    every publish, default False: pipelined), ``reply_timeout`` (seconds
    without progress before an operation fails, default 10) and ``ack_delay``
    (seconds an acknowledgement may wait in an event loop to go out with
    others, default 0.002).
    """

    QoS = QoS
    do_restore = False
    confirm_publish = False
    reply_timeout = DEFAULT_REPLY_TIMEOUT
    ack_delay = DEFAULT_ACK_DELAY
    from_transport_options = (
        *virtual.Channel.from_transport_options,
        "confirm_publish",
        "reply_timeout",
        "ack_delay",
    )

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._prefetch_count = 0
        self._acked_queues: set[str] = set()  # the queues consumed with acknowledgements
        self._held: dict[str, dict[int, None]] = {}  # per queue, the tags delivered and not settled yet
        self._cancelled: set[str] = set()  # queues whose consumer was cancelled while holding messages
        self._subscribed: dict[str, list[tuple[str, str | None]]] = {}  # per consumed queue: (topic, group)s
        self._bound_cache: dict[str, tuple[bool, float]] = {}  # _bound_anywhere's answers, until when
        self._closing = False
        self.wire = self._open_wire()

    def _open_wire(self) -> Wire:
        return Wire(broker_address(self.connection.client), float(self.reply_timeout))

    # ------------------------------------------------------------ publishing and routing

    def basic_publish(self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any) -> None:
        """Publish ``message`` to the topic ``exchange`` and ``routing_key`` map to (pigeon.kombu.routes):
        the broker hands a copy to every queue bound to it."""
        self._inplace_augment_message(message, exchange, routing_key)
        topic = self.route(exchange, routing_key)
        if exchange and self._kind(exchange) != "direct" and not self._bound_anywhere(topic):
            return  # unroutable: dropped, as AMQP drops what no queue is bound to
        self.wire.publish(topic, envelope.encode(message))
        if self.confirm_publish:
            self.wire.sync()

    def _bound_anywhere(self, topic: str) -> bool:
        """Whether some consumer group takes messages of a fanout or topic exchange's ``topic``.

        Pigeon keeps what no group takes in the topic's own backlog (a plain
        topic's messages wait for a subscriber), while AMQP drops what no queue
        is bound to: Celery's worker events, sent every two seconds whether
        anyone listens or not, would pile up. So the broker is asked (STATS
        GROUPS), at most once per ``ROUTES_TTL`` seconds per topic.
        """
        now = time.monotonic()
        known = self._bound_cache.get(topic)
        if known is None or known[1] <= now:
            known = (self.wire.group_matches(topic), now + ROUTES_TTL)
            self._bound_cache[topic] = known
        return known[0]

    def route(self, exchange: str, routing_key: str) -> str:
        """The topic a message published to ``exchange`` with ``routing_key`` goes to: the queue named
        by the key for the default exchange, else as pigeon.kombu.routes says for the exchange's type
        (a direct exchange this process did not declare is taken as direct)."""
        if not exchange:
            return routing_key
        return routes.publish_topic(self._kind(exchange), exchange, routing_key)

    def _kind(self, exchange: str) -> str:
        declared = self.state.exchanges.get(exchange)
        return str(declared["type"]) if declared else "direct"

    def _subscriptions(self, queue: str) -> list[tuple[str, str | None]]:
        """What consuming ``queue`` subscribes to: its own topic plainly, and as group ``queue`` the
        topics and patterns of its bindings that route elsewhere (pigeon.kombu.routes)."""
        subscriptions: list[tuple[str, str | None]] = [(queue, None)]
        group = routes.group_name(queue)
        for exchange, routing_key, _ in self.state.queue_bindings(queue):
            for pattern in routes.binding_patterns(self._kind(exchange), exchange, routing_key, queue):
                subscriptions.append((pattern, group))
        return subscriptions

    # ------------------------------------------------------------ queues

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        """Nothing to create: a topic exists while it has subscribers or messages."""

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        """Every queue name exists (topics are made on first use)."""
        return True

    def queue_bind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        """Bind ``queue``; a binding that routes through a group makes the group exist now, so that it
        keeps what is published before a consumer comes (an AMQP queue exists once declared)."""
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
        exchange = exchange or "amq.direct"
        group = routes.group_name(queue)
        for pattern in routes.binding_patterns(self._kind(exchange), exchange, routing_key, queue):
            if queue in self._subscribed:
                self._subscribe(queue, [(pattern, group)])
            elif self.wire.stats_group(pattern, group) is None:
                # an acknowledged subscription with a window of 1, so no message can be lost meanwhile
                self.wire.subscribe(pattern, ack=True, prefetch=1, group=group)
                self.wire.unsubscribe(pattern, group, taken=routes.matcher(pattern))

    def _delete(self, queue: str, exchange: str, routing_key: str, *args: Any, **kwargs: Any) -> None:
        """End the groups a binding of ``queue`` made (the broker refuses while one has a consumer);
        a plain queue's topic goes by itself once it is empty and unused."""
        for pattern in routes.binding_patterns(self._kind(exchange), exchange, routing_key, queue):
            with contextlib.suppress(CommandError):
                self.wire.destroy_group(pattern, routes.group_name(queue))

    def _backlog(self, wire: Wire, topic: str, group: str | None) -> int:
        entry = wire.stats_group(topic, group) if group else wire.stats_topic(topic)
        return int(entry["backlog_messages"]) if entry else 0

    def _size(self, queue: str) -> int:
        """Messages ready in the queue: its backlogs (delivered, unacknowledged ones are not counted)."""
        return sum(self._backlog(self.wire, topic, group) for topic, group in self._subscriptions(queue))

    def _purge(self, queue: str) -> int:
        """Drop the queue's ready messages; returns how many.

        Pigeon has no purge command, so a second connection subscribes plainly
        to each of the queue's topics and groups (at-most-once: a message handed
        to it is gone), takes messages until the backlog is empty (the STATS
        round trips let them flow), and unsubscribes. Consumers of the queue with
        room in their window keep taking messages meanwhile, as they would in any broker.
        """
        purged = 0
        for topic, group in self._subscriptions(queue):
            if self._backlog(self.wire, topic, group):
                purged += self._drain(topic, group)
        return purged

    def _drain(self, topic: str, group: str | None) -> int:
        purger = self._open_wire()
        try:
            purger.subscribe(topic, ack=False, prefetch=None, group=group)
            left: int | None = None
            deadline = time.monotonic() + purger.timeout
            while time.monotonic() < deadline:  # gives up after `timeout` s without progress
                backlog = self._backlog(purger, topic, group)
                if not backlog:
                    break
                if left is None or backlog < left:
                    left = backlog
                    deadline = time.monotonic() + purger.timeout
            return purger.unsubscribe(topic, group, taken=routes.matcher(topic))
        finally:
            purger.close()

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        raise NotImplementedError(
            "pigeon:// has no basic_get (the broker pushes messages, it has no pull): consume the queue "
            "with a Consumer, or SimpleQueue.get(block=True)"
        )

    # ------------------------------------------------------------ consuming

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> None:
        """Consume ``queue``: its subscriptions (``_subscriptions``), acknowledged with the channel's
        prefetch, or plain.

        A delivery names only its topic, so the queues one channel consumes
        must not share a topic: a queue whose subscriptions overlap another's
        on this channel is refused (routes.OverlappingQueues; use another channel).
        """
        subscriptions = self._subscriptions(queue)
        for other, theirs in self._subscribed.items():
            for pattern, _ in subscriptions:
                clash = routes.first_overlap(pattern, [topic for topic, _ in theirs])
                if clash is not None and other != queue:
                    raise routes.OverlappingQueues(
                        f"pigeon:// cannot consume {queue!r} and {other!r} on one channel: {pattern!r} and "
                        f"{clash!r} can both match a topic, and a delivery names only its topic: "
                        "use two channels"
                    )
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        if not no_ack:
            self._acked_queues.add(queue)
        try:
            self._subscribed[queue] = []
            self._subscribe(queue, subscriptions)
        except CommandError:
            # refused (e.g. PERMISSION_DENIED): no consumer
            self._unsubscribe(queue)
            super().basic_cancel(consumer_tag)
            raise
        self.connection.watch(self)

    def _subscribe(self, queue: str, subscriptions: list[tuple[str, str | None]]) -> None:
        """SUBSCRIBE to ``subscriptions`` for ``queue`` in its mode (again: with the current window)."""
        acked = queue in self._acked_queues
        window = (1 if queue in self._cancelled else self._window()) if acked else None
        done = self._subscribed[queue]
        for topic, group in subscriptions:
            self.wire.subscribe(topic, ack=acked, prefetch=window, group=group)
            if (topic, group) not in done:
                done.append((topic, group))

    def _queue_of(self, topic: str) -> str | None:
        """The consumed queue a delivery of ``topic`` is for."""
        if topic in self._subscribed:
            return topic
        for queue, subscriptions in self._subscribed.items():
            if any(
                group is not None and codec.topic_matches(pattern, topic) for pattern, group in subscriptions
            ):
                return queue
        return None

    def basic_cancel(self, consumer_tag: str) -> None:
        """Stop consuming; the messages the consumer still holds stay its own until settled.

        AMQP keeps a cancelled consumer's unacknowledged messages with it until
        they are settled (Celery's warm shutdown acknowledges the tasks it was
        running after cancelling), while Pigeon's ``UNSUBSCRIBE`` gives them
        back at once. So a consumer that holds some gets a window of 1 (which
        it is already over: no more come) and unsubscribes when it settles the
        last one.
        """
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue is None or self._closing or queue in self._active_queues:
            return  # closing: DISCONNECT gives everything back at once
        if self._held.get(queue):
            self._cancelled.add(queue)
            self._subscribe(queue, self._subscribed[queue])
        else:
            self._unsubscribe(queue)

    def _unsubscribe(self, queue: str) -> None:
        self._acked_queues.discard(queue)
        self._cancelled.discard(queue)
        self._held.pop(queue, None)
        for topic, group in self._subscribed.pop(queue, []):
            self.wire.unsubscribe(topic, group, taken=routes.matcher(topic))

    def basic_qos(self, prefetch_size: int = 0, prefetch_count: int = 0, apply_global: bool = False) -> None:
        """Set the prefetch window (per consumed queue: Pigeon's window is per subscription)."""
        self._prefetch_count = prefetch_count
        for queue in sorted(self._acked_queues - self._cancelled):
            self._subscribe(queue, self._subscribed.get(queue, []))

    def _window(self) -> int:
        count = self._prefetch_count
        return PREFETCH_MAX if not count else min(int(count), PREFETCH_MAX)

    def basic_ack(self, delivery_tag: int | None, multiple: bool = False) -> None:
        """``ACK`` the delivery (queued: see ``Transport.ack_queued``); ``multiple``: every one up to it,
        at once."""
        if delivery_tag is None:
            return  # a delivery of a no_ack consumer: nothing to settle
        if multiple:
            self.wire.ack_through(delivery_tag)
            for queue, tags in list(self._held.items()):
                for tag in [tag for tag in tags if tag <= delivery_tag]:
                    self._settled(queue, tag)
        else:
            self.wire.ack(delivery_tag)
            self._settled_tag(delivery_tag)
            self.connection.ack_queued(self)

    def ack_batch(self) -> int:
        """How many queued acknowledgements are sent at once: half the window (at most ACK_BATCH_MAX), so
        that a full window never waits for ``ack_delay`` before the broker may deliver more."""
        return max(1, min(ACK_BATCH_MAX, self._window() // 2))

    def basic_reject(self, delivery_tag: int | None, requeue: bool = False) -> None:
        """``requeue``: ``NACK``, back to the head of the queue; otherwise ``ACK``: dropped."""
        if delivery_tag is None:
            return
        if requeue:
            self.wire.nack(delivery_tag)
            self._settled_tag(delivery_tag)
        else:
            self.basic_ack(delivery_tag)

    def _settled_tag(self, tag: int) -> None:
        for queue, tags in self._held.items():
            if tag in tags:
                self._settled(queue, tag)
                return

    def _settled(self, queue: str, tag: int) -> None:
        tags = self._held[queue]
        del tags[tag]
        if not tags and queue in self._cancelled and not self._closing:
            self._unsubscribe(queue)

    def deliver_buffered(self) -> int:
        """Hand the deliveries read so far to their consumers' callbacks; returns how many."""
        delivered = 0
        callbacks = self.connection._callbacks
        for message in self.wire.take_deliveries():
            queue = self._queue_of(message.topic)
            callback = callbacks.get(queue) if queue is not None else None
            try:
                raw = envelope.decode(message.data)
            except ValueError:
                logger.warning("pigeon: dropping a message of %r that is not a kombu message", message.topic)
                self.basic_ack(message.tag)
                continue
            if callback is None:
                self.basic_reject(message.tag, requeue=True)
                continue
            if message.tag is not None:
                self._held.setdefault(str(queue), {})[message.tag] = None
            properties = raw["properties"]
            properties["delivery_tag"] = message.tag
            properties.setdefault("delivery_info", {})["redelivered"] = (message.attempt or 1) > 1
            callback(raw)
            delivered += 1
        return delivered

    def close(self) -> None:
        """Close the channel and its connection; the broker redelivers what it held unacknowledged."""
        if self.closed:
            return
        self._closing = True
        wire = self.wire
        try:
            super().close()
        finally:
            wire.close()


ChannelT = Channel  # Transport.Channel below is a class attribute, which would shadow the name


class Transport(virtual.Transport):  # type: ignore[misc]
    """kombu's transport for ``pigeon://[user:password@]host:port`` (default port 3333), and
    ``pigeons://`` over TLS (``Connection(ssl=...)``, Celery's ``broker_use_ssl``: pigeon.kombu.address).

    Refused credentials (``AuthFailedError``, ``AuthRequiredError``) are
    channel errors, as every refusal, and not connection errors: kombu's
    ``ensure_connection`` raises them at once and a Celery worker stops,
    where it would retry a connection error forever. A command the broker
    refuses is not retried either.
    """

    Channel = Channel
    default_port = DEFAULT_PORT
    driver_type = "pigeon"
    driver_name = "pigeon"
    polling_interval = None
    can_parse_url = True  # kombu hands the URL over whole: pigeon.kombu.address reads it as Client.from_url
    connection_errors = CONNECTION_ERRORS
    channel_errors = (*virtual.Transport.channel_errors, CommandError)
    # without these kombu would count every channel error (AuthFailedError too) as recoverable
    recoverable_connection_errors = CONNECTION_ERRORS
    recoverable_channel_errors = ()
    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=routes.SUPPORTED,
        heartbeats=True,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._hub: Any = None
        self._watched: dict[int, ChannelT] = {}  # channels whose sockets the event loop watches, by fd
        # in an event loop, a socket pair whose reader wakes it for deliveries already read (_on_tick)
        self._wakers: tuple[socket.socket, socket.socket] | None = None
        self._wake_pending = False
        self._ack_timers: dict[ChannelT, Any] = {}  # the event loop's timer that sends a channel's acks
        self.delivered_total = 0  # deliveries handed to consumers' callbacks, for tests and tools

    def driver_version(self) -> str:
        """The pigeon-broker version."""
        return __version__

    # ------------------------------------------------------------ heartbeats

    def get_heartbeat_interval(self, connection: Any) -> float:
        """Seconds between heartbeats: the connection's ``heartbeat`` (Celery's ``broker_heartbeat``),
        shortened to half the broker's ``--idle-timeout`` when it has one, so that the broker never
        closes a quiet worker's connection; 0 (none) when neither asks for them."""
        requested = float(self.client.heartbeat or 0)
        idle = [
            channel.wire.info.idle_timeout
            for channel in self._open_channels()
            if channel.wire.info.idle_timeout
        ]
        if not idle:
            return requested
        bound = min(idle) / 2
        return min(requested, bound) if requested else bound

    def heartbeat_check(self, connection: Any, rate: int = 2) -> None:
        """Called ``rate`` times per interval (Celery's worker does it from its event loop): ``PING``
        quiet channels, and raise ConnectionClosedError for a broker silent for two intervals (kombu
        and Celery then reconnect)."""
        interval = self.get_heartbeat_interval(connection)
        if interval:
            for channel in self._open_channels():
                channel.wire.heartbeat(interval)

    # ------------------------------------------------------------ without an event loop

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver what arrives on any channel; wait up to ``timeout`` s, then raise ``socket.timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._deliver_buffered(send_acks=True):
                return
            channels = {channel.wire.fileno(): channel for channel in self._open_channels()}
            poller = select.poll()
            for fd in channels:
                poller.register(fd, select.POLLIN)
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            events = poller.poll(None if wait is None else wait * 1000)
            for fd, _ in events:
                channels[fd].wire.read_available()
            if not events and wait is not None:
                if self._deliver_buffered(send_acks=True):
                    return
                raise TimeoutError()  # socket.timeout, which kombu's callers catch

    def _open_channels(self) -> list[ChannelT]:
        return [channel for channel in self.channels if not channel.closed and channel.wire.sock is not None]

    def _deliver_buffered(self, send_acks: bool) -> int:
        delivered = 0
        for channel in self._open_channels():
            if send_acks:
                channel.wire.flush_acks()
            if channel.wire.has_deliveries:
                delivered += channel.deliver_buffered()
        self.delivered_total += delivered
        return delivered

    # ------------------------------------------------------------ in an event loop (Celery's worker hub)

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Watch every channel's socket in ``loop``; acknowledgements go out by timers (``ack_queued``)."""
        self._hub = loop
        self._watched.clear()
        for channel in self._open_channels():
            self.watch(channel)
        loop.on_tick.add(self._on_tick)
        if self._wakers is None:
            self._wakers = socket.socketpair()
            for end in self._wakers:
                end.setblocking(False)
        loop.add_reader(self._wakers[0].fileno(), self._on_wake)

    def watch(self, channel: ChannelT) -> None:
        """Have the event loop (once there is one) wake this transport when ``channel`` has bytes."""
        fd = channel.wire.fileno()
        if self._hub is not None and fd not in self._watched:
            self._watched[fd] = channel
            self._hub.add_reader(fd, self.on_readable, fd)

    def on_readable(self, fd: int) -> None:
        """The event loop saw bytes on a channel's socket: take them and deliver."""
        channel = self._watched.get(fd)
        if channel is None or channel.closed:
            return
        try:
            channel.wire.read_available()
        finally:
            self.delivered_total += channel.deliver_buffered()

    def _on_tick(self) -> None:
        """Deliveries read while a command waited for its reply are in no socket any more, so no
        read event would hand them over: wake the event loop through the transport's own socket
        pair, whose reader (``_on_wake``) delivers them.

        Delivering them from this callback instead would stall: the hub polls right after its tick
        callbacks with a timeout computed before them (up to seconds), and what Celery does after a
        delivery (acknowledging, through ``call_soon``) would wait for that poll.
        """
        if self._wakers is None or self._wake_pending:
            return
        if any(channel.wire.has_deliveries for channel in self._open_channels()):
            self._wake_pending = True
            self._wakers[1].send(b"\0")

    def _on_wake(self) -> None:
        self._wake_pending = False
        if self._wakers is not None:
            with contextlib.suppress(BlockingIOError):
                self._wakers[0].recv(64)
        self._deliver_buffered(send_acks=False)

    def ack_queued(self, channel: ChannelT) -> None:
        """An acknowledgement was queued on ``channel``: in an event loop, send the queued ones once
        ``channel.ack_batch()`` are queued, else ``channel.ack_delay`` after the first. Without one,
        ``drain_events`` sends them at its next call.

        Waiting loses nothing: an unsent acknowledgement only means a redelivery if the connection
        goes (at least once, as before), and any other command, a publish and closing send them first.
        """
        if self._hub is None:
            return
        if channel.wire.acks_queued >= channel.ack_batch():
            self._send_acks(channel)
        elif channel not in self._ack_timers:
            self._ack_timers[channel] = self._hub.call_later(channel.ack_delay, self._send_acks, channel)

    def _send_acks(self, channel: ChannelT) -> None:
        self._cancel_ack_timer(channel)
        if not channel.closed:
            channel.wire.flush_acks()

    def _cancel_ack_timer(self, channel: ChannelT) -> None:
        timer = self._ack_timers.pop(channel, None)
        if timer is not None:
            timer.cancel()

    def close_channel(self, channel: ChannelT) -> None:
        """Forget the channel (and stop watching its socket); its queued acks go with its DISCONNECT."""
        self._cancel_ack_timer(channel)
        fd = channel.wire.fileno()
        if self._watched.pop(fd, None) is not None and self._hub is not None:
            self._hub.remove_reader(fd)
        super().close_channel(channel)

    def close_connection(self, connection: Any) -> None:
        """Close every channel and stop being called by the event loop."""
        if self._hub is not None:
            self._hub.on_tick.discard(self._on_tick)
        if self._wakers is not None:
            if self._hub is not None:
                self._hub.remove_reader(self._wakers[0].fileno())
            for end in self._wakers:
                end.close()
            self._wakers = None
        super().close_connection(connection)
