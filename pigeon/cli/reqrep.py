"""``pigeon-cli`` subcommands ``request`` and ``reply``: request/reply from the shell, like ``nats
request`` and ``nats reply``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from pigeon.cli.common import EXIT_ERROR, Subparsers, add_connection_options, open_client, positive
from pigeon.client.base import DEFAULT_REQUEST_TIMEOUT
from pigeon.client.codec import Message
from pigeon.errors import InvalidArgumentError


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds over 0, not {text!r}")
    return value


def register(subparsers: Subparsers) -> None:
    """Add ``request`` and ``reply`` to ``pigeon-cli``."""
    request = subparsers.add_parser(
        "request",
        help="send a request and print its reply",
        description="Send DATA as a request to TOPIC and print the first reply; exit 1 without one in time.",
    )
    request.add_argument("topic")
    request.add_argument("data")
    request.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_REQUEST_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the reply (default {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    add_connection_options(request)
    request.set_defaults(func=run_request)

    reply = subparsers.add_parser(
        "reply",
        help="answer the requests sent to a topic, from a command or by echoing them",
        description="Answer each request to TOPIC: with the standard output of COMMAND run with the "
        "request on its standard input (-- COMMAND ARGS...), or with the request itself (--echo).",
    )
    reply.add_argument("topic", help="a topic, or a pattern (svc.*, svc.>)")
    reply.add_argument(
        "--group",
        metavar="NAME",
        help="join this consumer group: the responders of one group share the requests",
    )
    reply.add_argument("--echo", action="store_true", help="answer each request with its own data")
    reply.add_argument("--count", type=positive, metavar="N", help="exit after answering N requests")
    reply.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    add_connection_options(reply)
    reply.set_defaults(func=run_reply)


def run_request(args: argparse.Namespace) -> int:
    """``pigeon-cli request``: print the reply's data (exit 1 and a message on stderr on a timeout)."""
    with open_client(args) as client:
        answer = client.request(os.fsencode(args.topic), os.fsencode(args.data), timeout=args.timeout)
    out = sys.stdout.buffer
    out.write(answer.data + b"\n")
    out.flush()
    return 0


def _answer(message: Message, command: list[str]) -> bytes:
    """What to reply to ``message``: its data with no command (--echo), else the command's stdout."""
    if not command:
        return message.data
    done = subprocess.run(command, input=message.data, stdout=subprocess.PIPE, check=False)
    if done.returncode != 0:
        print(f"pigeon-cli: {command[0]} exited with {done.returncode}", file=sys.stderr, flush=True)
    return done.stdout


def run_reply(args: argparse.Namespace) -> int:
    """``pigeon-cli reply``: answer requests until interrupted, or until ``--count`` of them."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.echo == bool(command):
        raise InvalidArgumentError("give either --echo or -- COMMAND [ARGS...]")
    with open_client(args) as client:
        client.subscribe(os.fsencode(args.topic), args.group)
        print(f"answering requests to {args.topic}", file=sys.stderr, flush=True)
        answered = 0
        while args.count is None or answered < args.count:
            message = client.next_message()
            if message.reply_to is None:
                print("pigeon-cli: a plain message (not a request) was skipped", file=sys.stderr, flush=True)
                continue
            message.respond(_answer(message, command))
            answered += 1
    return 0 if answered or args.count is None else EXIT_ERROR
