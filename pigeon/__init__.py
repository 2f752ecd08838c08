"""Pigeon: a lightweight pub/sub broker with work-queue (round-robin) delivery."""

from pigeon._version import __version__
from pigeon.client import AsyncClient, Client, Message, Refused
from pigeon.errors import (
    BacklogFullError,
    CommandError,
    ConnectionClosedError,
    InvalidArgumentError,
    PigeonError,
    ProtocolError,
    TimeoutError,
)
from pigeon.server import Server
from pigeon.testing import ServerThread

__all__ = [
    "AsyncClient",
    "BacklogFullError",
    "Client",
    "CommandError",
    "ConnectionClosedError",
    "InvalidArgumentError",
    "Message",
    "PigeonError",
    "ProtocolError",
    "Refused",
    "Server",
    "ServerThread",
    "TimeoutError",
    "__version__",
]
