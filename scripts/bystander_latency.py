"""A bystander's PING round trips while the HTTP monitoring endpoints are scraped, with many topics.

Starts a ``pigeon`` server with its HTTP listener, makes ``--topics`` topics
(one waiting message each), then runs a bystander in its own process that
sends PING after PING and times each round trip, while this process fetches
each endpoint ``--scrapes`` times in a row. The report gives, per phase (quiet,
then each endpoint), the bystander's round trips (count, p50, p99, max) and
the endpoint's own response times and sizes.

    python scripts/bystander_latency.py                                  # 100,000 topics, 10 scrapes each
    python scripts/bystander_latency.py --metrics-topics 100 --loop asyncio

Not a test: it measures, it asserts nothing (the machine's noise is in the
figures; run it on a quiet machine).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
import urllib.request
from collections.abc import Sequence
from multiprocessing.connection import Connection

from pigeon.testing import LineClient, ServerProcess

MONITORING_PREFIX = "monitoring on "


def _bystander(host: str, port: int, results: Connection) -> None:
    """PING until told to stop; send back (sent at, round trip) pairs, monotonic seconds."""
    client = LineClient(host, port)
    samples: list[tuple[float, float]] = []
    while not results.poll():
        start = time.monotonic()
        assert client.ask("PING") == b"PONG"
        samples.append((start, time.monotonic() - start))
    results.send(samples)
    client.close()


def _make_topics(proc: ServerProcess, count: int) -> None:
    """One message waiting in each of ``count`` topics, published in pipelined batches."""
    client = proc.client(timeout=120)
    client.connect()
    batch = 10_000
    for first in range(0, count, batch):
        names = range(first, min(first + batch, count))
        client.send("".join(f"PUBLISH {client.client_id} topic-{i} x\n" for i in names))
        for _ in names:
            client.line()
    client.close()


def _fetch(url: str) -> tuple[float, int]:
    """Seconds and bytes of one GET."""
    start = time.monotonic()
    with urllib.request.urlopen(url, timeout=120) as response:
        size = len(response.read())
    return time.monotonic() - start, size


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    """Run the measurement and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--topics", type=int, default=100_000)
    parser.add_argument("--scrapes", type=int, default=10, help="GETs of each endpoint (default %(default)s)")
    parser.add_argument("--metrics-topics", type=int, default=0, help="the server's --metrics-topics")
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"))
    parser.add_argument("--quiet-seconds", type=float, default=3.0, help="bystander alone first")
    args = parser.parse_args()

    proc = ServerProcess("--http-port", "0", "--metrics-topics", str(args.metrics_topics), loop=args.loop)
    base = next(line.split(MONITORING_PREFIX, 1)[1].strip() for line in proc.log if MONITORING_PREFIX in line)
    try:
        started = time.monotonic()
        _make_topics(proc, args.topics)
        print(f"{args.topics} topics made in {time.monotonic() - started:.1f} s ({proc.loop_name})")
        ours, theirs = multiprocessing.Pipe()
        bystander = multiprocessing.Process(target=_bystander, args=(proc.host, proc.port, theirs))
        bystander.start()
        phases: list[tuple[str, float, float, list[tuple[float, int]]]] = []
        time.sleep(args.quiet_seconds)
        phases.append(("quiet", time.monotonic() - args.quiet_seconds, time.monotonic(), []))
        for path in ("metrics", "topics", "topics?count=1000", "topics/busiest?count=100", "stats"):
            begin = time.monotonic()
            fetches = [_fetch(base + path) for _ in range(args.scrapes)]
            phases.append((f"/{path}", begin, time.monotonic(), fetches))
        ours.send("stop")
        samples: list[tuple[float, float]] = ours.recv()
        bystander.join(30)
    finally:
        proc.stop()

    print(f"--metrics-topics {args.metrics_topics}, {args.scrapes} GETs per endpoint, one after another")
    header = ("phase", "pings", "p50 ms", "p99 ms", "max ms", "GET mean ms", "bytes")
    print("{:28} {:>6} {:>8} {:>8} {:>8}   {:>11} {:>10}".format(*header))
    for name, begin, end, fetches in phases:
        rtts = [rtt for at, rtt in samples if begin <= at < end]
        if not rtts:
            continue
        get_ms = _ms(statistics.mean(f[0] for f in fetches)) if fetches else "       -"
        size = str(fetches[0][1]) if fetches else "-"
        print(
            f"{name:28} {len(rtts):6d} {_ms(_percentile(rtts, 0.5))} {_ms(_percentile(rtts, 0.99))} "
            f"{_ms(max(rtts))}      {get_ms} {size:>10}"
        )


if __name__ == "__main__":
    main()
