"""``pigeon-cli bench``: an end-to-end load generator for a running broker.

Workloads: ``pipe`` (1 publisher, 1 subscriber), ``queue`` (1 publisher, K
subscribers sharing a topic), ``fanout`` (1 publisher, K subscribers that each get
every message: Pigeon consumer groups, NATS and Redis plain subscriptions;
deliveries per second), ``fanin`` (P publishers over T topics, one
subscriber per topic), ``ackqueue`` (1 publisher, K consumers acknowledging in
batches, ``pigeon.bench.acking``), ``latency`` (one message in flight, publish to
delivery) and ``connections`` (N idle connections with one subscription each,
broker memory per connection). Against a broker that keeps its queue on disk,
``durable`` (1 publisher with at most ``confirm_window`` unconfirmed messages,
confirmations per second, no consumer) and ``durable_ackqueue4`` (the same with 4
acknowledging consumers, messages acknowledged per second); these two run only
when named, and ``durable`` needs a broker whose queue holds the whole run
(``pigeon --max-backlog``).

The generator is built not to be the bottleneck: publish commands are prebuilt
into batches sent with ``sendall`` from a thread per publisher, and readers
``recv_into`` a large buffer and only count newlines, so each thread spends its
time in system calls that release the GIL. Publishers stay a bounded number of
messages ahead of their subscribers (``pigeon.bench.window``), so that no
broker is measured filling a queue for a subscriber that cannot keep up. ``pigeon.bench.sink``
measures the generator's own ceiling. The broker's CPU use is sampled during
each run when its process can be found (it must run on this machine).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any

from pigeon.bench.acking import (
    AckConsumer,
    AckDialect,
    Confirms,
    JetStreamAcks,
    PigeonAcks,
    RedisStreamAcks,
)
from pigeon.bench.amqp import RabbitAcks
from pigeon.bench.window import IN_FLIGHT, PUBLISH_BATCH, Window
from pigeon.bench.wire import DIALECTS, LineSocket, WireError, dialect
from pigeon.cli.common import Subparsers, add_tls, positive
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT

DESCRIPTION = "Measure a running broker: throughput, latency and memory per connection."
WORKLOADS = ("pipe", "queue", "fanin", "ackqueue", "latency", "connections")
DURABLE_WORKLOADS = ("durable", "durable_ackqueue4")  # run only when named, against a durable broker
NAMED_WORKLOADS = ("fanout",)  # run only when named (Pigeon's needs consumer groups, issue 15)
CONFIRM_WINDOW = 1000  # durable: unconfirmed messages the publisher may have
ACK_DIALECTS: dict[str, type[AckDialect]] = {
    d.name: d for d in (PigeonAcks, JetStreamAcks, RedisStreamAcks, RabbitAcks)
}
READ_BYTES = 4 * 1024 * 1024  # recv_into buffer per reader
SETTLE_SECONDS = 5.0  # longest wait for in-flight messages after publishers stop


@dataclass
class Result:
    """One workload's figures; fields that do not apply stay None."""

    workload: str
    msgs_per_s: float | None = None
    broker_cpu_percent: float | None = None
    msgs_per_cpu_s: float | None = None  # per second of broker CPU: robust to a shared machine
    p50_us: float | None = None
    p99_us: float | None = None
    p999_us: float | None = None
    bytes_per_connection: float | None = None
    note: str = ""


@dataclass
class Options:
    """What to run, against what."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    pub_port: int | None = None  # publishers connect here (another node of a cluster); None: port
    dialect: str = "pigeon"
    size: int = 64
    duration: float = 3.0
    warmup: float = 0.5
    subscribers: int = 4
    publishers: int = 8
    topics: int = 8
    connections: int = 1000
    samples: int = 20000
    pid: int | None = None
    progress: bool = True
    window: int = IN_FLIGHT  # messages a topic's publishers may be ahead of its subscribers; 0: no bound
    batch: int = PUBLISH_BATCH  # publish commands per sendall
    prefetch: int = 1000  # ackqueue: unacknowledged messages a consumer may hold
    ack_batch: int = 100  # ackqueue: messages a consumer acknowledges at once
    confirm_window: int = CONFIRM_WINDOW  # durable: unconfirmed messages the publisher may have
    tls: bool = False  # connect over TLS (pipe, queue, fanin, latency, connections)
    ca: str | None = None  # with tls: trust the CA certificates in this PEM file, not the system's

    def tls_context(self) -> ssl.SSLContext | None:
        """The client context of ``tls`` and ``ca``, or None for plain text."""
        if not self.tls and self.ca is None:
            return None
        return _client_context(self.ca)


@functools.lru_cache(maxsize=4)
def _client_context(ca: str | None) -> ssl.SSLContext:
    """One context per CA file for all the generator's connections (loading a CA takes a while)."""
    return ssl.create_default_context(cafile=ca)


