"""``pigeon-cli top``: a live terminal view of a broker, refreshed from its STATS replies.

Each refresh reads the server-wide figures and the full topic, consumer group
and connection listings (``Client.stats()``, every page; groups only from a
server whose HELLO names ``groups``). It needs a terminal; its errors are one
line on stderr, like every pigeon-cli command's.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pigeon.cli.common import CliError, Subparsers, add_connection_options, open_client
from pigeon.cli.stats import (
    CONNECTION_HEADER,
    GROUP_HEADER,
    connection_rows,
    group_rows,
    human_bytes,
    human_duration,
    table,
)
from pigeon.client import Client

# curses is imported where it is used: Windows has none, and every pigeon-cli
# command loads this module to register ``top``.
if TYPE_CHECKING:
    import curses


@dataclass
class Sample:
    """The broker's figures at one moment (``at`` is this process's monotonic clock)."""

    at: float
    stats: dict[str, Any]
    topics: list[dict[str, Any]]
    connections: list[dict[str, Any]]
    groups: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, client: Client) -> Sample:
        """Ask the broker for every section (its groups when it has them)."""
        stats = client.stats()
        topics = client.stats("topics")
        connections = client.stats("connections")
        info = client.server_info
        groups = client.stats("groups") if info is not None and "groups" in info.features else []
        return cls(time.monotonic(), stats, topics, connections, groups)


def _per_second(now: float, then: float, seconds: float) -> float:
    return max(0.0, now - then) / seconds if seconds > 0 else 0.0


def screen_lines(current: Sample, previous: Sample | None, target: str) -> list[str]:
    """What the screen shows: a summary, the busiest topics, the consumer groups (when there are
    any), then the clients."""
    s = current.stats
    seconds = current.at - previous.at if previous is not None else 0.0
    before = previous.stats if previous is not None else s

    def rate(key: str) -> float:
        return _per_second(s[key], before[key], seconds)

    errors = sum(s["errors"].values())
    lines = [
        f"pigeon {target}  up {human_duration(s['uptime_seconds'])}  "
        f"connections {s['connections']} ({s['connections_total']} total)  topics {s['topics']}",
        f"msgs/s in {rate('published'):.0f}  out {rate('delivered'):.0f}    "
        f"bytes/s in {human_bytes(rate('bytes_in'))}  out {human_bytes(rate('bytes_out'))}",
        f"published {s['published']}  delivered {s['delivered']}  "
        f"backlog {s['backlog_messages']} ({human_bytes(s['backlog_bytes'])})  "
        f"refused {s['refused']}  errors {errors}  slow consumers {s['slow_consumers']}",
        "",
    ]
    old = {t["name"]: t for t in previous.topics} if previous is not None else {}
    rows = []
    for t in current.topics:
        was = old.get(t["name"], t)
        rows.append(
            (
                _per_second(t["published"], was["published"], seconds),
                _per_second(t["delivered"], was["delivered"], seconds),
                t,
            )
        )
    rows.sort(key=lambda r: (-r[0] - r[1], -r[2]["backlog_messages"], r[2]["name"]))
    lines += table(
        ("TOPIC", "SUBS", "BACKLOG", "IN/S", "OUT/S", "PUBLISHED", "DELIVERED"),
        [
            (
                t["name"],
                t["subscribers"],
                t["backlog_messages"],
                f"{r_in:.0f}",
                f"{r_out:.0f}",
                t["published"],
                t["delivered"],
            )
            for r_in, r_out, t in rows
        ],
    )
    lines.append("")
    if current.groups:
        lines += table(GROUP_HEADER, group_rows(current.groups))
        lines.append("")
    lines += table(CONNECTION_HEADER, connection_rows(current.connections))
    return lines


def _draw(screen: curses.window, lines: list[str], footer: str) -> None:
    import curses

    screen.erase()
    height, width = screen.getmaxyx()
    for y, line in enumerate(lines[: height - 1]):
        screen.addnstr(y, 0, line, width - 1, curses.A_BOLD if y == 0 else curses.A_NORMAL)
    screen.addnstr(height - 1, 0, footer, width - 1, curses.A_REVERSE)
    screen.refresh()


def _loop(
    screen: curses.window, client: Client, target: str, interval: float, iterations: int | None
) -> None:
    import curses

    curses.curs_set(0)
    screen.timeout(int(interval * 1000))
    previous: Sample | None = None
    shown = 0
    while iterations is None or shown < iterations:
        current = Sample.read(client)
        _draw(screen, screen_lines(current, previous, target), "q: quit")
        shown += 1
        previous = current
        key = screen.getch()
        if key in (ord("q"), ord("Q"), 27):
            return


def run(client: Client, interval: float, iterations: int | None) -> int:
    """Show the live view until q (or ``iterations`` refreshes); returns the exit code.

    Raises CliError when there is no terminal to draw on.
    """
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CliError("top needs a terminal (for plain output, use pigeon-cli stats)")
    try:
        import curses
    except ImportError:
        raise CliError("top needs the curses module, which this Python does not have") from None
    try:
        curses.wrapper(_loop, client, f"{client.host}:{client.port}", interval, iterations)
    except curses.error as exc:
        raise CliError(f"top cannot draw on this terminal: {exc}") from None
    except KeyboardInterrupt:
        pass
    return 0


def _run(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        return run(client, args.interval, args.iterations)


def register(subparsers: Subparsers) -> None:
    """Add the ``top`` subcommand to pigeon-cli."""
    top = subparsers.add_parser("top", help="a live view of the broker's traffic, topics and clients")
    add_connection_options(top)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("-n", "--iterations", type=int, help="stop after this many refreshes (default: until q)")
    top.set_defaults(func=_run)
