"""This node's place in the cluster: its lease, the member set, and the slots it owns.

etcd holds, under ``/pigeon/<cluster>/``:

- ``members/<node>``: ``{"address": "host:port", "http": ...}``, bound to the node's lease;
- ``slots/<n>``: the name of the node that owns slot ``n``, bound to that node's lease, created
  only if absent (a transaction), so that two nodes never hold a slot at once;
- ``copies/<n>``: with replicas, ``{"owner": ..., "nodes": [...]}``, the nodes that hold every
  message of slot ``n`` its owner confirmed, written by that owner while it holds the slot (and
  with the slot's key when it takes it), bound to no lease: when the owner dies, the first of
  them that is live takes the slot over (``taker``).

A node serves a slot only while it holds that key and believes its lease alive: a lease is
believed alive until ``ttl`` seconds after the last keep-alive that etcd answered was *sent*, which
is never later than etcd's own expiry of it. No etcd call is made per message: etcd is read when
the watch says something changed (and every ``POLL`` seconds in case a watch broke).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aetcd

from pigeon.cluster.slots import SLOTS, owner_order, preferred_owner

log = logging.getLogger("pigeon.cluster")

T = TypeVar("T")

DEFAULT_TTL = 5.0

# Seconds between two full reads of the cluster's keys when no watch event came: the bound on how
# late a node sees a change if its watch broke (an etcd restart).
POLL = 1.0

# Seconds an etcd call may take before the node tries the next endpoint.
CALL_TIMEOUT = 2

# Seconds a node must have been seen as a member before it is handed slots: time for every node to
# place its clients' wildcard patterns on it first (pigeon.cluster.patterns; docs/cluster.md)
JOIN_GRACE = 2.0


class ClusterNode:
    """Membership and slot ownership of one node, kept in etcd.

    ``endpoints`` are etcd's client addresses (tried in turn); ``name`` is unique in the cluster;
    ``info`` is what the member key says about this node (at least ``"address"``, where clients
    and other nodes reach it). ``busy_slots()`` names the slots of the topics the node holds (with
    subscribers or messages): it hands any other slot to its preferred owner; ``on_lost()`` is
    called when the node stops serving every slot because its lease is lost; ``on_members()`` after
    each read of the member set; ``on_taking(slots)`` just before it starts serving slots it did
    not hold (with no await in between: nothing of theirs has been served yet). ``tls`` is the
    client context this node opens its connections to the others with (``connect``). With
    replicas, ``copies_of(slot)`` names the nodes that hold every message of a slot this node
    owns: they are recorded in etcd (``record_copies``), and ``on_copies()`` is called after each
    write; ``replica_figures()`` is what the node holds for other owners, for ``status``.
    """

    def __init__(
        self,
        endpoints: list[tuple[str, int]],
        name: str,
        info: dict[str, Any],
        *,
        ttl: float = DEFAULT_TTL,
        cluster: str = "pigeon",
        busy_slots: Callable[[], set[int]] = lambda: set(range(SLOTS)),
        on_lost: Callable[[], None] = lambda: None,
        on_members: Callable[[], None] = lambda: None,
        on_taking: Callable[[list[int]], None] = lambda slots: None,
        tls: ssl.SSLContext | None = None,
        copies_of: Callable[[int], tuple[str, ...]] | None = None,
        on_copies: Callable[[], None] = lambda: None,
        replica_figures: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.name = name
        self.info = info
        self.ttl = ttl
        self.prefix = f"/pigeon/{cluster}/".encode()
        self._busy_slots = busy_slots
        self._on_lost = on_lost
        self._on_members = on_members
        self._on_taking = on_taking
        self._copies_of = copies_of
        self._on_copies = on_copies
        self._replica_figures = replica_figures
        self.tls = tls  # how this node connects to the others (``connect``): TLS, or None for TCP
        self.members: dict[str, dict[str, Any]] = {}
        # member -> (its lease, when this node first read it with that lease: a restart is a new member)
        self._first_seen: dict[str, tuple[int, float]] = {}
        self.owners: dict[int, str] = {}  # slot -> owner, as etcd said last
        # slot -> (its owner, the nodes that hold all its messages), as etcd said last
        self.copies: dict[int, tuple[str, tuple[str, ...]]] = {}
        self._held: set[int] = set()  # slots whose keys are bound to this node's current lease
        self.owned: set[int] = set()  # the slots this node serves
        self.etcd_ok = False
        self.upstreams_opened = 0  # connections to owners opened to forward a client's commands
        self._client: Any = None
        self._endpoint = 0
        self._lease: Any = None
        self._alive_until = 0.0
        self._fence: asyncio.TimerHandle | None = None  # stops serving when the lease runs out
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- what the server asks, on every routing decision: no I/O -------------------------------

    def serves(self, slot: int) -> bool:
        """Whether this node owns ``slot`` now (and its lease is believed alive)."""
        self._check_lease()
        return slot in self.owned

    def _check_lease(self) -> None:
        """Stop serving every slot once the lease is no longer believed alive. Checked on every
        routing decision and status, and by a timer (``_renewed``): what stops a node is its own
        clock, never an etcd call that returns (a call to an etcd that is gone may hang)."""
        if self.owned and time.monotonic() >= self._alive_until:
            self._lose("its lease was not renewed in time")

    def _renewed(self, sent: float, granted: float) -> None:
        """etcd answered a grant or keep-alive sent at ``sent`` with a TTL of ``granted`` s: the
        lease is believed alive until ``sent`` plus the shorter of that and ``--cluster-ttl`` (etcd
        may round the TTL), and the fence timer moves there."""
        self._alive_until = sent + min(self.ttl, granted)
        if self._fence is not None:
            self._fence.cancel()
        delay = self._alive_until - time.monotonic()
        self._fence = asyncio.get_running_loop().call_later(max(0.0, delay), self._check_lease)

    def owner(self, slot: int) -> str | None:
        """The node that owns ``slot`` as etcd said last, or None (also for a slot this node is
        giving up: its next owner is not known yet)."""
        if slot in self.owned:
            return self.name
        node = self.owners.get(slot)
        return None if node == self.name else node

    def recorded(self, slot: int) -> tuple[str, ...] | None:
        """The nodes etcd names as holding every message of ``slot`` when this node owns it (none
        recorded yet: empty), or None for a slot it does not own."""
        if slot not in self.owned:
            return None
        owner, nodes = self.copies.get(slot, (self.name, ()))
        return nodes if owner == self.name else ()

    def record_copies(self) -> None:
        """``copies_of`` changed: write it to etcd soon (the balancer does, on its next pass)."""
        self._changed.set()

    def taker(self, slot: int) -> str | None:
        """The live member that should take ``slot`` while nobody holds it: when its last owner is
        gone and etcd names nodes that hold all its messages, the first live one of them in the
        slot's order; else its preferred owner. Every node computes the same from etcd's keys."""
        last = self.copies.get(slot)
        if last is not None and last[0] not in self.members:
            holders = set(last[1])
            for node in owner_order(slot, self.members):
                if node in holders:
                    return node
        return preferred_owner(slot, self.members)

    def address_of(self, node: str) -> str | None:
        """Where clients reach ``node`` (``host:port``), or None for a node not in the member set."""
        member = self.members.get(node)
        return None if member is None else str(member.get("address"))

    def connect(
        self, node: str, protocol: Callable[[], asyncio.BaseProtocol]
    ) -> asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]:
        """Open a connection to ``node`` at its member address, over TLS (the peer's certificate
        checked against its address) when this node has ``tls``: a client's forwarding upstream, a
        replication link. A node not in the member set fails to connect, as an unreachable one."""
        host, _, port = (self.address_of(node) or "").rpartition(":")
        loop = asyncio.get_running_loop()
        return loop.create_task(
            loop.create_connection(protocol, host.strip("[]"), int(port or 0), ssl=self.tls)
        )

    def status(self) -> dict[str, Any]:
        """The cluster as this node sees it: for ``CLUSTER STATUS``, HTTP ``/cluster`` and the CLI."""
        self._check_lease()
        per_node: dict[str, list[int]] = {}
        for slot, node in sorted(self.owners.items()):
            per_node.setdefault(node, []).append(slot)
        status = {
            "node": self.name,
            "etcd": self.etcd_ok,
            "lease_ttl": self.ttl,
            "slots": SLOTS,
            "owned": sorted(self.owned),
            "members": {
                node: {**info, "slots": per_node.get(node, [])} for node, info in sorted(self.members.items())
            },
            "unowned": SLOTS - len(self.owners),
            "copies": {
                str(slot): list(nodes)
                for slot, (owner, nodes) in sorted(self.copies.items())
                if slot in self.owned and owner == self.name
            },
            "upstreams_opened": self.upstreams_opened,
        }
        if self._replica_figures is not None:
            status["replicas"] = self._replica_figures()
        return status

    # -- life ------------------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Join: take a lease, write the member key, then keep them and the slots in the background.

        Raises ConnectionError when no endpoint answers within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._join()
                break
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"cannot join the cluster through etcd: {exc}") from exc
                await self._next_endpoint()
                await asyncio.sleep(0.2)
        with contextlib.suppress(Exception):
            await self._rebalance()  # take this node's free slots before it says it listens
        self._tasks = [
            asyncio.create_task(self._keep_alive()),
            asyncio.create_task(self._watch()),
            asyncio.create_task(self._balance()),
        ]

    async def stop(self) -> None:
        """Leave: stop serving, revoke the lease (its keys go with it) and close the etcd client."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        # etcd's client may turn a cancellation into an error of its own: do not wait for ever
        await asyncio.wait(self._tasks, timeout=CALL_TIMEOUT)
        self.owned.clear()
        if self._fence is not None:
            self._fence.cancel()
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await bounded(self._client.revoke_lease(self._lease.id))
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()

    async def _next_endpoint(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                # bounded: _keep_alive calls this before it checks the lease, so a close that hangs
                # (etcd gone) must not keep a node serving past its lease
                await bounded(self._client.close())
        self._endpoint = (self._endpoint + 1) % len(self.endpoints)
        self._client = None

    def _etcd(self) -> Any:
        if self._client is None:
            host, port = self.endpoints[self._endpoint]
            self._client = aetcd.Client(host, port, timeout=CALL_TIMEOUT)
        return self._client

    async def _join(self) -> None:
        client = self._etcd()
        sent = time.monotonic()
        # etcd's TTL is whole seconds: ask for no less than --cluster-ttl, believe no more of it
        self._lease = await client.lease(max(1, math.ceil(self.ttl)))
        self._renewed(sent, float(self._lease.ttl))
        await client.put(self._key("members", self.name), json.dumps(self.info).encode(), self._lease)
        self.etcd_ok = True
        log.info("joined the cluster as %s (lease %x, ttl %g s)", self.name, self._lease.id, self.ttl)
        await self._read()

    def _key(self, kind: str, name: str | int) -> bytes:
        return self.prefix + f"{kind}/{name}".encode()

    def _lose(self, why: str, lease_gone: bool = False) -> None:
        """Stop serving every slot. The lease is kept unless etcd said it is gone: if a late
        keep-alive finds it alive, the slots whose keys it still holds are served again."""
        if self.owned:
            log.warning("stopped serving %d slots: %s", len(self.owned), why)
            self.owned.clear()
            self._on_lost()
        if lease_gone:
            self._lease = None

    async def _keep_alive(self) -> None:
        """Renew the lease every ttl/3; when it is gone, stop serving and join again with a new one."""
        while not self._stopping:
            await asyncio.sleep(self.ttl / 3)
            if self._lease is None:
                with contextlib.suppress(Exception):
                    await self._join()
                    self._changed.set()
                continue
            sent = time.monotonic()
            try:
                reply = await bounded(self._etcd().refresh_lease(self._lease.id))
            except Exception as exc:
                self.etcd_ok = False
                log.warning("etcd did not renew the lease: %s", exc)
                await self._next_endpoint()
                if time.monotonic() >= self._alive_until:
                    self._lose("its lease could not be renewed")
                continue
            self.etcd_ok = True
            if reply.TTL <= 0:
                self._lose("etcd says its lease expired", lease_gone=True)
                continue
            self._renewed(sent, float(reply.TTL))

    async def _watch(self) -> None:
        """Wake the balancer whenever a key of the cluster changes; retry when the watch breaks. Once
        a watch is in place the balancer reads once more: a change made before (since the node's
        first read, or while a watch was broken) is seen then, not a POLL later."""
        while not self._stopping:
            try:
                events = await self._etcd().watch_prefix(self.prefix)
                self._changed.set()
                async for _event in events:
                    self._changed.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(POLL)

    async def _read(self) -> None:
        members: dict[str, dict[str, Any]] = {}
        leases: dict[str, int] = {}
        owners: dict[int, str] = {}
        copies: dict[int, tuple[str, tuple[str, ...]]] = {}
        held: set[int] = set()
        lease = None if self._lease is None else self._lease.id
        for kv in await bounded(self._etcd().get_prefix(self.prefix)):
            kind, _, name = kv.key[len(self.prefix) :].decode().partition("/")
            if kind == "members":
                members[name] = json.loads(kv.value)
                leases[name] = kv.lease
            elif kind == "slots" and name.isdigit():
                owners[int(name)] = kv.value.decode()
                if kv.lease == lease:
                    held.add(int(name))
            elif kind == "copies" and name.isdigit():
                record = json.loads(kv.value)
                copies[int(name)] = (str(record["owner"]), tuple(record["nodes"]))
        self.members, self.owners, self.copies, self._held = members, owners, copies, held
        now = time.monotonic()
        seen = self._first_seen
        self._first_seen = {
            node: seen[node] if seen.get(node, (None,))[0] == lease else (lease, now)
            for node, lease in leases.items()
        }
        self._on_members()
        # a slot etcd no longer gives this node (its key is gone): stop serving it at once
        for slot in list(self.owned):
            if slot not in held:
                self.owned.discard(slot)
                log.warning("slot %d is no longer this node's in etcd: stopped serving it", slot)

    async def _balance(self) -> None:
        """Read the cluster on each change (or every POLL s), take the free slots this node is
        preferred for, and hand over those another live node is preferred for when nothing holds them."""
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), POLL)
            self._changed.clear()
            try:
                await self._read()
                await self._rebalance()
                await self._write_copies()
            except asyncio.CancelledError:
                raise
            except (aetcd.ClientError, TimeoutError, OSError) as exc:
                self.etcd_ok = False
                log.debug("cluster read failed: %s", exc)
            except Exception:
                # not etcd's: a failure of this node's own (a takeover's, say) must not pass as one
                log.exception("balancing the slots failed")

    def _settled(self, node: str | None) -> bool:
        """Whether ``node`` has been a member for JOIN_GRACE seconds, as this node saw it."""
        seen = None if node is None else self._first_seen.get(node)
        return seen is not None and time.monotonic() - seen[1] >= JOIN_GRACE

    async def _txn(self, compare: list[Any], success: list[Any]) -> bool:
        """One etcd transaction: ``success`` if every comparison holds; whether it did."""
        ok, _ = await bounded(self._etcd().transaction(compare=compare, success=success, failure=[]))
        return bool(ok)

    async def _rebalance(self) -> None:
        if self._lease is None or self.name not in self.members:
            return
        txn = self._etcd().transactions
        # Which slots to hand over is decided and applied with no await in between: a topic made
        # in a slot while its key is being given up would otherwise be served by two nodes.
        busy = self._busy_slots()
        handed = [
            slot
            for slot in sorted(self.owned)
            if self.owners.get(slot) == self.name
            and (preferred := preferred_owner(slot, self.members)) != self.name
            and slot not in busy
            and self._settled(preferred)
        ]
        self.owned.difference_update(handed)
        for batch in _batches(handed):
            keys = [self._key("slots", slot) for slot in batch]
            await self._txn(
                [txn.value(key) == self.name.encode() for key in keys], [txn.delete(key) for key in keys]
            )
            for slot in batch:
                self.owners.pop(slot, None)
        taken: list[int] = []
        for slot in sorted(self._held - self.owned - set(handed)):
            if time.monotonic() < self._alive_until:
                self.owned.add(slot)  # the lease came back alive (etcd was away for a while)
                taken.append(slot)
        free = [
            slot for slot in range(SLOTS) if self.owners.get(slot) is None and self.taker(slot) == self.name
        ]
        # a slot's key and (with replicas) its copies' key in one transaction: etcd never names the
        # last owner's copies for a slot this node serves
        for batch in _batches(free, TXN_BATCH // 2):
            keys = [self._key("slots", slot) for slot in batch]
            # all at once when all are free; one by one when another node got some first
            if not await self._txn(
                [txn.version(key) == 0 for key in keys],
                [op for slot in batch for op in self._take_ops(slot)],
            ):
                batch = [
                    slot
                    for slot, key in zip(batch, keys, strict=True)
                    if await self._txn([txn.version(key) == 0], self._take_ops(slot))
                ]
            if self._lease is not None:
                if self._copies_of is not None:
                    self.copies.update({slot: (self.name, ()) for slot in batch})
                self.owners.update(dict.fromkeys(batch, self.name))
                self._held.update(batch)
                self._on_taking(batch)
                self.owned.update(batch)
                taken.extend(batch)
        if taken or handed:
            log.info(
                "took %d slots, handed %d over to their preferred owners; %d owned, %d members",
                len(taken),
                len(handed),
                len(self.owned),
                len(self.members),
            )

    def _wanted_copies(self, slot: int) -> tuple[str, ...]:
        return () if self._copies_of is None else self._copies_of(slot)

    def _take_ops(self, slot: int) -> list[Any]:
        """The etcd operations that take ``slot``: its key, bound to this node's lease, and with
        replicas its copies' key, naming no node: the messages a takeover puts back are in no other
        node's copy yet (``ReplicationSender.took_over``). The balancer's next write, in the same
        pass, names the successors that hold all of a slot that got none."""
        txn = self._etcd().transactions
        ops = [txn.put(self._key("slots", slot), self.name.encode(), self._lease)]
        if self._copies_of is not None:
            ops.append(txn.put(self._key("copies", slot), self._copies_value(())))
        return ops

    def _copies_value(self, nodes: tuple[str, ...]) -> bytes:
        return json.dumps({"owner": self.name, "nodes": list(nodes)}).encode()

    async def _write_copies(self) -> None:
        """Record ``copies_of`` in etcd for every slot this node owns where etcd says otherwise, each
        only while this node holds the slot's key; then ``on_copies`` (also when nothing changed:
        the nodes replaced in slots this node does not own are let go then)."""
        if self._copies_of is None or self._lease is None:
            return
        txn = self._etcd().transactions
        wanted = {slot: self._wanted_copies(slot) for slot in sorted(self.owned)}
        changed = [slot for slot, nodes in wanted.items() if self.copies.get(slot) != (self.name, nodes)]

        def mine(slot: int) -> Any:
            return txn.value(self._key("slots", slot)) == self.name.encode()

        def put(slot: int) -> Any:
            return txn.put(self._key("copies", slot), self._copies_value(wanted[slot]))

        for batch in _batches(changed):
            # all at once when all are still this node's; one by one when some were handed over
            if not await self._txn([mine(slot) for slot in batch], [put(slot) for slot in batch]):
                batch = [slot for slot in batch if await self._txn([mine(slot)], [put(slot)])]
            self.copies.update({slot: (self.name, wanted[slot]) for slot in batch})
        self._on_copies()


async def bounded(call: Coroutine[Any, Any, T]) -> T:
    """The result of an etcd ``call``, or TimeoutError after CALL_TIMEOUT s. Unlike ``wait_for``, a
    call that does not end when cancelled (the etcd client may go on retrying a gone server) is left
    to end on its own rather than waited for: every etcd call of a node returns within the bound."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=CALL_TIMEOUT)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_consume)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_consume)
        raise TimeoutError(f"etcd did not answer within {CALL_TIMEOUT} s")
    return task.result()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so that asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


# etcd refuses a transaction of more than 128 operations (--max-txn-ops)
TXN_BATCH = 100


def _batches(slots: list[int], size: int = TXN_BATCH) -> list[list[int]]:
    """``slots`` in runs of at most ``size``."""
    return [slots[i : i + size] for i in range(0, len(slots), size)]
