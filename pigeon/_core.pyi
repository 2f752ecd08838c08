"""Type stubs of the Cython core (pigeon/_core.pyx)."""

from collections.abc import Callable
from typing import Any

COMMAND_NAMES: tuple[str, ...]
ERROR_NAMES: tuple[str, ...]

class Broker:
    """All broker state: connections, topics, subscriptions and backlogs."""

    on_warning: Callable[[str], object] | None
    """Called with a sentence for rare events an operator should see (a topic's backlog filling up)."""

    def __init__(
        self,
        *,
        max_line: int = ...,
        max_backlog: int = ...,
        max_connections: int = ...,
        max_memory: int = ...,
        max_subscriptions: int = ...,
        max_topics: int = ...,
        max_pending: int = ...,
        idle_ticks: int = ...,
        out_batch: int = ...,
    ) -> None: ...
    def open(
        self,
        writer: Callable[[bytes], object],
        peer: str | None = None,
        pending: Callable[[], int] | None = None,
        closer: Callable[[str, bool], object] | None = None,
    ) -> int:
        """Register a new connection; ``writer(bytes)`` receives its output. Returns its handle.

        ``peer`` is the client's address; ``pending()`` the output bytes buffered past the core;
        ``closer(reason, flush)`` is called when the core itself ends the connection.
        """
    def get_buffer(self, handle: int) -> memoryview:
        """A writable view to read the connection's next bytes into."""
    def buffer_updated(self, handle: int, nbytes: int) -> bool:
        """Process bytes read into the view; False when the connection must be closed."""
    def feed(self, handle: int, data: bytes) -> bool:
        """Process bytes read from the connection (a copying ``buffer_updated``)."""
    def pause(self, handle: int) -> None:
        """The connection's transport is full: skip it in every rotation, keep its output in the core."""
    def resume(self, handle: int) -> None:
        """The connection can take output again: hand it what was kept, deliver backlogs it can serve."""
    def close(self, handle: int) -> None:
        """The connection is gone: give back messages it was never handed, leave every rotation, free it."""
    def tick(self) -> None:
        """Advance the idle clock: close connections that sent nothing for more than idle_ticks ticks."""
    def client_id(self, handle: int) -> str | None:
        """The id CONNECT gave this connection, or None before CONNECT."""
    def topic_info(self, topic: bytes) -> tuple[int, int] | None:
        """``(subscribers, backlog_messages)`` for a topic, or None if the broker holds no such topic."""
    def stats(self) -> dict[str, Any]:
        """Server-wide counters and gauges: ints, dicts of ints by kind, and the uptime in seconds."""
    def topics(self) -> list[dict[str, Any]]:
        """Every topic: name, subscribers, backlog depth, published, delivered."""
    def connections(self) -> list[dict[str, Any]]:
        """Every open connection: handle, client id, address, subscriptions, traffic, age."""
    @property
    def max_line_length(self) -> int:
        """The longest accepted command line, in bytes."""
    @property
    def max_backlog_messages(self) -> int:
        """How many messages one topic's backlog holds at most."""
