"""What per-topic permissions cost a publisher: a user with 20 publish patterns against no auth, in one run.

Two measurements, each taking turns between the two set-ups and reporting medians:

- ``core``: pipelined PUBLISH lines through ``Broker.feed`` to one subscriber (no sockets: the
  check's share is not hidden by the kernel's). ``Broker(auth=True)`` with the publisher granted 20
  patterns, against ``Broker()``.
- ``server``: the same over TCP against two ``pigeon`` processes, one with ``--users`` (the
  publisher logs in as the 20-pattern user), one without.

Each runs with one topic (the connection's cached allowed topic: no pattern is looked at after the
first PUBLISH) and with 20 topics in turn (every PUBLISH changes topic, so each is checked against
the patterns; the last topic matches only the 20th pattern, ``orders.*.new``).

    python benchmarks/auth_overhead.py --level core --repeat 7
    python benchmarks/auth_overhead.py --level server --repeat 5 --messages 500000
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from pigeon._core import Broker
from pigeon.server.users import hash_password
from pigeon.testing import LineClient, ServerProcess

# 20 patterns of the three kinds the core compiles: token wildcards, prefixes, and one of each last
PATTERNS = [f"app{i}.events.*" for i in range(10)] + [f"svc{i}.>" for i in range(9)] + ["orders.*.new"]
# one topic per pattern, in the same order: topic i is allowed by pattern i only
TOPICS = (
    [f"app{i}.events.created" for i in range(10)] + [f"svc{i}.jobs.a" for i in range(9)] + ["orders.eu.new"]
)
PASSWORD = "bench-password"


def publish_lines(topics: list[str], count: int, size: int) -> bytes:
    """``count`` PUBLISH lines of client c2, going through ``topics`` in turn."""
    body = b"x" * size
    return b"".join(b"PUBLISH c2 %s %s\n" % (topics[i % len(topics)].encode(), body) for i in range(count))


def core_rate(auth: bool, topics: list[str], messages: int, size: int) -> float:
    """Publishes per second through ``Broker.feed``, in batches of 2,000 lines."""
    broker = Broker(auth=auth, max_backlog=messages, max_memory=8 << 30)
    sub = broker.open(lambda data: None)
    pub = broker.open(lambda data: None)
    if auth:  # identities preset (as a client certificate does): a bare CONNECT logs in
        broker.grant(sub, "sub", [], [">"], False)
        broker.grant(pub, "pub", PATTERNS, [], False)
    broker.feed(sub, b"CONNECT\n")
    broker.feed(pub, b"CONNECT\n")
    for topic in topics:
        broker.feed(sub, b"SUBSCRIBE c1 %s\n" % topic.encode())
    batch = publish_lines(topics, 2000, size)
    started = time.perf_counter()
    for _ in range(messages // 2000):
        broker.feed(pub, batch)
    return (messages // 2000 * 2000) / (time.perf_counter() - started)


def _drain(sock: socket.socket, lines: int, done: threading.Event) -> None:
    """Read until ``lines`` newlines have arrived."""
    seen = 0
    while seen < lines:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        seen += chunk.count(b"\n")
    done.set()


def _connect(server: ServerProcess, auth: bool, user: str) -> LineClient:
    client = server.client(timeout=120)
    reply = client.ask(f"CONNECT {user} {PASSWORD}" if auth else "CONNECT")
    assert reply.startswith(b"CONNECTED "), reply
    client.client_id = reply.split(b" ", 1)[1].decode()
    return client


def server_rate(server: ServerProcess, auth: bool, topics: list[str], messages: int, size: int) -> float:
    """Messages per second from a pipelined publisher to a subscriber over TCP (until the last arrives)."""
    sub, pub = _connect(server, auth, "sub"), _connect(server, auth, "pub")
    for topic in topics:
        sub.subscribe(topic)
    batch = publish_lines(topics, 2000, size).replace(b" c2 ", f" {pub.client_id} ".encode())
    rounds = messages // 2000
    received, answered = threading.Event(), threading.Event()
    readers = [
        threading.Thread(target=_drain, args=(sub.sock, rounds * 2000, received), daemon=True),
        threading.Thread(target=_drain, args=(pub.sock, rounds * 2000, answered), daemon=True),
    ]
    started = time.perf_counter()
    for reader in readers:
        reader.start()
    for _ in range(rounds):
        pub.sock.sendall(batch)
    if not received.wait(300) or not answered.wait(300):
        raise RuntimeError("the messages did not all arrive within 300 s")
    elapsed = time.perf_counter() - started
    sub.close()
    pub.close()
    return rounds * 2000 / elapsed


def users_file(directory: str) -> Path:
    path = Path(directory) / "users.toml"
    hashed = hash_password(PASSWORD)
    path.write_text(
        f'[users.pub]\npassword = "{hashed}"\npublish = {json.dumps(PATTERNS)}\n'
        f'[users.sub]\npassword = "{hashed}"\nsubscribe = [">"]\n'
    )
    return path


def main() -> int:
    """Take turns between auth and no auth, print medians and ratios."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--level", choices=("core", "server"), default="core")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    cases = {"1 topic": TOPICS[-1:], "20 topics": TOPICS}
    rates: dict[tuple[str, bool], list[float]] = {
        (case, auth): [] for case in cases for auth in (False, True)
    }
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        if args.level == "server":
            servers = {False: ServerProcess(), True: ServerProcess("--users", str(users_file(tmp)))}
        try:
            for _ in range(args.repeat):
                for case, topics in cases.items():
                    for auth in (False, True):
                        if args.level == "core":
                            rate = core_rate(auth, topics, args.messages, args.size)
                        else:
                            rate = server_rate(servers[auth], auth, topics, args.messages, args.size)
                        rates[case, auth].append(rate)
        finally:
            for server in servers.values():
                server.stop()
    print(f"{args.level}: {args.messages:,} publishes of {args.size} bytes, median of {args.repeat}")
    for case in cases:
        plain, checked = (statistics.median(rates[case, auth]) for auth in (False, True))
        print(
            f"  {case:9}  no auth {plain:>11,.0f}/s   20 patterns {checked:>11,.0f}/s"
            f"   ratio {checked / plain:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
