"""The asyncio layer: accepts TCP connections and moves bytes between sockets and the core.

Nothing here parses or routes: each read goes straight into the core's buffer
(``asyncio.BufferedProtocol``), and the core hands each affected connection its
output through ``transport.write``, once per pass of the event loop (the core
asks for that flush through ``on_output``). The core also says when to stop and
restart reading a connection (``on_reading``: its transport is full, or a
PUBLISH of its waits for flow control), which connections it ends
(``on_close``) and when its next NACK delay is due (``on_timer``); the clock's
ticks run its timeouts (idle, write, ack). With a users file, logins are
checked by ``pigeon.server.logins``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from pigeon._core import Broker
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT
from pigeon.server.limits import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_GROUP_TTL,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BACKLOG,
    DEFAULT_MAX_BACKLOG_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_SUBSCRIPTIONS,
    DEFAULT_MAX_TOPICS,
    DEFAULT_PREFETCH,
    DEFAULT_WRITE_TIMEOUT,
)
from pigeon.server.store import Recovered, Store, StoreError
from pigeon.server.tls import DEFAULT_HANDSHAKE_TIMEOUT, certificate_user

if TYPE_CHECKING:
    from pigeon.server.logins import Logins

log = logging.getLogger("pigeon")

# Connections the kernel queues before the loop accepts them: asyncio's default
# of 100 drops SYNs in a burst of connects, which clients see as 1 s stalls.
LISTEN_BACKLOG = 4096

# Seconds between two ticks of the core's clock, which runs the idle and write
# timeouts: a timeout fires up to one tick after it is due.
TICK_INTERVAL = 0.25

# A subscriber whose unsent output passes WRITE_HIGH is paused, and so skipped by
# every rotation, until it drains below WRITE_LOW.
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024


def format_address(peername: object) -> str:
    """``host:port`` for an IPv4 peer, ``[host]:port`` for IPv6, else the address as text."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or the name ``localhost``) can only be reached from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


