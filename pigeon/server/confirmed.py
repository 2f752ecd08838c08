"""How far the log is confirmed: the one caller of ``Broker.log_synced``.

Under ``--fsync always`` (and on a cluster node with ``--replicas``, whose core runs as if it were)
the core holds each ``PUBLISHED`` until the log is confirmed up to its record: synced by the store
(``pigeon.server.store``), and held by every successor (``pigeon.cluster.replication``). Both tell
``ConfirmedLog``, which tells the core and wakes whoever waits for a position (a cluster node's
router, which must not answer a command itself before the core's held replies to earlier ones).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from pigeon._core import Broker


class ConfirmedLog:
    """The log position confirmed so far, and the futures waiting for one not confirmed yet."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.position = int(broker.log_state["synced"])
        # (position, order of arrival, future): the heap's least position first; the order breaks
        # ties, as futures do not compare
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    def confirmed(self, position: int) -> None:
        """The log is confirmed up to ``position``: the core's replies waiting for it go (first), then
        the futures waiting for it are resolved."""
        self._broker.log_synced(position)
        self.position = max(self.position, position)
        while self._waiting and self._waiting[0][0] <= self.position:
            future = heapq.heappop(self._waiting)[2]
            if not future.done():  # cancelled: its waiter has gone
                future.set_result(None)

    def wait_for(self, position: int) -> asyncio.Future[None]:
        """A future resolved once the log is confirmed up to ``position`` (at once if it is)."""
        future = asyncio.get_running_loop().create_future()
        if position <= self.position:
            future.set_result(None)
        else:
            heapq.heappush(self._waiting, (position, next(self._arrivals), future))
        return future
