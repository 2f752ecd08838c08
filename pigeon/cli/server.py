"""The ``pigeon`` command: parse flags, pick the event loop, run the server until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pigeon._version import __version__
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT
from pigeon.server import logs
from pigeon.server.limits import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BACKLOG,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_SUBSCRIPTIONS,
    DEFAULT_MAX_TOPICS,
    raise_open_files_limit,
)
from pigeon.server.loops import loop_factory
from pigeon.server.protocol import Server

if TYPE_CHECKING:
    from pigeon.server.monitor import Monitor

log = logging.getLogger("pigeon")

DEFAULT_HTTP_HOST = "127.0.0.1"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 0 to 65535, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 (off) or more, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pigeon`` command."""
    parser = argparse.ArgumentParser(
        prog="pigeon",
        description="Pigeon: a lightweight pub/sub broker. Each message goes to one subscriber, in turn.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="TCP port; 0 picks a free one (default %(default)s)"
    )
    parser.add_argument(
        "--max-line",
        type=_positive,
        default=DEFAULT_MAX_LINE,
        metavar="BYTES",
        help="longest command line; a longer one closes its connection (default %(default)s)",
    )
    parser.add_argument(
        "--max-backlog",
        type=_positive,
        default=DEFAULT_MAX_BACKLOG,
        metavar="MESSAGES",
        help="messages a topic keeps while no subscriber can take them (default %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open connections; one more gets ERROR and is closed (default %(default)s)",
    )
    parser.add_argument(
        "--max-memory",
        type=_positive,
        default=DEFAULT_MAX_MEMORY,
        metavar="BYTES",
        help="message bytes in all backlogs together; a PUBLISH past it gets ERROR (default %(default)s)",
    )
    parser.add_argument(
        "--max-subscriptions",
        type=_positive,
        default=DEFAULT_MAX_SUBSCRIPTIONS,
        metavar="N",
        help="topics one connection subscribes to (default %(default)s)",
    )
    parser.add_argument(
        "--max-topics",
        type=_positive,
        default=DEFAULT_MAX_TOPICS,
        metavar="N",
        help="topics the server holds (default %(default)s)",
    )
    parser.add_argument(
        "--max-pending",
        type=_positive,
        default=DEFAULT_MAX_PENDING,
        metavar="BYTES",
        help="unsent output of one connection before it is dropped as a slow consumer (default %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that sends nothing for this long; 0 is off (default %(default)s)",
    )
    parser.add_argument(
        "--http-port",
        type=_port,
        metavar="PORT",
        help="serve /metrics, JSON figures and a dashboard over HTTP on this port; 0 picks a free one "
        "(off by default; needs the 'monitor' extra)",
    )
    parser.add_argument(
        "--http-host",
        default=DEFAULT_HTTP_HOST,
        help="address of the HTTP monitoring listener (default %(default)s)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop where installed with auto (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="default %(default)s",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or as one JSON object each (default %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"pigeon {__version__}")
    return parser


def _raise_open_files_limit(max_connections: int) -> None:
    """Let the process hold max_connections sockets, as far as the hard limit allows (as Redis does)."""
    # room for the listener, the log and the interpreter's own files
    want = max_connections + 64
    limit = raise_open_files_limit(want)
    if limit is not None and limit < want:
        log.warning(
            "open files limit %d is below --max-connections %d: accept will fail before the limit",
            limit,
            max_connections,
        )


async def serve(server: Server, loop_name: str, monitor: Monitor | None = None) -> int:
    """Run ``server`` (and ``monitor``) until SIGINT or SIGTERM, shut down cleanly; returns the exit code.

    Raises OSError when the broker's own address cannot be bound.
    """
    await server.start()
    if monitor is not None:
        try:
            await monitor.start()
        except OSError as exc:
            log.error("cannot listen on %s:%d for HTTP: %s", monitor.host, monitor.port, exc.strerror or exc)
            await server.stop()
            return 1
        log.info("monitoring on http://%s:%d/", monitor.host, monitor.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Windows has no add_signal_handler: Ctrl-C arrives as KeyboardInterrupt there
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # only now, so that whoever waits for this line can signal a clean stop at once
    log.info("pigeon %s listening on %s:%d (%s)", __version__, server.host, server.port, loop_name)
    await stop.wait()
    log.info("shutting down")
    if monitor is not None:
        await monitor.stop()
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pigeon`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        loop_name, new_loop = loop_factory(args.loop)
    except ImportError:
        log.error("--loop uvloop: uvloop is not installed")
        return 2
    _raise_open_files_limit(args.max_connections)
    server = Server(
        args.host,
        args.port,
        max_line=args.max_line,
        max_backlog=args.max_backlog,
        max_connections=args.max_connections,
        max_memory=args.max_memory,
        max_subscriptions=args.max_subscriptions,
        max_topics=args.max_topics,
        max_pending=args.max_pending,
        idle_timeout=args.idle_timeout,
    )
    monitor = None
    if args.http_port is not None:
        try:
            from pigeon.server.monitor import Monitor
        except ImportError as exc:
            log.error("--http-port needs the monitor extra: pip install 'pigeon-broker[monitor]' (%s)", exc)
            return 2
        monitor = Monitor(server.broker, args.http_host, args.http_port)
    loop = new_loop()
    code = 0
    try:
        code = loop.run_until_complete(serve(server, loop_name, monitor))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror or exc)
        return 1
    except KeyboardInterrupt:
        if monitor is not None:
            loop.run_until_complete(monitor.stop())
        loop.run_until_complete(server.stop())
    finally:
        loop.close()
    return code