class _Connection(asyncio.BufferedProtocol):
    """One client socket, tied to one core connection handle."""

    __slots__ = (
        "_broker",
        "_connections",
        "_deadline",
        "_handle",
        "_logins",
        "_transport",
        "_write_timeout",
        "host",
        "peer",
    )

    def __init__(
        self,
        broker: Broker,
        connections: dict[int, _Connection],
        write_timeout: float,
        logins: Logins | None,
    ) -> None:
        self._broker = broker
        self._connections = connections
        self._write_timeout = write_timeout
        self._logins = logins
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._handle = -1
        self.host = ""  # the peer's address
        self.peer = ""  # host:port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        peername = transport.get_extra_info("peername")
        self.host = str(peername[0]) if isinstance(peername, tuple) and peername else str(peername)
        self.peer = format_address(peername)
        self._handle = self._broker.open(self._write, self.peer, transport.get_write_buffer_size)
        self._connections[self._handle] = self
        if self._logins is not None:
            self._logins.opened(self._handle, self, transport)
        if log.isEnabledFor(logging.DEBUG):
            user = certificate_user(transport)
            by = f" (certificate of {user!r})" if user is not None else ""
            log.debug("connection %d opened from %s%s", self._handle, self.peer, by)

    def _write(self, data: bytes) -> None:
        # After a reset or once closing, transports drop writes without a word:
        # raising instead makes the core give the messages back to their topics.
        assert self._transport is not None
        if self._transport.is_closing():
            raise ConnectionResetError("transport is closing")
        self._transport.write(data)

    def closed_by_core(self, reason: str, flush: bool) -> None:
        """The core ended this connection: close the socket, after its output when ``flush``."""
        assert self._transport is not None
        if reason:
            log.warning("closing connection %d from %s: %s", self._handle, self.peer, reason)
        if flush:
            self.close_after_output()
        else:
            self._transport.abort()

    def close_after_output(self) -> None:
        """Close once the transport has sent what it holds, or abort after the write timeout."""
        assert self._transport is not None
        self._transport.close()
        if self._write_timeout > 0 and self._deadline is None:
            # a peer that does not read would hold a closing socket for ever
            self._deadline = asyncio.get_running_loop().call_later(self._write_timeout, self._give_up)

    def _give_up(self) -> None:
        assert self._transport is not None
        log.warning(
            "connection %d from %s: output not taken within %g s of closing, aborting (%d bytes unsent)",
            self._handle,
            self.peer,
            self._write_timeout,
            self.unsent(),
        )
        self._transport.abort()

    def set_reading(self, reading: bool) -> None:
        """Stop or restart reading from the socket, as the core asks."""
        assert self._transport is not None
        if self._transport.is_closing():
            return
        if reading:
            self._transport.resume_reading()
        else:
            self._transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._broker.get_buffer(self._handle)

    def buffer_updated(self, nbytes: int) -> None:
        self._broker.buffer_updated(self._handle, nbytes)

    def eof_received(self) -> bool:
        # The client will send nothing more: it leaves every rotation now, and
        # the transport closes once the replies already written are sent (a
        # half-closed peer may still read them), within the write timeout.
        # close_after_output already closed the transport; True would only ask it to stay
        # open, which TLS transports refuse with a warning per connection.
        self._broker.eof(self._handle)
        self.close_after_output()
        return False

    def pause_writing(self) -> None:
        self._broker.pause(self._handle)

    def resume_writing(self) -> None:
        self._broker.resume(self._handle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._connections.pop(self._handle, None)
        if self._logins is not None:
            self._logins.closed(self._handle)
        client_id = self._broker.client_id(self._handle)
        self._broker.close(self._handle)
        log.debug("connection %d closed: client %s from %s", self._handle, client_id or "-", self.peer)

    def close(self) -> None:
        """Close after flushing what was already written."""
        if self._transport is not None:
            self._transport.close()

    def unsent(self) -> int:
        """Output bytes the transport holds, not yet taken by the socket."""
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    def abort(self) -> None:
        """Close at once, dropping unsent output."""
        if self._transport is not None:
            self._transport.abort()


class Server:
    """A Pigeon broker listening on one TCP address, on the running event loop.

    ``port=0`` picks a free port; ``server.port`` tells which after ``start``.
    With ``tls`` (a server ``ssl.SSLContext``, see ``pigeon.server.tls``) the
    port speaks TLS only, and a client that has not completed its handshake
    within ``tls_handshake_timeout`` seconds is closed. With ``users_file``
    (``pigeon.server.users``) clients must log in, and ``tls_map_user`` logs in
    a client whose certificate's commonName is a user of the file. With ``reuse_port``
    several processes listen on the same port (SO_REUSEPORT; ``pigeon --workers``).
    Use ``async with Server(...) as server:`` or ``start()`` and ``stop()``.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_memory: int = DEFAULT_MAX_MEMORY,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
        max_topics: int = DEFAULT_MAX_TOPICS,
        max_pending: int = DEFAULT_MAX_PENDING,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        default_prefetch: int = DEFAULT_PREFETCH,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        group_ttl: float = DEFAULT_GROUP_TTL,
        max_disk: int = 0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES,
        data_dir: str | os.PathLike[str] | None = None,
        fsync: str = "everysec",
        repair: bool = False,
        users_file: str | os.PathLike[str] | None = None,
        tls: ssl.SSLContext | None = None,
        tls_handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        tls_map_user: bool = False,
        reuse_port: bool = False,
    ) -> None:
        self.host = host
        self._reuse_port = reuse_port
        self.tls = tls
        self._tls_handshake_timeout = tls_handshake_timeout
        self._requested_port = port
        self.store = Store(data_dir, fsync) if data_dir is not None else None
        self.recovered: Recovered | None = None
        self._repair = repair
        self.broker = Broker(
            durable=self.store is not None,
            fsync=self.core_fsync(fsync),
            max_disk=max_disk,
            max_line=max_line,
            max_backlog=max_backlog,
            max_connections=max_connections,
            max_memory=max_memory,
            max_subscriptions=max_subscriptions,
            max_topics=max_topics,
            max_pending=max_pending,
            idle_timeout=idle_timeout,
            write_timeout=write_timeout,
            default_prefetch=default_prefetch,
            ack_timeout=ack_timeout,
            max_deliveries=max_deliveries,
            max_payload=max_payload,
            max_backlog_bytes=max_backlog_bytes,
            group_ttl=group_ttl,
            tick_interval=TICK_INTERVAL,
            auth=users_file is not None,
            tls=tls is not None,
        )
        self.broker.on_warning = log.warning
        self.broker.on_close = self._closed_by_core
        self.broker.on_reading = self._set_reading
        self._connections: dict[int, _Connection] = {}
        self.logins: Logins | None = None
        if users_file is not None:
            # only then: the users file's parser and the password hashes take a while to load
            from pigeon.server.logins import Logins

            # raises UsersError when the file cannot be used
            self.logins = Logins(self.broker, users_file, self._connections, map_certificates=tls_map_user)
        self._listener: asyncio.Server | None = None
        self._clock: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._restoring: asyncio.Handle | None = None

    def core_fsync(self, fsync: str) -> str:
        """The ``--fsync`` policy the core runs with: ``fsync`` itself. A subclass may make every
        ``PUBLISHED`` wait for ``broker.log_synced`` (``"always"``) whatever the store does, as a
        cluster node with replicas does (``pigeon.cluster.replication`` calls it)."""
        return fsync

    @property
    def port(self) -> int:
        """The port actually listened on (differs from the one asked for when that was 0)."""
        if self._listener is None or not self._listener.sockets:
            return self._requested_port
        return int(self._listener.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Recover the data directory if there is one, then start listening. Raises StoreError when
        the data directory cannot be used, OSError when the address cannot be bound."""
        loop = asyncio.get_running_loop()
        if self.store is not None:
            self.store.open()
            try:
                self.recovered = self.store.recover(self.broker, self._repair)
            except BaseException:
                self.store.close()
                raise
            self.store.attach(self.broker, loop)
        # one flush per pass of the loop, after every read of that pass
        self.broker.on_output = partial(loop.call_soon, self.broker.flush)
        self.broker.on_timer = self._arm_timer
        write_timeout = self.broker.limits["write_timeout"]
        self._listener = await loop.create_server(
            partial(self.new_connection, write_timeout),
            self.host,
            self._requested_port,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
            backlog=LISTEN_BACKLOG,
            ssl=self.tls,
            ssl_handshake_timeout=self._tls_handshake_timeout if self.tls is not None else None,
        )
        self._clock = asyncio.create_task(self._tick(self.broker.tick_interval))
        if self.store is not None:
            # the messages come back a chunk per pass of the loop while it serves
            self._restoring = loop.call_soon(self._restore)

    def _restore(self) -> None:
        """Put back the next chunk of recovered messages; once all are, say what came back."""
        assert self.store is not None and self.recovered is not None
        try:
            done = self.store.restore(self.broker)
        except StoreError as exc:
            # out of memory, or a damaged record in a sealed segment (its checksum is checked as
            # its message comes back): stop rather than serve a log known to be wrong. Nothing was
            # recorded as done that was not; the next start checks every record before serving.
            log.critical("%s; stopping", exc)
            os._exit(1)
        if not done:
            self._restoring = asyncio.get_running_loop().call_soon(self._restore)
            return
        self._restoring = None
        found = self.recovered
        log.info(
            "recovered %d messages on %d topics from %s in %.2f s",
            found.messages,
            found.topics,
            self.store.directory,
            found.seconds,
        )

    def new_connection(self, write_timeout: float) -> asyncio.BufferedProtocol:
        """The protocol of one accepted connection (a cluster node routes instead: pigeon.cluster)."""
        return _Connection(self.broker, self._connections, write_timeout, self.logins)

    async def _tick(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.broker.tick()

    def server_stats(self) -> dict[str, int]:
        """Figures kept by this layer, not the core: logins delayed by the throttle."""
        return {"logins_throttled": 0} if self.logins is None else self.logins.stats()

    def cluster_status(self) -> dict[str, Any] | None:
        """The cluster as this node sees it; None for a broker that is no cluster node."""
        return None

    def reload_users(self) -> bool:
        """Read the users file again and apply it (SIGHUP); False when there is none or it cannot be
        used (logged: the old rules stay)."""
        if self.logins is None:
            log.info("SIGHUP: no users file to reload (pigeon --users FILE), still serving")
            return False
        return self.logins.reload()

    def _arm_timer(self, delay: float) -> None:
        """The core's next delayed message is due in ``delay`` seconds (one timer at a time)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self.broker.run_timers)

    def _closed_by_core(self, handle: int, reason: str, flush: bool) -> None:
        conn = self._connections.get(handle)
        if conn is not None:
            conn.closed_by_core(reason, flush)

    def _set_reading(self, handle: int, reading: bool) -> None:
        conn = self._connections.get(handle)
        if conn is not None:
            conn.set_reading(reading)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting and reading, close every connection after its output, wait for them to go.

        Connections whose peers have not taken their output after ``timeout``
        seconds are aborted. Messages the core still holds stay in their
        topics' backlogs (``broker.stats()["backlog_messages"]`` counts them).
        """
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._restoring is not None:
            self._restoring.cancel()
            self._restoring = None
        if self._listener is not None:
            self._listener.close()
        if self.logins is not None:
            self.logins.stop()
        # what this pass of the loop produced goes out before the sockets close
        self.broker.flush()
        for conn in list(self._connections.values()):
            conn.close()
        await self._until_closed(timeout)
        if self._connections:
            stuck = list(self._connections.values())
            log.warning(
                "aborting %d connection(s) that did not take their output within %g s (%d bytes unsent)",
                len(stuck),
                timeout,
                sum(conn.unsent() for conn in stuck),
            )
            for conn in stuck:
                conn.abort()
            # aborted transports report connection_lost on the next pass of the loop
            await self._until_closed(timeout)
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        if self.store is not None:
            self.broker.flush()  # the records of the last pass
            self.store.close()

    async def _until_closed(self, timeout: float) -> None:
        """Wait until every connection is gone, or ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
