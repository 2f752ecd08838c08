"""The ``pigeon`` command: parse flags, pick the event loop, run the server until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from pigeon import __version__
from pigeon.server import DEFAULT_HOST, DEFAULT_MAX_BACKLOG, DEFAULT_MAX_LINE, DEFAULT_PORT, Server

log = logging.getLogger("pigeon")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
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
    parser.add_argument("--version", action="version", version=f"pigeon {__version__}")
    return parser


def loop_factory(choice: str) -> tuple[str, LoopFactory]:
    """The event loop's name and constructor for ``--loop``; raises ImportError for a missing uvloop."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


async def serve(server: Server, loop_name: str) -> None:
    """Run ``server`` until SIGINT or SIGTERM, then shut it down cleanly."""
    await server.start()
    log.info("pigeon %s listening on %s:%d (%s)", __version__, server.host, server.port, loop_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Windows has no add_signal_handler: Ctrl-C arrives as KeyboardInterrupt there
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pigeon`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        loop_name, new_loop = loop_factory(args.loop)
    except ImportError:
        log.error("--loop uvloop: uvloop is not installed")
        return 2
    server = Server(args.host, args.port, max_line=args.max_line, max_backlog=args.max_backlog)
    loop = new_loop()
    try:
        loop.run_until_complete(serve(server, loop_name))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror or exc)
        return 1
    except KeyboardInterrupt:
        loop.run_until_complete(server.stop())
    finally:
        loop.close()
    return 0
