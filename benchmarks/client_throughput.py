"""Pipelined publish throughput: the client library next to a raw socket, against one server, in one run.

Run from the repository root: ``python -m benchmarks.client_throughput``. Every
variant publishes the same messages to the same ``pigeon`` process (started
here on a free port, with backlog and memory limits large enough that nothing is refused) and
waits for every reply; the table gives messages per second and the ratio to
the raw socket, the best of ``--rounds`` rounds each.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Callable, Sequence

from pigeon import AsyncClient, Client
from pigeon.client.base import WINDOW
from pigeon.client.codec import CHUNK
from pigeon.server.loops import loop_factory
from pigeon.testing import ServerProcess

Variant = Callable[[str, int, str, list[bytes]], int]

RECORD_OVERHEAD = 128  # bytes the broker holds per message besides its payload, with room to spare


def raw_socket(host: str, port: int, topic: str, messages: list[bytes]) -> int:
    """The floor: PUBLISH lines joined in chunks, replies only counted (the client's chunk and window)."""
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"CONNECT\n")
        reply = sock.recv(100)
        client_id = reply.split()[1]
        head = b"PUBLISH %s %s " % (client_id, topic.encode())
        separator = b"\n" + head
        answered = 0
        for start in range(0, len(messages), CHUNK):
            sock.sendall(head + separator.join(messages[start : start + CHUNK]) + b"\n")
            sent = min(start + CHUNK, len(messages))
            while sent - answered > WINDOW:
                answered += sock.recv(1 << 18).count(b"\n")
        while answered < len(messages):
            answered += sock.recv(1 << 18).count(b"\n")
        return answered


def client_publish_many(host: str, port: int, topic: str, messages: list[bytes]) -> int:
    """``Client.publish_many``."""
    with Client(host, port) as client:
        return len(messages) - len(client.publish_many(topic, messages))


def client_no_wait(host: str, port: int, topic: str, messages: list[bytes]) -> int:
    """``Client.publish(wait=False)`` per message, then ``flush()``."""
    with Client(host, port) as client:
        for message in messages:
            client.publish(topic, message, wait=False)
        return len(messages) - len(client.flush())


def client_waited(host: str, port: int, topic: str, messages: list[bytes]) -> int:
    """``Client.publish`` per message: one round trip each, for contrast."""
    with Client(host, port) as client:
        for message in messages:
            client.publish(topic, message)
        return len(messages)


def _run_async(main: Callable[[], object], loop_name: str) -> int:
    _, new_loop = loop_factory(loop_name)
    loop = new_loop()
    try:
        return int(loop.run_until_complete(main()))  # type: ignore[arg-type]
    finally:
        loop.close()


def async_publish_many(loop_name: str) -> Variant:
    """``AsyncClient.publish_many`` on the given event loop."""

    def run(host: str, port: int, topic: str, messages: list[bytes]) -> int:
        async def main() -> int:
            async with AsyncClient(host, port) as client:
                return len(messages) - len(await client.publish_many(topic, messages))

        return _run_async(main, loop_name)

    return run


def async_no_wait(loop_name: str) -> Variant:
    """``AsyncClient.publish(wait=False)`` per message, then ``flush()``."""

    def run(host: str, port: int, topic: str, messages: list[bytes]) -> int:
        async def main() -> int:
            async with AsyncClient(host, port) as client:
                for message in messages:
                    await client.publish(topic, message, wait=False)
                return len(messages) - len(await client.flush())

        return _run_async(main, loop_name)

    return run


def measure(
    variants: dict[str, tuple[Variant, int]], messages: list[bytes], rounds: int, pin: bool = False
) -> list[str]:
    """One ``pigeon`` process for every variant (on CPU 0 with ``pin``); returns the table's lines."""
    # every variant's messages stay in backlogs (nobody subscribes): room for all of them, each
    # held in a record of its bytes plus a header, rounded up, and a slot in its backlog
    kept = len(messages) * (rounds * len(variants) + 1)
    held = kept * (len(messages[0]) + RECORD_OVERHEAD)
    server = ServerProcess("--max-backlog", str(kept), "--max-memory", str(held))
    if pin:
        os.sched_setaffinity(server.proc.pid, {0})
    try:
        results: dict[str, tuple[int, float]] = {}
        for round_no in range(rounds):
            for index, (name, (variant, divisor)) in enumerate(variants.items()):
                batch = messages[: len(messages) // divisor]
                start = time.perf_counter()
                accepted = variant(server.host, server.port, f"bench{index}-{round_no}", batch)
                elapsed = time.perf_counter() - start
                if accepted != len(batch):
                    raise RuntimeError(f"{name}: {len(batch) - accepted} messages refused")
                rate = len(batch) / elapsed
                if name not in results or rate > results[name][1]:
                    results[name] = (len(batch), rate)
    finally:
        server.stop()
    floor = results["raw socket"][1]
    lines = [f"server loop {server.loop_name}, {len(messages[0])}-byte messages, best of {rounds}"]
    lines.append(f"{'variant':<42} {'messages':>9} {'msgs/s':>11} {'vs raw':>7}")
    for name, (count, rate) in results.items():
        lines.append(f"{name:<42} {count:>9} {rate:>11,.0f} {rate / floor:>7.2f}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run every variant, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=64, help="message bytes (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin", action="store_true", help="run this process on CPU 1 (the server on CPU 0)")
    args = parser.parse_args(argv)
    if args.pin:
        os.sched_setaffinity(0, {1})
    messages = [(b"%0*d" % (args.size, i))[-args.size :] for i in range(args.messages)]
    client_loop = "uvloop" if loop_factory("auto")[0] == "uvloop" else "asyncio"
    variants: dict[str, tuple[Variant, int]] = {
        "raw socket": (raw_socket, 1),
        "Client.publish_many": (client_publish_many, 1),
        "Client.publish(wait=False)+flush": (client_no_wait, 1),
        f"AsyncClient.publish_many ({client_loop})": (async_publish_many(client_loop), 1),
        f"AsyncClient.publish(wait=False) ({client_loop})": (async_no_wait(client_loop), 1),
        "Client.publish (waited, 1/20)": (client_waited, 20),
    }
    for line in measure(variants, messages, args.rounds, args.pin):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
