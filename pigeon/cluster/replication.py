"""Replication of durable topics (``--replicas N``): each slot's log records go to its successors.

The owner of a slot hands every pass's records to its store (``Store.write``) and also sends the
``PUBLISH`` records of each slot, and every ``DONE`` and ``DELIVERED`` record, to that slot's
*successors*: the next N live members in the slot's rendezvous order, the first of which takes the
slot if the owner dies. The core runs as under ``--fsync always``: a ``PUBLISHED`` waits for the
log to be confirmed (the store's ``ConfirmedLog``), which this module says only once every
successor that got records up to a position has confirmed them (and, under ``--fsync always``, the
local disk has synced them). A successor keeps, per owner, the messages not done yet and the last
``DELIVERED`` record of each (``ReplicaStore``), and appends what it gets to a file of its own
(synced before it confirms under ``--fsync always``); when it takes a slot, the cluster server puts
that slot's messages back into its core (``Broker.take_over``: with their groups and attempts)
before it serves the slot.
docs/cluster.md ("Replication") has the design and the guarantees.

On the wire, a node opens a connection to its successor, sends ``CLUSTER REPLICATE <its name>``,
waits for the same line back, then sends batches: a header (``BATCH``: the bytes of records that
follow, and the owner's log position after them) and those records, as the store wrote them. The
successor answers each run of batches with the position of the last one (8 bytes) once it holds
them. A new connection starts with a *snapshot*: every record of the owner's segments on disk for
the slots the successor replicates, so a successor that is new (a node joined, the old one died)
or was cut off has every message not done before anything newer is confirmed.

The walks over records are C's: ``SlotSplitter`` (pigeon/cluster/_split.pyx) splits a pass's
records among the successors, ``ReplicaIndex`` (pigeon/cluster/_index.pyx) is a successor's index
of one owner's messages not done; neither makes a Python object per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from pigeon._core import Broker
from pigeon.cluster._index import ReplicaIndex
from pigeon.cluster._split import SlotSplitter
from pigeon.cluster.slots import SLOTS, owner_order
from pigeon.server.compaction import sync_directory
from pigeon.server.store import HEADER, HOUSEKEEPING_INTERVAL, Store

log = logging.getLogger("pigeon.cluster")

BATCH = struct.Struct("<IQ")  # bytes of records, the owner's log position after them
ACK = struct.Struct("<Q")
REPLICATE = b"CLUSTER REPLICATE"
# Seconds between two attempts to reach a successor that did not answer.
RECONNECT_DELAY = 0.2
# Seconds between two attempts at a successor that refused this node (each costs it a password check).
REFUSED_DELAY = 2.0
# Bytes of records a link holds back while a batch is in flight, before it sends them anyway.
HOLD_MAX = 1 << 20


def split_records(
    data: bytes | memoryview, successors: Callable[[int], tuple[str, ...]], done_to: Iterable[str]
) -> dict[str, list[memoryview]]:
    """The records of ``data`` each node gets: the ``PUBLISH`` records of the slots it is one of
    ``successors(slot)`` of, and every ``DONE`` and ``DELIVERED`` record to each of ``done_to``; as
    slices of ``data``, neighbouring records in one. The walk is C's (``SlotSplitter``, without
    Python's lock)."""
    return SlotSplitter([successors(slot) for slot in range(SLOTS)], done_to).split(data)


