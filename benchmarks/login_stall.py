"""Do logins stall other clients? A publish/subscribe stream's latency with and without 200 concurrent logins.

A ``pigeon --users`` process (default scrypt parameters) carries a stream: one publisher sends a
timestamped message every millisecond, one subscriber notes each one's latency. Each round has a
quiet phase (stream only) and a login phase: another process opens 200 connections and sends
``CONNECT <user> <password>`` on all at once; the phase lasts until the last is answered. The
latencies of the messages sent during each phase are pooled over the rounds. The issue's bar: the
p99 with logins stays under the p99 without plus the time of one hash.

    python benchmarks/login_stall.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pigeon.server.users import hash_password, parse_hash
from pigeon.testing import LineClient, ServerProcess

USER, PASSWORD = "bench", "bench-password"


async def login_wave(host: str, port: int, count: int) -> None:
    """Open ``count`` connections, send a login on each at once, wait for every answer."""
    opened = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(count)))
    for _, writer in opened:
        writer.write(f"CONNECT {USER} {PASSWORD}\n".encode())
    replies = await asyncio.gather(*(reader.readline() for reader, _ in opened))
    bad = [reply for reply in replies if not reply.startswith(b"CONNECTED ")]
    if bad:
        raise RuntimeError(f"{len(bad)} logins failed: {bad[0]!r}")
    for _, writer in opened:
        writer.close()


def hash_seconds(samples: int = 20) -> float:
    """Median time of one check of a default-parameter hash."""
    hashed = parse_hash(hash_password(PASSWORD))
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        hashed.matches(PASSWORD.encode())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class Stream:
    """A publisher sending a timestamped message every ``interval`` s, and a subscriber timing them."""

    def __init__(self, server: ServerProcess, interval: float = 0.001) -> None:
        self.pub, self.sub = self._login(server), self._login(server)
        self.sub.subscribe("stream")
        self.interval = interval
        self.latencies: list[tuple[float, float]] = []  # (sent at, latency)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._publish), threading.Thread(target=self._receive)]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _login(server: ServerProcess) -> LineClient:
        client = server.client()
        reply = client.ask(f"CONNECT {USER} {PASSWORD}")
        client.client_id = reply.split(b" ", 1)[1].decode()
        return client

    def _publish(self) -> None:
        next_at = time.perf_counter()
        while not self._stop.is_set():
            self.pub.send(f"PUBLISH {self.pub.client_id} stream {time.perf_counter()!r}")
            self.pub.line()  # PUBLISHED
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
        self.pub.send(f"PUBLISH {self.pub.client_id} stream stop")

    def _receive(self) -> None:
        while True:
            body = self.sub.line().split(b" ", 2)[2]
            if body == b"stop":
                return
            sent = float(body)
            self.latencies.append((sent, time.perf_counter() - sent))

    def between(self, start: float, end: float) -> list[float]:
        """Latencies of the messages sent from ``start`` to ``end``."""
        return [latency for sent, latency in self.latencies if start <= sent <= end]

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    """Run the rounds and print the latencies and the hash time."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--quiet-seconds", type=float, default=3.0)
    parser.add_argument("--wave", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.wave:
        asyncio.run(login_wave(args.wave[0], int(args.wave[1]), args.logins))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "users.toml"
        path.write_text(
            f'[users.{USER}]\npassword = "{hash_password(PASSWORD)}"\npublish = [">"]\nsubscribe = [">"]\n'
        )
        server = ServerProcess("--users", str(path), "--max-connections", "100000")
        stream = Stream(server)
        quiet: list[float] = []
        busy: list[float] = []
        waves: list[float] = []
        try:
            for _ in range(args.rounds):
                start = time.perf_counter()
                time.sleep(args.quiet_seconds)
                quiet += stream.between(start, time.perf_counter())
                start = time.perf_counter()
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--logins",
                        str(args.logins),
                        "--wave",
                        server.host,
                        str(server.port),
                    ],
                    check=True,
                )
                end = time.perf_counter()
                waves.append(end - start)
                time.sleep(0.2)  # the last messages of the phase arrive
                busy += stream.between(start, end)
        finally:
            stream.stop()
            server.stop()
    hashed = hash_seconds()
    print(
        f"{args.rounds} rounds; {args.logins} concurrent logins per round, "
        f"answered in median {statistics.median(waves):.2f} s"
    )
    print(f"one hash (scrypt n=2^14 r=8 p=1): {hashed * 1000:.1f} ms")
    for name, values in (("stream only", quiet), ("with logins", busy)):
        print(
            f"{name:12} {len(values):6} messages  p50 {percentile(values, 0.5) * 1000:7.2f} ms"
            f"  p99 {percentile(values, 0.99) * 1000:7.2f} ms  max {max(values) * 1000:7.2f} ms"
        )
    bar = percentile(quiet, 0.99) + hashed
    verdict = "within" if percentile(busy, 0.99) <= bar else "OVER"
    print(f"bar (p99 without + one hash): {bar * 1000:.2f} ms; p99 with logins {verdict} it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
