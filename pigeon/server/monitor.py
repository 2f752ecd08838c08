"""The HTTP monitoring listener: Prometheus metrics, JSON figures and the dashboard.

Served by aiohttp on the broker's own event loop, so every request reads the
core directly, between two reads of client sockets. No request holds the loop
for long: listings are served a page at a time, and what needs every topic
(the busiest topics) walks them a page at a time, yielding between pages.
Needs the ``monitor`` extra (``pip install "pigeon-broker[monitor]"``).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pigeon._core import Broker
from pigeon.server.busiest import PAGE_MAX, busiest_topics
from pigeon.server.metrics import registry_for

_DASHBOARD = resources.files("pigeon.server").joinpath("dashboard.html")

# entries per page of /topics and /connections unless asked otherwise (as STATS TOPICS)
PAGE_DEFAULT = 100

# the one endpoint open without the token: a load balancer's probe carries none
HEALTH_PATH = "/healthz"

# a cursor is a position in a table of the core: it fits its size_t
_CURSOR_MAX = (1 << 64) - 1

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header's host name (lower case, an IPv6 address without brackets) and port (None if absent).

    A header that cannot be read gives an empty host name.
    """
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if not port:
        return host, None
    # a port that is not a number makes the whole header unusable
    return (host, int(port)) if port.isdigit() else ("", None)