class ReplicaLink(asyncio.Protocol):
    """This node's connection to one successor: batches out, confirmed positions back."""

    def __init__(self, sender: ReplicationSender, node: str) -> None:
        self.sender = sender
        self.node = node
        self.acked = 0  # the highest position the successor confirmed on this connection
        self.transport: asyncio.Transport | None = None
        self.ready = False  # the successor answered CLUSTER REPLICATE (then it got its snapshot)
        self.closed = False
        self._inbuf = bytearray()
        self._sent = 0  # the position after the last batch sent
        self._held: list[bytes] = []  # records sent once the batch in flight is confirmed
        self._held_bytes = 0
        self._held_at = 0  # the position after them
        # batches that wait for a snapshot being read ahead of them: (records or their read, position)
        self._outbox: deque[tuple[bytes | Future[bytes], int]] = deque()
        # snapshots sent and not confirmed yet: (the position they end at, their slots)
        self.snapshots: deque[tuple[int, frozenset[int]]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(self.sender.login + b"%s %s\n" % (REPLICATE, self.sender.name.encode()))

    def send(self, chunk: bytes, position: int) -> None:
        """Send the records ``chunk`` that end at the owner's log ``position`` (once ready), after
        any snapshot still being read."""
        assert self.ready and self.transport is not None
        if self._outbox:
            self._outbox.append((chunk, position))
        else:
            self._hold(chunk, position)

    def _hold(self, chunk: bytes, position: int) -> None:
        """Send ``chunk`` now when nothing is in flight, else with the others held once the successor
        confirms (a successor busy with one batch gets the next passes' records in one: fewer sends
        and confirmations per record as the load grows, as Nagle's algorithm does for TCP)."""
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        self._held_at = position
        if self.acked >= self._sent or self._held_bytes >= HOLD_MAX:
            self._send_held()

    def _send_held(self) -> None:
        assert self.transport is not None
        chunk = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        # two buffers, one system call (uvloop's writev): the records are not copied once more
        self.transport.writelines((BATCH.pack(len(chunk), self._held_at), chunk))
        self._sent = self._held_at
        self._held.clear()
        self._held_bytes = 0

    def send_when_read(self, snapshot: Future[bytes], position: int) -> None:
        """Send the records ``snapshot`` reads off the loop (up to ``position``) once they are read;
        what is sent meanwhile waits behind them, in order. ``drain`` once it is done."""
        assert self.ready
        self._outbox.append((snapshot, position))

    def drain(self) -> None:
        """Send what waited, up to the next snapshot not read yet. A snapshot that could not be read
        breaks the connection: the owner connects again, with a new snapshot."""
        while self._outbox:
            chunk, position = self._outbox[0]
            if isinstance(chunk, Future):
                if not chunk.done():
                    return
                if chunk.exception() is not None:
                    log.error("cannot read a snapshot for %s: %s", self.node, chunk.exception())
                    self._outbox.clear()
                    if self.transport is not None:
                        self.transport.abort()
                    return
                chunk = chunk.result()
            self._outbox.popleft()
            if self.transport is not None and not self.transport.is_closing():
                self._hold(chunk, position)

    def data_received(self, data: bytes) -> None:
        self._inbuf += data
        if not self.ready:
            nl = self._inbuf.find(b"\n")
            if nl < 0:
                return
            line = bytes(self._inbuf[:nl])
            del self._inbuf[: nl + 1]
            if self.sender.login and line.startswith(b"CONNECTED "):
                self.data_received(b"")  # this node's login went through: the answer follows
                return
            if not line.startswith(REPLICATE):
                self.sender.link_refused(self, line)
                return
            self.ready = True
            self.sender.link_ready(self)
        whole = len(self._inbuf) - len(self._inbuf) % ACK.size
        if whole:
            self.acked = max(self.acked, ACK.unpack_from(self._inbuf, whole - ACK.size)[0])
            del self._inbuf[:whole]
            if self._held and self.acked >= self._sent:
                self._send_held()
            self.sender.link_acked(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.sender.link_lost(self)

    def close(self) -> None:
        """End this connection (its successor changed, or the node stops)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def successors_of(slot: int, owner: str, members: Iterable[str], replicas: int) -> tuple[str, ...]:
    """The nodes that keep copies of ``slot``'s messages for ``owner``: the first ``replicas``
    live members other than it, in the slot's rendezvous order (fewer when fewer are live). The
    first is the node that takes the slot if the owner dies; the others, if it dies too."""
    return tuple(node for node in owner_order(slot, members) if node != owner)[:replicas]


class ReplicationSender:
    """The owner's half: sits between the core and its store (``on_log``/``on_sync``), sends each
    slot's records to its ``replicas`` successors and lets ``PUBLISHED`` go once every live one
    confirmed.

    It also knows, per slot, which nodes hold every one of its messages (``copies_of``: what etcd
    records, so that the node that takes a slot over when this one dies has them). A new
    successor joins that set once it confirmed its snapshot; until etcd names it there, the nodes
    it replaces are fed the slot's records as before and are waited for, so that a node named in
    etcd never lacks a confirmed message.

    ``members()`` is the live member set as etcd said last (names to info), ``connect(node,
    protocol)`` opens a connection to one (``ClusterNode.connect``: over TLS between TLS nodes);
    ``login`` is the ``CONNECT <user> <password>`` line a link sends first where nodes require
    logins (``--node-user``), else empty. ``record()`` asks for ``copies_of`` to be written to
    etcd (``ClusterNode.record_copies``), and ``recorded(slot)`` says what etcd names for a slot
    this node owns (None for a slot it does not own); ``copies_recorded`` is called after a write.
    """

    def __init__(
        self,
        name: str,
        broker: Broker,
        store: Store,
        members: Callable[[], dict[str, Any]],
        connect: Callable[[str, Callable[[], asyncio.BaseProtocol]], asyncio.Task[Any]],
        login: bytes = b"",
        replicas: int = 1,
        min_replicas: int = 0,
        record: Callable[[], None] = lambda: None,
        recorded: Callable[[int], tuple[str, ...] | None] = lambda slot: None,
    ) -> None:
        self.name = name
        self.login = login
        self.broker = broker
        self.store = store
        self.replicas = replicas
        self.min_replicas = min_replicas
        self._short = False  # fewer successors live than min_replicas (members_changed says)
        self._members = members
        self._connect = connect
        self._links: dict[str, ReplicaLink] = {}
        self._unreachable: set[str] = set()  # successors warned about, until one takes replicas
        self._record = record
        self._recorded = recorded
        self._successors: list[tuple[str, ...]] = [()] * SLOTS
        # per slot, the nodes that hold every one of its messages (confirmed snapshot, fed since)
        self._in_sync: list[set[str]] = [set() for _ in range(SLOTS)]
        # per slot, the nodes its records go to: its successors, then the nodes they replace
        self._targets: list[tuple[str, ...]] = [()] * SLOTS
        self._needed: frozenset[str] = frozenset()  # every node that is a target of some slot
        self._splitter = SlotSplitter(self._targets, ())  # each pass's records to the targets
        self._member_names: frozenset[str] = frozenset()
        self._written = int(broker.log_state["written"])  # the core's log position
        self._local = self._written  # what the disk holds, as --fsync promises it
        self._released = int(broker.log_state["synced"])
        # (position, nodes that must confirm it): in log order
        self._pending: list[tuple[int, set[str]]] = []
        self._stopping = False
        # snapshots are read here, off the loop, one at a time
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-snapshot")

    def attach(self) -> None:
        """Take the store's place as the broker's log writer (after ``Store.attach``)."""
        self.broker.on_log = self.write
        self.broker.on_sync = self.sync
        self.store.on_synced = self._synced
        self.members_changed()

    # -- who replicates which slot -----------------------------------------------------------------

    def members_changed(self) -> None:
        """The member set may have changed: move slots to their new successors, each new or changed
        successor getting a snapshot first; nothing waits any more for a successor that is gone."""
        names = frozenset(self._members())
        if names == self._member_names or self._stopping:
            return
        self._member_names = names
        self._successors = [successors_of(slot, self.name, names, self.replicas) for slot in range(SLOTS)]
        # every slot has as many successors: min(replicas, the other live members)
        live = len(self._successors[0])
        short = live < self.min_replicas
        if short and not self._short:
            log.warning(
                "only %d successors live, --min-replicas is %d: durable publishes are refused",
                live,
                self.min_replicas,
            )
        elif self._short and not short:
            log.warning("%d successors live again: durable publishes are taken", live)
        self._short = short
        self.broker.log_replicas(live, self.min_replicas)
        for in_sync in self._in_sync:
            in_sync.intersection_update(names)
        old = self._targets
        self._retarget()
        moved: dict[str, set[int]] = {}
        for slot, successors in enumerate(self._successors):
            for successor in successors:
                if successor not in old[slot]:
                    moved.setdefault(successor, set()).add(slot)
        for node, slots in sorted(moved.items()):
            link = self._links.get(node)
            if link is None:
                self._open(node)
            elif link.ready:
                self._snapshot(link, slots)  # a link not ready yet gets every slot of its node then
        for _, nodes in self._pending:
            # a new successor's snapshot will hold every record written so far: until it confirms,
            # they wait for it (else, their old successor gone, they would wait for no one)
            nodes.update(moved)
        self._record()

    def _retarget(self) -> None:
        """Send each slot's records to its successors and to the nodes that still hold all of it
        (the successors they replace, until etcd no longer names them); close the links to nodes
        that are neither, and let what waited for those nodes go."""
        self._targets = [
            successors + tuple(sorted(in_sync.difference(successors)))
            for successors, in_sync in zip(self._successors, self._in_sync, strict=True)
        ]
        needed = self._needed = frozenset(node for targets in self._targets for node in targets)
        self._splitter = SlotSplitter(self._targets, needed)
        for node in list(self._links):
            if node not in needed:
                self._links.pop(node).close()
        for _, nodes in self._pending:
            nodes.intersection_update(needed)
        self._release_soon()

    def copies_of(self, slot: int) -> tuple[str, ...]:
        """The nodes to name in etcd as holding every message of ``slot`` (where it goes if this node
        dies): its successors once each has caught up, until then every node that holds it all."""
        successors = self._successors[slot]
        in_sync = self._in_sync[slot]
        if in_sync.issuperset(successors):
            return successors
        return tuple(owner_order(slot, in_sync))

    def copies_recorded(self) -> None:
        """etcd was written: stop feeding (and waiting for) the nodes a slot's caught-up successors
        replace once etcd no longer names them (at once for a slot this node does not own: it has
        no messages)."""
        changed = False
        for slot, successors in enumerate(self._successors):
            in_sync = self._in_sync[slot]
            replaced = in_sync.difference(successors)
            if not replaced or not in_sync.issuperset(successors):
                continue
            recorded = self._recorded(slot)
            if recorded is None or replaced.isdisjoint(recorded):
                in_sync.difference_update(replaced)
                changed = True
        if changed:
            self._retarget()

    def took_over(self, slots: Iterable[int]) -> None:
        """A takeover put messages of ``slots`` back into the core (at the log's end, handed to this
        sender as they were written): a successor holds all of those slots again only once it has
        confirmed the log up to here, as after a snapshot. Until then it leaves their in-sync set,
        and etcd names nobody for them, so that the dead owner's other successors keep their copies
        (``ReplicaStore.forget_taken``) while these messages are only here."""
        position = int(self.broker.log_state["appended"])
        resync: dict[str, set[int]] = {}
        for slot in slots:
            for node in self._in_sync[slot]:
                resync.setdefault(node, set()).add(slot)
            self._in_sync[slot].clear()
        for node, node_slots in resync.items():
            link = self._links.get(node)
            if link is not None and link.ready:
                link.snapshots.append((position, frozenset(node_slots)))
        if resync:
            self._retarget()
            self._record()

    def link_acked(self, link: ReplicaLink) -> None:
        """``link``'s successor confirmed a position: once it covers a snapshot, the successor holds
        every message of the snapshot's slots (etcd is told); then release what it confirmed."""
        caught_up = False
        while link.snapshots and link.acked >= link.snapshots[0][0]:
            _, slots = link.snapshots.popleft()
            for slot in slots:
                if link.node in self._successors[slot]:
                    self._in_sync[slot].add(link.node)
                    caught_up = True
        if caught_up and self._links.get(link.node) is link:
            self._record()
        self.release()

    def _open(self, node: str) -> None:
        """Connect to ``node``, a successor; once it answers it gets a snapshot (link_ready)."""
        link = ReplicaLink(self, node)
        self._links[node] = link
        task = self._connect(node, lambda: link)
        task.add_done_callback(lambda done: self._connected(link, done))

    def _connected(self, link: ReplicaLink, done: asyncio.Task[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            # retried every RECONNECT_DELAY until the node's lease expires: one warning per outage
            if link.node not in self._unreachable:
                self._unreachable.add(link.node)
                log.warning("cannot reach %s to keep replicas: %s (retrying)", link.node, done.exception())
            link.connection_lost(None)

    def link_ready(self, link: ReplicaLink) -> None:
        """A successor accepted ``link``: it gets a snapshot of all its slots, read now and not at
        every connection attempt (a dead successor is retried until its lease expires, and the
        snapshot reads the whole log). Records written while it connected are in that snapshot. It
        is the link's first batch, alone (nothing is held before it), which the successor relies on:
        that batch replaces its copy (``ReplicaReceiver``)."""
        self._unreachable.discard(link.node)
        if self._links.get(link.node) is link and not self._stopping:
            self._snapshot(link, {slot for slot in range(SLOTS) if link.node in self._successors[slot]})

    def link_refused(self, link: ReplicaLink, answer: bytes) -> None:
        """``link``'s successor refused to keep replicas (it does not accept this node's login, say):
        warn once, and try again as after a broken connection, since a reload of its users file
        (SIGHUP) may let this node in. What waits for it waits on."""
        if link.node not in self._unreachable:
            self._unreachable.add(link.node)
            log.warning(
                "%s refused to keep replicas: %r (retrying every %g s)", link.node, answer, REFUSED_DELAY
            )
        link.close()
        if self._links.get(link.node) is link and not self._stopping:
            del self._links[link.node]
            asyncio.get_running_loop().call_later(REFUSED_DELAY, self._reopen, link.node)

    def link_lost(self, link: ReplicaLink) -> None:
        """A successor's connection broke: while it is still a successor, connect again after a
        short delay (with a snapshot: what was in flight may be lost). What waited for it waits on."""
        if self._links.get(link.node) is not link or self._stopping:
            return
        del self._links[link.node]
        self._out_of_sync(link.node)
        asyncio.get_running_loop().call_later(RECONNECT_DELAY, self._reopen, link.node)

    def _out_of_sync(self, node: str) -> None:
        """``node``'s link broke: it starts again from a snapshot, and until it has confirmed one it
        does not hold every message (etcd is told). A node fed only because it held a slot's messages
        is fed no longer."""
        lost = False
        for in_sync in self._in_sync:
            if node in in_sync:
                in_sync.discard(node)
                lost = True
        if lost:
            self._retarget()
            self._record()

    def _reopen(self, node: str) -> None:
        if not self._stopping and node not in self._links and node in self._needed:
            self._open(node)

    def _snapshot(self, link: ReplicaLink, slots: set[int]) -> None:
        """Send ``link`` every record on disk of ``slots`` (and every DONE and DELIVERED): the
        successor then has every message of theirs not done, with its attempts. Every position not
        confirmed yet waits for it too. The segments are opened now, as they are at this position,
        and read on a thread, so the loop serves on meanwhile; records written meanwhile wait
        behind the snapshot on the link. Each successor's link gets its own snapshot, read in turn."""
        loop = asyncio.get_running_loop()
        served = _commands(self.broker)
        snapshot = self._reader.submit(read_snapshot, self._segment_files(), link.node, frozenset(slots))

        def read(_: Future[bytes]) -> None:
            link.drain()
            if snapshot.exception() is None:
                log.info(
                    "while %d commands were served, read and sent a snapshot of %d slots (%d bytes) to %s",
                    _commands(self.broker) - served,
                    len(slots),
                    len(snapshot.result()),
                    link.node,
                )

        def hand_back(done: Future[bytes]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the node stopped meanwhile
                loop.call_soon_threadsafe(read, done)

        link.send_when_read(snapshot, self._written)
        link.snapshots.append((self._written, frozenset(slots)))
        snapshot.add_done_callback(hand_back)
        for _, nodes in self._pending:
            nodes.add(link.node)
        self._pending.append((self._written, {link.node}))

    def _segment_files(self) -> list[tuple[int, int | None]]:
        """Every segment opened now (a compaction or deletion that replaces one later leaves this
        file as it is), with how many of its bytes to read: the tail's written part, the others whole."""
        tail = self.store.tail()
        files: list[tuple[int, int | None]] = []
        for path in self.store.segments():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # deleted since the listing: it held only messages done
            files.append((fd, tail[1] if tail is not None and tail[0] == path else None))
        return files

    # -- the core's log, through here --------------------------------------------------------------

    def write(self, data: memoryview, new_segment: bool) -> None:
        """The core's records of one pass: to the store, then each successor its share (a successor
        whose connection is being made gets them in its snapshot, read from the store once it is
        ready; they wait for it)."""
        self.store.write(data, new_segment)
        self._written += len(data)
        if self.store.fsync != "always":
            self._local = self._written
        waiting: set[str] = set()
        for node, parts in self._splitter.split(data).items():
            link = self._links.get(node)
            if link is not None and link.ready:
                link.send(b"".join(parts), self._written)
            waiting.add(node)
        self._pending.append((self._written, waiting))

    def sync(self, position: int) -> None:
        """The core asks for ``position`` to be confirmed: synced first under --fsync always."""
        if self.store.fsync == "always":
            self.store.sync(position)
        else:
            self._release_soon()

    def _release_soon(self) -> None:
        # never from inside the core's own call (on_log, on_sync): log_synced re-enters it
        asyncio.get_running_loop().call_soon(self.release)

    def _synced(self, position: int) -> None:
        if self.store.fsync == "always":
            self._local = max(self._local, position)
            self.release()

    def release(self) -> None:
        """Tell the core how far the log is confirmed: on disk as --fsync says, and at every
        successor that got records up to there. While fewer successors are live than
        --min-replicas, nothing more is: what waits, waits for the successors that come."""
        if self._short:
            return
        released = self._released
        while self._pending:
            position, nodes = self._pending[0]
            if position > self._local:
                break
            if any(node not in self._links or self._links[node].acked < position for node in nodes):
                break
            self._pending.pop(0)
            released = position
        if not self._pending:
            released = max(released, min(self._local, self._written))
        if released > self._released:
            self._released = released
            assert self.store.confirmed is not None  # attached before this sender
            self.store.confirmed.confirmed(released)

    def stop(self) -> None:
        """Close every link (the node stops)."""
        self._stopping = True
        self._reader.shutdown(wait=False)
        for link in self._links.values():
            link.close()
        self._links.clear()


def read_snapshot(files: list[tuple[int, int | None]], node: str, slots: frozenset[int]) -> bytes:
    """The records of segment ``files`` (descriptor, bytes to read or None for all) that ``node``
    gets for ``slots``: their PUBLISH records, and every DONE and DELIVERED. Runs on a thread;
    closes the files."""
    parts: list[memoryview] = []
    try:
        for fd, size in files:
            data = os.pread(fd, os.fstat(fd).st_size if size is None else size, 0)[len(HEADER) :]
            chosen = split_records(data, lambda slot: (node,) if slot in slots else (), (node,))
            parts.extend(chosen.get(node, []))
    finally:
        for fd, _ in files:
            os.close(fd)
    return b"".join(parts)


def _commands(broker: Broker) -> int:
    """How many commands the core has run (a gauge of whether the loop served meanwhile)."""
    return sum(broker.stats()["commands"].values())


# An owner's replica file is written anew from what memory holds once it is this many bytes and
# REWRITE_RATIO times more than that: appends stay one write each, and the file stays within a
# bounded multiple of the messages not done even when they never all are at once.
REWRITE_MIN = 64 << 20
REWRITE_RATIO = 4
FILE_SUFFIX = ".log"
# a file being written anew, renamed over the owner's once it is whole: ``<owner>.log.new.<n>``, n
# counting (under --fsync always one may still wait for its sync when the next is written)
FRESH_SUFFIX = FILE_SUFFIX + ".new."


class ReplicaStore:
    """The successor's half: per owner, the messages it replicated that are not done yet, in log
    order, with the last ``DELIVERED`` record of each, and the file under ``directory`` each
    owner's records are appended to (synced before they are confirmed under --fsync always, within
    a second under everysec), which ``load`` reads back at a start."""

    def __init__(self, directory: Path, fsync: str) -> None:
        self.directory = directory
        self.fsync = fsync
        # per owner, its messages not done, each with its last DELIVERED record
        self.messages: dict[str, ReplicaIndex] = {}
        self._files: dict[str, int] = {}
        self._sizes: dict[str, int] = {}  # the bytes in each owner's file
        # owners whose copy was read back at the start and has not been replaced by a snapshot since
        self._loaded: set[str] = set()
        self._written_anew = 0  # files written anew so far (each one's name is new)
        self.syncs = 0  # fdatasyncs of replica files done
        self._counting = threading.Lock()  # a sync is counted on the thread that ends it
        # under everysec: the owners whose files were written since their last sync, whether a file
        # was renamed since the directory's, and the timer of the next sync
        self._unsynced: set[str] = set()
        self._renamed = False
        self._sync_timer: asyncio.TimerHandle | None = None
        # syncs, renames and closes, in order, off the loop
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-replica-sync")

    def _path(self, owner: str) -> Path:
        return self.directory / (quote(owner, safe="") + FILE_SUFFIX)

    def load(self) -> tuple[int, int]:
        """Read back the files a previous run left: each owner's messages not done, as they were
        when it stopped. A torn record at a file's end (the run was killed mid-write) is cut off
        with a warning. They stay until the owner's next snapshot replaces them, and only in the
        slots etcd still names this node for (``forget_unrecorded``). Returns (messages, owners
        they are of)."""
        if not self.directory.is_dir():
            return 0, 0
        for fresh in self.directory.glob("*" + FRESH_SUFFIX + "*"):
            fresh.unlink()  # a file written anew that a crash left half done: the old one stands
        messages = 0
        for path in sorted(self.directory.glob("*" + FILE_SUFFIX)):
            owner = unquote(path.name[: -len(FILE_SUFFIX)])
            data = path.read_bytes()
            index = ReplicaIndex()
            whole = index.keep(data)
            if not index:
                path.unlink()  # nothing left of this owner's: no file until it replicates here again
                continue
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            if whole < len(data):
                log.warning(
                    "%s: cut off a torn record at offset %d (%d bytes)", path, whole, len(data) - whole
                )
                os.ftruncate(fd, whole)
            self.messages[owner], self._files[owner], self._sizes[owner] = index, fd, whole
            self._loaded.add(owner)
            messages += len(index)
            self._bound(owner)
        return messages, len(self._loaded)

    def open(self, owner: str) -> None:
        """A new connection from ``owner``: it starts with a snapshot (``replace``). What it sent
        before is kept until then, in memory and in its file: if the owner dies first, this copy
        holds every message it confirmed (it confirmed none without this node while this node was
        its successor)."""
        if owner in self._files:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(owner), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._files[owner], self._sizes[owner] = fd, os.fstat(fd).st_size

    def replace(self, owner: str, snapshot: bytes) -> None:
        """``owner``'s snapshot came whole: it replaces what this node held of it, in memory and
        (written anew) on disk."""
        self._loaded.discard(owner)
        self._reset(owner, snapshot)
        self._bound(owner)

    def keep(self, owner: str, chunk: bytes) -> None:
        """Records from ``owner``: indexed in memory (``ReplicaIndex``: the messages not done, each by
        where its record is in ``chunk``, and where its last ``DELIVERED`` record is) and appended
        to its file."""
        index = self.messages.get(owner)
        if index is None:
            index = self.messages[owner] = ReplicaIndex()
        index.keep(chunk)
        fd = self._files.get(owner)
        if fd is not None:
            if index:
                _write_all(fd, chunk)
                self._sizes[owner] += len(chunk)
                self._written(owner)
            self._bound(owner)

    def _bound(self, owner: str) -> None:
        """Keep ``owner``'s file in step with its messages not done: emptied when there are none,
        written anew from them once it has grown REWRITE_RATIO times larger (and REWRITE_MIN)."""
        fd = self._files.get(owner)
        if fd is None:
            return
        index = self.messages[owner]
        if not index:
            if self._sizes[owner]:
                os.ftruncate(fd, 0)  # everything done: the file starts again
                self._sizes[owner] = 0
                self._written(owner)
        elif self._sizes[owner] > max(REWRITE_MIN, REWRITE_RATIO * index.nbytes):
            # indexed again from those records alone: the reads they came in are let go
            self._reset(owner, index.records())

    def _reset(self, owner: str, records: bytes) -> None:
        """``owner``'s copy becomes ``records`` alone: indexed anew, and its file replaced with one
        holding them, written beside it, then renamed over it (under --fsync always, on the sync
        thread once it is synced, before any later sync there confirms what follows). What comes
        next is appended to the new file."""
        index = self.messages[owner] = ReplicaIndex()
        index.keep(records)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(owner)
        self._written_anew += 1
        fresh = path.with_name(f"{path.name[: -len(FILE_SUFFIX)]}{FRESH_SUFFIX}{self._written_anew}")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        _write_all(fd, records)
        old = self._files.get(owner)
        self._files[owner], self._sizes[owner] = fd, len(records)
        if self.fsync == "always":
            self._syncer.submit(_settle_synced, fd, fresh, path).add_done_callback(self._synced)
        else:
            os.replace(fresh, path)
            self._renamed = True
            self._written(owner)
        if old is not None:
            self._syncer.submit(os.close, old)  # after the syncs already asked of it

    def figures(self) -> dict[str, int]:
        """What this node holds for other owners, for ``CLUSTER STATUS``: the owners with messages
        not done, those messages, the bytes of the replica files and the syncs of them so far."""
        return {
            "owners": sum(1 for index in self.messages.values() if index),
            "messages": sum(len(index) for index in self.messages.values()),
            "file_bytes": sum(self._sizes.values()),
            "syncs": self.syncs,
        }

    def confirm(self, owner: str, answer: Callable[[], None], fail: Callable[[], None]) -> None:
        """Call ``answer`` once what ``owner`` sent so far is as safe as --fsync says, or ``fail``
        when the sync failed (nothing is confirmed: the owner connects again, with a snapshot)."""
        fd = self._files.get(owner)
        if self.fsync != "always" or fd is None:
            answer()
            return
        loop = asyncio.get_running_loop()

        def synced(future: Future[None]) -> None:
            if future.exception() is not None:
                log.error("cannot sync the replica of %s: %s", owner, future.exception())
                loop.call_soon_threadsafe(fail)
            else:
                loop.call_soon_threadsafe(answer)

        done = self._syncer.submit(os.fdatasync, fd)
        done.add_done_callback(self._synced)
        done.add_done_callback(synced)

    def _synced(self, done: Future[None]) -> None:
        """After a sync (on the sync thread, or on the loop's when it was over already): counted
        when it worked."""
        if done.exception() is None:
            with self._counting:
                self.syncs += 1

    def _written(self, owner: str) -> None:
        """``owner``'s file changed: under everysec it is synced within a second (``_sync_written``)."""
        if self.fsync != "everysec":
            return
        self._unsynced.add(owner)
        if self._sync_timer is None:
            loop = asyncio.get_running_loop()
            self._sync_timer = loop.call_later(HOUSEKEEPING_INTERVAL, self._sync_written)

    def _sync_written(self) -> None:
        """Sync, on the sync thread, the files written since their last sync (and the directory after
        a rename), as the store syncs the log under everysec: a crash of the machine loses at most
        about the last second of what this node confirmed to owners."""
        self._sync_timer = None
        for owner in sorted(self._unsynced):
            fd = self._files.get(owner)
            if fd is not None:  # the file of the moment: one it replaced is closed after the syncs before
                self._syncer.submit(_sync_logged, fd, self._path(owner)).add_done_callback(self._synced)
        self._unsynced.clear()
        if self._renamed:
            self._renamed = False
            self._syncer.submit(sync_directory, self.directory)

    def take(self, slots: set[int], me: str) -> list[bytes]:
        """The messages of ``slots`` this node replicated for other owners, removed from the
        replica: per owner, the ``PUBLISH`` record of each in its log order, each followed by its
        last ``DELIVERED`` record if it has one (what ``Broker.take_over`` puts back)."""
        taken: list[bytes] = []
        for owner, index in self.messages.items():
            if owner != me:
                records = index.take(slots)
                if records:
                    taken.append(records)
                    self._bound(owner)
        return taken

    def forget_taken(
        self,
        owners: dict[int, str],
        copies: dict[int, tuple[str, tuple[str, ...]]],
        members: Iterable[str],
        me: str,
    ) -> None:
        """Drop the messages of owners that are gone (not in ``members``) in the slots another
        node serves now (``owners``: slot to owner, as etcd says) once etcd names nodes that hold
        all of that node's messages of the slot (``copies``): it took them over and replicates them
        as its own (with ``--replicas 2`` or more every successor of the dead owner held them, and
        only the first took them). Until then this copy may be the only one besides the new owner's."""
        live = set(members)
        for owner, index in self.messages.items():
            if owner in live or not index:
                continue
            taken = {
                slot
                for slot, node in owners.items()
                if node not in (me, owner)
                and (found := copies.get(slot)) is not None
                and found[0] == node
                and found[1]
            }
            self._forget(owner, taken, "another node took over")

    def forget_unrecorded(self, copies: dict[int, tuple[str, tuple[str, ...]]], me: str) -> None:
        """Drop, of each copy read back at the start (and not replaced by a snapshot since), the
        messages of the slots where etcd does not name this node among the owner's copies
        (``copies``: slot to owner and nodes, ``ClusterNode.copies``): the owner went on without
        this node (it is sending a snapshot, or another node took the slot over), so they are
        stale. The others are what this node holds for an owner that died with it."""
        for owner in sorted(self._loaded):
            stale = {
                slot
                for slot in range(SLOTS)
                if copies.get(slot, ("", ()))[0] != owner or me not in copies[slot][1]
            }
            self._forget(owner, stale, "etcd no longer names this node for")

    def _forget(self, owner: str, slots: set[int], why: str) -> None:
        """Drop ``owner``'s messages of ``slots`` (logged, with ``why``), in memory and in its file."""
        forgotten = self.messages[owner].forget(slots)
        if forgotten:
            log.info("dropped %d replicated messages of %s that %s", forgotten, owner, why)
            self._bound(owner)

    def close(self) -> None:
        """Finish the syncs and renames asked for (and under everysec, sync what was written since
        the last one), and close the files."""
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_written()
        self._syncer.shutdown(wait=True)
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def _write_all(fd: int, data: bytes) -> None:
    """Append all of ``data`` to ``fd`` (one write, unless the kernel takes less at once)."""
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])


def _sync_logged(fd: int, path: Path) -> None:
    """On the sync thread: sync one replica file under everysec; a failure is logged, and the next
    write to the file asks for another sync (its confirmations were given already, as the log's are
    under everysec)."""
    try:
        os.fdatasync(fd)
    except OSError as exc:
        log.error("cannot sync %s: %s", path, exc.strerror or exc)
        raise


def _settle_synced(fd: int, fresh: Path, path: Path) -> None:
    """On the sync thread: sync the file written anew, rename it over the owner's and sync the
    directory, so that a crash leaves the old file or the whole new one."""
    os.fdatasync(fd)
    os.replace(fresh, path)
    sync_directory(path.parent)


class ReplicaReceiver:
    """A connection that said ``CLUSTER REPLICATE <owner>``: its batches go to the replica store,
    and each read's batches are confirmed with the position of the last. The first batch is the
    owner's whole snapshot (``ReplicationSender.link_ready``): it replaces the store's copy."""

    def __init__(
        self, store: ReplicaStore, owner: str, reply: Callable[[bytes], None], close: Callable[[], None]
    ) -> None:
        self.store = store
        self.owner = owner
        self._reply = reply
        self._close = close
        self._inbuf = bytearray()
        self._snapshot_kept = False
        store.open(owner)

    def take(self, data: bytes | memoryview) -> None:
        """Bytes read from the owner."""
        self._inbuf += data
        pos = 0
        position = 0
        # the batches' records copied once, into one bytes object, from views of the buffer (all
        # released before the buffer is resized)
        with memoryview(self._inbuf) as view:
            parts: list[memoryview] = []
            while len(view) - pos >= BATCH.size:
                size, at = BATCH.unpack_from(view, pos)
                if len(view) - pos - BATCH.size < size:
                    break
                parts.append(view[pos + BATCH.size : pos + BATCH.size + size])
                pos += BATCH.size + size
                position = at
            # the connection's first batch is the owner's whole snapshot: it replaces the copy
            snapshot = bytes(parts[0]) if parts and not self._snapshot_kept else None
            chunk = b"".join(parts if snapshot is None else parts[1:])
            for part in parts:
                part.release()
        if not pos:
            return
        del self._inbuf[:pos]
        if snapshot is not None:
            self._snapshot_kept = True
            self.store.replace(self.owner, snapshot)
        if snapshot is None or chunk:
            self.store.keep(self.owner, chunk)
        self.store.confirm(self.owner, lambda: self._reply(ACK.pack(position)), self._close)
