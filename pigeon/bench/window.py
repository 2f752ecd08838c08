"""End-to-end flow control for the load generator's publishers.

A publisher that never waits fills the broker's queue for a slower subscriber, and each broker
then does something different with the surplus: Pigeon stops reading the publisher, nats-server
2.9 stalls it for 100 ms to 1 s once a subscriber has 32 MiB pending (and drops the subscriber
as a slow consumer at 64 MiB), Redis grows the subscriber's output buffer until its
client-output-buffer-limit disconnects it. The figures would then measure those policies and
tens of megabytes of cache-cold buffers, not the broker's routing. So every publisher stays at
most ``limit`` messages ahead of what the subscribers of its topic have received, counted by the
generator itself, the same way for every protocol, whether or not it acknowledges publishes.
"""

from __future__ import annotations

import threading

PUBLISH_BATCH = 500  # messages per sendall
IN_FLIGHT = 50_000  # messages a topic's publishers may be ahead of its subscribers


class Window:
    """Published minus delivered messages of one topic, kept at most ``limit``; ``limit`` 0 is no bound."""

    def __init__(self, limit: int, lines_per_message: int) -> None:
        self.limit = limit
        self._lines_per_message = max(1, lines_per_message)
        self._sent = 0
        self._lines = 0
        self._waiters = 0
        self._changed = threading.Condition(threading.Lock())

    def delivered(self, lines: int) -> None:
        """A subscriber of the topic received ``lines`` more lines."""
        with self._changed:
            self._lines += lines
            if self._waiters:
                self._changed.notify_all()

    def acquire(self, messages: int, stop: threading.Event) -> bool:
        """Wait until ``messages`` more fit in the window and count them sent; False once ``stop`` is set."""
        with self._changed:
            while self.limit and self._sent + messages - self._lines // self._lines_per_message > self.limit:
                if stop.is_set():
                    return False
                self._waiters += 1
                # a short timeout: the stop event does not notify this condition
                self._changed.wait(0.1)
                self._waiters -= 1
            self._sent += messages
        return not stop.is_set()