def _plain_address(address: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack socket's) as its IPv4 address; any other text as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)


class HostCheck:
    """Which ``Host`` headers the listener answers: a defence against DNS rebinding.

    A web page an operator visits could make the browser resolve its own name
    to this listener's address and read the broker's figures; such a request
    carries that page's name in ``Host``. Answered: the listener's own
    addresses (as bound, and the one the request arrived on, which is how a
    wildcard bind is reached) and ``localhost``, each with the listener's port,
    and the names given (``--http-allow-host``): a NAME with any port, a
    NAME:PORT only with that port.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._any_port: set[str] = set()
        self._exact: set[tuple[str, int | None]] = set()
        for name in names:
            host, port = split_host(name)
            if port is None:
                self._any_port.add(host)
            else:
                self._exact.add((host, port))
        self._own: set[str] = {"localhost"}
        self._port = 0

    def listening(self, hosts: Iterable[str], port: int) -> None:
        """The listener is bound to ``hosts`` (addresses or names) on ``port``."""
        self._own.update(_plain_address(host.lower()) for host in hosts)
        self._port = port

    def allows(self, header: str, local_address: str | None) -> bool:
        """Whether to answer a request with this ``Host`` header, arrived on ``local_address``."""
        host, port = split_host(header)
        if not host:
            return False
        if host in self._any_port or (host, port) in self._exact:
            return True
        if port is None:
            port = 80
        if port != self._port:
            return False
        host = _plain_address(host)
        return host in self._own or (local_address is not None and host == _plain_address(local_address))


class Monitor:
    """The monitoring endpoints for one broker, listening on ``host:port`` (0 picks a free port).

    ``metrics_topics`` is how many topics (the busiest by messages published)
    get per-topic Prometheus series; ``allow_hosts`` are the names that may
    appear in the ``Host`` header besides the listener's own address. With a
    ``token``, every endpoint but ``/healthz`` answers only a request with
    ``Authorization: Bearer <token>`` (401 otherwise), and that request sees
    everything. ``admin_only`` (the broker has users) keeps the per-connection
    listing (``/connections``) for the token's holders: without a token it is
    refused (403). ``server_stats`` gives the counters the server keeps outside the
    core (``Server.server_stats``); ``cluster_status`` the cluster as a node sees it
    (``/cluster``: ``{"cluster": null}`` on a broker that is no cluster node).
    """

    def __init__(
        self,
        broker: Broker,
        host: str,
        port: int = 0,
        *,
        metrics_topics: int = 0,
        allow_hosts: Iterable[str] = (),
        token: str | None = None,
        admin_only: bool = False,
        server_stats: Callable[[], Mapping[str, int]] = dict,
        cluster_status: Callable[[], Mapping[str, Any] | None] = lambda: None,
    ) -> None:
        self.broker = broker
        self._authorization = None if token is None else f"Bearer {token}".encode()
        self._admin_only = admin_only
        self._server_stats = server_stats
        self._cluster_status = cluster_status
        self.host = host
        self.metrics_topics = metrics_topics
        self._requested_port = port
        self._hosts = HostCheck(allow_hosts)
        self._dashboard = _DASHBOARD.read_bytes()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def app(self) -> web.Application:
        """The aiohttp application serving every endpoint."""
        app = web.Application(middlewares=[self._check_host, self._check_token])
        app.router.add_get("/", self._on_dashboard)
        app.router.add_get("/metrics", self._on_metrics)
        app.router.add_get("/stats", self._on_stats)
        app.router.add_get("/topics", self._page(self.broker.topics))
        app.router.add_get("/topics/busiest", self._on_busiest)
        app.router.add_get("/connections", self._admin(self._page(self.broker.connections)))
        app.router.add_get("/cluster", self._on_cluster)
        app.router.add_get(HEALTH_PATH, self._on_health)
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
        bound = [str(address[0]) for address in self._runner.addresses]
        self._hosts.listening([self.host, *bound], self.port)

    async def stop(self) -> None:
        """Close the listener and any open HTTP connection."""
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._site = None

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get(hdrs.HOST, "")
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        local = str(sockname[0]) if isinstance(sockname, tuple) else None
        if not self._hosts.allows(header, local):
            return web.Response(
                status=421,
                text=f"421 Misdirected Request: this listener does not answer for Host {header!r} "
                "(see pigeon --http-allow-host)\n",
            )
        return await handler(request)

    @web.middleware
    async def _check_token(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._authorization is None or request.path == HEALTH_PATH:
            return await handler(request)
        given = request.headers.get(hdrs.AUTHORIZATION, "").encode()
        # compare_digest: the time taken does not tell how much of the token was right
        if not hmac.compare_digest(given, self._authorization):
            return web.Response(
                status=401,
                text="401 Unauthorized: send Authorization: Bearer <the --http-token>\n",
                headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="pigeon"'},
            )
        return await handler(request)

    def _admin(self, handler: Handler) -> Handler:
        """``handler`` when the requester may see per-connection data (see ``admin_only``), else 403."""
        if not self._admin_only or self._authorization is not None:
            return handler  # no users, or every request that gets this far showed the token

        async def refuse(request: web.Request) -> web.Response:
            return web.Response(
                status=403,
                text="403 Forbidden: per-connection data needs the monitoring token (pigeon --http-token)\n",
            )

        return refuse

    @staticmethod
    def _respond(data: object) -> web.Response:
        return web.json_response(data, headers={"Cache-Control": "no-store"})

    @staticmethod
    def _number(request: web.Request, name: str, default: int, low: int, high: int) -> int:
        text = request.query.get(name)
        if text is None:
            return default
        if not text.isdigit() or not low <= int(text) <= high:
            raise web.HTTPBadRequest(text=f"{name} must be a whole number from {low} to {high}\n")
        return int(text)

    def _page(self, read: Callable[[int, int], dict[str, Any]]) -> Handler:
        """An endpoint serving one page of a core listing: ``?cursor=<n>&count=<n>``."""

        async def handler(request: web.Request) -> web.Response:
            cursor = self._number(request, "cursor", 0, 0, _CURSOR_MAX)
            count = self._number(request, "count", PAGE_DEFAULT, 1, PAGE_MAX)
            return self._respond(read(cursor, count))

        return handler

    async def _on_stats(self, request: web.Request) -> web.Response:
        return self._respond(self.broker.stats())

    async def _on_cluster(self, request: web.Request) -> web.Response:
        return self._respond({"cluster": self._cluster_status()})

    async def _on_health(self, request: web.Request) -> web.Response:
        return self._respond({"status": "ok"})

    async def _on_busiest(self, request: web.Request) -> web.Response:
        count = self._number(request, "count", PAGE_DEFAULT, 1, PAGE_MAX)
        return self._respond({"topics": await busiest_topics(self.broker, count)})

    async def _on_metrics(self, request: web.Request) -> web.Response:
        topics = await busiest_topics(self.broker, self.metrics_topics)
        body = generate_latest(registry_for(self.broker, topics, self._server_stats()))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _on_dashboard(self, request: web.Request) -> web.Response:
        return web.Response(body=self._dashboard, content_type="text/html", charset="utf-8")
