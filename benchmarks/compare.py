"""Pigeon side by side with nats-server, redis-server and RabbitMQ, same workloads, same run.

Each broker is started fresh, pinned to one CPU with taskset, while this
process (the load generator, ``pigeon.bench.load``) pins itself to another. The
brokers take turns within each repeat, so they share whatever else the machine
is doing, and the table shows the median of the repeats with the ratios the
targets are stated in. A peer that is not installed is skipped with a note.
The acknowledged queue (``ackqueue``) runs on a broker process of its own: nats-server
with JetStream (``-js``), Redis Streams, RabbitMQ (which runs only this workload).

    python benchmarks/compare.py                 # the full comparison (a few minutes)
    python benchmarks/compare.py --quick         # a smoke run of a few seconds
    python benchmarks/compare.py --json out.json --chart out.png
    python benchmarks/compare.py --durable       # the durable table (issue 13)
    python benchmarks/compare.py --framed --size 65536 --peers nats --workloads pipe,queue,fanin
                                                 # Pigeon speaking protocol 2 (PUB, MSG frames)

``--durable`` measures the brokers keeping their queues on disk instead, with the workloads
``durable`` (1 publisher, 1,000 unconfirmed messages, confirmations per second) and
``durable_ackqueue4`` (the same with 4 acknowledging consumers): Pigeon in memory, with
``--fsync everysec`` and ``always``; Redis with ``appendfsync everysec`` and ``always``; RabbitMQ
(durable queue, persistent messages, publisher confirms); JetStream with file storage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace

from pigeon.bench.brokers import Broker, brokers, durable_brokers, running
from pigeon.bench.load import (
    ACK_DIALECTS,
    DURABLE_WORKLOADS,
    LATENCY_STEP,
    NAMED_WORKLOADS,
    WORKLOADS,
    BrokerProbe,
    LatencySession,
    Options,
    Result,
    render_rows,
    run,
    write_chart,
)
from pigeon.server.limits import raise_open_files_limit

THROUGHPUT = ("pipe", "queue", "fanout", "fanin")
PEERS = ("nats", "redis", "rabbitmq")
ACK_TARGETS = (("queue", 0.7), ("peers", 3.0))  # ackqueue >= 0.7 x Pigeon's queue, >= 3 x the fastest peer
# durable: (Pigeon flavour, at least this many times, the other) for the workload ``durable``
DURABLE_TARGETS = (
    ("pigeon-everysec", 0.5, "pigeon-memory"),
    ("pigeon-everysec", 3.0, "redis-everysec"),
    ("pigeon-always", 3.0, "redis-always"),
    ("pigeon-always", 3.0, "rabbitmq"),
    ("pigeon-always", 3.0, "jetstream"),
)
# durable brokers that also run durable_ackqueue4
DURABLE_ACKQUEUE = ("pigeon-everysec", "pigeon-always", "redis-everysec", "jetstream", "rabbitmq")


@dataclass
class Table:
    """Median results per broker, and the notes gathered on the way."""

    results: dict[str, list[Result]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_results(runs: Sequence[Sequence[Result]]) -> list[Result]:
    """Per workload, the median of each figure over the repeats."""
    merged = []
    for first in runs[0]:
        same = [r for rs in runs if (r := _get(rs, first.workload)) is not None]
        merged.append(
            Result(
                first.workload,
                msgs_per_s=_median([r.msgs_per_s for r in same]),
                broker_cpu_percent=_median([r.broker_cpu_percent for r in same]),
                msgs_per_cpu_s=_median([r.msgs_per_cpu_s for r in same]),
                p50_us=_median([r.p50_us for r in same]),
                p99_us=_median([r.p99_us for r in same]),
                p999_us=_median([r.p999_us for r in same]),
                bytes_per_connection=_median([r.bytes_per_connection for r in same]),
                note=first.note,
            )
        )
    return merged


def measure(
    opts: Options,
    workloads: Sequence[str],
    repeat: int,
    include_sink: bool,
    pins: tuple[list[str], str],
    framed: bool = False,
    peers: Sequence[str] = PEERS,
) -> Table:
    """Run every installed broker (Pigeon and ``peers``) ``repeat`` times, taking turns, and keep the
    medians; ``framed``: Pigeon speaks protocol 2 (dialect ``pigeon2``)."""
    broker_pin, client_cpu = pins
    table = Table()
    runs: dict[str, list[list[Result]]] = {}
    candidates = [b for b in brokers(include_sink) if b.name in ("pigeon", "ceiling", *peers)]
    if framed:
        candidates = [replace(b, dialect="pigeon2") if b.name == "pigeon" else b for b in candidates]
        table.notes.append("pigeon: protocol 2 (HELLO 2, PUB frames, MSG frames)")
    for b in candidates:
        if b.executable is None:
            table.notes.append(f"{b.name}: not installed, skipped (Debian package {b.name}-server)")
    active = [b for b in candidates if b.executable is not None]
    for b in active:
        if b.version:
            table.notes.append(f"{b.name}: {b.version}")
    others = [w for w in workloads if w not in ("latency", "ackqueue")]
    for _ in range(repeat):
        for b in active:
            wanted = [w for w in others if w in THROUGHPUT] if b.name == "ceiling" else others
            results = []
            if wanted and b.plain:
                with running(b, broker_pin) as (pid, port):
                    results += run(replace(opts, port=port, pid=pid, dialect=b.dialect), wanted)
            if "ackqueue" in workloads:
                with running(b, broker_pin, acks=True) as (pid, port):
                    results += run(replace(opts, port=port, pid=pid, dialect=b.dialect), ["ackqueue"])
            if results:
                runs.setdefault(b.name, []).append(results)
        if "latency" in workloads:
            latency = measure_latency(
                opts, [b for b in active if b.plain and b.name != "ceiling"], broker_pin
            )
            for name, result in latency.items():
                if name in runs:
                    runs[name][-1].append(result)
                else:
                    runs.setdefault(name, []).append([result])
    table.results = {name: median_results(rs) for name, rs in runs.items()}
    if "ackqueue" in workloads:
        for b in active:
            if b.name != "ceiling":
                table.notes.append(f"{b.name} ackqueue: {ACK_DIALECTS[b.dialect].notes}")
    table.notes.append(
        f"broker pinned with: {' '.join(broker_pin) or '(not pinned)'}; load generator: {client_cpu}"
    )
    return table


def measure_durable(
    opts: Options, workloads: Sequence[str], repeat: int, pins: tuple[list[str], str]
) -> Table:
    """The durable table: every durable broker ``repeat`` times, taking turns, a fresh process (and
    data directory) per workload; the medians."""
    broker_pin, client_cpu = pins
    table = Table()
    runs: dict[str, list[list[Result]]] = {}
    candidates = durable_brokers()
    for b in candidates:
        if b.executable is None:
            table.notes.append(f"{b.name}: not installed, skipped")
        elif b.version and b.version not in " ".join(table.notes):
            table.notes.append(f"{b.name.split('-')[0]}: {b.version}")
    active = [b for b in candidates if b.executable is not None]
    for _ in range(repeat):
        for b in active:
            results = []
            for w in workloads:
                if w == "durable_ackqueue4" and b.name not in DURABLE_ACKQUEUE:
                    continue
                with running(b, broker_pin) as (pid, port):
                    results += run(replace(opts, port=port, pid=pid, dialect=b.dialect), [w])
            runs.setdefault(b.name, []).append(results)
    table.results = {name: median_results(rs) for name, rs in runs.items()}
    for dialect in dict.fromkeys(b.dialect for b in active):
        table.notes.append(f"{dialect} durable: {ACK_DIALECTS[dialect].durable_notes}")
    table.notes.append(
        f"broker pinned with: {' '.join(broker_pin) or '(not pinned)'}; load generator: {client_cpu}"
    )
    return table


def durable_verdicts(table: Table) -> list[tuple[str, str, float | None, bool | None]]:
    """(target, measured as text, ratio, met) for the issue's durable targets."""
    out = []
    for mine, need, other in DURABLE_TARGETS:
        a, b = (_get(table.results.get(n, []), "durable") for n in (mine, other))
        ratio = _ratio(a.msgs_per_s if a else None, b.msgs_per_s if b else None)
        text = "-" if ratio is None else f"{ratio:.2f} x"
        out.append((f"durable: {mine} >= {need} x {other}", text, ratio, _met(ratio, need)))
    return out


