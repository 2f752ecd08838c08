"""The exceptions the client library raises; all derive from ``PigeonError``."""

from __future__ import annotations

import builtins


class PigeonError(Exception):
    """Base class of every error the Pigeon client raises."""


class InvalidArgumentError(PigeonError, ValueError):
    """A topic or message the protocol cannot carry; raised before anything is sent."""


class CommandError(PigeonError):
    """The server refused a command with ``ERROR <reason>``; ``reason`` is its text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BacklogFullError(CommandError):
    """A PUBLISH was refused because the topic's backlog is full: retry later or add subscribers."""


class ConnectionClosedError(PigeonError, builtins.ConnectionError):
    """The connection is closed or was lost; ``reason`` is the server's last ERROR, if it sent one."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(f"{message}: {reason}" if reason else message)
        self.reason = reason


class ProtocolError(ConnectionClosedError):
    """The server sent something the client cannot make sense of, so the client dropped the connection."""


class TimeoutError(PigeonError, builtins.TimeoutError):
    """No reply or message arrived in time. The connection stays usable: a late reply is discarded."""


def error_from_reason(reason: str) -> CommandError:
    """The exception for an ``ERROR <reason>`` line."""
    if reason.startswith("BACKLOG_FULL "):
        return BacklogFullError(reason)
    return CommandError(reason)
