"""What the ``pigeon`` command does on each signal.

SIGINT, SIGTERM and SIGQUIT (nginx's graceful stop) stop the server cleanly;
SIGHUP reloads the users file (``--users``); SIGUSR1 logs the counters on one
line; the server keeps serving through both. Windows has
none of these but SIGINT, which arrives there as KeyboardInterrupt instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pigeon")

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGQUIT")


def counters_line(stats: dict[str, Any]) -> str:
    """The server-wide figures as ``name=value`` pairs on one line (the tables by kind left out)."""
    return " ".join(
        f"{name}={round(value, 3) if isinstance(value, float) else value}"
        for name, value in stats.items()
        if not isinstance(value, dict)
    )


def _stopper(name: str, stop: Callable[[], object]) -> Callable[[], None]:
    def handler() -> None:
        log.info("%s: shutting down", name)
        stop()

    return handler


def _reloader(reload: Callable[[], object]) -> Callable[[], None]:
    def handler() -> None:
        reload()  # it logs what it did

    return handler


def install(
    loop: asyncio.AbstractEventLoop,
    stop: Callable[[], object],
    stats: Callable[[], dict[str, Any]],
    reload: Callable[[], object],
) -> None:
    """Handle the signals this platform has: ``stop()`` on INT, TERM and QUIT; ``reload()`` on HUP;
    a log line of ``stats()`` on USR1."""
    handlers: dict[str, Callable[[], None]] = {name: _stopper(name, stop) for name in STOP_SIGNALS}
    handlers["SIGHUP"] = _reloader(reload)
    handlers["SIGUSR1"] = lambda: log.info("SIGUSR1: %s", counters_line(stats()))
    for name, handler in handlers.items():
        number = getattr(signal, name, None)
        if number is None:
            continue
        # Windows event loops have no add_signal_handler
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(number, handler)
