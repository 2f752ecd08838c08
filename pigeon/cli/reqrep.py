"""``pigeon-cli`` subcommands ``request`` and ``reply``: request/reply from the shell, like ``nats
request`` and ``nats reply``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from pigeon.cli.common import EXIT_ERROR, Subparsers, add_connection_options, open_client, positive
from pigeon.client.codec import Message
from pigeon.errors import InvalidArgumentError


def register(subparsers: Subparsers) -> None:
    """Add ``request`` and ``reply`` to ``pigeon-cli``."""
    request = subparsers.add_parser(
        "request",
        help="send a request and print its reply",
        description="Send DATA as a request to TOPIC and print the first reply; exit 1 without one within "
        "--timeout seconds.",
    )
    request.add_argument("topic")
    request.add_argument("data")
    add_connection_options(request)
    request.set_defaults(func=run_request)

    reply = subparsers.add_parser(
        "reply",
        help="answer the requests sent to a topic, from a command or by echoing them",
        usage="pigeon-cli reply [options] TOPIC (--echo | -- COMMAND [ARGS...])",
        description="Answer each request to TOPIC: with the standard output of COMMAND run with the "
        "request on its standard input (-- COMMAND ARGS...), or with the request itself (--echo). "
        "With a COMMAND, the options come before TOPIC.",
    )
    reply.add_argument("topic", help="a topic, or a pattern (svc.*, svc.>)")
    reply.add_argument(
        "--group",
        metavar="NAME",
        help="join this consumer group: the responders of one group share the requests",
    )
    reply.add_argument("--echo", action="store_true", help="answer each request with its own data")
    reply.add_argument("--count", type=positive, metavar="N", help="exit after answering N requests")
    # after "--" every word is the command's, options included
    reply.add_argument("command", nargs="*", help="-- COMMAND [ARGS...]: answers with its stdout")
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
    command: list[str] = args.command
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
