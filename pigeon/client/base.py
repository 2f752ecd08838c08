"""What ``Client`` and ``AsyncClient`` share besides the session: settings, subscriptions, results."""

from __future__ import annotations

from pigeon.client.codec import Refused
from pigeon.client.session import Pending, Session
from pigeon.errors import ConnectionClosedError, ProtocolError

DEFAULT_TIMEOUT = 10.0
DEFAULT_RECONNECT_TIMEOUT = 30.0
DEFAULT_MAX_QUEUED = 10_000  # deliveries an AsyncClient holds before it stops reading

# Pipelining: commands go out in chunks of CHUNK lines, and the sender waits for
# replies while more than WINDOW are outstanding, so neither side buffers without bound.
CHUNK = 2048
WINDOW = 16384
RECV_SIZE = 256 * 1024
OUT_LIMIT = 64 * 1024  # buffered publish(wait=False) bytes that trigger a send

RECONNECT_FIRST_DELAY = 0.05
RECONNECT_MAX_DELAY = 1.0


class ClientBase:
    """Settings and bookkeeping common to the blocking and the asyncio client."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float | None,
        reconnect: bool,
        reconnect_timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.client_id = ""
        self.reconnects = 0  # how many times the connection was re-established
        self._cid = b""
        self._session = Session()
        self._topics: dict[bytes, None] = {}  # an ordered set, re-subscribed after a reconnect
        self._unflushed: list[Pending] = []  # publish(wait=False) batches since the last flush
        self._closed = False

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The topics this client is subscribed to."""
        return tuple(topic.decode() for topic in self._topics)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} id={self.client_id or '-'}>"

    def _connected(self, reply: bytes) -> None:
        """Take the id from a CONNECTED reply."""
        if not reply or b" " in reply:
            raise ProtocolError(f"bad CONNECTED reply: {reply!r}")
        self._cid = reply
        self.client_id = reply.decode()

    def _track_unwaited(self) -> None:
        """Register one publish(wait=False) so that flush() reports it."""
        batch = self._session.expect_unwaited()
        if not self._unflushed or self._unflushed[-1] is not batch:
            self._unflushed.append(batch)

    def _take_refusals(self) -> list[Refused]:
        """The refusals of every publish(wait=False) since the last flush, numbered from 0."""
        refused: list[Refused] = []
        offset = 0
        for batch in self._unflushed:
            refused.extend(Refused(offset + r.index, r.error) for r in batch.refused)
            offset += batch.total
        self._unflushed = []
        return refused

    def _closed_error(self) -> ConnectionClosedError:
        return ConnectionClosedError("the client is closed")


def result(pending: Pending) -> bytes:
    """A single command's reply text after its verb; raises the server's refusal."""
    if pending.error is not None:
        raise pending.error
    return pending.reply
