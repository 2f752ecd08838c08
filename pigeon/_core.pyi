"""Type stubs of the Cython core (pigeon/_core.pyx and its parts in pigeon/core/)."""

from collections.abc import Callable, Sequence
from mmap import mmap
from typing import Any

COMMAND_NAMES: tuple[str, ...]
"""Command kinds, in the order of ``stats()["commands"]``."""
ERROR_CODES: tuple[str, ...]
"""The code of each error kind, as sent on the wire: ``ERROR <CODE> <text>``."""
ERROR_NAMES: tuple[str, ...]
"""The same kinds in lower case, as the keys of ``stats()["errors"]``."""
LIMIT_DEFAULTS: dict[str, Any]
"""Every limit's default, by keyword (ints, and seconds as floats for the timeouts)."""
LIMIT_NAMES: tuple[str, ...]
"""The limit keywords ``Broker`` takes."""
TOPIC_MAX_BYTES: int
"""The longest topic name the core accepts (pigeon.protocol.TOPIC_MAX)."""
PROTOCOL_VERSION: int
"""The protocol version HELLO reports."""
INPUT_SLACK_BYTES: int
"""Bytes of a connection's unfinished input kept even when memory is full (``Broker.hold_input``)."""
INVISIBLE_UNICODE_VERSION: str
"""The Unicode version of the table of characters refused in topic names."""
FSYNC_MODES: tuple[str, ...]
"""The --fsync policies: no, everysec, always."""
LOG_SEGMENT: int
"""Bytes of a log segment file before the next one starts (--data-dir)."""

def record_checksum(data: bytes | memoryview, hardware: bool = True) -> int:
    """The CRC-32C a log record's body carries; ``hardware=False`` uses the fallback loop."""

def checksum_in_hardware() -> bool:
    """Whether this CPU computes CRC-32C with its own instruction."""

def segment_summary(
    data: bytes | memoryview,
) -> tuple[list[tuple[int, int]], int, list[tuple[int, int]], int]:
    """A segment's records (after the header): its PUBLISH seqs as runs, how many, its DONE runs,
    how many DONE and DELIVERED records (compaction)."""

def segment_kept(data: bytes | memoryview, done: bytes | memoryview) -> list[tuple[int, int]]:
    """The (start, end) parts of a segment's records (after the header) that compaction keeps: the
    PUBLISH and DELIVERED records of messages not in ``done`` (runs: the bytes of an ``array('Q')``)."""

def keep_heap(mmap_threshold: int = ..., trim_threshold: int = ...) -> bool:
    """Keep output batches on glibc's heap instead of fresh pages (the server calls it once);
    False where the C library is not glibc."""

