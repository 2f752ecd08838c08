"""``pigeon-cli stats``: the broker's figures, read with the STATS command, as tables.

It speaks the wire protocol (``Client.stats()``: ``STATS``, and ``STATS
TOPICS`` and ``STATS CONNECTIONS`` page by page), so it works against any
broker, with or without its HTTP monitoring listener. ``pigeon-cli top``
(``pigeon.cli.top``) shows the same figures live, with the table helpers
defined here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from pigeon.cli.common import Subparsers, add_connection_options, open_client

SECTIONS = ("server", "topics", "connections", "groups")


def human_bytes(n: float) -> str:
    """A byte count in B, kB, MB, GB (powers of 1000, as the dashboard)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``3d04h``, ``2h05m``, ``4m07s`` or ``9s``."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Rows aligned under a header: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]


def server_rows(stats: dict[str, Any]) -> list[tuple[str, object]]:
    """The server-wide figures as (name, value) rows, the by-kind dicts flattened."""
    rows: list[tuple[str, object]] = []
    for key, value in stats.items():
        if isinstance(value, dict):
            rows.extend((f"{key}.{kind}", count) for kind, count in value.items())
        elif key == "uptime_seconds":
            rows.append(("uptime", human_duration(value)))
        else:
            rows.append((key, value))
    return rows


def topic_rows(topics: Sequence[dict[str, Any]]) -> list[tuple[object, ...]]:
    """One row per topic, in the order given."""
    return [
        (t["name"], t["subscribers"], t["backlog_messages"], t["published"], t["delivered"]) for t in topics
    ]


TOPIC_HEADER = ("TOPIC", "SUBS", "BACKLOG", "PUBLISHED", "DELIVERED")


def connection_rows(connections: Sequence[dict[str, Any]]) -> list[tuple[object, ...]]:
    """One row per connection, in the order given."""
    return [
        (
            c["client_id"] or "-",
            c["address"] or "-",
            c.get("protocol", 1),  # absent from servers older than protocol 2
            c["subscriptions_total"],
            human_bytes(c["pending_bytes"]),
            c["messages_in"],
            c["messages_out"],
            human_duration(c["connected_seconds"]),
        )
        for c in connections
    ]


CONNECTION_HEADER = ("CLIENT", "ADDRESS", "PROTO", "SUBS", "PENDING", "MSGS IN", "MSGS OUT", "AGE")


def group_rows(groups: Sequence[dict[str, Any]]) -> list[tuple[object, ...]]:
    """One row per consumer group, in the order given (a pattern's default group named ``-``)."""
    return [
        (
            g["pattern"],
            g["group"] or "-",
            g["subscribers"],
            g["backlog_messages"],
            g["delivered"],
            g["unacked"],
        )
        for g in groups
    ]


GROUP_HEADER = ("TOPIC OR PATTERN", "GROUP", "SUBS", "BACKLOG", "DELIVERED", "UNACKED")


def _run_stats(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        figures: Any = client.stats(None if args.section == "server" else args.section)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    if args.section == "server":
        lines = table(("FIGURE", "VALUE"), server_rows(figures))
    elif args.section == "topics":
        lines = table(TOPIC_HEADER, topic_rows(figures))
    elif args.section == "groups":
        lines = table(GROUP_HEADER, group_rows(figures))
    else:
        lines = table(CONNECTION_HEADER, connection_rows(figures))
    print("\n".join(lines))
    return 0


def register(subparsers: Subparsers) -> None:
    """Add the ``stats`` subcommand to pigeon-cli."""
    stats = subparsers.add_parser("stats", help="print the broker's figures as a table")
    add_connection_options(stats)
    stats.add_argument("section", nargs="?", choices=SECTIONS, default="server", help="default %(default)s")
    stats.add_argument(
        "--json",
        action="store_true",
        help="print the figures as indented JSON (a listing: the entries of all its pages)",
    )
    stats.set_defaults(func=_run_stats)
