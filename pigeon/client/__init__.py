"""The Python clients of the broker: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

``base`` holds what the two share, ``codec`` the wire encoding and parsing,
``session`` the protocol state without I/O. Pure Python: importing this
package loads neither the broker's compiled core nor the server.
"""

from pigeon.client.aio import AsyncClient
from pigeon.client.codec import Message, Refused
from pigeon.client.sync import Client

__all__ = ["AsyncClient", "Client", "Message", "Refused"]
