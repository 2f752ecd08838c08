"""The ``pigeon-cli`` command: shell tools that talk to a running broker, like redis-cli and nats.

Each subcommand lives in a module with a ``register(subparsers)`` function that
adds its parser and sets ``func`` (``args -> exit code``); list new modules in
``SUBCOMMAND_MODULES``. Failures print one line on stderr, never a traceback.
``python -m pigeon.cli.client`` runs it where the console script is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pigeon._version import __version__
from pigeon.cli.common import EXIT_ERROR, CliError
from pigeon.errors import PigeonError

SUBCOMMAND_MODULES = (
    "pigeon.cli.pubsub",
    "pigeon.cli.reqrep",
    "pigeon.cli.stats",
    "pigeon.cli.top",
    "pigeon.cli.cluster",
    "pigeon.bench.load",
    "pigeon.cli.passwd",
)

EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT


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


if __name__ == "__main__":
    sys.exit(main())
