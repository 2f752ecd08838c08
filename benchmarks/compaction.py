"""What log compaction costs: the durable pipe with and without a message left behind.

    python benchmarks/compaction.py --repeat 3 --seconds 10

Pigeon with ``--data-dir`` (``--fsync everysec``, 64 MiB segments), one publisher with at most
1,000 unconfirmed 64-byte messages and one plain subscriber taking them (a message is done once
its socket took it), in turns:

- ``drained``: nothing is left behind; each sealed segment is deleted once its messages are done,
  and no compaction pass runs;
- ``pinned``: one message is published first to a topic nobody reads, so the first segment is
  never deleted and every later one is reclaimed by compaction (a pass each second).

Reported per turn: messages confirmed per second, how many the subscriber got, and the log on disk
at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import suppress

from pigeon.bench.brokers import durable_brokers, start_broker, stop_broker
from pigeon.bench.load import ACK_DIALECTS, publish_confirmed
from pigeon.bench.window import PUBLISH_BATCH

QUEUE = b"compaction.jobs"
CONFIRM_WINDOW = 1000
READ_BYTES = 1 << 20


def connected(port: int) -> tuple[socket.socket, bytes]:
    """A connection to Pigeon and its client id."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"CONNECT\n")
    return sock, sock.recv(1024).split()[1]


def pin(port: int) -> None:
    """Publish one message to a topic nobody reads (it stays live, and keeps the first segment)."""
    sock, client = connected(port)
    with sock:
        sock.sendall(b"PUBLISH " + client + b" compaction.pinned left-behind\n")
        reply = b""
        while not reply.endswith(b"\n"):
            reply += sock.recv(1024)
        assert reply.startswith(b"PUBLISHED"), reply


def subscribe(port: int, counts: list[int]) -> socket.socket:
    """A plain subscriber of QUEUE counting the lines it gets into ``counts[0]`` on a thread."""
    sock, client = connected(port)
    sock.sendall(b"SUBSCRIBE " + client + b" " + QUEUE + b"\n")

    def read() -> None:
        buf = bytearray(READ_BYTES)
        with suppress(OSError):
            while n := sock.recv_into(buf):
                counts[0] += buf.count(b"\n", 0, n)

    threading.Thread(target=read, daemon=True).start()
    return sock


def disk(data: str) -> int:
    """Bytes of the segments in ``data``."""
    return sum(os.path.getsize(os.path.join(data, n)) for n in os.listdir(data) if n.endswith(".seg"))


def measure(pinned: bool, seconds: float, size: int) -> tuple[float, int, int]:
    """(confirmed per second, taken by the subscriber, bytes on disk at the end) of one run."""
    broker = next(b for b in durable_brokers() if b.name == "pigeon-everysec")
    d = ACK_DIALECTS["pigeon"](durable=True)
    scratch = tempfile.mkdtemp(prefix="pigeon-compaction-")
    running = start_broker(broker, [], scratch)
    stop = threading.Event()
    try:
        if pinned:
            pin(running.port)
        taken, confirmed = [0], [0]
        errors: list[str] = []
        subscriber = subscribe(running.port, taken)
        sock, command = d.publisher("127.0.0.1", running.port, QUEUE, b"x" * size)
        batch = min(PUBLISH_BATCH, CONFIRM_WINDOW // 2)
        writer = threading.Thread(
            target=publish_confirmed,
            args=(sock, command * batch, batch, d.confirms(), CONFIRM_WINDOW, confirmed, None, stop, errors),
            daemon=True,
        )
        writer.start()
        time.sleep(1.0)  # warm up
        first, started = confirmed[0], time.perf_counter()
        time.sleep(seconds)
        rate = (confirmed[0] - first) / (time.perf_counter() - started)
        stop.set()
        writer.join(10)
        time.sleep(2.0)  # the subscriber takes the rest, the next passes reclaim what is done
        subscriber.close()
        if errors:
            raise RuntimeError(errors[0])
        return rate, taken[0], disk(os.path.join(scratch, "data"))
    finally:
        stop.set()
        stop_broker(running)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the two cases in turns and print a line per run, then the ratio of the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"drained": [], "pinned": []}
    for turn in range(args.repeat):
        for case in rates:
            rate, taken, on_disk = measure(case == "pinned", args.seconds, args.size)
            rates[case].append(rate)
            print(
                f"turn {turn + 1} {case}: {rate:,.0f} confirmed/s, {taken:,} taken, "
                f"{on_disk / 2**20:.1f} MiB on disk at the end",
                flush=True,
            )
    medians = {case: sorted(r)[len(r) // 2] for case, r in rates.items()}
    print(
        f"median: drained {medians['drained']:,.0f}, pinned {medians['pinned']:,.0f} confirmed/s "
        f"(pinned / drained {medians['pinned'] / medians['drained']:.2f})"
    )


if __name__ == "__main__":
    main()
