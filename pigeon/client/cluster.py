"""``ClusterClient`` and ``AsyncClusterClient``: clients of a Pigeon cluster that send each topic's
commands straight to the node that owns it, the way Redis Cluster clients follow ``MOVED``.

A cluster node forwards the commands for topics other nodes own (docs/cluster.md). These clients
ask every node for redirects instead (``CLUSTER REDIRECT``): they learn the slot map from
``CLUSTER STATUS`` and from each ``ERROR MOVED``, keep one connection per node they use (a
``Client`` or ``AsyncClient`` made with ``redirects=True``), and route a command by its topic's slot
(``pigeon.cluster.slots.slot_of``, the nodes' own function). On ``MOVED`` they correct the map and
send the command again, on ``TRYAGAIN`` or a node that cannot be reached they read the map again and
retry with backoff, for up to ``reconnect_timeout`` seconds.

The routing is written once, in ``ClusterBase``, as coroutines over the node clients' own
coroutines, the way ``ClientBase`` holds one connection's logic: ``ClusterClient``'s node clients
never suspend, so ``run_blocking`` runs it; ``AsyncClusterClient`` awaits it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import select
import socket
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar

from pigeon import errors
from pigeon.client import codec
from pigeon.client.address import TlsOption
from pigeon.client.aio import AsyncClient
from pigeon.client.base import (
    DEFAULT_MAX_QUEUED,
    DEFAULT_RECONNECT_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TIMEOUT,
    RECONNECT_FIRST_DELAY,
    RECONNECT_MAX_DELAY,
    ClientBase,
    earliest,
    run_blocking,
    stale_error,
)
from pigeon.client.codec import Data, Message, Refused
from pigeon.client.sync import Client
from pigeon.client.usage import AsyncUse, BlockingUse
from pigeon.cluster.slots import slot_of
from pigeon.errors import (
    ConnectionClosedError,
    InvalidArgumentError,
    MovedError,
    StaleDeliveryError,
    TryAgainError,
    UnknownCommandError,
    UnknownDeliveryTagError,
)
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT, parse_host_port

if TYPE_CHECKING:
    from typing_extensions import Unpack

N = TypeVar("N", bound=ClientBase)
T = TypeVar("T")
Address = tuple[str, int]

# MOVED replies followed for one command before it fails with the last one: the map changes only
# when a node joins, leaves or dies, so more than a few in a row means nodes disagree for now
MAX_REDIRECTS = 16


@dataclasses.dataclass
class _Subscription:
    """One ``subscribe`` call, kept to subscribe again when its node is lost."""

    topic: bytes
    group: bytes | None
    ack: bool
    prefetch: int | None
    address: Address | None  # the node it is on; None while it must be made again


@dataclasses.dataclass
class _PatternSubscription:
    """One ``subscribe`` call to a wildcard pattern, kept on every node of the cluster."""

    pattern: bytes
    group: bytes | None
    ack: bool
    prefetch: int | None
    nodes: set[Address]  # the nodes it is on


# Seconds between two reads of the member set while the client holds pattern subscriptions: how
# late it places them on a node that joined (or came back)
PATTERN_CHECK = 1.0


def member_addresses(status: dict[str, Any]) -> list[Address]:
    """Every member's address, from a ``CLUSTER STATUS`` document."""
    found = (parse_host_port(str(member.get("address", ""))) for member in status.get("members", {}).values())
    return [address for address in found if address is not None]


def slot_map(status: dict[str, Any]) -> dict[int, Address]:
    """slot -> owner's address, from a ``CLUSTER STATUS`` document (docs/cluster.md)."""
    owners: dict[int, Address] = {}
    for member in status.get("members", {}).values():
        address = parse_host_port(str(member.get("address", "")))
        if address is not None:
            owners.update(dict.fromkeys(member.get("slots", ()), address))
    return owners


def _publish_many(node: ClientBase, name: bytes, part: list[Data]) -> Awaitable[list[Refused]]:
    return node._publish_many(name, part)


