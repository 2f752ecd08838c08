"""``pigeon passwd`` and ``pigeon-cli passwd``: read a password twice without echo, print its hash line.

The line goes into the users file as a user's ``password`` (docs/security.md).
A password is one word on the wire (``CONNECT <user> <password>``), so one
that is empty or holds whitespace is refused.
"""

from __future__ import annotations

import getpass
import sys

from pigeon.cli.common import EXIT_ERROR, Subparsers
from pigeon.server.users import hash_password


def password_problem(password: str) -> str | None:
    """Why ``password`` cannot be used, or None when it can."""
    if not password:
        return "the password is empty"
    if any(char.isspace() for char in password):
        return "the password contains whitespace (it is sent as one word of CONNECT <user> <password>)"
    return None


def run() -> int:
    """Ask for the password twice (no echo) and print its ``scrypt$...`` line; 1 when refused."""
    try:
        password = getpass.getpass("Password: ")
        again = getpass.getpass("Again: ")
    except EOFError:
        print("passwd: no password read", file=sys.stderr)
        return EXIT_ERROR
    problem = password_problem(password) or (None if again == password else "the passwords differ")
    if problem is not None:
        print(f"passwd: {problem}", file=sys.stderr)
        return EXIT_ERROR
    print(hash_password(password))
    return 0


def register(subparsers: Subparsers) -> None:
    """Add ``passwd`` to ``pigeon-cli``."""
    parser = subparsers.add_parser(
        "passwd",
        help="read a password (no echo) and print the hash line for a users file",
        description="Read a password twice without echo and print its scrypt hash line, "
        "for the 'password' of a user in the file given to pigeon --users.",
    )
    parser.set_defaults(func=lambda args: run())
