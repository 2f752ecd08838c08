"""Pigeon: a lightweight pub/sub broker with work-queue (round-robin) delivery.

The public names are loaded on first use (PEP 562), so that ``import pigeon``
and the client library load neither the compiled core nor the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pigeon._version import __version__

if TYPE_CHECKING:
    from pigeon.client import (
        AsyncClient,
        AsyncClusterClient,
        Client,
        ClusterClient,
        Message,
        Refused,
        ServerInfo,
    )
    from pigeon.errors import (
        AlreadyConnectedError,
        AuthFailedError,
        AuthRequiredError,
        BacklogFullError,
        BadFrameError,
        BadReplyTokenError,
        BadTopicError,
        ClosingError,
        CommandError,
        ConnectionClosedError,
        FeatureNotSupportedError,
        GroupInUseError,
        IdleTimeoutError,
        InvalidArgumentError,
        LineTooLongError,
        MemoryFullError,
        MovedError,
        NoSuchGroupError,
        NotConnectedError,
        NotEnoughReplicasError,
        NotSubscribedError,
        PayloadTooLargeError,
        PermissionDeniedError,
        PigeonError,
        ProtocolError,
        RequestTimeoutError,
        RetryableError,
        StaleDeliveryError,
        StorageFullError,
        TimeoutError,
        TooManyConnectionsError,
        TooManySubscriptionsError,
        TooManyTopicsError,
        UnknownCommandError,
        UnknownDeliveryTagError,
        UsageError,
        WrongClientIdError,
    )
    from pigeon.server import Server
    from pigeon.testing import ServerThread

__all__ = [
    "AlreadyConnectedError",
    "AsyncClient",
    "AsyncClusterClient",
    "AuthFailedError",
    "AuthRequiredError",
    "BacklogFullError",
    "BadFrameError",
    "BadReplyTokenError",
    "BadTopicError",
    "Client",
    "ClosingError",
    "ClusterClient",
    "CommandError",
    "ConnectionClosedError",
    "FeatureNotSupportedError",
    "GroupInUseError",
    "IdleTimeoutError",
    "InvalidArgumentError",
    "LineTooLongError",
    "MemoryFullError",
    "Message",
    "MovedError",
    "NoSuchGroupError",
    "NotConnectedError",
    "NotEnoughReplicasError",
    "NotSubscribedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PigeonError",
    "ProtocolError",
    "Refused",
    "RequestTimeoutError",
    "RetryableError",
    "Server",
    "ServerInfo",
    "ServerThread",
    "StaleDeliveryError",
    "StorageFullError",
    "TimeoutError",
    "TooManyConnectionsError",
    "TooManySubscriptionsError",
    "TooManyTopicsError",
    "TryAgainError",
    "UnknownCommandError",
    "UnknownDeliveryTagError",
    "UsageError",
    "WrongClientIdError",
    "__version__",
]

# public name -> the module that defines it
_MODULES = {
    "AsyncClient": "pigeon.client",
    "Client": "pigeon.client",
    "AsyncClusterClient": "pigeon.client",
    "ClusterClient": "pigeon.client",
    "Message": "pigeon.client",
    "Refused": "pigeon.client",
    "ServerInfo": "pigeon.client",
    "AlreadyConnectedError": "pigeon.errors",
    "AuthFailedError": "pigeon.errors",
    "AuthRequiredError": "pigeon.errors",
    "BacklogFullError": "pigeon.errors",
    "BadTopicError": "pigeon.errors",
    "BadFrameError": "pigeon.errors",
    "BadReplyTokenError": "pigeon.errors",
    "FeatureNotSupportedError": "pigeon.errors",
    "PayloadTooLargeError": "pigeon.errors",
    "ClosingError": "pigeon.errors",
    "CommandError": "pigeon.errors",
    "ConnectionClosedError": "pigeon.errors",
    "GroupInUseError": "pigeon.errors",
    "IdleTimeoutError": "pigeon.errors",
    "InvalidArgumentError": "pigeon.errors",
    "LineTooLongError": "pigeon.errors",
    "MemoryFullError": "pigeon.errors",
    "NoSuchGroupError": "pigeon.errors",
    "MovedError": "pigeon.errors",
    "TryAgainError": "pigeon.errors",
    "StorageFullError": "pigeon.errors",
    "NotConnectedError": "pigeon.errors",
    "NotEnoughReplicasError": "pigeon.errors",
    "NotSubscribedError": "pigeon.errors",
    "PermissionDeniedError": "pigeon.errors",
    "PigeonError": "pigeon.errors",
    "ProtocolError": "pigeon.errors",
    "RetryableError": "pigeon.errors",
    "StaleDeliveryError": "pigeon.errors",
    "RequestTimeoutError": "pigeon.errors",
    "TimeoutError": "pigeon.errors",
    "TooManyConnectionsError": "pigeon.errors",
    "TooManySubscriptionsError": "pigeon.errors",
    "TooManyTopicsError": "pigeon.errors",
    "UnknownCommandError": "pigeon.errors",
    "UnknownDeliveryTagError": "pigeon.errors",
    "UsageError": "pigeon.errors",
    "WrongClientIdError": "pigeon.errors",
    "Server": "pigeon.server",
    "ServerThread": "pigeon.testing",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is asked for."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the ones not loaded yet included."""
    return sorted({*globals(), *__all__})
