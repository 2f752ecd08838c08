"""``ServerThread``: a Pigeon broker on its own event loop in a background thread.

For synchronous programs and tests that want a broker in-process. The pytest
fixtures built on it live in ``pigeon.pytest_plugin``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pigeon.protocol import DEFAULT_HOST
from pigeon.server.loops import loop_factory
from pigeon.server.protocol import Server

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pigeon.server.limits import ServerLimits

T = TypeVar("T")

START_TIMEOUT = 10.0


class ServerThread:
    """Runs ``pigeon.Server`` in a daemon thread; ``port=0`` (the default) picks a free port.

    Use ``with ServerThread() as server:`` (or ``start()``/``stop()``) and
    connect to ``server.host``/``server.port``. ``loop`` is "auto" (uvloop
    when installed), "uvloop" or "asyncio"; the other keywords are ``Server``'s
    (``max_line``, ``max_backlog``, ..., ``idle_timeout``).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        loop: str = "auto",
        **limits: Unpack[ServerLimits],
    ) -> None:
        self.host = host
        self.loop_name, self._new_loop = loop_factory(loop)
        self.server = Server(host, port, **limits)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def port(self) -> int:
        """The port the broker listens on."""
        return self.server.port

    def start(self) -> ServerThread:
        """Start the thread and wait until the broker listens; raises OSError if it cannot bind."""
        if self._thread is not None or self._started.done():
            raise RuntimeError("a ServerThread can be started only once")
        self._thread = threading.Thread(target=self._run, name=f"pigeon-server-{id(self):x}", daemon=True)
        self._thread.start()
        try:
            self._started.result(START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection, stop the broker and wait for the thread to end."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            # a closed loop means the thread is already on its way out
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self._thread = None

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the broker's thread and return its result (the core is not thread-safe)."""
        if self._loop is None:
            raise RuntimeError("ServerThread not started")

        async def run() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(START_TIMEOUT)

    def stats(self) -> dict[str, Any]:
        """The broker's counters (``Broker.stats()``), read on its own thread."""
        return self.call(self.server.broker.stats)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerThread {self.host}:{self.port} ({self.loop_name})>"

    def _run(self) -> None:
        loop = self._new_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        await self.server.start()
        self._started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            await self.server.stop()
