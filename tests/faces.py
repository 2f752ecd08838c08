"""Both clients behind one blocking face, so that one test runs against ``Client`` and ``AsyncClient``.

``AsyncClient`` runs on an event loop of the server's kind in a background
thread, so it reads and reconnects between the test's calls as in a program;
``Face`` gives both clients the same blocking methods. The ``open_client``
fixture (tests/conftest.py) makes them.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from pigeon import AsyncClient, Client, Message, ServerThread
from pigeon.server.loops import loop_factory
from pigeon.testing import ServerProcess

T = TypeVar("T")
Target = ServerProcess | ServerThread


class LoopThread:
    """An event loop of one kind (asyncio or uvloop) running in a background thread."""

    def __init__(self, loop_name: str) -> None:
        _, new_loop = loop_factory(loop_name)
        self.loop = new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, steps: Coroutine[Any, Any, T]) -> T:
        """Run ``steps`` on the loop and wait for its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(steps, self.loop).result(60)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Face:
    """A ``Client``, or an ``AsyncClient`` whose coroutine methods are run to completion on its loop."""

    def __init__(self, client: Client | AsyncClient, loop: LoopThread | None) -> None:
        self.client = client
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.client, name)
        loop = self._loop
        if loop is None or not inspect.iscoroutinefunction(value):
            return value
        return lambda *args, **kwargs: loop.run(value(*args, **kwargs))

    def messages(self, timeout: float | None = None) -> list[Message]:
        """Every delivery until ``timeout`` seconds pass without one."""
        if isinstance(self.client, Client):
            return list(self.client.messages(timeout))
        assert self._loop is not None
        return self._loop.run(_collect(self.client.messages(timeout)))


async def _collect(messages: AsyncIterator[Message]) -> list[Message]:
    return [message async for message in messages]


OpenClient = Callable[..., Face]
