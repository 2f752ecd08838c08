"""The Python clients of the broker: ``Client`` (blocking) and ``AsyncClient`` (asyncio), and for a
cluster ``ClusterClient`` and ``AsyncClusterClient`` (``cluster``: each topic's commands to its owner).

``base`` holds the protocol logic the two share (each only does the I/O),
``codec`` the wire encoding and parsing, ``session`` the protocol state
without I/O. Pure Python: importing this package loads neither the broker's
compiled core nor the server.
"""

from pigeon.client.aio import AsyncClient
from pigeon.client.cluster import AsyncClusterClient, ClusterClient
from pigeon.client.codec import Message, Refused, ServerInfo
from pigeon.client.sync import Client

__all__ = ["AsyncClient", "AsyncClusterClient", "Client", "ClusterClient", "Message", "Refused", "ServerInfo"]
