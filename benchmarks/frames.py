"""Framed (protocol 2) against text (v1) publish and delivery, in one run, with the project's load
generator (``pigeon.bench.load``, workload ``pipe``: 1 publisher, 1 subscriber).

    python benchmarks/frames.py                       # 64 B, 1 KiB, 64 KiB, 1 MiB; median of 3
    python benchmarks/frames.py --sizes 64 --repeat 5
    python benchmarks/frames.py --sizes 16384 --window 50000 --broker-flag=--max-backlog-bytes=4294967296
                                # the generator's default window, the broker without the byte bound

For each size the two dialects take turns within each repeat, each on a fresh
``pigeon`` pinned to ``--broker-cpu`` with taskset (this process, the
generator, to ``--client-cpu``): ``pigeon`` publishes ``PUBLISH`` lines and
receives ``MESSAGE`` lines, ``pigeon2`` sends ``HELLO 2`` and publishes ``PUB``
frames and receives ``MSG`` frames. The table gives the median messages and
megabytes per second, the broker's peak RSS, and the ratio framed / text of the
same run (both on a broker with ``--max-line`` 4 MiB, which a 1 MiB text line
needs). Large messages get a smaller window and batch, so that the generator
keeps about ``WINDOW_BYTES`` in flight whatever the size. The load average is
printed before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pigeon.bench.brokers import brokers, pigeon_with, running
from pigeon.bench.load import BrokerProbe, Options, render_rows, run
from pigeon.bench.window import IN_FLIGHT, PUBLISH_BATCH
from pigeon.server.limits import raise_open_files_limit

DIALECTS = ("pigeon", "pigeon2")
SIZES = (64, 1024, 65536, 1 << 20)
WINDOW_BYTES = 64 << 20  # bytes the publisher may be ahead of the subscriber
BATCH_BYTES = 1 << 20  # bytes of publish commands per sendall
RSS_EVERY = 0.1  # seconds between samples of the broker's RSS
# the text form of a 1 MiB message is a line over the default --max-line: both dialects get room
FLAGS = ("--max-line", str(4 << 20))


@dataclass
class Sample:
    """The runs of one size and dialect."""

    rates: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)


def sized(opts: Options, size: int, window: int | None) -> Options:
    """Options for ``size``-byte messages: the default window and batch, less for large messages
    (``window``: that many messages in flight whatever the size)."""
    return replace(
        opts,
        size=size,
        window=window if window is not None else max(16, min(IN_FLIGHT, WINDOW_BYTES // size)),
        batch=max(1, min(PUBLISH_BATCH, BATCH_BYTES // size)),
    )


def peak_rss(pid: int, done: threading.Event, peak: list[int]) -> None:
    """Sample the broker's RSS until ``done``; the largest goes into ``peak[0]``."""
    probe = BrokerProbe(pid, 0)
    while not done.wait(RSS_EVERY):
        rss = probe.rss() or 0
        peak[0] = max(peak[0], rss)


def one_run(opts: Options, dialect: str, pin: list[str], flags: Sequence[str]) -> tuple[float, int]:
    """One ``pipe`` run on a fresh broker started with ``flags``: messages per second and its peak RSS."""
    pigeon = replace(next(b for b in brokers(False) if b.name == "pigeon"), start=pigeon_with(*flags))
    with running(pigeon, pin) as (pid, port):
        assert pid is not None
        done = threading.Event()
        peak = [0]
        sampler = threading.Thread(target=peak_rss, args=(pid, done, peak), daemon=True)
        sampler.start()
        try:
            (result,) = run(replace(opts, port=port, pid=pid, dialect=dialect), ["pipe"])
        finally:
            done.set()
            sampler.join()
    return result.msgs_per_s or 0.0, peak[0]


def table(samples: dict[tuple[int, str], Sample], sizes: Sequence[int]) -> str:
    """The results as a Markdown table."""
    rows = [
        [
            "size",
            "text msg/s",
            "text MB/s",
            "text RSS MB",
            "framed msg/s",
            "framed MB/s",
            "framed RSS MB",
            "framed / text",
        ]
    ]
    for size in sizes:
        cells = [f"{size:,} B"]
        rates = {}
        for dialect in DIALECTS:
            s = samples[size, dialect]
            rate = statistics.median(s.rates)
            rates[dialect] = rate
            cells += [f"{rate:,.0f}", f"{rate * size / 1e6:,.1f}", f"{max(s.rss) / 1e6:,.0f}"]
        cells.append(f"{rates['pigeon2'] / rates['pigeon']:.2f}x" if rates["pigeon"] else "-")
        rows.append(cells)
    return render_rows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run every size and dialect ``--repeat`` times, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated message sizes")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size and dialect (default 3)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    parser.add_argument("--broker-cpu", type=int, default=0, help="CPU for the broker (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU for the load generator (default 1)")
    parser.add_argument(
        "--window", type=int, help=f"messages in flight (default {WINDOW_BYTES >> 20} MiB' worth)"
    )
    parser.add_argument("--broker-flag", action="append", default=[], help="a flag for pigeon (repeatable)")
    args = parser.parse_args(argv)
    flags = [*FLAGS, *(part for flag in args.broker_flag for part in flag.split("=", 1))]
    sizes = [int(size) for size in args.sizes.split(",") if size]
    raise_open_files_limit()
    pin: list[str] = []
    if {args.broker_cpu, args.client_cpu} <= os.sched_getaffinity(0):
        os.sched_setaffinity(0, {args.client_cpu})
        pin = ["taskset", "-c", str(args.broker_cpu)]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    opts = Options(duration=args.duration, progress=False)
    samples = {(size, dialect): Sample() for size in sizes for dialect in DIALECTS}
    for _ in range(args.repeat):
        for size in sizes:
            for dialect in DIALECTS:
                rate, rss = one_run(sized(opts, size, args.window), dialect, pin, flags)
                samples[size, dialect].rates.append(rate)
                samples[size, dialect].rss.append(rss)
    print(table(samples, sizes))
    print(
        f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; broker pinned with "
        f"{' '.join(pin) or '(not pinned)'}; pigeon {' '.join(flags)}; median of {args.repeat} runs of "
        f"{args.duration} s",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
