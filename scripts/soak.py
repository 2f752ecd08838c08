"""Soak test: many clients subscribe, publish and leave at random while every message is accounted for.

Starts a ``pigeon`` server, runs ``--clients`` connections for ``--duration``
seconds (each one publishing, subscribing, unsubscribing and leaving at random,
a new client taking the place of each one that leaves), then stops the
publishers, drains every backlog with a fresh subscriber and checks that each
acknowledged message (``PUBLISHED``) was delivered exactly once, and that
nothing unacknowledged was delivered. Clients leave with DISCONNECT and read
until the server closes, so everything routed to them reaches them. The
server's resident memory is sampled every second; the report gives it after
warm-up and at the end.

    python scripts/soak.py --duration 600 --clients 300        # the documented long run
    python scripts/soak.py --duration 20 --clients 100         # the CI version (tests/test_soak.py)

Exits 1 when the accounting fails or RSS grows past ``--max-rss-growth``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from pigeon.testing import ServerProcess

TOPICS = [f"soak.{i}" for i in range(60)]


@dataclass
class Ledger:
    """Every message's fate, as seen by the clients."""

    next_id: int = 0
    acked: set[str] = field(default_factory=set)
    refused: int = 0
    delivered: Counter[str] = field(default_factory=Counter)
    connections: int = 0

    def new_body(self) -> str:
        self.next_id += 1
        return f"m{self.next_id}"


class SoakClient:
    """One connection: a reader task sorts MESSAGE lines from replies, which answer commands in order."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.replies: deque[tuple[asyncio.Future[str], str | None]] = deque()
        self.subscribed: set[str] = set()
        self.client_id = ""

    async def open(self, host: str, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection(host, port, limit=1 << 22)
        self.reading = asyncio.create_task(self._read())
        self.client_id = (await self.command("CONNECT")).split()[1]
        self.ledger.connections += 1

    async def _read(self) -> None:
        while line := await self.reader.readline():
            text = line.decode().rstrip("\n")
            if text.startswith("MESSAGE "):
                self.ledger.delivered[text.split(" ", 2)[2]] += 1
                continue
            future, body = self.replies.popleft()
            if body is not None:
                if text.startswith("PUBLISHED "):
                    self.ledger.acked.add(body)
                else:
                    self.ledger.refused += 1
            future.set_result(text)

    def send(self, line: str, body: str | None = None) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.replies.append((future, body))
        self.writer.write(line.encode() + b"\n")
        return future

    async def command(self, line: str) -> str:
        return await self.send(line)

    async def publish_batch(self, topic: str, n: int) -> None:
        futures = []
        for _ in range(n):
            body = self.ledger.new_body()
            futures.append(self.send(f"PUBLISH {self.client_id} {topic} {body}", body))
        await asyncio.gather(*futures)

    async def subscribe(self, topic: str) -> None:
        if (await self.command(f"SUBSCRIBE {self.client_id} {topic}")).startswith("SUBSCRIBED"):
            self.subscribed.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        await self.command(f"UNSUBSCRIBE {self.client_id} {topic}")
        self.subscribed.discard(topic)

    async def leave(self) -> None:
        """DISCONNECT, then read until the server closes: every message routed here arrives."""
        assert await self.command("DISCONNECT") == "DISCONNECTED"
        await self.reading
        self.writer.close()


async def client_life(host: str, port: int, ledger: Ledger, stop: asyncio.Event, rng: random.Random) -> None:
    """One seat: a client acts at random until it leaves, then a new one takes its place."""
    while not stop.is_set():
        client = SoakClient(ledger)
        await client.open(host, port)
        while not stop.is_set():
            action = rng.random()
            if action < 0.45:
                await client.publish_batch(rng.choice(TOPICS), rng.randint(1, 50))
            elif action < 0.65:
                await client.subscribe(rng.choice(TOPICS))
            elif action < 0.75 and client.subscribed:
                await client.unsubscribe(rng.choice(sorted(client.subscribed)))
            elif action < 0.80:
                break
            else:
                await asyncio.sleep(rng.random() * 0.05)
        await client.leave()


async def drain(host: str, port: int, ledger: Ledger) -> int:
    """Subscribe a fresh client to every topic until STATS shows no backlog left; returns what it took."""
    client = SoakClient(ledger)
    await client.open(host, port)
    before = sum(ledger.delivered.values())
    for topic in TOPICS:
        await client.subscribe(topic)
    while True:
        stats = json.loads((await client.command("STATS")).split(" ", 1)[1])
        if stats["backlog_messages"] == 0:
            break
        await asyncio.sleep(0.05)
    await client.leave()
    return sum(ledger.delivered.values()) - before


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def soak(args: argparse.Namespace) -> int:
    server = ServerProcess(loop=args.loop)
    ledger = Ledger()
    rng = random.Random(args.seed)
    stop = asyncio.Event()
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    try:
        seats = [
            asyncio.create_task(
                client_life(server.host, server.port, ledger, stop, random.Random(rng.random()))
            )
            for _ in range(args.clients)
        ]
        while time.monotonic() - started < args.duration:
            await asyncio.sleep(1)
            samples.append((time.monotonic() - started, rss_kib(server.proc.pid)))
            if any(seat.done() for seat in seats):
                break
        stop.set()
        await asyncio.gather(*seats)
        drained = await drain(server.host, server.port, ledger)
        final_rss = rss_kib(server.proc.pid)
    finally:
        code = server.stop()
    duplicates = sum(1 for n in ledger.delivered.values() if n > 1)
    lost = ledger.acked - set(ledger.delivered)
    unacked = set(ledger.delivered) - ledger.acked
    warm = [rss for t, rss in samples if t >= args.duration * 0.2] or [final_rss]
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "loop": server.loop_name,
        "connections_opened": ledger.connections,
        "clients_at_once": args.clients,
        "published_acked": len(ledger.acked),
        "refused": ledger.refused,
        "delivered": sum(ledger.delivered.values()),
        "drained_at_end": drained,
        "duplicates": duplicates,
        "lost": len(lost),
        "delivered_unacked": len(unacked),
        "rss_kib_after_warmup": warm[0],
        "rss_kib_max_after_warmup": max(warm),
        "rss_kib_end": final_rss,
        "server_exit": code,
    }
    print(json.dumps(report, indent=2))
    ok = not duplicates and not lost and not unacked and code == 0
    if final_rss > warm[0] * args.max_rss_growth:
        print(f"RSS grew from {warm[0]} KiB to {final_rss} KiB", file=sys.stderr)
        ok = False
    return 0 if ok else 1


def main() -> int:
    """Parse the flags and run the soak."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=600, help="seconds of traffic (default %(default)s)"
    )
    parser.add_argument("--clients", type=int, default=300, help="connections at once (default %(default)s)")
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-rss-growth",
        type=float,
        default=1.5,
        help="fail when the final RSS exceeds the post-warm-up RSS by this factor (default %(default)s)",
    )
    return asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