class BrokerProbe:
    """CPU time and memory of the broker's process, found by pid or by its listening port."""

    def __init__(self, pid: int | None, port: int) -> None:
        import psutil

        self._psutil = psutil
        self.process: Any = None
        if pid is None:
            pid = self._listener_pid(port)
        if pid is not None:
            self.process = psutil.Process(pid)

    def _listener_pid(self, port: int) -> int | None:
        try:
            conns = self._psutil.net_connections(kind="tcp")
        except self._psutil.AccessDenied:
            return None
        for conn in conns:
            if conn.status == "LISTEN" and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
        return None

    def cpu_seconds(self) -> float | None:
        """User plus system CPU seconds used so far, or None when the broker is not visible."""
        if self.process is None:
            return None
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int | None:
        """Resident set size in bytes, or None when the broker is not visible."""
        if self.process is None:
            return None
        return int(self.process.memory_info().rss)


class _Progress:
    """A tqdm bar over seconds, or nothing when disabled."""

    def __init__(self, enabled: bool, label: str, total: float) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=round(total, 1), desc=label, unit="s", leave=False, file=sys.stderr, bar_format=_BAR
            )

    def advance(self, seconds: float, status: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(round(seconds, 1))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


_BAR = "{desc:>12} {bar:30} {n:.1f}/{total:.1f}s {postfix}"


def _count_lines(sock: socket.socket, counts: list[int], index: int, window: Window | None = None) -> None:
    """Count the newlines arriving on ``sock`` into ``counts[index]`` (and ``window``) until it closes."""
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    while True:
        try:
            n = sock.recv_into(view)
        except OSError:
            return
        if n == 0:
            return
        lines = buf.count(b"\n", 0, n)
        counts[index] += lines
        if window is not None:
            window.delivered(lines)


def _publish_loop(
    sock: socket.socket, chunk: bytes, messages: int, window: Window, stop: threading.Event
) -> None:
    while window.acquire(messages, stop):
        try:
            sock.sendall(chunk)
        except OSError:
            return


def publish_confirmed(
    sock: socket.socket,
    chunk: bytes,
    messages: int,
    confirms: Confirms,
    limit: int,
    counts: list[int],
    window: Window | None,
    stop: threading.Event,
    errors: list[str],
    total: int | None = None,
) -> None:
    """Send ``chunk`` (``messages`` publishes) whenever it leaves at most ``limit`` unconfirmed
    (and fits in ``window``, when given), else read confirmations into ``counts[0]``; until ``stop``,
    or until ``total`` publishes are sent and confirmed.

    One thread both sends and reads: a reader thread waking the sender through a condition
    would put two thread switches, and a wait for the GIL, in every round trip of the window.
    """
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    sent = 0
    try:
        while not stop.is_set() and (total is None or counts[0] < total):
            if sent + messages - counts[0] <= limit and (total is None or sent < total):
                if window is not None and not window.acquire(messages, stop):
                    return
                sock.sendall(chunk)
                sent += messages
                continue
            n = sock.recv_into(view)
            if n == 0:
                return
            counts[0] += confirms.feed(buf, n)
    except OSError:
        return
    except WireError as exc:
        errors.append(str(exc))


def _blocking(*socks: socket.socket) -> None:
    """Leave the setup's timeout behind: a socket with a timeout polls before every recv and send,
    a system call more per read than the loop itself makes. Readers end by ``_shutdown`` instead."""
    for sock in socks:
        sock.settimeout(None)


def _shutdown(sock: socket.socket, how: int) -> None:
    # the broker may already have closed its side
    with suppress(OSError):
        sock.shutdown(how)


def _topic(tag: str, i: int) -> bytes:
    return f"bench.{tag}.{i}".encode()


def _run_tag() -> str:
    return os.urandom(4).hex()


@contextmanager
def _threads() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    try:
        yield threads
    finally:
        for t in threads:
            t.join(SETTLE_SECONDS)


def _start(threads: list[threading.Thread], target: Callable[..., None], *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    threads.append(t)
    return t


def _wait_quiet(counts: list[int], limit: float) -> None:
    """Wait until no more lines arrive for a moment (at most ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    last = -1
    while time.monotonic() < deadline and sum(counts) != last:
        last = sum(counts)
        time.sleep(0.2)


def run_throughput(
    opts: Options,
    probe: BrokerProbe,
    workload: str,
    *,
    publishers: int,
    topics: int,
    subscribers: int,
    group: bool,
    fanout: bool = False,
) -> Result:
    """Pipelined publishing; messages per second counted as they reach the subscribers (with
    ``fanout`` each subscriber gets every message, and each delivery counts)."""
    d = dialect(opts.dialect)
    tag = _run_tag()
    payload = b"x" * opts.size
    subs: list[LineSocket] = []
    pubs: list[LineSocket] = []
    delivered = [0] * subscribers
    acked = [0] * publishers
    stop = threading.Event()
    windows = [Window(opts.window, d.lines_per_message) for _ in range(topics)]
    tls = opts.tls_context()
    try:
        for i in range(subscribers):
            conn = d.connect(opts.host, opts.port, tls)
            subs.append(conn)
            if fanout:
                d.subscribe_fanout(conn, d.handshake(conn), _topic(tag, i % topics), i)
            else:
                d.subscribe(conn, d.handshake(conn), _topic(tag, i % topics), group)
        chunks = []
        for i in range(publishers):
            conn = d.connect(opts.host, opts.port if opts.pub_port is None else opts.pub_port, tls)
            pubs.append(conn)
            chunks.append(d.publish(d.handshake(conn), _topic(tag, i % topics), payload) * opts.batch)
        _blocking(*(conn.sock for conn in subs + pubs))
        with _threads() as threads:
            for i, conn in enumerate(subs):
                # fanning out, the first subscriber alone paces the publisher (they all get the same)
                window = windows[i % topics] if not fanout or i == 0 else None
                _start(threads, _count_lines, conn.sock, delivered, i, window)
            for i, conn in enumerate(pubs):
                _start(threads, _count_lines, conn.sock, acked, i)
                _start(threads, _publish_loop, conn.sock, chunks[i], opts.batch, windows[i % topics], stop)
            time.sleep(opts.warmup)
            rate, cpu = _measure(opts, probe, workload, delivered, d.lines_per_message)
            stop.set()
            for conn in pubs:
                _shutdown(conn.sock, socket.SHUT_WR)
            _wait_quiet(delivered, SETTLE_SECONDS)
            for conn in subs + pubs:
                _shutdown(conn.sock, socket.SHUT_RDWR)
    finally:
        stop.set()
        for conn in subs + pubs:
            conn.sock.close()
    note = f"{publishers} pub, {topics} topic(s), {subscribers} sub" + (", each gets all" if fanout else "")
    per_cpu = rate * 100.0 / cpu if cpu else None
    return Result(workload, msgs_per_s=rate, broker_cpu_percent=cpu, msgs_per_cpu_s=per_cpu, note=note)


def consume(consumer: AckConsumer, counts: list[int], index: int, window: Window, errors: list[str]) -> None:
    """Read deliveries, acknowledge them in batches, count them into ``counts[index]`` and ``window``."""
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    n = len(consumer.early)
    buf[:n] = consumer.early
    try:
        with consumer.lock:
            consumer.send(consumer.start())
        while True:
            if n:
                with consumer.lock:
                    received, reply = consumer.feed(buf, n)
                    consumer.send(reply)
                if received:
                    counts[index] += received
                    window.delivered(received)
            n = consumer.sock.recv_into(view)
            if n == 0:
                return
    except OSError:
        return
    except WireError as exc:
        errors.append(str(exc))


def run_ackqueue(opts: Options, probe: BrokerProbe, workload: str = "ackqueue") -> Result:
    """1 publisher, K consumers acknowledging every ``ack_batch`` messages with ``prefetch`` outstanding.

    ``durable`` and ``durable_ackqueue4`` (see the module's docstring) keep the publisher within
    ``confirm_window`` unconfirmed messages as well; ``durable`` has no consumer and counts
    confirmations.
    """
    durable = workload in DURABLE_WORKLOADS
    consumers_wanted = {"durable": 0, "durable_ackqueue4": 4}.get(workload, opts.subscribers)
    d = ACK_DIALECTS[opts.dialect](durable=durable)
    queue = _topic(_run_tag(), 0)
    consumers: list[AckConsumer] = []
    pub: socket.socket | None = None
    delivered = [0] * consumers_wanted
    replies = [0]
    errors: list[str] = []
    stop = threading.Event()
    window = Window(opts.window, 1)
    # two batches fit in the confirmation window, so one is on its way while the other is confirmed
    batch = min(opts.batch, max(1, opts.confirm_window // 2)) if durable else opts.batch
    try:
        d.setup(opts.host, opts.port, queue, consumers_wanted, opts.prefetch)
        for i in range(consumers_wanted):
            consumers.append(d.consumer(opts.host, opts.port, queue, i, opts.prefetch, opts.ack_batch))
        pub, command = d.publisher(opts.host, opts.port, queue, b"x" * opts.size)
        _blocking(pub, *(c.sock for c in consumers))
        with _threads() as threads:
            readers = [
                _start(threads, consume, c, delivered, i, window, errors) for i, c in enumerate(consumers)
            ]
            if durable:
                gate = window if consumers else None
                confirms = d.confirms()
                publisher = _start(
                    threads, publish_confirmed, pub, command * batch, batch, confirms,
                    opts.confirm_window, replies, gate, stop, errors,
                )  # fmt: skip
            else:
                _start(threads, _count_lines, pub, replies, 0)
                publisher = _start(threads, _publish_loop, pub, command * batch, batch, window, stop)
            time.sleep(opts.warmup)
            rate, cpu = _measure(opts, probe, workload, delivered if consumers else replies, 1)
            stop.set()
            publisher.join(SETTLE_SECONDS)
            _shutdown(pub, socket.SHUT_WR)
            _wait_quiet(delivered if consumers else replies, SETTLE_SECONDS)
            for c in consumers:
                c.settle()
                # a FIN after the last acks, not a reset that could drop them
                _shutdown(c.sock, socket.SHUT_WR)
            for t in readers:
                t.join(SETTLE_SECONDS)
    finally:
        stop.set()
        for c in consumers:
            c.sock.close()
        if pub is not None:
            pub.close()
    if errors:
        raise WireError(f"{opts.dialect}: {errors[0]}")
    if durable:
        note = f"1 pub, {opts.confirm_window} unconfirmed, {consumers_wanted} consumers"
    else:
        note = f"1 pub, {consumers_wanted} consumers, prefetch {opts.prefetch}, ack every {opts.ack_batch}"
    per_cpu = rate * 100.0 / cpu if cpu else None
    return Result(workload, msgs_per_s=rate, broker_cpu_percent=cpu, msgs_per_cpu_s=per_cpu, note=note)


def _measure(
    opts: Options, probe: BrokerProbe, label: str, counts: list[int], lines_per_message: int
) -> tuple[float, float | None]:
    """Messages per second over ``opts.duration``, and the broker's CPU use meanwhile."""
    bar = _Progress(opts.progress, label, opts.duration)
    cpu0 = probe.cpu_seconds()
    c0, t0 = sum(counts), time.perf_counter()
    try:
        end = t0 + opts.duration
        now = t0
        while now < end:
            time.sleep(min(0.1, end - now))
            prev, now = now, time.perf_counter()
            rate = (sum(counts) - c0) / lines_per_message / (now - t0)
            bar.advance(now - prev, f"{rate / 1e6:.2f} M msgs/s")
    finally:
        bar.close()
    c1, t1 = sum(counts), time.perf_counter()
    cpu1 = probe.cpu_seconds()
    cpu = None if cpu0 is None or cpu1 is None else 100.0 * (cpu1 - cpu0) / (t1 - t0)
    return (c1 - c0) / lines_per_message / (t1 - t0), cpu


def _read_lines(sock: socket.socket, view: memoryview, buf: bytearray, lines: int) -> None:
    while lines > 0:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("broker closed the connection")
        lines -= buf.count(b"\n", 0, n)


LATENCY_STEP = 1000  # samples per turn; their acknowledgements must fit in a socket buffer


class LatencySession:
    """A publisher and a subscriber on one topic, timing one message in flight at a time.

    ``sample(n)`` can be called in turns on several sessions, so that brokers
    compared on a shared machine see the same background noise.
    """

    def __init__(self, opts: Options) -> None:
        self.dialect = dialect(opts.dialect)
        self.times: list[int] = []
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        topic = _topic(_run_tag(), 0)
        tls = opts.tls_context()
        self.sub = self.dialect.connect(opts.host, opts.port, tls)
        self.pub = self.dialect.connect(opts.host, opts.port, tls)
        try:
            self.dialect.subscribe(self.sub, self.dialect.handshake(self.sub), topic, False)
            self._command = self.dialect.publish(self.dialect.handshake(self.pub), topic, b"x" * opts.size)
        except BaseException:
            self.close()
            raise

    def sample(self, n: int, keep: bool = True) -> None:
        """Time ``n`` messages, from PUBLISH sent to MESSAGE received; ``keep`` False warms up."""
        clock = time.perf_counter_ns
        d = self.dialect
        for _ in range(n):
            start = clock()
            self.pub.sock.sendall(self._command)
            _read_lines(self.sub.sock, self._view, self._buf, d.lines_per_message)
            elapsed = clock() - start
            if keep:
                self.times.append(elapsed)
        # Acknowledgements are read once per batch (they fit in the socket buffer), so the
        # generator does the same work per sample whether or not the protocol acknowledges:
        # on a busy machine extra client work shows up in the tail as if it were the broker's.
        _read_lines(self.pub.sock, self._view, self._buf, d.lines_per_ack * n)

    def warm_up(self, samples: int) -> None:
        """Untimed round trips, a tenth of ``samples`` (100 to LATENCY_STEP)."""
        self.sample(min(LATENCY_STEP, max(100, samples // 10)), keep=False)

    def result(self, cpu: float | None) -> Result:
        """Percentiles of the kept samples, in microseconds."""
        times = sorted(self.times)

        def pct(p: float) -> float:
            return times[min(len(times) - 1, int(p * len(times)))] / 1e3

        return Result(
            "latency",
            broker_cpu_percent=cpu,
            p50_us=pct(0.50),
            p99_us=pct(0.99),
            p999_us=pct(0.999),
            note=f"{len(times)} samples",
        )

    def close(self) -> None:
        """Close both sockets."""
        self.sub.sock.close()
        self.pub.sock.close()


def run_latency(opts: Options, probe: BrokerProbe) -> Result:
    """One message in flight: time from PUBLISH sent to MESSAGE received."""
    session = LatencySession(opts)
    bar = _Progress(opts.progress, "latency", float(opts.samples))
    try:
        session.warm_up(opts.samples)
        cpu0, t0 = probe.cpu_seconds(), time.perf_counter()
        while len(session.times) < opts.samples:
            step = min(LATENCY_STEP, opts.samples - len(session.times))
            session.sample(step)
            bar.advance(float(step), "")
        cpu1, t1 = probe.cpu_seconds(), time.perf_counter()
    finally:
        bar.close()
        session.close()
    cpu = None if cpu0 is None or cpu1 is None else 100.0 * (cpu1 - cpu0) / (t1 - t0)
    return session.result(cpu)


def run_connections(opts: Options, probe: BrokerProbe) -> Result:
    """Open N idle connections, each subscribed to its own topic; broker RSS growth per connection."""
    d = dialect(opts.dialect)
    tag = _run_tag()
    conns: list[LineSocket] = []
    before = probe.rss()
    bar = _Progress(opts.progress, "connections", float(opts.connections))
    try:
        for i in range(opts.connections):
            conn = d.connect(opts.host, opts.port, opts.tls_context())
            conns.append(conn)
            d.subscribe(conn, d.handshake(conn), _topic(tag, i), False)
            if (i + 1) % 100 == 0:
                bar.advance(100.0, "")
        time.sleep(0.5)  # let the broker finish any lazy work before sampling
        after = probe.rss()
    finally:
        bar.close()
        for conn in conns:
            conn.sock.close()
    per_conn = None if before is None or after is None else (after - before) / opts.connections
    return Result("connections", bytes_per_connection=per_conn, note=f"{opts.connections} connections")


def run(opts: Options, workloads: Sequence[str]) -> list[Result]:
    """Run the named workloads in order against one broker."""
    probe = BrokerProbe(opts.pid, opts.port)
    results: list[Result] = []
    for name in workloads:
        if name == "ackqueue" or name in DURABLE_WORKLOADS:
            tls = opts.tls_context() is not None
            results.append(Result(name, note="not over TLS") if tls else run_ackqueue(opts, probe, name))
            continue
        if opts.dialect not in DIALECTS:
            results.append(Result(name, note=f"no {opts.dialect} driver for {name}"))
            continue
        d = dialect(opts.dialect)
        if name == "pipe":
            results.append(
                run_throughput(opts, probe, name, publishers=1, topics=1, subscribers=1, group=False)
            )
        elif name == "queue":
            if not d.has_queue_groups:
                results.append(Result(name, note=f"{d.name} has no queue groups"))
                continue
            results.append(
                run_throughput(
                    opts, probe, name, publishers=1, topics=1, subscribers=opts.subscribers, group=True
                )
            )
        elif name == "fanout":
            results.append(
                run_throughput(
                    opts,
                    probe,
                    name,
                    publishers=1,
                    topics=1,
                    subscribers=opts.subscribers,
                    group=False,
                    fanout=True,
                )
            )
        elif name == "fanin":
            results.append(
                run_throughput(
                    opts,
                    probe,
                    name,
                    publishers=opts.publishers,
                    topics=opts.topics,
                    subscribers=opts.topics,
                    group=False,
                )
            )
        elif name == "latency":
            results.append(run_latency(opts, probe))
        elif name == "connections":
            results.append(run_connections(opts, probe))
        else:
            raise ValueError(f"unknown workload {name!r}")
    return results


def _fmt(value: float | None, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def format_table(results: Sequence[Result]) -> str:
    """A plain-text table of the results."""
    rows = [
        (
            "workload",
            "M msgs/s",
            "broker CPU %",
            "M msgs/CPU-s",
            "p50 us",
            "p99 us",
            "p99.9 us",
            "B/conn",
            "note",
        )
    ]
    for r in results:
        rows.append(
            (
                r.workload,
                _fmt(r.msgs_per_s, 1e6, 3),
                _fmt(r.broker_cpu_percent, 1, 0),
                _fmt(r.msgs_per_cpu_s, 1e6, 3),
                _fmt(r.p50_us, 1, 1),
                _fmt(r.p99_us, 1, 1),
                _fmt(r.p999_us, 1, 1),
                _fmt(r.bytes_per_connection, 1, 0),
                r.note,
            )
        )
    return render_rows(rows)


def render_rows(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def write_chart(series: Mapping[str, Sequence[Result]], path: str) -> None:
    """A PNG bar chart of throughput per workload, one bar per broker (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [
        w
        for w in WORKLOADS + NAMED_WORKLOADS + DURABLE_WORKLOADS
        if any(r.workload == w and r.msgs_per_s for rs in series.values() for r in rs)
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(series))
    for k, (broker, results) in enumerate(series.items()):
        by_name = {r.workload: r.msgs_per_s or 0.0 for r in results}
        xs = [i + k * width for i in range(len(workloads))]
        ax.bar(xs, [by_name.get(w, 0.0) / 1e6 for w in workloads], width, label=broker)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(workloads))], workloads)
    ax.set_ylabel("M messages/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _workload_list(text: str) -> list[str]:
    names = [w.strip() for w in text.split(",") if w.strip()]
    for name in names:
        if name not in WORKLOADS + NAMED_WORKLOADS + DURABLE_WORKLOADS:
            known = ", ".join(WORKLOADS + NAMED_WORKLOADS + DURABLE_WORKLOADS)
            raise argparse.ArgumentTypeError(f"unknown workload {name!r}; choose from {known}")
    return names


# integer flags named after their Options field
_COUNT_FLAGS = (
    ("--size", "message bytes"),
    ("--subscribers", "queue, ackqueue: subscribers sharing the topic"),
    ("--publishers", "fanin: publishers"),
    ("--topics", "fanin: topics, one subscriber each"),
    ("--connections", "connections: idle connections to open"),
    ("--samples", "latency: messages timed"),
    ("--batch", "publishes per send"),
    ("--prefetch", "ackqueue: unacknowledged messages per consumer"),
    ("--ack-batch", "ackqueue: messages acknowledged at once"),
    ("--confirm-window", "durable: unconfirmed messages the publisher may have"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` command's flags."""
    defaults = Options()
    parser.add_argument("--host", default=defaults.host, help="broker address (default %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port, help="broker port (default %(default)s)")
    parser.add_argument(
        "--pub-port",
        type=int,
        default=None,
        help="pipe, queue, fanin: publishers connect to this port, subscribers to --port (two nodes "
        "of a cluster; default: --port)",
    )
    parser.add_argument(
        "--workloads",
        type=_workload_list,
        default=list(WORKLOADS),
        metavar="LIST",
        help=f"comma-separated, from {','.join(WORKLOADS + NAMED_WORKLOADS + DURABLE_WORKLOADS)} "
        f"(default {','.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=defaults.duration,
        help="seconds per throughput run (default %(default)s)",
    )
    for flag, text in _COUNT_FLAGS:
        default = getattr(defaults, flag[2:].replace("-", "_"))
        parser.add_argument(flag, type=positive, default=default, help=f"{text} (default {default})")
    parser.add_argument(
        "--window",
        type=int,
        default=defaults.window,
        help="messages publishers may be ahead of their subscribers, 0: no bound (default %(default)s)",
    )
    parser.add_argument(
        "--pid", type=int, default=None, help="broker process id (default: found by its listening port)"
    )
    parser.add_argument(
        "--dialect",
        choices=sorted(set(DIALECTS) | set(ACK_DIALECTS)),
        default=defaults.dialect,
        help="wire protocol; rabbitmq runs ackqueue only (default %(default)s)",
    )
    add_tls(parser)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--chart", metavar="PNG", help="also draw a chart (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from(args: argparse.Namespace) -> Options:
    """Options from parsed ``bench`` flags."""
    return Options(
        host=args.host,
        port=args.port,
        pub_port=args.pub_port,
        dialect=args.dialect,
        size=args.size,
        duration=args.duration,
        subscribers=args.subscribers,
        publishers=args.publishers,
        topics=args.topics,
        connections=args.connections,
        samples=args.samples,
        pid=args.pid,
        window=args.window,
        batch=args.batch,
        prefetch=args.prefetch,
        ack_batch=args.ack_batch,
        confirm_window=args.confirm_window,
        tls=args.tls or args.ca is not None,
        ca=args.ca,
        progress=not args.no_progress and not args.json,
    )


def missing_modules(opts: Options) -> list[str]:
    """The optional modules these options need (the ``bench`` extra) that cannot be imported."""
    needed = ["psutil", "tqdm"] if opts.progress else ["psutil"]
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def command(args: argparse.Namespace) -> int:
    """Run the ``bench`` command; returns the exit code."""
    opts = options_from(args)
    missing = missing_modules(opts)
    if missing:
        print(f"bench: needs {' and '.join(missing)}: pip install 'pigeon-broker[bench]'", file=sys.stderr)
        return 1
    try:
        results = run(opts, args.workloads)
    except (OSError, RuntimeError) as exc:
        print(f"bench: {opts.host}:{opts.port}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"options": asdict(opts), "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(format_table(results))
    if args.chart:
        write_chart({opts.dialect: results}, args.chart)
    return 0


def register(subparsers: Subparsers) -> None:
    """Add ``bench`` to a command's subparsers (``pigeon-cli bench``)."""
    parser = subparsers.add_parser("bench", help="measure a running broker", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=command)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pigeon.bench`` (``pigeon/bench/__main__.py``)."""
    parser = argparse.ArgumentParser(prog="python -m pigeon.bench", description=DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_args(argv))