class Broker:
    """All broker state: connections, topics, subscriptions, backlogs and message records."""

    on_output: Callable[[], object] | None
    """Called once when ``flush()`` is due; None runs it before each call returns (tests)."""
    on_close: Callable[[int, str, bool], object] | None
    """``(handle, reason, flush)``: the core ended a connection; close its socket (after its output: flush).

    ``reason`` is empty when the client asked (DISCONNECT).
    """
    on_reading: Callable[[int, bool], object] | None
    """``(handle, reading)``: stop (False) or restart (True) reading a connection's socket."""
    on_warning: Callable[[str], object] | None
    """Called with a sentence for rare events an operator should see (a topic's backlog filling up)."""
    on_timer: Callable[[float], object] | None
    """``(seconds)``: call ``run_timers()`` that many seconds from now (the next NACK delay is due)."""
    on_log: Callable[[memoryview, bool], object] | None
    """``(records, new_segment)``: append these records to the log (in a new segment when asked);
    raise OSError when they cannot be written, and the core tries again at the next flush."""
    on_sync: Callable[[int], object] | None
    """``(position)``: sync the log up to ``position`` off the loop, then call ``log_synced(position)``."""
    on_auth: Callable[[int, bytes, bytes], object] | None
    """``(handle, user, password)``: a ``CONNECT <user> <password>`` while auth is on. The connection is
    not read until ``auth_result(handle, ok)`` answers (call ``grant`` first); None fails every login."""
    log_disk: int
    """Bytes of the log on disk, as the store last said (--max-disk compares with it)."""

    def __init__(
        self,
        *,
        tick_interval: float = ...,
        durable: bool = ...,
        auth: bool = ...,
        tls: bool = ...,
        fsync: str = ...,
        log_segment: int = ...,
        max_line: int = ...,
        max_backlog: int = ...,
        max_connections: int = ...,
        max_memory: int = ...,
        max_subscriptions: int = ...,
        max_topics: int = ...,
        max_pending: int = ...,
        idle_timeout: float = ...,
        write_timeout: float = ...,
        out_batch: int = ...,
        default_prefetch: int = ...,
        ack_timeout: float = ...,
        max_deliveries: int = ...,
        max_disk: int = ...,
        max_payload: int = ...,
        max_backlog_bytes: int = ...,
        group_ttl: float = ...,
    ) -> None: ...
    def open(
        self,
        writer: Callable[[bytes], object],
        peer: str | None = None,
        transport_size: Callable[[], int] | None = None,
    ) -> int:
        """Register a new connection; ``writer(bytes)`` receives its output. Returns its handle."""
    def get_buffer(self, handle: int) -> memoryview:
        """A writable view to read the connection's next bytes into."""
    def buffer_updated(self, handle: int, nbytes: int) -> None:
        """Process bytes read into the view."""
    def feed(self, handle: int, data: bytes) -> bool:
        """Process bytes and flush (a copying ``buffer_updated``); False once the connection is closing."""
    def flush(self) -> None:
        """Hand every connection its pending output, then report connections the core closed."""
    def eof(self, handle: int) -> None:
        """The client sent its FIN: leave every rotation, give unsent messages back, hand the replies over."""
    def pause(self, handle: int) -> None:
        """The connection's transport is full: skip it in every rotation and stop reading it."""
    def resume(self, handle: int) -> None:
        """The connection can take output again: hand it what was kept, read it again."""
    def note_input(self, handle: int) -> None:
        """The connection sent input this core does not run (forwarded to another node): its
        ``--idle-timeout`` counts from now."""
    def hold_input(self, handle: int, nbytes: int) -> bool:
        """The cluster's router now holds ``nbytes`` of this connection's unfinished input: counted
        against ``--max-memory`` until the next call or the close. False, and nothing changes, when the
        hold would grow past ``INPUT_SLACK_BYTES`` and the limit (the router refuses with MEMORY_FULL)."""
    def keep_open_when_idle(self, handle: int) -> None:
        """Never close this connection for ``--idle-timeout`` (another node's connection on behalf of a
        client of its own, or its replication stream: the client is checked on its own node)."""
    def close(self, handle: int) -> None:
        """The connection is gone: give back messages it was never handed, leave every rotation, free it."""
    def run_timers(self) -> None:
        """Give back the NACKed messages whose delay is over."""
    def grant(
        self, handle: int, user: str, publish: Sequence[str], subscribe: Sequence[str], admin: bool = False
    ) -> None:
        """Set a connection's user and the topic patterns it may publish and subscribe to (NATS rules:
        ``*`` one token, ``>`` as the last token one or more; ``admin`` allows everything).

        Before CONNECT it presets the identity (a bare CONNECT then logs in as that user); after, it
        replaces the permissions and ends the subscriptions no longer allowed, as UNSUBSCRIBE does
        (each told through on_warning). ValueError for a malformed pattern, and nothing changes.
        """
    def auth_result(self, handle: int, ok: bool) -> None:
        """Answer the pending ``CONNECT <user> <password>``: ``CONNECTED <id>`` and the input goes on, or
        ``ERROR AUTH_FAILED`` and the connection closes. A handle that closed meanwhile: nothing (but its
        number may be reused: do not answer for a connection seen closed). RuntimeError from inside
        on_auth (answer once it has returned)."""
    def recover_segment(self) -> None:
        """The next ``recover()`` calls scan a new segment (call before each one, oldest first)."""
    def recover(
        self, data: bytes | memoryview | mmap, publish_checksums: bool = True
    ) -> tuple[int, str | None]:
        """Scan records: ``(offset, problem)``, how far they were sound and None or what is wrong there;
        without ``publish_checksums`` the PUBLISH records' checksums are left to ``recover_restore``."""
    def recover_scanned(self) -> int:
        """Every segment is scanned: the restore starts (PUBLISH waits until recover_finish); returns the
        bytes of records it walks."""
    def recover_restore(
        self, data: bytes | memoryview | mmap, limit: int, checksums: bool = False
    ) -> tuple[int, str | None]:
        """Put the messages not done of scanned records back in their topics, at most ``limit`` records,
        with ``checksums`` checking each PUBLISH record's first; returns ``(bytes walked, None or what is
        wrong with the record there)``."""
    def take_over(self, records: bytes | memoryview) -> int:
        """Put back another node's messages from its PUBLISH and DELIVERED records (in its log order), as a
        recovery does (each PUBLISH record's checksum checked as its message comes back), each as a new
        message of this log; returns how many came back. ValueError at a record not sound (the messages
        before a PUBLISH record whose checksum does not match came back)."""
    @property
    def recovering(self) -> bool:
        """Whether a restore is running."""
    def recover_finish(self) -> tuple[int, int, int, int]:
        """The restore is over: ``(messages, topics, records scanned, seq of the oldest message or 0)``."""
    def log_synced(self, position: int) -> None:
        """The store synced the log up to ``position``: replies waiting for it may go."""
    def log_replicas(self, live: int, needed: int) -> None:
        """``live`` successors hold copies, a PUBLISH needs ``needed``: below, NOT_ENOUGH_REPLICAS."""
    def log_wait(self, handle: int) -> int:
        """The log position this connection's output waits for (a held ``PUBLISHED``), 0 when none; once
        that output has gone it may still say the position, which is then confirmed."""
    def log_deletable(self) -> int:
        """How many of the oldest segments hold only done messages."""
    def log_deleted(self, n: int) -> None:
        """The store deleted the ``n`` oldest segments."""
    def log_compaction_started(self) -> None:
        """The store started a compaction pass (STATS says log_compacting until it ends)."""
    def log_compaction_ended(
        self, rewritten: int, removed: int, reclaimed: int, failed: bool, seconds: float
    ) -> None:
        """A compaction pass ended: what it rewrote, deleted and freed, whether an error stopped it."""
    @property
    def log_state(self) -> dict[str, Any]:
        """Positions appended, written and synced; live messages and bytes; segments and their live counts."""
    def tick(self) -> None:
        """Advance the clock by one tick_interval: idle, write and ack timeouts."""
    def client_id(self, handle: int) -> str | None:
        """The id CONNECT gave this connection, or None before CONNECT."""
    def subscribed(self, handle: int, topic: bytes, group: bytes | None = None) -> bool:
        """Whether the connection holds a subscription to ``topic`` (a topic or a pattern), in the
        consumer group ``group`` when given."""
    def topic_info(self, topic: bytes) -> tuple[int, int] | None:
        """``(subscribers, backlog_messages)`` for a topic, or None if the broker holds no such topic."""
    def stats(self) -> dict[str, Any]:
        """Server-wide counters and gauges: ints, dicts of ints by kind, and the uptime in seconds."""
    def topics(self, cursor: int = 0, count: int = 100) -> dict[str, Any]:
        """One page of topics: ``{"topics": [...], "next": cursor}``, next 0 at the end."""
    def connections(self, cursor: int = 0, count: int = 100) -> dict[str, Any]:
        """One page of connections: ``{"connections": [...], "next": cursor}``, next 0 at the end."""
    def groups(self, cursor: int = 0, count: int = 100) -> dict[str, Any]:
        """One page of consumer groups, newest first: ``{"groups": [...], "next": cursor}``, 0 at the end."""
    @property
    def limits(self) -> dict[str, Any]:
        """Every limit of this broker, by keyword."""
    @property
    def tick_interval(self) -> float:
        """Seconds between two ``tick()`` calls, as the server is to run them."""
    def _fail_allocation(self, n: int) -> None:
        """Tests: make the n-th allocation of the core from now fail (0 cancels)."""
