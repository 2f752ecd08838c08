"""How fast a durable broker comes back: fill a queue, kill -9, restart, consume.

    python benchmarks/recovery.py --messages 10000000 --brokers pigeon     # the recovery figure
    python benchmarks/recovery.py --messages 1000000 --consume              # Pigeon and its peers
    python benchmarks/recovery.py --messages 1000000 --restarts 5           # medians of 5 rounds
    python benchmarks/recovery.py --brokers pigeon,jetstream,floor --restarts 5

For each broker in turn (Pigeon with ``--fsync everysec``, Redis Streams with AOF ``appendfsync
everysec``, NATS JetStream with a file stream, RabbitMQ with a durable queue of persistent
messages): one publisher fills the queue with 1,000 unconfirmed messages at most (the same
drivers as ``compare.py --durable``), then the broker is killed with SIGKILL and started again
on the same files. Reported: the time from the restart's exec until the broker is ready
(Pigeon: its own "recovered N messages ... in T s"), until the first delivery reaches a
consumer waiting for it, and (with --consume) until 4 acknowledging consumers (prefetch 1,000,
acknowledging every 100) have acknowledged every message. With ``--restarts N`` each broker
goes through N such rounds (fresh files, fill, kill -9, restart) and its figures are the medians,
each round's ready and first-message times listed after them.

``floor`` is no broker: benchmarks/start_floor.py, the interpreter, asyncio and uvloop listening and
answering a line, started the same way (its ready and first reply, nothing to fill or recover).
Beside a broker's restart it shows what of that time Python alone takes on this machine.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from pigeon.bench.acking import AckDialect
from pigeon.bench.brokers import Broker, Started, durable_brokers, start_broker, stop_broker
from pigeon.bench.load import ACK_DIALECTS, consume, publish_confirmed
from pigeon.bench.window import PUBLISH_BATCH, Window
from pigeon.bench.wire import WireError

RECOVERED = re.compile(r"recovered (\d+) messages on (\d+) topics from \S+ in ([0-9.]+) s")
# the broker flavour of the durable table each name restarts
FLAVOURS = {
    "pigeon": "pigeon-everysec",
    "redis": "redis-everysec",
    "jetstream": "jetstream",
    "rabbitmq": "rabbitmq",
}
CONSUMERS = 4
PREFETCH = 1000
ACK_BATCH = 100
CONFIRM_WINDOW = 1000
QUEUE = b"recovery.jobs"
FLOOR = Path(__file__).with_name("start_floor.py")
DEADLINE = 900.0  # the longest wait for a fill or a drain


@dataclass
class Figures:
    """What one broker's fill, crash and restart took."""

    filled_per_s: float
    ready_s: float
    first_s: float | None = None
    all_s: float | None = None
    acked: int = 0
    recovered: str = ""  # Pigeon's own start-up line


