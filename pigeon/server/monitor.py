"""The HTTP monitoring listener: Prometheus metrics, JSON figures and the dashboard.

Served by aiohttp on the broker's own event loop, so every request reads the
core directly, between two reads of client sockets. Needs the ``monitor``
extra (``pip install "pigeon-broker[monitor]"``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pigeon._core import Broker
from pigeon.server.metrics import registry_for

_DASHBOARD = resources.files("pigeon.server").joinpath("dashboard.html")


class Monitor:
    """The monitoring endpoints for one broker, listening on ``host:port`` (0 picks a free port)."""

    def __init__(self, broker: Broker, host: str, port: int = 0) -> None:
        self.broker = broker
        self.host = host
        self._requested_port = port
        self._registry = registry_for(broker)
        self._dashboard = _DASHBOARD.read_bytes()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def app(self) -> web.Application:
        """The aiohttp application serving every endpoint."""
        app = web.Application()
        app.router.add_get("/", self._on_dashboard)
        app.router.add_get("/metrics", self._on_metrics)
        app.router.add_get("/stats", self._json(self.broker.stats))
        app.router.add_get("/topics", self._json(self.broker.topics))
        app.router.add_get("/connections", self._json(self.broker.connections))
        app.router.add_get("/healthz", self._json(lambda: {"status": "ok"}))
        return app

    @property
    def port(self) -> int:
        """The port actually listened on, once started."""
        if self._runner is None or not self._runner.addresses:
            return self._requested_port
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Start listening; raises OSError when the address cannot be bound."""
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self._requested_port, reuse_address=True)
        try:
            await self._site.start()
        except OSError:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the listener and any open HTTP connection."""
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._site = None

    @staticmethod
    def _json(read: Callable[[], object]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(read(), headers={"Cache-Control": "no-store"})

        return handler

    async def _on_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _on_dashboard(self, request: web.Request) -> web.Response:
        return web.Response(body=self._dashboard, content_type="text/html", charset="utf-8")
