"""A connection of the core's own, with no socket: how a node puts messages into its core (or takes
them out) by the protocol, exactly as a client would, so the core records them in its log."""

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

    ``publish`` sends messages and closes once every ``PUBLISHED`` came back; ``drain`` subscribes
    to topics (a plain subscription: what it is handed is done) and closes once they are empty.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._expected = 0
        self._replies = 0
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
            if line.startswith(b"PUBLISHED"):
                self._replies += 1
            elif line.startswith(b"ERROR"):
                log.warning("an internal connection got %s", line[:200].decode(errors="replace"))
        if self._expected and self._replies >= self._expected:
            self._expected = 0
            asyncio.get_running_loop().call_soon(self._broker.close, self.handle)

    def publish(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Publish each (topic, message) in order; a consumer group's copy (a topic field with a
        space) is left out: groups are not replicated in this version."""
        frames = [
            b"PUB %s %s %d\n%s\n" % (self._client_id, topic, len(message), message)
            for topic, message in messages
            if b" " not in topic
        ]
        if len(frames) < len(messages):
            log.warning("left out %d consumer group copies (not replicated)", len(messages) - len(frames))
        if not frames:
            self._broker.close(self.handle)
            return
        self._expected = len(frames)
        self._broker.feed(self.handle, b"".join(frames))

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
