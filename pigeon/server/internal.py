"""A connection of the core's own, with no socket: how a node takes messages out of its core by
the protocol, exactly as a client would, so the core records them as done in its log."""

from __future__ import annotations

import asyncio
import logging
import time

from pigeon._core import Broker

log = logging.getLogger("pigeon")

# How often a drain looks whether its topics are empty, and for how long at most.
DRAIN_POLL = 0.05
DRAIN_TIMEOUT = 30.0
# The user an internal connection is, as the core shows it (STATS CONNECTIONS, as its peer is
# "internal"): granted by the server itself, it needs no entry in the users file.
INTERNAL_USER = "internal"


class InternalClient:
    """One core connection, speaking protocol 2, whose output goes nowhere but here.

    ``drain`` subscribes to topics (a plain subscription: what it is handed is done) and closes
    once they are empty.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._client_id = b""
        self.handle = broker.open(self._output, "internal")
        # the server's own connection: an identity vouched for, allowed everything, so that a bare
        # CONNECT is answered where logins are required too (--users: else AUTH_REQUIRED, and what
        # it was to put back or take out would be lost)
        broker.grant(self.handle, INTERNAL_USER, [], [], admin=True)
        broker.feed(self.handle, b"CONNECT\nHELLO 2\n")
        if not self._client_id:
            raise RuntimeError("the core did not answer CONNECT on an internal connection")

    def _output(self, data: bytes) -> None:
        if not self._client_id and data.startswith(b"CONNECTED "):
            self._client_id = data.split(None, 2)[1]
        for line in data.split(b"\n"):
            if line.startswith(b"ERROR"):
                log.warning("an internal connection got %s", line[:200].decode(errors="replace"))

    def drain(self, topics: list[bytes]) -> None:
        """Take every message of ``topics`` (they are done), then close."""
        self._broker.feed(self.handle, b"".join(b"SUBSCRIBE %s %s\n" % (self._client_id, t) for t in topics))
        asyncio.get_running_loop().create_task(self._close_when_empty(topics))

    async def _close_when_empty(self, topics: list[bytes]) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            infos = [self._broker.topic_info(topic) for topic in topics]
            if all(info is None or info[1] == 0 for info in infos):
                break
            await asyncio.sleep(DRAIN_POLL)
        self._broker.close(self.handle)
