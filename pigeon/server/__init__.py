"""The broker: the asyncio layer around the Cython core, its event loops, logging and HTTP monitoring."""

from pigeon.server.protocol import Server

__all__ = ["Server"]