def format_durable(table: Table) -> str:
    """The durable table: throughput and CPU per broker, each Pigeon flavour's ratio to the peers."""
    names = list(table.results)
    rows = [("workload", "figure", *names)]
    for w in DURABLE_WORKLOADS:
        for label, attr, scale, digits in (
            ("M msgs/s", "msgs_per_s", 1e6, 3),
            ("broker CPU %", "broker_cpu_percent", 1.0, 0),
        ):
            cells = [
                _cell(getattr(r, attr) if (r := _get(table.results[n], w)) else None, scale, digits)
                for n in names
            ]
            if any(c != "-" for c in cells):
                rows.append((w, label, *cells))
    return _with_verdicts(render_rows(rows), durable_verdicts(table), table.notes, (44, 10))


def measure_latency(opts: Options, active: Sequence[Broker], broker_pin: list[str]) -> dict[str, Result]:
    """Every broker up at once, timed in turns of LATENCY_STEP samples, so all share the same noise."""
    with ExitStack() as stack:
        sessions: dict[str, tuple[LatencySession, BrokerProbe]] = {}
        for b in active:
            pid, port = stack.enter_context(running(b, broker_pin))
            session = LatencySession(replace(opts, port=port, dialect=b.dialect))
            stack.callback(session.close)
            session.warm_up(opts.samples)
            sessions[b.name] = (session, BrokerProbe(pid, port))
        cpu: dict[str, float] = {}
        for name, (_, probe) in sessions.items():
            cpu[name] = -(probe.cpu_seconds() or 0.0)
        started = time.perf_counter()
        done = 0
        while done < opts.samples:
            step = min(LATENCY_STEP, opts.samples - done)
            for session, _ in sessions.values():
                session.sample(step)
            done += step
        elapsed = time.perf_counter() - started
        results = {}
        for name, (session, probe) in sessions.items():
            used = probe.cpu_seconds()
            share = None if used is None else 100.0 * (used + cpu[name]) / elapsed
            results[name] = session.result(share)
        return results


