"""Client throughput against one server, in one run: pipelined publishing next to a raw socket, and
consuming plainly next to consuming with acknowledgements.

Run from the repository root: ``python -m benchmarks.client_throughput``. Every
publish variant publishes the same messages to the same ``pigeon`` process (started
here on a free port, with backlog and memory limits large enough that nothing waits) and
waits for every reply; the table gives messages per second and the ratio to
the raw socket, the best of ``--rounds`` rounds each. Every consume variant then
takes the same number of messages from a backlog filled beforehand (not timed):
plainly, and with ``ack=True`` (prefetch ``ACK_PREFETCH``) acknowledging every
``ACK_BATCH`` messages with one ``client.ack()``; its table gives the ratio to
plain consuming with the same client.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Callable, Sequence

from pigeon import AsyncClient, Client, Message
from pigeon.client.base import WINDOW
from pigeon.client.codec import CHUNK, pub_frames
from pigeon.server.loops import loop_factory
from pigeon.testing import ServerProcess

Variant = Callable[[str, int, str, list[bytes]], int]
Consumer = Callable[[str, int, str, int], int]

RECORD_OVERHEAD = 128  # bytes the broker holds per message besides its payload, with room to spare
ACK_PREFETCH = 1000  # unacknowledged messages an acknowledging consumer holds (the broker's default)
ACK_BATCH = 100  # messages acknowledged by one client.ack() (one ACK <first>-<last> line)


def raw_socket(host: str, port: int, topic: str, messages: list[bytes]) -> int:
    """The floor: the PUB frames the client sends (protocol 2), built per chunk as the client builds
    them (``codec.pub_frames``), replies only counted (the client's chunk and window)."""
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"CONNECT\n")
        reply = sock.recv(100)
        client_id = reply.split()[1]
        name = topic.encode()
        answered = 0
        for start in range(0, len(messages), CHUNK):
            sock.sendall(pub_frames(client_id, name, messages[start : start + CHUNK]))
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


def client_consume(ack: bool) -> Consumer:
    """``Client.next_message`` for ``count`` messages; with ``ack``, acknowledged in batches."""

    def run(host: str, port: int, topic: str, count: int) -> int:
        with Client(host, port) as client:
            client.subscribe(topic, ack=ack, prefetch=ACK_PREFETCH if ack else None)
            batch: list[Message] = []
            for _ in range(count):
                batch.append(client.next_message(10))
                if ack and len(batch) == ACK_BATCH:
                    client.ack(batch)
                    batch = []
            if ack and batch:
                client.ack(batch)
            if ack and client.check_acks():
                raise RuntimeError("the broker refused acknowledgements")
            return count

    return run


def async_consume(ack: bool, loop_name: str) -> Consumer:
    """``AsyncClient.next_message`` for ``count`` messages; with ``ack``, acknowledged in batches."""

    def run(host: str, port: int, topic: str, count: int) -> int:
        async def main() -> int:
            async with AsyncClient(host, port) as client:
                await client.subscribe(topic, ack=ack, prefetch=ACK_PREFETCH if ack else None)
                batch: list[Message] = []
                for _ in range(count):
                    batch.append(await client.next_message(10))
                    if ack and len(batch) == ACK_BATCH:
                        client.ack(batch)
                        batch = []
                if ack and batch:
                    client.ack(batch)
                if ack and await client.check_acks():
                    raise RuntimeError("the broker refused acknowledgements")
                return count

        return _run_async(main, loop_name)

    return run


def measure_consume(
    server: ServerProcess, consumers: dict[str, tuple[Consumer, str]], messages: list[bytes], rounds: int
) -> list[str]:
    """Each consumer takes ``messages`` from a backlog filled first (not timed); the table's lines.

    ``consumers`` maps each name to its consumer and the name of the plain one it is compared with.
    """
    results: dict[str, float] = {}
    for round_no in range(rounds):
        for index, (name, (consumer, _)) in enumerate(consumers.items()):
            topic = f"consume{index}-{round_no}"
            raw_socket(server.host, server.port, topic, messages)  # the backlog to consume (not timed)
            start = time.perf_counter()
            taken = consumer(server.host, server.port, topic, len(messages))
            rate = taken / (time.perf_counter() - start)
            results[name] = max(rate, results.get(name, 0.0))
    lines = [f"{'consume variant':<52} {'messages':>9} {'msgs/s':>11} {'vs plain':>8}"]
    for name, (_, plain) in consumers.items():
        ratio = results[name] / results[plain]
        lines.append(f"{name:<52} {len(messages):>9} {results[name]:>11,.0f} {ratio:>8.2f}")
    return lines


def measure(
    variants: dict[str, tuple[Variant, int]],
    messages: list[bytes],
    rounds: int,
    pin: bool = False,
    consumers: dict[str, tuple[Consumer, str]] | None = None,
) -> list[str]:
    """One ``pigeon`` process for every variant (on CPU 0 with ``pin``); returns the tables' lines."""
    # every variant's messages stay in backlogs (nobody subscribes): room for all of them, each
    # held in a record of its bytes plus a header, rounded up, and a slot in its backlog
    kept = len(messages) * (rounds * len(variants) + 1)  # consumers take theirs before the next round
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
        consumed = measure_consume(server, consumers or {}, messages, rounds)
    finally:
        server.stop()
    floor = results["raw socket"][1]
    lines = [f"server loop {server.loop_name}, {len(messages[0])}-byte messages, best of {rounds}"]
    lines.append(f"{'variant':<42} {'messages':>9} {'msgs/s':>11} {'vs raw':>7}")
    for name, (count, rate) in results.items():
        lines.append(f"{name:<42} {count:>9} {rate:>11,.0f} {rate / floor:>7.2f}")
    return lines + consumed if consumers else lines


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
    consumers: dict[str, tuple[Consumer, str]] = {
        "Client, plain": (client_consume(False), "Client, plain"),
        "Client, ack=True, client.ack per 100": (client_consume(True), "Client, plain"),
        f"AsyncClient, plain ({client_loop})": (
            async_consume(False, client_loop),
            f"AsyncClient, plain ({client_loop})",
        ),
        f"AsyncClient, ack=True, client.ack per 100 ({client_loop})": (
            async_consume(True, client_loop),
            f"AsyncClient, plain ({client_loop})",
        ),
    }
    for line in measure(variants, messages, args.rounds, args.pin, consumers):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
