"""The exceptions the client library raises; all derive from ``PigeonError``.

Every ``ERROR`` line of the server is ``ERROR <CODE> <text>``; each code has a
class below (``ERROR_CLASSES``), under ``CommandError``. The retryable limits
(``RetryableError``) can be caught together to retry later. The codes the
server sends just before it closes a connection (``ClosingError``) reach
the caller as the ``error`` of a ``ConnectionClosedError``. This table is the
client's own: the client does not load the server's compiled core, and a test
checks the table against the core's ``ERROR_CODES``. The codes a cluster node's router sends
itself (``MOVED``, ``TRYAGAIN``) have theirs in ``CLUSTER_ERROR_CLASSES``.
"""

from __future__ import annotations

import builtins
import re
from typing import TYPE_CHECKING

from pigeon.protocol import parse_host_port

if TYPE_CHECKING:
    from pigeon.client.codec import Message


class PigeonError(Exception):
    """Base class of every error the Pigeon client raises."""


class InvalidArgumentError(PigeonError, ValueError):
    """A topic or message the protocol cannot carry, or a line over the server's limit; nothing was sent."""


class CommandError(PigeonError):
    """The server refused a command with ``ERROR <code> <reason>``.

    ``code`` is the upper-case code (None from a server that sends none),
    ``reason`` the text after it; ``str()`` of the error is the reason.
    """

    CODE: str | None = None

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code if code is not None else self.CODE


class UsageError(CommandError):
    """A command with missing or extra arguments."""

    CODE = "USAGE"


class UnknownCommandError(CommandError):
    """A command word the server does not know (an older server, or a typo)."""

    CODE = "UNKNOWN_COMMAND"


class NotConnectedError(CommandError):
    """A command that needs ``CONNECT`` first."""

    CODE = "NOT_CONNECTED"


class AlreadyConnectedError(CommandError):
    """A second ``CONNECT`` on one connection."""

    CODE = "ALREADY_CONNECTED"


class WrongClientIdError(CommandError):
    """A command naming a client id that is not this connection's."""

    CODE = "WRONG_CLIENT_ID"


class BadTopicError(CommandError):
    """A topic the server refuses (length, characters, encoding)."""

    CODE = "BAD_TOPIC"


class NotSubscribedError(CommandError):
    """``UNSUBSCRIBE`` from a topic this connection does not subscribe to."""

    CODE = "NOT_SUBSCRIBED"


class TooManySubscriptionsError(CommandError):
    """One ``SUBSCRIBE`` past the server's ``--max-subscriptions`` for one connection."""

    CODE = "TOO_MANY_SUBSCRIPTIONS"


class TooManyTopicsError(CommandError):
    """A new topic past the server's ``--max-topics``."""

    CODE = "TOO_MANY_TOPICS"


class UnknownDeliveryTagError(CommandError):
    """An ``ACK`` or ``NACK`` of a delivery tag (or of a range with no tag) not outstanding on the connection.

    The message was settled already, or given back for redelivery (its
    ``--ack-timeout`` passed, or it was NACKed). An ACK or NACK has no reply
    on success, so this error arrives after the call that sent it: the client
    keeps it for ``check_acks()``. ``tags`` is the ``(first, last)`` tags of
    the refused ``ACK``/``NACK`` (first == last for one tag).
    """

    CODE = "UNKNOWN_DELIVERY_TAG"

    @property
    def tags(self) -> tuple[int, int] | None:
        """``(first, last)`` of the refused tag or range, None when the reason does not name them."""
        match = _TAGS.search(self.reason)
        if match is None:
            return None
        first = int(match[1])
        return first, int(match[2]) if match[2] else first


class RetryableError(CommandError):
    """A refusal because a limit is reached for now: the same command may succeed later."""


class BacklogFullError(RetryableError):
    """A PUBLISH refused because the topic's backlog is full: retry later or add subscribers."""

    CODE = "BACKLOG_FULL"


class MemoryFullError(RetryableError):
    """A command refused because the server holds ``--max-memory`` bytes: retry once it has delivered some."""

    CODE = "MEMORY_FULL"