class ClusterOptions(TypedDict, total=False):
    """The keywords of ``ClusterClient`` and ``AsyncClusterClient`` but the latter's ``max_queued``."""

    seeds: Sequence[Address]
    timeout: float | None
    reconnect_timeout: float
    user: str | None
    password: str | None
    tls: TlsOption


class ClusterBase(abc.ABC, Generic[N]):
    """The routing state and logic of a cluster client; a subclass makes the node clients and waits."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        seeds: Sequence[Address] = (),
        timeout: float | None = DEFAULT_TIMEOUT,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        user: str | None = None,
        password: str | None = None,
        tls: TlsOption = None,
    ) -> None:
        self.seeds: list[Address] = [(host, port), *(seed for seed in seeds if seed != (host, port))]
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self.user = user
        self._password = password
        self._tls = tls
        self.redirects_followed = 0  # MOVED replies this client has followed
        self._nodes: dict[Address, N] = {}  # the open connection to each node in use
        self._draining: list[N] = []  # clients of lost nodes whose received deliveries are not all taken
        self._mine: weakref.WeakSet[ClientBase] = weakref.WeakSet()  # every node client this client made
        self._owners: dict[int, Address] = {}  # slot -> owner, as last learnt
        self._default = self.seeds[0]  # the node for commands without topic and slots without known owner
        self._subscriptions: dict[tuple[bytes, bytes | None], _Subscription] = {}
        self._patterns: dict[tuple[bytes, bytes | None], _PatternSubscription] = {}
        self._members: list[Address] = []  # every node of the cluster, as last read
        self._members_read = 0.0  # when (time.monotonic())
        self._queued: list[tuple[N, bytes, Data]] = []  # publish(wait=False) calls since the last flush
        self._turn = 0  # the node whose deliveries are taken first next time: each gets its turn
        self._closed = False

    @property
    def nodes(self) -> tuple[Address, ...]:
        """The nodes this client holds a connection to, as ``(host, port)``."""
        return tuple(self._nodes)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The topics and patterns this client is subscribed to (once per group it joined there)."""
        return tuple(topic.decode() for topic, _ in [*self._subscriptions, *self._patterns])

    def owner_of(self, topic: str | bytes) -> Address:
        """The node this client sends ``topic``'s commands to, as it knows the map now."""
        return self._owners.get(slot_of(codec.encode_topic(topic)), self._default)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} nodes={list(self._nodes)}>"

    # ------------------------------------------------------------ the primitives each client provides

    @abc.abstractmethod
    async def _open_node(self, address: Address) -> N:
        """A connected node client for ``address`` that asks for redirects; raises ConnectionClosedError."""

    @abc.abstractmethod
    async def _wait_for_data(self, nodes: list[N], until: float | None) -> None:
        """Until one of ``nodes`` has received something or is lost, or ``time.monotonic()`` passes
        ``until``."""

    @abc.abstractmethod
    async def _sleep(self, seconds: float) -> None:
        """Pause (before a retry)."""

    @abc.abstractmethod
    async def _queue_publish(self, node: N, topic: bytes, message: Data) -> None:
        """``node.publish(topic, message, wait=False)``."""

    def _taken(self, node: N) -> None:
        """A delivery was taken from ``node``'s queue (a hook: only the asyncio client needs it)."""

    # ------------------------------------------------------------ nodes and the map

    async def _node(self, address: Address) -> N:
        """The open connection to ``address``, made if there is none."""
        if self._closed:
            raise ConnectionClosedError("the client is closed")
        node = self._nodes.get(address)
        if node is not None:
            if node._poll_connected():
                return node
            await self._drop(address)
        node = await self._open_node(address)
        self._mine.add(node)
        existing = self._nodes.get(address)
        if existing is not None:  # another task opened one meanwhile (the asyncio client)
            await node._close()
            return existing
        self._nodes[address] = node
        return node

    async def _drop(self, address: Address) -> None:
        """Forget the connection to a node that is lost or does not answer; its subscriptions are to be
        made again (by ``_next_message``), its received deliveries are still handed out."""
        node = self._nodes.pop(address, None)
        if node is None:
            return
        if node.connected:
            node._lose("given up by the cluster client")
        if node._session.messages:
            self._draining.append(node)
        for subscription in self._subscriptions.values():
            if subscription.address == address:
                subscription.address = None
        for pattern in self._patterns.values():
            pattern.nodes.discard(address)

    async def _refresh(self) -> None:
        """Read the slot map from the first node that answers: those connected, then the seeds."""
        failure: Exception | None = None
        for address in [*self._nodes, *(seed for seed in self.seeds if seed not in self._nodes)]:
            try:
                node = await self._node(address)
                status = await node._cluster()
            except UnknownCommandError:
                # a broker that is no cluster node: it owns every topic
                self._owners, self._default, self._members = {}, address, [address]
                return
            except (ConnectionClosedError, errors.TimeoutError) as exc:
                failure = exc
                await self._drop(address)
                continue
            self._owners, self._default, self._members = slot_map(status), address, member_addresses(status)
            self._members_read = time.monotonic()
            return
        raise ConnectionClosedError(f"no node of the cluster answers: {failure}")

    async def _routed(
        self, name: bytes, call: Callable[[N], Awaitable[T]], *, repeat: bool
    ) -> tuple[Address, T]:
        """``call`` on the owner of topic ``name``, and the owner's address.

        A ``MOVED`` reply corrects the map and the call goes to the node it names. An owner that
        cannot be reached, or a ``TRYAGAIN`` (a slot without owner), makes it read the map again and
        retry with backoff for up to ``reconnect_timeout`` seconds; a connection lost during the
        call too when ``repeat`` (a command safe to send twice), else that loss is raised.
        """
        slot = slot_of(name)
        deadline: float | None = None
        delay = RECONNECT_FIRST_DELAY
        moved = 0
        while True:
            address = self._owners.get(slot, self._default)
            try:
                node = await self._node(address)
            except ConnectionClosedError as exc:
                failure: Exception = exc  # nothing was sent
            else:
                try:
                    return address, await call(node)
                except MovedError as exc:
                    if exc.address is None or moved >= MAX_REDIRECTS:
                        raise
                    moved += 1
                    self.redirects_followed += 1
                    self._owners[slot] = exc.address
                    continue
                except TryAgainError as exc:
                    failure = exc
                except ConnectionClosedError as exc:
                    await self._drop(address)
                    if not repeat or self._closed:
                        raise
                    failure = exc
            # the owner is dead or there is none yet: the cluster moves its slots within its lease TTL
            now = time.monotonic()
            deadline = deadline or now + self.reconnect_timeout
            if now >= deadline:
                raise failure
            await self._sleep(min(delay, deadline - now))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
            with contextlib.suppress(ConnectionClosedError):
                await self._refresh()

    async def _any_node(self) -> N:
        """A node for a command without topic: the one the map came from, or another that answers."""
        try:
            return await self._node(self._default)
        except ConnectionClosedError:
            await self._refresh()
            return await self._node(self._default)

    # ------------------------------------------------------------ commands

    async def _subscribe(
        self, topic: str | bytes, group: str | bytes | None, ack: bool, prefetch: int | None
    ) -> None:
        name = codec.encode_topic(topic)
        gname = None if group is None else codec.encode_group(group)
        if codec.is_pattern(name):
            await self._subscribe_pattern(_PatternSubscription(name, gname, ack, prefetch, set()))
            return
        subscription = _Subscription(name, gname, ack, prefetch, None)
        await self._make(subscription)
        self._subscriptions[name, gname] = subscription

    async def _make(self, subscription: _Subscription) -> None:
        """Subscribe on the topic's owner, and note where."""
        s = subscription
        s.address, _ = await self._routed(
            s.topic, lambda node: node._subscribe(s.topic, s.group, s.ack, s.prefetch), repeat=True
        )

    async def _subscribe_pattern(self, pattern: _PatternSubscription) -> None:
        """Subscribe to a pattern on every node: each owner gives the client its share of the topics it
        owns that match (docs/cluster.md, "Wildcard patterns"). A refusal undoes it on the nodes that
        accepted and is raised; a node that cannot be reached gets it later (``_place_patterns``)."""
        await self._refresh()
        try:
            await self._place(pattern)
        except errors.CommandError:
            await self._unplace(pattern)
            raise
        self._patterns[pattern.pattern, pattern.group] = pattern

    async def _place(self, pattern: _PatternSubscription) -> None:
        """Subscribe to ``pattern`` on each member it is not on yet, but those that cannot be reached."""
        p = pattern
        for address in self._members:
            if address in p.nodes:
                continue
            try:
                node = await self._node(address)
                await node._subscribe(p.pattern, p.group, p.ack, p.prefetch)
            except (ConnectionClosedError, errors.TimeoutError):
                await self._drop(address)
                continue
            p.nodes.add(address)

    async def _unplace(self, pattern: _PatternSubscription) -> None:
        """Unsubscribe from ``pattern`` on every node it is on (those lost meanwhile have lost it)."""
        nodes, pattern.nodes = pattern.nodes, set()
        for address in nodes:
            with contextlib.suppress(ConnectionClosedError, errors.TimeoutError, errors.NotSubscribedError):
                await (await self._node(address))._unsubscribe(pattern.pattern, pattern.group)

    async def _place_patterns(self) -> None:
        """Read the member set again (every PATTERN_CHECK seconds) and place the pattern subscriptions
        on the nodes that lack them: a node that joined, or came back after it was lost."""
        if not self._patterns or time.monotonic() < self._members_read + PATTERN_CHECK:
            return
        self._members_read = time.monotonic()  # not again before PATTERN_CHECK, even if no node answers
        with contextlib.suppress(ConnectionClosedError):
            await self._refresh()
        for pattern in self._patterns.values():
            with contextlib.suppress(errors.CommandError):
                await self._place(pattern)

    async def _destroy_pattern_group(self, name: bytes, group: str | bytes) -> None:
        """``DESTROY`` of a pattern's group on every node: done when some node destroyed it; the
        first refusal other than NoSuchGroupError is raised (after every node had its turn), and
        NoSuchGroupError when no node held the group."""
        await self._refresh()
        refusals: list[errors.CommandError] = []
        destroyed = False
        for address in self._members:
            try:
                await (await self._node(address))._destroy_group(name, group)
            except (ConnectionClosedError, errors.TimeoutError):
                await self._drop(address)
                continue
            except errors.CommandError as exc:
                refusals.append(exc)
                continue
            destroyed = True
        others = [exc for exc in refusals if not isinstance(exc, errors.NoSuchGroupError)]
        if others:
            raise others[0]
        if refusals and not destroyed:
            raise refusals[0]

    async def _unsubscribe(self, topic: str | bytes, group: str | bytes | None) -> None:
        name = codec.encode_topic(topic)
        gname = None if group is None else codec.encode_group(group)
        pattern = self._patterns.pop((name, gname), None)
        if pattern is not None:
            await self._unplace(pattern)
            return
        subscription = self._subscriptions.pop((name, gname), None)
        if subscription is not None and subscription.address is None:
            return  # its node was lost, and the subscription with it
        await self._routed(name, lambda node: node._unsubscribe(name, gname), repeat=True)

    async def _destroy_group(self, topic: str | bytes, group: str | bytes) -> None:
        name = codec.encode_topic(topic)
        if codec.is_pattern(name):
            await self._destroy_pattern_group(name, group)
            return
        await self._routed(name, lambda node: node._destroy_group(name, group), repeat=True)

    async def _publish(self, topic: str | bytes, message: Data) -> None:
        name = codec.encode_topic(topic)
        await self._routed(name, lambda node: node._publish(name, message), repeat=False)

    async def _publish_many(self, topic: str | bytes, messages: Iterable[Data]) -> list[Refused]:
        """``publish_many`` on the owner; the messages refused with ``MOVED`` or ``TRYAGAIN`` (the
        slot moved during the batch) are sent again, in order, where the map now says."""
        name = codec.encode_topic(topic)
        batch = list(messages)
        indexes = list(range(len(batch)))
        refused: list[Refused] = []
        for _ in range(MAX_REDIRECTS):
            part = [batch[i] for i in indexes]
            _, answers = await self._routed(name, partial(_publish_many, name=name, part=part), repeat=False)
            again = [r for r in answers if isinstance(r.error, (MovedError, TryAgainError))]
            refused += [Refused(indexes[r.index], r.error) for r in answers if r not in again]
            if not again:
                break
            await self._reroute(name, [r.error for r in again])
            indexes = [indexes[r.index] for r in again]
        else:
            refused += [Refused(i, errors.TimeoutError("the topic's owner kept moving")) for i in indexes]
        return sorted(refused, key=lambda r: r.index)

    async def _request(self, topic: str | bytes, message: Data, timeout: float) -> Message:
        """``request`` on the topic's owner, whose connection its reply comes back on; a connection
        lost meanwhile is raised (the request may have been answered), not sent again."""
        name = codec.encode_topic(topic)
        _, reply = await self._routed(name, lambda node: node._request(name, message, timeout), repeat=False)
        return reply

    async def _reroute(self, name: bytes, refusals: list[Exception]) -> None:
        """Learn from refusals with MOVED (the new owner) or TRYAGAIN (wait a moment, read the map)."""
        moved = next((e for e in refusals if isinstance(e, MovedError) and e.address is not None), None)
        if moved is not None and moved.address is not None:
            self.redirects_followed += 1
            self._owners[slot_of(name)] = moved.address
            return
        await self._sleep(RECONNECT_MAX_DELAY)
        with contextlib.suppress(ConnectionClosedError):
            await self._refresh()

    async def _publish_later(self, topic: str | bytes, message: Data) -> None:
        """``publish(wait=False)`` on the owner as the map says now (``flush`` follows redirects)."""
        name = codec.encode_topic(topic)
        address = self._owners.get(slot_of(name), self._default)
        try:
            node = await self._node(address)
        except ConnectionClosedError:
            await self._refresh()
            node = await self._node(self._owners.get(slot_of(name), self._default))
        await self._queue_publish(node, name, message)
        self._queued.append((node, name, message))

    async def _flush(self) -> list[Refused]:
        """Every node's ``flush``, refusals numbered across nodes; those with ``MOVED`` or ``TRYAGAIN``
        are published again (waiting for each reply, in order) where the map now says."""
        queued, self._queued = self._queued, []
        refusals: dict[int, Exception] = {}
        for node in dict.fromkeys(node for node, _, _ in queued):
            mine = [index for index, (n, _, _) in enumerate(queued) if n is node]
            refusals.update((mine[r.index], r.error) for r in await node._flush())
        for index in sorted(refusals):
            if isinstance(refusals[index], (MovedError, TryAgainError)):
                _, name, message = queued[index]
                try:
                    await self._publish(name, message)
                except (errors.CommandError, ConnectionClosedError, errors.TimeoutError) as exc:
                    refusals[index] = exc
                else:
                    del refusals[index]
        return [Refused(index, refusals[index]) for index in sorted(refusals)]

    def _settle(self, messages: Iterable[Message], delay: float | None, ack: bool) -> None:
        """ACK (or NACK after ``delay``) each message on the connection it came on, the node that
        issued its tag."""
        by_node: dict[ClientBase, list[Message]] = {}
        for message in messages:
            link = message._link
            if link is None:
                raise InvalidArgumentError(f"{message!r} is from a plain subscription: nothing to settle")
            node = link.client
            if not isinstance(node, ClientBase) or node not in self._mine:
                raise InvalidArgumentError(f"{message!r} was delivered to another client")
            by_node.setdefault(node, []).append(message)
        stale: list[Message] = []
        for node, batch in by_node.items():
            try:
                if ack:
                    node.ack(batch)
                else:
                    node.nack(batch, delay)
            except StaleDeliveryError as exc:
                stale += exc.messages
        if stale:
            raise stale_error(stale)

    async def _check_acks(self) -> list[UnknownDeliveryTagError]:
        refused: list[UnknownDeliveryTagError] = []
        for node in list(self._nodes.values()):
            refused += await node._check_acks()
        return refused

    async def _close(self) -> None:
        self._closed = True
        nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            await node._close()

    # ------------------------------------------------------------ deliveries

    def _take_message(self) -> Message | None:
        """A delivery already received by any node, each node in turn first; None when there is none."""
        while self._draining:
            if self._draining[0]._session.messages:
                return self._draining[0]._session.messages.popleft()
            self._draining.pop(0)
        nodes = list(self._nodes.values())
        for i in range(len(nodes)):
            node = nodes[(self._turn + i) % len(nodes)]
            if node._session.messages:
                self._turn = (self._turn + i + 1) % len(nodes)
                message = node._session.messages.popleft()
                self._taken(node)
                return message
        return None

    async def _next_message(self, timeout: float | None) -> Message:
        """The next delivery from any node; subscriptions of a lost node are made again on the
        topic's (new) owner first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = self._take_message()
            if message is not None:
                return message
            if self._closed:
                raise ConnectionClosedError("the client is closed")
            lost = [address for address, node in self._nodes.items() if not node.connected]
            for address in lost:
                await self._drop(address)
            orphans = [s for s in self._subscriptions.values() if s.address is None]
            for subscription in orphans:
                await self._make(subscription)
            await self._place_patterns()
            if lost or orphans:
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.TimeoutError(f"no message within {timeout}s")
            nodes = list(self._nodes.values())
            until = deadline
            if self._patterns:  # wake up to place them on nodes that joined
                until = earliest(until, self._members_read + PATTERN_CHECK)
            for node in nodes:
                node._keep_alive()
                until = earliest(until, node._keepalive_due())
            await self._wait_for_data(nodes, until)


class ClusterClient(ClusterBase[Client], BlockingUse):
    """A blocking client of a Pigeon cluster that sends each topic's commands to the node owning it.

    ``host``, ``port`` and ``seeds`` (``(host, port)`` pairs) are nodes to learn the cluster from
    (any one that answers will do); the client then connects to each node it needs, as it advertises
    itself. Its calls are ``Client``'s, and deliveries from every node come through ``next_message``
    and ``messages``. A command is retried on the new owner when a topic moves (``MOVED``), and,
    for up to ``reconnect_timeout`` seconds, while a slot has no owner or its owner cannot be reached
    (a publish whose reply was lost with its connection is not resent: it raises
    ConnectionClosedError, as ``Client`` does). Subscriptions on a node that is lost are made again on
    the topic's new owner. Works with a broker that is no cluster node too (it owns every topic).
    Not thread-safe.
    """

    def __init__(
        self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **options: Unpack[ClusterOptions]
    ) -> None:
        super().__init__(host, port, **options)
        run_blocking(self._refresh())

    def subscribe(
        self,
        topic: str | bytes,
        group: str | bytes | None = None,
        *,
        ack: bool = False,
        prefetch: int | None = None,
    ) -> None:
        """Subscribe on the topic's owner, as ``Client.subscribe``; to a wildcard pattern on every node."""
        run_blocking(self._subscribe(topic, group, ack, prefetch))

    def unsubscribe(self, topic: str | bytes, group: str | bytes | None = None) -> None:
        """Unsubscribe on the topic's owner, as ``Client.unsubscribe``."""
        run_blocking(self._unsubscribe(topic, group))

    def destroy_group(self, topic: str | bytes, group: str | bytes) -> None:
        """End a consumer group on the topic's owner, as ``Client.destroy_group``."""
        run_blocking(self._destroy_group(topic, group))

    def publish(self, topic: str | bytes, message: Data, *, wait: bool = True) -> None:
        """Publish on the topic's owner, as ``Client.publish``; ``flush()`` follows the redirects of
        ``wait=False`` publishes."""
        run_blocking(self._publish(topic, message) if wait else self._publish_later(topic, message))

    def flush(self) -> list[Refused]:
        """Every node's replies to ``publish(wait=False)`` calls, as ``Client.flush`` (indexes count
        across nodes, in call order)."""
        return run_blocking(self._flush())

    def publish_many(self, topic: str | bytes, messages: Iterable[Data]) -> list[Refused]:
        """Publish many messages on the topic's owner, as ``Client.publish_many``."""
        return run_blocking(self._publish_many(topic, messages))

    def request(
        self, topic: str | bytes, message: Data, *, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Message:
        """Send a request to the topic's owner and return the first reply, as ``Client.request``; a
        request delivered to this client is answered with ``message.respond(data)``, which goes to the
        node that delivered it (as ``ack`` does)."""
        return run_blocking(self._request(topic, message, timeout))

    def ack(self, messages: Iterable[Message]) -> None:
        """Acknowledge deliveries, each to the node it came from, as ``Client.ack``."""
        self._settle(messages, None, ack=True)

    def nack(self, messages: Iterable[Message], delay: float | None = None) -> None:
        """Give deliveries back to the nodes they came from, as ``Client.nack``."""
        self._settle(messages, delay, ack=False)

    def check_acks(self) -> list[UnknownDeliveryTagError]:
        """Every node's refusals of ACK and NACK, as ``Client.check_acks``."""
        return run_blocking(self._check_acks())

    def ping(self) -> float:
        """Round trip to one node, in seconds."""
        return run_blocking(self._any_node()).ping()

    def stats(self, address: Address | None = None) -> dict[str, Any]:
        """``STATS`` of one node: ``address``, or the one the map came from."""
        node = run_blocking(self._node(address) if address is not None else self._any_node())
        return node.stats()

    def cluster(self) -> dict[str, Any]:
        """``CLUSTER STATUS`` of a node (docs/cluster.md); the map is read again from it too."""
        run_blocking(self._refresh())
        return run_blocking(self._any_node()).cluster()

    def next_message(self, timeout: float | None = None) -> Message:
        """The next delivery from any node; raises pigeon.TimeoutError when none arrives in ``timeout``
        seconds."""
        message = self._take_message()
        return run_blocking(self._next_message(timeout)) if message is None else message

    def close(self) -> None:
        """Close every node's connection (DISCONNECT after anything queued); safe to call twice."""
        run_blocking(self._close())

    async def _open_node(self, address: Address) -> Client:
        host, port = address
        return Client(
            host,
            port,
            timeout=self.timeout,
            user=self.user,
            password=self._password,
            tls=self._tls,
            redirects=True,
        )

    async def _wait_for_data(self, nodes: list[Client], until: float | None) -> None:
        socks = {node._sock: node for node in nodes if node._sock is not None}
        left = None if until is None else max(until - time.monotonic(), 0.0)
        if not socks:
            time.sleep(left if left is not None else RECONNECT_MAX_DELAY)
            return
        # bytes TLS has decrypted already are not seen by select
        ready: list[socket.socket] = [s for s in socks if isinstance(s, ssl.SSLSocket) and s.pending()]
        if not ready:
            ready, _, _ = select.select(list(socks), [], [], left)
        for sock in ready:
            with contextlib.suppress(ConnectionClosedError):  # noticed by the caller: not connected
                socks[sock]._receive(0.0, send_queued=False)

    async def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def _queue_publish(self, node: Client, topic: bytes, message: Data) -> None:
        node.publish(topic, message, wait=False)


class AsyncClusterClient(ClusterBase[AsyncClient], AsyncUse):
    """The asyncio ``ClusterClient``: ``async with AsyncClusterClient(...) as client:`` or
    ``client = await AsyncClusterClient(...).connect()``; the calls are ``AsyncClient``'s, routed as
    ``ClusterClient`` routes them. ``max_queued`` applies to each node's connection."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED,
        **options: Unpack[ClusterOptions],
    ) -> None:
        super().__init__(host, port, **options)
        self.max_queued = max_queued
        self._arrived = asyncio.Event()  # every node client's: set when any of them receives or is lost

    async def connect(self) -> AsyncClusterClient:
        """Read the slot map from a node that answers; returns the client."""
        await self._refresh()
        return self

    async def subscribe(
        self,
        topic: str | bytes,
        group: str | bytes | None = None,
        *,
        ack: bool = False,
        prefetch: int | None = None,
    ) -> None:
        """As ``ClusterClient.subscribe``."""
        await self._subscribe(topic, group, ack, prefetch)

    async def unsubscribe(self, topic: str | bytes, group: str | bytes | None = None) -> None:
        """As ``ClusterClient.unsubscribe``."""
        await self._unsubscribe(topic, group)

    async def destroy_group(self, topic: str | bytes, group: str | bytes) -> None:
        """As ``ClusterClient.destroy_group``."""
        await self._destroy_group(topic, group)

    async def publish(self, topic: str | bytes, message: Data, *, wait: bool = True) -> None:
        """As ``ClusterClient.publish``."""
        await (self._publish(topic, message) if wait else self._publish_later(topic, message))

    async def flush(self) -> list[Refused]:
        """As ``ClusterClient.flush``."""
        return await self._flush()

    async def publish_many(self, topic: str | bytes, messages: Iterable[Data]) -> list[Refused]:
        """As ``ClusterClient.publish_many``."""
        return await self._publish_many(topic, messages)

    async def request(
        self, topic: str | bytes, message: Data, *, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Message:
        """As ``ClusterClient.request``; many may be awaited at once."""
        return await self._request(topic, message, timeout)

    def ack(self, messages: Iterable[Message]) -> None:
        """As ``ClusterClient.ack`` (a plain method: it only writes)."""
        self._settle(messages, None, ack=True)

    def nack(self, messages: Iterable[Message], delay: float | None = None) -> None:
        """As ``ClusterClient.nack``."""
        self._settle(messages, delay, ack=False)

    async def check_acks(self) -> list[UnknownDeliveryTagError]:
        """As ``ClusterClient.check_acks``."""
        return await self._check_acks()

    async def ping(self) -> float:
        """As ``ClusterClient.ping``."""
        return await (await self._any_node()).ping()

    async def stats(self, address: Address | None = None) -> dict[str, Any]:
        """As ``ClusterClient.stats``."""
        node = await (self._node(address) if address is not None else self._any_node())
        return await node.stats()

    async def cluster(self) -> dict[str, Any]:
        """As ``ClusterClient.cluster``."""
        await self._refresh()
        return await (await self._any_node()).cluster()

    async def next_message(self, timeout: float | None = None) -> Message:
        """As ``ClusterClient.next_message``."""
        message = self._take_message()
        return await self._next_message(timeout) if message is None else message

    async def close(self) -> None:
        """As ``ClusterClient.close``."""
        await self._close()
        self._arrived.set()

    async def _open_node(self, address: Address) -> AsyncClient:
        host, port = address
        node = AsyncClient(
            host,
            port,
            timeout=self.timeout,
            max_queued=self.max_queued,
            user=self.user,
            password=self._password,
            tls=self._tls,
            redirects=True,
        )
        node._arrived = self._arrived  # one event for all nodes: next_message waits for any of them
        return await node.connect()

    async def _wait_for_data(self, nodes: list[AsyncClient], until: float | None) -> None:
        self._arrived.clear()
        left = None if until is None else max(until - time.monotonic(), 0.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), left)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _queue_publish(self, node: AsyncClient, topic: bytes, message: Data) -> None:
        await node.publish(topic, message, wait=False)

    def _taken(self, node: AsyncClient) -> None:
        node._taken()
