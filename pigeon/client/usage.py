"""What every client offers on top of its own ``next_message`` and ``close``, written once: iterating
over deliveries (``messages()``) and the ``with`` (``async with``) statement. ``BlockingUse`` is for
``Client`` and ``ClusterClient``, ``AsyncUse`` for ``AsyncClient`` and ``AsyncClusterClient``."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from pigeon import errors
from pigeon.client.codec import Message

if TYPE_CHECKING:
    from typing_extensions import Self


class BlockingUse(abc.ABC):
    """``messages()`` and ``with`` for a blocking client."""

    @abc.abstractmethod
    def next_message(self, timeout: float | None = None) -> Message:
        """The next delivery; raises pigeon.TimeoutError when none arrives within ``timeout`` seconds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the client; safe to call twice."""

    def messages(self, timeout: float | None = None) -> Iterator[Message]:
        """Deliveries as they arrive; the iteration ends after ``timeout`` seconds without one."""
        while True:
            try:
                message = self.next_message(timeout)
            except errors.TimeoutError:
                return
            yield message

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncUse(abc.ABC):
    """``messages()`` and ``async with`` for an asyncio client."""

    @abc.abstractmethod
    async def connect(self) -> Self:
        """Connect; returns the client."""

    @abc.abstractmethod
    async def next_message(self, timeout: float | None = None) -> Message:
        """The next delivery; raises pigeon.TimeoutError when none arrives within ``timeout`` seconds."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the client; safe to call twice."""

    async def messages(self, timeout: float | None = None) -> AsyncIterator[Message]:
        """Deliveries as they arrive; the iteration ends after ``timeout`` seconds without one."""
        while True:
            try:
                message = await self.next_message(timeout)
            except errors.TimeoutError:
                return
            yield message

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