class StorageFullError(RetryableError):
    """A PUBLISH refused because the log under ``--data-dir`` is at ``--max-disk`` (or the disk is full)
    and waiting cannot help: the message is over a quarter of the limit, or the publisher consumes the
    topic itself. Retry once consumers have drained some."""

    CODE = "STORAGE_FULL"


class NotEnoughReplicasError(RetryableError):
    """A ``PUBLISH`` to a durable topic of a cluster node started with ``--min-replicas M`` while
    fewer than M of its successors are live: nothing was stored; retry once nodes are back (as
    Kafka's ``NOT_ENOUGH_REPLICAS``)."""

    CODE = "NOT_ENOUGH_REPLICAS"


class AuthRequiredError(CommandError):
    """A bare ``CONNECT`` to a server that requires a user and password (``--users``).

    The connection stays open for a ``CONNECT <user> <password>``.
    """

    CODE = "AUTH_REQUIRED"


class PermissionDeniedError(CommandError):
    """A ``PUBLISH`` or ``SUBSCRIBE`` to a topic outside the user's patterns, or ``STATS CONNECTIONS``
    for a user who is not an admin; nothing changed."""

    CODE = "PERMISSION_DENIED"


class PayloadTooLargeError(CommandError):
    """A ``PUB`` whose payload is over the server's ``--max-payload`` (its HELLO's ``max_payload``);
    the server skipped the payload and the connection goes on."""

    CODE = "PAYLOAD_TOO_LARGE"


class NoSuchGroupError(CommandError):
    """``DESTROY`` of a consumer group the server does not hold (never made, expired or destroyed)."""

    CODE = "NO_SUCH_GROUP"


class GroupInUseError(CommandError):
    """``DESTROY`` of a consumer group that still has subscribers; nothing changed."""

    CODE = "GROUP_IN_USE"


class BadReplyTokenError(CommandError):
    """A ``REPLY`` whose token is not one the server mints (``<handle>.<generation>.<id>``); its
    payload was skipped. A well-formed token of a request no longer waiting gets no error."""

    CODE = "BAD_REPLY_TOKEN"


class MovedError(CommandError):
    """A command for a topic another cluster node owns, from a client that asked for redirects
    (``CLUSTER REDIRECT``): ``ERROR MOVED <slot> <host:port>``, as Redis Cluster. Nothing was done;
    send the command to ``address``. ``slot`` is the topic's slot (None when the reason does not
    name it), ``address`` the owner's ``(host, port)``."""

    CODE = "MOVED"

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason, code)
        slot, _, address = reason.partition(" ")
        self.slot = int(slot) if slot.isdigit() else None
        self.address = parse_host_port(address)


class TryAgainError(RetryableError):
    """A command for a topic whose cluster slot has no owner yet (its owner died and its lease has
    not expired, or the slot is being handed over) after the node waited its lease TTL plus 2 s:
    nothing was done, retry. ``slot`` is the slot (None when the reason does not name it)."""

    CODE = "TRYAGAIN"

    @property
    def slot(self) -> int | None:
        """The slot without owner, from the reason ``slot <n> of '<topic>' ...``."""
        match = _SLOT.match(self.reason)
        return int(match[1]) if match else None


class ClosingError(CommandError):
    """An error the server sends just before it closes the connection; see ``ConnectionClosedError.error``."""


class LineTooLongError(ClosingError):
    """A line longer than the server's ``--max-line``."""

    CODE = "LINE_TOO_LONG"


class TooManyConnectionsError(ClosingError):
    """A connection past the server's ``--max-connections``."""

    CODE = "TOO_MANY_CONNECTIONS"


class IdleTimeoutError(ClosingError):
    """Nothing was sent for the server's ``--idle-timeout``."""

    CODE = "IDLE_TIMEOUT"


class AuthFailedError(ClosingError):
    """A wrong user or password (the same error for both); the server closes the connection."""

    CODE = "AUTH_FAILED"


