"""A broker that is one node of a cluster: ``Server`` with a ``ClusterNode`` and routed connections."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from functools import partial
from pathlib import Path
from typing import Any

from pigeon.cluster.node import DEFAULT_TTL, ClusterNode
from pigeon.cluster.replication import ReplicaStore, ReplicationSender
from pigeon.cluster.router import RoutedConnection
from pigeon.cluster.slots import slot_of
from pigeon.server.busiest import PAGE_MAX
from pigeon.server.confirmed import ConfirmedLog
from pigeon.server.internal import InternalClient
from pigeon.server.protocol import Server, _Connection, format_address
from pigeon.server.users import UsersError

log = logging.getLogger("pigeon.cluster")

# where this node's own password (--node-user) is read from when no --node-password-file is given
NODE_PASSWORD_ENV = "PIGEON_NODE_PASSWORD"


class ClusterServer(Server):
    """A ``Server`` that joins the cluster of ``endpoints`` (etcd) as ``node_name`` before it listens.

    ``advertise`` (``host:port``) is where clients and other nodes reach it; by default its own
    host and port. With ``node_port`` (0 picks a free one) the node also listens on that port of
    its host, and advertises it: the way to reach this very node when its client port is shared by
    several processes (``pigeon --workers``). With ``replicas=N`` (and a ``data_dir``) each durable
    topic's messages are copied to its slot's N successors before ``PUBLISHED`` (docs/cluster.md,
    "Replication"); with ``min_replicas=M`` a durable ``PUBLISH`` is refused while fewer than M
    successors are live. ``node_login`` (user, password) is what this node logs in as on other nodes
    (``--node-user``): needed for replicas when ``users_file`` requires logins, and checked against
    it. ``node_tls`` is the client context for this node's connections to the others (given when
    it speaks TLS, ``tls``: so do they). The other keywords are ``Server``'s.
    """

    def __init__(
        self,
        *args: Any,
        endpoints: list[tuple[str, int]],
        node_name: str,
        advertise: str | None = None,
        node_port: int | None = None,
        lease_ttl: float = DEFAULT_TTL,
        cluster_name: str = "pigeon",
        replicas: int = 0,
        min_replicas: int = 0,
        node_login: tuple[str, str] | None = None,
        node_tls: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        if replicas < 0:
            raise ValueError("--replicas must be 0 or more")
        if not 0 <= min_replicas <= replicas:
            raise ValueError("--min-replicas must be 0 to --replicas")
        if replicas and kwargs.get("data_dir") is None:
            raise ValueError("--replicas needs --data-dir: only durable topics are replicated")
        self._replicating = replicas  # read by core_fsync, from Server.__init__
        self._min_replicas = min_replicas
        super().__init__(*args, **kwargs)
        self.replicas: ReplicaStore | None = None
        self._sender: ReplicationSender | None = None
        self._node_login = b""
        if node_login is not None:
            self._node_login = self._check_node_login(*node_login)
        elif replicas and self.logins is not None:
            raise UsersError(
                "--replicas with --users needs --node-user (a user with cluster = true) and its password "
                f"(--node-password-file or {NODE_PASSWORD_ENV}): other nodes require a login to replicate"
            )
        if replicas:
            self.replicas = ReplicaStore(
                Path(kwargs["data_dir"]) / "replicas", kwargs.get("fsync", "everysec")
            )
        self._advertise = advertise
        self._node_port = node_port
        self._node_listener: asyncio.Server | None = None
        self.cluster = ClusterNode(
            endpoints,
            node_name,
            {},
            ttl=lease_ttl,
            cluster=cluster_name,
            busy_slots=self.busy_slots,
            on_lost=self._lease_lost,
            on_members=self._members_changed,
            on_taking=self._taking,
            tls=node_tls,
            copies_of=self._copies_of if replicas else None,
            on_copies=self._copies_recorded,
            replica_figures=None if self.replicas is None else self.replicas.figures,
        )

    def _check_node_login(self, user: str, password: str) -> bytes:
        """The ``CONNECT`` line of this node's own login, checked against the users file when this
        node has one (every node should have the same): UsersError when it would be refused."""
        if not user or not password or len(f"{user} {password}".split()) != 2:
            raise UsersError("--node-user and its password must be one word each, not empty")
        if self.logins is not None:
            found = self.logins.users.check(user.encode(), password.encode())
            if found is None:
                raise UsersError(f"--node-user {user!r}: no such user, or not that password")
            if not found.may_replicate:
                raise UsersError(f"--node-user {user!r} may not replicate: give it cluster = true")
        return f"CONNECT {user} {password}\n".encode()

    def core_fsync(self, fsync: str) -> str:
        """With replicas, the core holds every ``PUBLISHED`` until the replication sender calls
        ``broker.log_synced`` (the store still syncs as ``fsync`` says)."""
        return "always" if self._replicating else fsync

    def new_connection(self, write_timeout: float) -> asyncio.BufferedProtocol:
        return RoutedConnection(
            self.broker,
            self._connections,
            write_timeout,
            self.logins,
            self.cluster,
            self.replicas,
            confirmed=self._replies_wait_for_log(),
        )

    def _replies_wait_for_log(self) -> ConfirmedLog | None:
        """How far the log is confirmed, when the core holds each ``PUBLISHED`` until it is
        (``--fsync always``, ``--replicas``); None when a reply waits only for its record's write,
        which the core's flush does."""
        if self.store is None or self.core_fsync(self.store.fsync) != "always":
            return None
        return self.store.confirmed

    async def start(self) -> None:
        """Listen, then join the cluster (the member key names the port actually bound)."""
        await super().start()
        port = self.port
        if self._node_port is not None:
            self._node_listener = await asyncio.get_running_loop().create_server(
                partial(self.new_connection, self.broker.limits["write_timeout"]),
                self.host,
                self._node_port,
                reuse_address=True,
                ssl=self.tls,
            )
            port = int(self._node_listener.sockets[0].getsockname()[1])
        self.cluster.info["address"] = self._advertise or format_address((self.host, port))
        if self.replicas is not None:
            await self._start_replication()
        try:
            await self.cluster.start()
        except BaseException:
            await super().stop()
            raise
        if self.replicas is not None:
            self._drop_stale()

    async def _start_replication(self) -> None:
        """Read back the replicas this node kept for other owners; wait until the log's messages are
        back (what is stale is known only then), then put the replication sender between the core
        and the store."""
        assert self.replicas is not None
        started = time.perf_counter()
        messages, owners = self.replicas.load()
        if owners:
            log.info(
                "read back %d replicated messages of %d owners from %s in %.3f s",
                messages,
                owners,
                self.replicas.directory,
                time.perf_counter() - started,
            )
        while self.broker.recovering:
            await asyncio.sleep(0.01)
        assert self.store is not None
        self._sender = ReplicationSender(
            self.cluster.name,
            self.broker,
            self.store,
            lambda: self.cluster.members,
            self.cluster.connect,
            login=self._node_login,
            replicas=self._replicating,
            min_replicas=self._min_replicas,
            record=self.cluster.record_copies,
            recorded=self.cluster.recorded,
        )
        self._sender.attach()

    def _copies_of(self, slot: int) -> tuple[str, ...]:
        """The nodes that hold every message of ``slot`` (``ReplicationSender.copies_of``)."""
        return () if self._sender is None else self._sender.copies_of(slot)

    def _copies_recorded(self) -> None:
        if self._sender is not None:
            self._sender.copies_recorded()

    def _drop_stale(self) -> None:
        """A node that comes back after its slots were taken over holds stale copies of their
        messages (the successor delivered them meanwhile): drop every topic of a slot another node
        owns now. The slots still free, or still held by this node's previous lease, keep theirs."""
        stale = [
            topic
            for topic in self._topics()
            if self.cluster.owners.get(slot_of(topic)) not in (None, self.cluster.name)
        ]
        if stale:
            log.info("dropping the messages of %d topics whose slots other nodes took over", len(stale))
            InternalClient(self.broker).drain(stale)

    def _members_changed(self) -> None:
        if self._sender is not None:
            self._sender.members_changed()
        # each client's pattern subscriptions go to the members that lack them (docs/cluster.md)
        for conn in list(self._connections.values()):
            if isinstance(conn, RoutedConnection):
                conn.members_changed()
        if self.replicas is not None:
            self.replicas.forget_taken(
                self.cluster.owners, self.cluster.copies, self.cluster.members, self.cluster.name
            )
            self.replicas.forget_unrecorded(self.cluster.copies, self.cluster.name)

    def _taking(self, slots: list[int]) -> None:
        """Before serving slots taken from a dead (or departed) owner: their replicated messages
        not done go to their topics (a group's copies to their group) first, in the owner's order,
        ahead of anything new, with their delivery attempts (``Broker.take_over``)."""
        if self.replicas is None:
            return
        started = time.perf_counter()
        messages = 0
        for records in self.replicas.take(set(slots), self.cluster.name):
            try:
                messages += self.broker.take_over(records)
            except (ValueError, MemoryError) as exc:
                log.error("could not take over replicated messages: %s", exc)
        if messages:
            assert self._sender is not None
            self._sender.took_over(slots)
            log.info(
                "took over %d replicated messages of %d slots in %.3f s",
                messages,
                len(slots),
                time.perf_counter() - started,
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Leave the cluster (other nodes take the slots at once), then stop as ``Server`` does."""
        if self._sender is not None:
            self._sender.stop()
        await self.cluster.stop()
        if self.replicas is not None:
            self.replicas.close()
        if self._node_listener is not None:
            self._node_listener.close()
        await super().stop(timeout)

    def cluster_status(self) -> dict[str, Any] | None:
        """The cluster as this node sees it (``ClusterNode.status``)."""
        return self.cluster.status()

    def busy_slots(self) -> set[int]:
        """The slots of every topic the core holds."""
        return {slot_of(topic) for topic in self._topics()}

    def _topics(self) -> list[bytes]:
        """The name of every topic the core holds."""
        names: list[bytes] = []
        cursor = 0
        while True:
            page = self.broker.topics(cursor, PAGE_MAX)
            names.extend(topic["name"].encode() for topic in page["topics"])
            cursor = page["next"]
            if cursor == 0:
                return names

    def _lease_lost(self) -> None:
        """This node serves no slot any more: its clients reconnect, to whichever node serves them.
        Those connected now, closed just after (not from inside the routing that may have noticed):
        a client accepted meanwhile already finds the node serving nothing."""
        connections = list(self._connections.values())
        asyncio.get_running_loop().call_soon(self._drop_clients, connections)

    def _drop_clients(self, connections: list[_Connection]) -> None:
        for conn in connections:
            conn.abort()
