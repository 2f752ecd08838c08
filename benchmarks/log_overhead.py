"""What the durable log costs the core: publishes per second through ``Broker.feed``, in memory and
with ``durable=True`` (records built, checksummed and handed to a writer that only counts them).

    python benchmarks/log_overhead.py [--messages N] [--size BYTES] [--repeat R]

No sockets and no disk: this isolates the core's share (records, CRC-32C, DONE runs); the wire
figures are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pigeon._core import Broker, checksum_in_hardware


def publishes_per_second(durable: bool, messages: int, size: int) -> float:
    """Feed ``messages`` PUBLISH lines for one plain subscriber, in batches of 2,000; return the rate."""
    broker = Broker(durable=durable, max_backlog=messages, max_memory=8 << 30)
    broker.on_log = lambda records, new_segment: None
    broker.on_sync = lambda position: None
    sub = broker.open(lambda data: None)
    broker.feed(sub, b"CONNECT\n")
    broker.feed(sub, b"SUBSCRIBE c1 t\n")
    pub = broker.open(lambda data: None)
    broker.feed(pub, b"CONNECT\n")
    batch = (b"PUBLISH c2 t " + b"x" * size + b"\n") * 2000
    started = time.perf_counter()
    for _ in range(messages // 2000):
        broker.feed(pub, batch)
    return (messages // 2000 * 2000) / (time.perf_counter() - started)


def main() -> None:
    """Measure both, taking turns, and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeat):
        for durable in (False, True):
            rates[durable].append(publishes_per_second(durable, args.messages, args.size))
    memory, logged = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"CRC-32C in hardware: {checksum_in_hardware()}")
    print(f"in memory: {memory:,.0f} publishes/s; durable: {logged:,.0f} publishes/s ({logged / memory:.0%})")


if __name__ == "__main__":
    main()