def _get(results: Sequence[Result], workload: str) -> Result | None:
    return next((r for r in results if r.workload == workload), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def verdicts(table: Table) -> list[tuple[str, str, float | None, bool | None]]:
    """(target, measured as text, measured ratio or value, met) for each of the issue's targets."""
    pigeon = table.results.get("pigeon", [])
    nats = table.results.get("nats")
    redis = table.results.get("redis")
    out: list[tuple[str, str, float | None, bool | None]] = []

    def tput(results: Sequence[Result] | None, w: str, per_cpu: bool = False) -> float | None:
        r = _get(results, w) if results is not None else None
        if r is None:
            return None
        return r.msgs_per_cpu_s if per_cpu else r.msgs_per_s

    targets = [
        (w, need, nats, "nats")
        for w, need in (("pipe", 1.25), ("queue", 1.25), ("fanout", 1.25), ("fanin", 1.0))
    ]
    targets += [(w, 2.0, redis, "redis") for w in THROUGHPUT if w != "fanout"]
    for w, need, peer, peer_name in targets:
        ratio = _ratio(tput(pigeon, w), tput(peer, w))
        per_cpu = _ratio(tput(pigeon, w, True), tput(peer, w, True))
        text = "-" if ratio is None else f"{ratio:.2f} x"
        if per_cpu is not None:
            text += f" ({per_cpu:.2f} x per CPU-s)"
        out.append((f"{w}: >= {need} x {peer_name}", text, ratio, _met(ratio, need)))
    out += _ack_verdicts(table)
    mine = _get(pigeon, "latency")
    theirs = _get(nats, "latency") if nats else None
    if mine and theirs and mine.p99_us is not None and theirs.p99_us is not None:
        ratio = mine.p99_us / theirs.p99_us
        out.append(("latency p99 <= nats", f"{ratio:.2f} x nats", ratio, ratio <= 1.0))
    conn = _get(pigeon, "connections")
    if conn and conn.bytes_per_connection is not None:
        kib = conn.bytes_per_connection / 1024
        out.append(("memory <= 10 KiB/conn", f"{kib:.1f} KiB", kib, kib <= 10.0))
    return out


def _ack_verdicts(table: Table) -> list[tuple[str, str, float | None, bool | None]]:
    """ackqueue against Pigeon's own plain queue and against the fastest peer's acknowledged queue."""
    pigeon = table.results.get("pigeon", [])
    acked, plain = _get(pigeon, "ackqueue"), _get(pigeon, "queue")
    if acked is None:
        return []
    peers = {
        name: r.msgs_per_s
        for name, results in table.results.items()
        if name in PEERS and (r := _get(results, "ackqueue")) is not None and r.msgs_per_s
    }
    fastest = max(peers, key=lambda name: peers[name] or 0.0, default=None)
    out = []
    for against, need in ACK_TARGETS:
        if against == "queue":
            ratio = _ratio(acked.msgs_per_s, plain.msgs_per_s if plain else None)
            label, text = f"ackqueue: >= {need} x queue", "-" if ratio is None else f"{ratio:.2f} x"
        else:
            ratio = _ratio(acked.msgs_per_s, peers[fastest] if fastest else None)
            label = f"ackqueue: >= {need} x fastest peer"
            text = "-" if ratio is None else f"{ratio:.2f} x {fastest}"
        out.append((label, text, ratio, _met(ratio, need)))
    return out


def _met(ratio: float | None, need: float) -> bool | None:
    return None if ratio is None else ratio >= need


def _cell(value: float | None, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def format_table(table: Table) -> str:
    """The side-by-side table, the targets and the notes, as text."""
    names = list(table.results)
    rows = [("workload", "figure", *names, *(f"pigeon/{p}" for p in PEERS if p in names))]
    # (label, Result field, scale, digits); ratios are shown for every figure but CPU use
    figures = (
        ("M msgs/s", "msgs_per_s", 1e6, 3),
        ("broker CPU %", "broker_cpu_percent", 1.0, 0),
        ("M msgs/CPU-s", "msgs_per_cpu_s", 1e6, 3),
        ("p50 us", "p50_us", 1.0, 1),
        ("p99 us", "p99_us", 1.0, 1),
        ("p99.9 us", "p999_us", 1.0, 1),
        ("bytes/conn", "bytes_per_connection", 1.0, 0),
    )
    for w in WORKLOADS + NAMED_WORKLOADS:
        for label, attr, scale, digits in figures:
            values: dict[str, float | None] = {
                n: (getattr(r, attr) if (r := _get(table.results[n], w)) else None) for n in names
            }
            if all(v is None for v in values.values()):
                continue
            ratios = [
                None if attr == "broker_cpu_percent" else _ratio(values.get("pigeon"), values.get(p))
                for p in PEERS
                if p in names
            ]
            rows.append(
                (
                    w,
                    label,
                    *(_cell(values[n], scale, digits) for n in names),
                    *("-" if x is None else f"{x:.2f}" for x in ratios),
                )
            )
    return _with_verdicts(render_rows(rows), verdicts(table), table.notes, (24, 32))


def _with_verdicts(
    rendered: str,
    found: Sequence[tuple[str, str, float | None, bool | None]],
    notes: Sequence[str],
    widths: tuple[int, int],
) -> str:
    """A rendered table, then a line per target (its columns ``widths`` wide), then the notes."""
    lines = [rendered, ""]
    for target, measured, _, met in found:
        mark = "n/a" if met is None else ("met" if met else "NOT met")
        lines.append(f"target {target:<{widths[0]}} {measured:<{widths[1]}} {mark}")
    return "\n".join([*lines, "", *notes])


def _pins(broker_cpu: int, client_cpu: int) -> tuple[list[str], str]:
    """The taskset prefix for brokers, after pinning this process; unpinned where impossible."""
    cpus = os.sched_getaffinity(0)
    if shutil.which("taskset") is None or broker_cpu not in cpus or client_cpu not in cpus:
        return [], "not pinned (needs taskset and both CPUs)"
    os.sched_setaffinity(0, {client_cpu})
    return ["taskset", "-c", str(broker_cpu)], f"CPU {client_cpu}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run the comparison, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per broker; the median is shown (default 3)"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per throughput run (default 3)")
    parser.add_argument("--size", type=int, default=64, help="message bytes (default 64)")
    parser.add_argument("--connections", type=int, default=5000, help="idle connections (default 5000)")
    parser.add_argument("--samples", type=int, default=20000, help="latency samples (default 20000)")
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS + NAMED_WORKLOADS), help="comma-separated subset"
    )
    parser.add_argument("--broker-cpu", type=int, default=0, help="CPU for the brokers (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU for the load generator (default 1)")
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip the generator's ceiling (null broker)"
    )
    parser.add_argument(
        "--noise",
        choices=("broker", "client"),
        help="keep a busy loop running on the brokers' or the generator's CPU: controlled contention",
    )
    parser.add_argument(
        "--durable",
        action="store_true",
        help="the durable table instead: brokers keeping their queues on disk (durable workloads)",
    )
    parser.add_argument(
        "--framed",
        action="store_true",
        help="Pigeon speaks protocol 2 (framed PUB and MSG); not with ackqueue",
    )
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers to run (default all)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short, one repeat")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--chart", metavar="PNG", help="also draw a chart (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.duration, args.connections, args.samples = 1, 0.3, 100, 500
    workloads = [w for w in args.workloads.split(",") if w]
    if args.durable:
        workloads = [w for w in workloads if w in DURABLE_WORKLOADS] or list(DURABLE_WORKLOADS)
    if args.framed and "ackqueue" in workloads:
        parser.error("--framed measures the plain workloads: leave ackqueue out of --workloads")
    # a fresh broker measures connections first, before other workloads leave freed memory to reuse
    workloads.sort(key=lambda w: w != "connections")
    raise_open_files_limit()
    opts = Options(
        size=args.size,
        duration=args.duration,
        warmup=0.2 if args.quick else 0.5,
        connections=args.connections,
        samples=args.samples,
        progress=sys.stderr.isatty(),
    )
    pins = _pins(args.broker_cpu, args.client_cpu)
    with _busy_loop(args.broker_cpu if args.noise == "broker" else args.client_cpu, args.noise is not None):
        if args.durable:
            table = measure_durable(opts, workloads, args.repeat, pins)
        else:
            peers = [p for p in args.peers.split(",") if p]
            table = measure(opts, workloads, args.repeat, not args.no_ceiling, pins, args.framed, peers)
    if args.noise:
        table.notes.append(f"with a busy loop on the {args.noise}'s CPU")
    table.notes.append(
        f"{platform.node()}: {os.cpu_count()} CPUs, {_cpu_model()}, Python {platform.python_version()}, "
        f"{args.size}-byte messages, median of {args.repeat}"
    )
    print(format_durable(table) if args.durable else format_table(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {k: [asdict(r) for r in v] for k, v in table.results.items()} | {"notes": table.notes},
                f,
                indent=2,
            )
    if args.chart:
        write_chart(table.results, args.chart)
    return 0


@contextmanager
def _busy_loop(cpu: int, wanted: bool) -> Iterator[None]:
    """A CPU-bound process pinned to ``cpu`` for the duration, when ``wanted``."""
    if not wanted:
        yield
        return
    proc = subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
