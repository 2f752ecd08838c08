"""What the ``pigeon-cli`` subcommands share: argparse types, connection options, exit codes, CliError."""

from __future__ import annotations

import argparse
from typing import TypeAlias

from pigeon.client.base import DEFAULT_TIMEOUT
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

EXIT_ERROR = 1


class CliError(Exception):
    """A failure to report as one line on stderr (``pigeon-cli: <message>``), with exit code 1."""


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_address(parser: argparse.ArgumentParser) -> None:
    """``--host`` and ``--port`` of the broker to talk to."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="broker address (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="broker port (default %(default)s)")


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """``--host``, ``--port`` and ``--timeout``, which the client library's subcommands take."""
    add_address(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="longest wait for a reply (default %(default)s)",
    )
