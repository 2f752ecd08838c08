"""A broker that is one node of a cluster: ``Server`` with a ``ClusterNode`` and routed connections."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from pigeon.cluster.node import DEFAULT_TTL, ClusterNode
from pigeon.cluster.router import RoutedConnection
from pigeon.cluster.slots import slot_of
from pigeon.server.busiest import PAGE_MAX
from pigeon.server.protocol import Server, format_address

log = logging.getLogger("pigeon.cluster")


class ClusterServer(Server):
    """A ``Server`` that joins the cluster of ``endpoints`` (etcd) as ``node_name`` before it listens.

    ``advertise`` (``host:port``) is where clients and other nodes reach it; by default its own
    host and port. With ``node_port`` (0 picks a free one) the node also listens on that port of
    its host, and advertises it: the way to reach this very node when its client port is shared by
    several processes (``pigeon --workers``). The other keywords are ``Server``'s.
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
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
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
        )

    def new_connection(self, write_timeout: float) -> asyncio.BufferedProtocol:
        return RoutedConnection(self.broker, self._connections, write_timeout, self.logins, self.cluster)

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
        try:
            await self.cluster.start()
        except BaseException:
            await super().stop()
            raise

    async def stop(self, timeout: float = 5.0) -> None:
        """Leave the cluster (other nodes take the slots at once), then stop as ``Server`` does."""
        await self.cluster.stop()
        if self._node_listener is not None:
            self._node_listener.close()
        await super().stop(timeout)

    def cluster_status(self) -> dict[str, Any] | None:
        """The cluster as this node sees it (``ClusterNode.status``)."""
        return self.cluster.status()

    def busy_slots(self) -> set[int]:
        """The slots of every topic the core holds."""
        slots: set[int] = set()
        cursor = 0
        while True:
            page = self.broker.topics(cursor, PAGE_MAX)
            slots.update(slot_of(topic["name"].encode()) for topic in page["topics"])
            cursor = page["next"]
            if cursor == 0:
                return slots

    def _lease_lost(self) -> None:
        """This node serves no slot any more: its clients reconnect, to whichever node serves them."""
        asyncio.get_running_loop().call_soon(self._drop_clients)

    def _drop_clients(self) -> None:
        for conn in list(self._connections.values()):
            conn.abort()