def fill(d: AckDialect, port: int, messages: int, size: int) -> float:
    """Publish ``messages`` of ``size`` bytes, at most 1,000 unconfirmed; the rate once all are confirmed."""
    sock, command = d.publisher("127.0.0.1", port, QUEUE, b"x" * size)
    sock.settimeout(None)
    confirmed = [0]
    errors: list[str] = []
    batch = min(PUBLISH_BATCH, CONFIRM_WINDOW // 2)
    started = time.perf_counter()
    try:
        publish_confirmed(
            sock, command * batch, batch, d.confirms(), CONFIRM_WINDOW, confirmed, None, threading.Event(),
            errors, total=messages,
        )  # fmt: skip
    finally:
        sock.close()
    if errors or confirmed[0] < messages:
        raise WireError(f"fill: {confirmed[0]} of {messages} confirmed {errors[:1]}")
    return messages / (time.perf_counter() - started)


def drain(d: AckDialect, port: int, messages: int, consumers: int, started: float, figures: Figures) -> None:
    """Consume with ``consumers`` acknowledging consumers until ``messages`` are acknowledged."""
    counts = [0] * consumers
    errors: list[str] = []
    clients = [d.consumer("127.0.0.1", port, QUEUE, i, PREFETCH, ACK_BATCH) for i in range(consumers)]
    for c in clients:
        c.sock.settimeout(None)
    threads = [
        threading.Thread(target=consume, args=(c, counts, i, Window(0, 1), errors), daemon=True)
        for i, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + DEADLINE
    try:
        while not sum(counts) and not errors and time.monotonic() < deadline:
            time.sleep(0.001)
        figures.first_s = time.perf_counter() - started
        while sum(counts) < messages and not errors and time.monotonic() < deadline:
            time.sleep(0.005)
        figures.all_s = time.perf_counter() - started
        figures.acked = sum(counts)
        for c in clients:
            c.settle()  # the last partial batch of acks
    finally:
        for c in clients:
            with_shutdown(c.sock)
        for t in threads:
            t.join(10)
    if errors:
        raise WireError(errors[0])


def with_shutdown(sock: socket.socket) -> None:
    """A FIN after the last acknowledgements, then the socket closed."""
    with suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    sock.close()


def measure(broker: Broker, messages: int, size: int, consume_all: bool, pin: list[str]) -> Figures:
    """Fill, kill -9, restart on the same files, consume; the figures."""
    d = ACK_DIALECTS[broker.dialect](durable=True)
    scratch = tempfile.mkdtemp(prefix=f"pigeon-recovery-{broker.name}-")
    running: Started | None = None
    try:
        running = start_broker(broker, pin, scratch)
        d.setup("127.0.0.1", running.port, QUEUE, CONSUMERS, PREFETCH)
        rate = fill(d, running.port, messages, size)
        stop_broker(running, signal.SIGKILL)
        running = None
        restarted = time.perf_counter()
        running = start_broker(broker, pin, scratch)
        figures = Figures(rate, time.perf_counter() - restarted)
        drain(
            d,
            running.port,
            messages if consume_all else 1,
            CONSUMERS if consume_all else 1,
            restarted,
            figures,
        )
        if broker.dialect == "pigeon":
            figures.recovered = recovered_line(running)
        if not consume_all:
            figures.all_s = None
        return figures
    finally:
        if running is not None:
            stop_broker(running)
        shutil.rmtree(scratch, ignore_errors=True)


def floor(pin: list[str]) -> Figures:
    """Start benchmarks/start_floor.py: the time to its listening line, and to its answer to a line."""
    started = time.perf_counter()
    proc = subprocess.Popen([*pin, sys.executable, str(FLOOR)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        figures = Figures(0.0, time.perf_counter() - started)
        port = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if port is None:
            raise WireError(f"{FLOOR.name} did not start: {line!r}")
        with socket.create_connection(("127.0.0.1", int(port.group(1)))) as sock:
            sock.sendall(b"CONNECT\r\n")
            if not sock.recv(64):
                raise WireError(f"{FLOOR.name} closed without answering")
        figures.first_s = time.perf_counter() - started
        return figures
    finally:
        proc.kill()
        proc.wait()


def recovered_line(running: Started) -> str:
    """Pigeon's "recovered N messages ..." line (logged once its restore ends, while it serves), or ""
    when it logs none within a minute."""
    deadline = time.monotonic() + 60
    while running.drain.is_alive() and time.monotonic() < deadline:
        found = [m.group(0) for m in map(RECOVERED.search, list(running.proc.lines)) if m]
        if found:
            return found[0]
        time.sleep(0.01)
    return ""


def medians(rounds: list[Figures]) -> Figures:
    """The median of each figure over the rounds (one round: its figures); the last round's line."""
    if len(rounds) == 1:
        return rounds[0]
    alls = [f.all_s for f in rounds if f.all_s is not None]
    return Figures(
        statistics.median(f.filled_per_s for f in rounds),
        statistics.median(f.ready_s for f in rounds),
        statistics.median(f.first_s for f in rounds if f.first_s is not None),
        statistics.median(alls) if alls else None,
        min(f.acked for f in rounds),
        rounds[-1].recovered,
    )


def seconds(values: list[float | None]) -> str:
    """Each round's time, as the line prints them."""
    return " ".join(f"{v:.3f}" for v in values if v is not None)


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the brokers named, one after the other, and print a line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--consume", action="store_true", help="also time 4 acking consumers taking all")
    names = [*FLAVOURS, "floor"]
    parser.add_argument("--brokers", default=",".join(names), help=f"comma-separated, from {','.join(names)}")
    parser.add_argument(
        "--restarts",
        type=int,
        default=1,
        help="rounds of fill, kill -9 and restart per broker; their medians",
    )
    args = parser.parse_args(argv)
    if args.messages % PUBLISH_BATCH:
        parser.error(f"--messages must be a multiple of {PUBLISH_BATCH}")
    if args.restarts < 1:
        parser.error(f"--restarts must be 1 or more, not {args.restarts}")
    known = {b.name: b for b in durable_brokers()}
    for name in args.brokers.split(","):
        if name == "floor":
            starts = [floor([]) for _ in range(args.restarts)]
            figures = medians(starts)
            print(
                f"floor: {FLOOR.name} (the interpreter, asyncio and uvloop; nothing to recover) ready after "
                f"{figures.ready_s:.3f} s, first reply {figures.first_s:.3f} s"
                + (
                    f"; medians of {len(starts)} starts (ready {seconds([f.ready_s for f in starts])} s, "
                    f"first reply {seconds([f.first_s for f in starts])} s)"
                    if len(starts) > 1
                    else ""
                ),
                flush=True,
            )
            continue
        broker = known[FLAVOURS[name]]
        if broker.executable is None:
            print(f"{name}: not installed, skipped")
            continue
        rounds = [measure(broker, args.messages, args.size, args.consume, []) for _ in range(args.restarts)]
        figures = medians(rounds)
        line = (
            f"{name}: filled {args.messages} messages of {args.size} bytes at {figures.filled_per_s:,.0f} "
            f"confirmed/s, kill -9; restart ready after {figures.ready_s:.3f} s, first message "
            f"{figures.first_s:.3f} s"
        )
        if figures.all_s is not None:
            line += (
                f", all {figures.acked} acked by {CONSUMERS} consumers {figures.all_s:.2f} s after the exec"
            )
        if len(rounds) > 1:
            line += (
                f"; medians of {len(rounds)} restarts (ready {seconds([f.ready_s for f in rounds])} s, "
                f"first message {seconds([f.first_s for f in rounds])} s)"
            )
        if figures.recovered:
            line += f"; the server's own figure: {figures.recovered}"
        print(line + (f" ({broker.version})" if broker.version else ""), flush=True)


if __name__ == "__main__":
    main()
