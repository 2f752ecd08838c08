"""``pigeon-cli`` subcommands ``pub``, ``sub`` and ``ping``."""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
from collections.abc import Iterator
from typing import BinaryIO

from pigeon.cli.common import EXIT_ERROR, Subparsers, add_connection_options, open_client, positive
from pigeon.client import Client
from pigeon.client.codec import Message
from pigeon.errors import InvalidArgumentError, StaleDeliveryError

READ_SIZE = 64 * 1024


def register(subparsers: Subparsers) -> None:
    """Add ``pub``, ``sub`` and ``ping`` to ``pigeon-cli``."""
    pub = subparsers.add_parser(
        "pub",
        help="publish a message, or one per line of stdin",
        description="Publish MESSAGE to TOPIC; without MESSAGE, publish each line of stdin.",
    )
    pub.add_argument("topic")
    pub.add_argument("message", nargs="?")
    add_connection_options(pub)
    pub.set_defaults(func=run_pub)

    sub = subparsers.add_parser(
        "sub",
        help="print the messages delivered to this subscriber",
        description="Subscribe and print each delivery's data on its own line, until interrupted.",
    )
    sub.add_argument("topics", nargs="+", metavar="topic", help="a topic, or a pattern (orders.*, orders.>)")
    sub.add_argument(
        "--group",
        metavar="NAME",
        help="join this consumer group on each topic: every group gets each message once, shared among "
        "its members; the group keeps a backlog while none is there",
    )
    sub.add_argument("--count", type=positive, metavar="N", help="exit after N messages")
    sub.add_argument(
        "--json",
        action="store_true",
        help='print {"topic": ..., "data": ...} per message ("data_base64" when not UTF-8)',
    )
    sub.add_argument(
        "--ack",
        action="store_true",
        help="subscribe with acknowledgements: each message is acknowledged once printed (at-least-once)",
    )
    sub.add_argument(
        "--prefetch",
        type=positive,
        metavar="N",
        help="with --ack: hold at most N unacknowledged messages (default: the broker's --default-prefetch)",
    )
    sub.add_argument(
        "--reconnect",
        action="store_true",
        help="when the connection drops (e.g. a broker restart), connect again and resubscribe, for ever",
    )
    add_connection_options(sub)
    sub.set_defaults(func=run_sub)

    ping = subparsers.add_parser("ping", help="measure the round trip to the broker")
    ping.add_argument("--count", type=positive, default=1, metavar="N", help="pings to send (default 1)")
    add_connection_options(ping)
    ping.set_defaults(func=run_ping)


def _client(args: argparse.Namespace) -> Client:
    if getattr(args, "reconnect", False):
        return open_client(args, reconnect=True, reconnect_timeout=math.inf)
    return open_client(args)


def stdin_lines(stream: BinaryIO) -> Iterator[list[bytes]]:
    """Lines of ``stream`` as they become available (no trailing ``\\n`` or ``\\r\\n``), in batches."""
    tail = b""
    read = getattr(stream, "read1", stream.read)
    while chunk := read(READ_SIZE):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        if lines:
            yield [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if tail:
        yield [tail[:-1] if tail.endswith(b"\r") else tail]


def run_pub(args: argparse.Namespace) -> int:
    """``pigeon-cli pub``: exit 1 when any message is refused (each refusal is reported)."""
    # the arguments' bytes as the shell passed them, UTF-8 or not (argv decodes them with surrogateescape)
    topic = os.fsencode(args.topic)
    with _client(args) as client:
        if args.message is not None:
            client.publish(topic, os.fsencode(args.message))
            return 0
        failed = False
        sent = 0
        for lines in stdin_lines(sys.stdin.buffer):
            for refused in client.publish_many(topic, lines):
                line = sent + refused.index + 1
                print(f"pigeon-cli: line {line} refused: {refused.error}", file=sys.stderr)
                failed = True
            sent += len(lines)
        return EXIT_ERROR if failed else 0


def _format(message: Message, as_json: bool) -> bytes:
    if not as_json:
        return message.data + b"\n"
    record: dict[str, str] = {"topic": message.topic}
    try:
        record["data"] = message.data.decode()
    except UnicodeDecodeError:
        record["data_base64"] = base64.b64encode(message.data).decode()
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


def run_sub(args: argparse.Namespace) -> int:
    """``pigeon-cli sub``: print deliveries until interrupted, or until ``--count`` of them.

    With ``--group`` it joins that consumer group on each topic or pattern.
    With ``--ack`` each message is acknowledged after it is printed (and
    flushed), so one that the command dies before printing is delivered again.
    With ``--reconnect`` a lost connection is re-established (retrying for
    ever) and the subscriptions restored; without it, a lost connection ends
    the command with an error.
    """
    if args.prefetch is not None and not args.ack:
        raise InvalidArgumentError("--prefetch needs --ack")
    out = sys.stdout.buffer
    with _client(args) as client:
        for topic in args.topics:
            client.subscribe(os.fsencode(topic), args.group, ack=args.ack, prefetch=args.prefetch)
        print(f"subscribed to {' '.join(args.topics)}; waiting for messages", file=sys.stderr, flush=True)
        received = 0
        while args.count is None or received < args.count:
            message = client.next_message()
            out.write(_format(message, args.json))
            out.flush()
            if args.ack:
                _acknowledge(message)
            received += 1
    return 0


def _acknowledge(message: Message) -> None:
    """Acknowledge a printed message; one whose connection has gone since is only reported."""
    try:
        message.ack()
    except StaleDeliveryError as exc:
        # printed, but the broker took it back when the connection dropped: it comes again
        print(f"pigeon-cli: not acknowledged, will be delivered again: {exc}", file=sys.stderr, flush=True)


def run_ping(args: argparse.Namespace) -> int:
    """``pigeon-cli ping``: print each round trip in milliseconds."""
    with _client(args) as client:
        for _ in range(args.count):
            print(f"PONG {client.ping() * 1000:.3f} ms", flush=True)
    return 0