class BadFrameError(ClosingError):
    """A ``PUB`` header without a byte count, or a payload not followed by a line end: the server
    cannot tell where the next command starts, so it closes the connection."""

    CODE = "BAD_FRAME"


# code -> class, in the order of the server's list (pigeon._core.ERROR_CODES)
ERROR_CLASSES: dict[str, type[CommandError]] = {
    cls.CODE: cls
    for cls in (
        UsageError,
        UnknownCommandError,
        NotConnectedError,
        AlreadyConnectedError,
        WrongClientIdError,
        BadTopicError,
        NotSubscribedError,
        BacklogFullError,
        LineTooLongError,
        TooManyConnectionsError,
        TooManySubscriptionsError,
        TooManyTopicsError,
        MemoryFullError,
        IdleTimeoutError,
        UnknownDeliveryTagError,
        StorageFullError,
        AuthRequiredError,
        AuthFailedError,
        PermissionDeniedError,
        PayloadTooLargeError,
        BadFrameError,
        NoSuchGroupError,
        GroupInUseError,
        BadReplyTokenError,
        NotEnoughReplicasError,
    )
    if cls.CODE is not None
}
ERROR_CODES = tuple(ERROR_CLASSES)

# code -> class for the codes a cluster node's router sends itself (pigeon/cluster/router.py), not the core
CLUSTER_ERROR_CLASSES: dict[str, type[CommandError]] = {
    cls.CODE: cls for cls in (MovedError, TryAgainError) if cls.CODE is not None
}

_CODE = re.compile(r"[A-Z][A-Z0-9_]*\Z")
_TAGS = re.compile(r"(\d+)(?:-(\d+))?\Z")
_SLOT = re.compile(r"slot (\d+) ")


class ConnectionClosedError(PigeonError, builtins.ConnectionError):
    """The connection is closed or was lost.

    ``error`` is the server's last unasked ``ERROR`` before it closed the
    connection (e.g. an ``IdleTimeoutError``), if it sent one; ``code`` and
    ``reason`` are that error's code and text, else None.
    """

    def __init__(self, message: str, error: CommandError | None = None) -> None:
        super().__init__(f"{message}: {error.reason}" if error is not None else message)
        self.error = error
        self.code = error.code if error is not None else None
        self.reason = error.reason if error is not None else None


class StaleDeliveryError(ConnectionClosedError):
    """An ``ack()`` or ``nack()`` of messages delivered on a connection that has closed since; none was sent.

    The broker gave those messages back for redelivery when the connection
    closed, and their delivery tags died with it (a new connection counts its
    tags from 1 again, so the old ones would name other messages). ``messages``
    are the stale messages; those of the current connection in the same call
    were settled.
    """

    def __init__(self, message: str, messages: list[Message]) -> None:
        super().__init__(message)
        self.messages = messages


class ProtocolError(ConnectionClosedError):
    """The server sent something the client cannot make sense of, so the client dropped the connection."""


class FeatureNotSupportedError(InvalidArgumentError):
    """The server lacks a feature a call needs (its HELLO does not list it, e.g. ``binary`` on a
    server older than protocol 2); nothing was sent. ``feature`` names it."""

    def __init__(self, feature: str, message: str) -> None:
        super().__init__(message)
        self.feature = feature


class TimeoutError(PigeonError, builtins.TimeoutError):
    """No reply or message arrived in time. The connection stays usable: a late reply is discarded."""


class RequestTimeoutError(TimeoutError):
    """``request()`` got no reply within its timeout (no responder, or one too slow or gone). A
    reply arriving later is dropped."""


def error_from_reply(text: str) -> CommandError:
    """The exception for the text after ``ERROR`` in a reply: ``<CODE> <reason>``.

    An unknown code gives a ``CommandError`` with that code; a line without a
    code (a server older than the codes) one whose code is None.
    """
    code, _, reason = text.partition(" ")
    if not _CODE.match(code):
        return CommandError(text)
    cls = ERROR_CLASSES.get(code) or CLUSTER_ERROR_CLASSES.get(code)
    return cls(reason) if cls is not None else CommandError(reason, code)
