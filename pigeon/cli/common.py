"""What the ``pigeon-cli`` subcommands share: argparse types, connection options, exit codes, CliError."""

from __future__ import annotations

import argparse
import os
import ssl
from typing import Any, TypeAlias

from pigeon.client import Client
from pigeon.client.address import TlsOption, url_keywords
from pigeon.client.base import DEFAULT_TIMEOUT
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

EXIT_ERROR = 1

PASSWORD_ENV = "PIGEON_PASSWORD"  # the password when --password is not given (it shows in no process list)


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


def add_tls(parser: argparse.ArgumentParser) -> None:
    """``--tls`` and ``--ca``: connect over TLS, trusting the system's CAs or the ones in a file."""
    parser.add_argument(
        "--tls", action="store_true", help="connect over TLS (the server's certificate checked)"
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        help="trust the CA certificates in FILE (PEM) instead of the system's; implies --tls",
    )


def tls_option(args: argparse.Namespace) -> TlsOption:
    """The client's ``tls`` for ``--tls`` and ``--ca``: a context trusting ``--ca``, True, or None."""
    if args.ca is not None:
        try:
            return ssl.create_default_context(cafile=args.ca)
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"cannot read the CA certificates of --ca {args.ca}: {exc}") from None
    return True if args.tls else None


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """What the client library's subcommands take: ``--url`` or ``--host`` and ``--port``, the
    credentials (``--user``, ``--password``), TLS (``--tls``, ``--ca``) and ``--timeout``."""
    parser.add_argument(
        "--url",
        metavar="URL",
        help="the broker as pigeon://[USER:PASSWORD@]HOST[:PORT], or pigeons://... for TLS "
        "(instead of --host and --port)",
    )
    parser.add_argument("--host", help=f"broker address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, help=f"broker port (default {DEFAULT_PORT})")
    parser.add_argument("--user", help="log in as USER (CONNECT <user> <password>)")
    parser.add_argument(
        "--password", help=f"the user's password (default: the {PASSWORD_ENV} environment variable)"
    )
    add_tls(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="longest wait for a reply (default %(default)s)",
    )


def client_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Client`` keywords that ``add_connection_options``'s flags give (all but the timeout).

    ``--user`` and ``--password`` replace a URL's; the password comes from
    PIGEON_PASSWORD when a user has none; ``--tls`` or ``--ca`` turn TLS on.
    """
    if args.url is not None:
        if args.host is not None or args.port is not None:
            raise CliError("give either --url or --host and --port")
        options = url_keywords(args.url, None)
    else:
        options = {
            "host": args.host or DEFAULT_HOST,
            "port": DEFAULT_PORT if args.port is None else args.port,
            "user": None,
            "password": None,
            "tls": None,
        }
    if args.user is not None:
        options["user"] = args.user
    if args.password is not None:
        options["password"] = args.password
    if options["user"] is not None and options["password"] is None:
        options["password"] = os.environ.get(PASSWORD_ENV)
        if options["password"] is None:
            raise CliError(f"--user {options['user']} needs --password or the {PASSWORD_ENV} variable")
    tls = tls_option(args)
    if tls is not None and not isinstance(options["tls"], ssl.SSLContext):
        options["tls"] = tls
    return options


def open_client(args: argparse.Namespace, **options: Any) -> Client:
    """A ``Client`` connected as the connection flags say (``options``: more ``Client`` keywords)."""
    return Client(timeout=args.timeout, **client_keywords(args), **options)
