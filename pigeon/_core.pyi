"""Type stubs of the Cython core (pigeon/_core.pyx)."""

from collections.abc import Callable

class Broker:
    """All broker state: connections, topics, subscriptions and backlogs."""

    def __init__(self, *, max_line: int = ..., max_backlog: int = ...) -> None: ...
    def open(self, writer: Callable[[bytes], object]) -> int:
        """Register a new connection; ``writer(bytes)`` receives its output. Returns its handle."""
    def get_buffer(self, handle: int) -> memoryview:
        """A writable view to read the connection's next bytes into."""
    def buffer_updated(self, handle: int, nbytes: int) -> bool:
        """Process bytes read into the view; False when the connection must be closed."""
    def feed(self, handle: int, data: bytes) -> bool:
        """Process bytes read from the connection (a copying ``buffer_updated``)."""
    def pause(self, handle: int) -> None:
        """The connection's transport is full: skip it in every rotation."""
    def resume(self, handle: int) -> None:
        """The connection can take output again: deliver backlogs it can serve."""
    def close(self, handle: int) -> None:
        """The connection is gone: leave every rotation and free its state."""
    def client_id(self, handle: int) -> str | None:
        """The id CONNECT gave this connection, or None before CONNECT."""
    def topic_info(self, topic: bytes) -> tuple[int, int] | None:
        """``(subscribers, backlog_messages)`` for a topic, or None if the broker holds no such topic."""
    def stats(self) -> dict[str, int]:
        """Server-wide counters and gauges."""
    @property
    def max_line_length(self) -> int:
        """The longest accepted command line, in bytes."""
    @property
    def max_backlog_messages(self) -> int:
        """How many messages one topic's backlog holds at most."""
