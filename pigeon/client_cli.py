"""The ``pigeon-cli`` command: shell tools that talk to a running broker, like redis-cli and nats.

Each subcommand lives in a module with a ``register(subparsers)`` function that
adds its parser and sets ``func`` (``args -> exit code``); list new modules in
``SUBCOMMAND_MODULES``. Failures print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import TypeAlias

from pigeon import __version__
from pigeon._clientbase import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT
from pigeon.errors import PigeonError

SUBCOMMAND_MODULES = ("pigeon.cli_pubsub", "pigeon.stats_cli", "pigeon.bench")

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT


class CliError(Exception):
    """A failure to report as one line on stderr."""


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """``--host``, ``--port`` and ``--timeout``, which every subcommand takes."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="broker address (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="broker port (default %(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="longest wait for a reply (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pigeon-cli``, with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="pigeon-cli", description="Talk to a Pigeon broker from the shell.")
    parser.add_argument("--version", action="version", version=f"pigeon-cli {__version__}")
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pigeon-cli`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, and keep Python's
        # final flush of stdout from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (PigeonError, CliError, OSError) as exc:
        print(f"pigeon-cli: {exc}", file=sys.stderr)
        return EXIT_ERROR
