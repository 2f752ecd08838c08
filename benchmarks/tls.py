"""What TLS costs: Pigeon over TLS against Pigeon in plain text and nats-server with and without TLS,
same certificates, same load generator, same run.

Four brokers take turns within each repeat (as in benchmarks/compare.py: each
started fresh and pinned to one CPU, this process pinned to the other): Pigeon
plain, Pigeon with ``--tls-cert``/``--tls-key``, nats-server plain, and
nats-server with ``tls {cert_file, key_file}``. The certificates are made for
the run (``trustme``, a test extra). Workloads ``pipe`` and ``queue`` (1
publisher, 4 subscribers) at each message size; the table gives the medians and
the ratios within the run. Over TLS the generator (Python's ``ssl`` in threads)
may saturate its CPU before a broker does: ``M msgs/CPU-s`` (messages per
second of broker CPU) is the figure that does not depend on it.

Run from the repository root (it imports benchmarks.compare):

    python -m benchmarks.tls                       # 64 B and 1 KiB, 5 repeats of 3 s (a few minutes)
    python -m benchmarks.tls --quick               # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import trustme

from benchmarks.compare import _cpu_model, _pins, median_results
from pigeon.bench.brokers import Broker, BrokerProcess, _go_env, _spawn, _wait_for_line, running
from pigeon.bench.load import Options, Result, render_rows, run
from pigeon.server.limits import raise_open_files_limit

WORKLOADS = ("pipe", "queue")
SIZES = (64, 1024)
# (numerator, denominator) of the ratios shown
RATIOS = (("pigeon-tls", "pigeon"), ("nats-tls", "nats"), ("pigeon-tls", "nats-tls"), ("pigeon", "nats"))


@dataclass(frozen=True)
class Certificates:
    """The run's PEM files: a CA, and a certificate and key it signed for 127.0.0.1."""

    ca: str
    cert: str
    key: str


def make_certificates(directory: str) -> Certificates:
    """A fresh CA and a server certificate for 127.0.0.1, written into ``directory``."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    files = Certificates(*(os.path.join(directory, name) for name in ("ca.pem", "cert.pem", "key.pem")))
    ca.cert_pem.write_to_path(files.ca)
    server.cert_chain_pems[0].write_to_path(files.cert)
    server.private_key_pem.write_to_path(files.key)
    return files


def _start_pigeon(tls: list[str], pin: list[str], scratch: str) -> tuple[BrokerProcess, int]:
    proc = _spawn([*pin, sys.executable, "-m", "pigeon", "--port", "0", "--loop", "uvloop", *tls])
    return proc, int(_wait_for_line(proc, re.compile(r"listening on \S+:(\d+)")).group(1))


def _start_nats(certs: Certificates | None, pin: list[str], scratch: str) -> tuple[BrokerProcess, int]:
    config = Path(scratch) / "nats.conf"
    lines = ["listen: 127.0.0.1:-1"]
    if certs is not None:
        lines.append(f'tls {{\n  cert_file: "{certs.cert}"\n  key_file: "{certs.key}"\n}}')
    config.write_text("\n".join(lines) + "\n")
    proc = _spawn([*pin, "nats-server", "-c", str(config)], _go_env())
    return proc, int(_wait_for_line(proc, re.compile(r"client connections on \S+:(\d+)")).group(1))


def brokers(certs: Certificates) -> list[tuple[Broker, bool]]:
    """The brokers of the run, each with whether the generator speaks TLS to it; nats only if installed."""
    tls_flags = ["--tls-cert", certs.cert, "--tls-key", certs.key]
    found = [
        (Broker("pigeon", "pigeon", sys.executable, partial(_start_pigeon, [])), False),
        (Broker("pigeon-tls", "pigeon", sys.executable, partial(_start_pigeon, tls_flags)), True),
    ]
    if shutil.which("nats-server"):
        found += [
            (Broker("nats", "nats", "nats-server", partial(_start_nats, None)), False),
            (Broker("nats-tls", "nats", "nats-server", partial(_start_nats, certs)), True),
        ]
    return found


def measure(
    opts: Options, sizes: Sequence[int], repeat: int, certs: Certificates, pin: list[str]
) -> dict[tuple[str, int], list[Result]]:
    """Per (broker, size): the median results of ``repeat`` runs, the brokers taking turns."""
    runs: dict[tuple[str, int], list[list[Result]]] = {}
    for _ in range(repeat):
        for size in sizes:
            for broker, tls in brokers(certs):
                with running(broker, pin) as (pid, port):
                    sized = replace(opts, port=port, pid=pid, dialect=broker.dialect, size=size)
                    options = replace(sized, tls=tls, ca=certs.ca if tls else None)
                    runs.setdefault((broker.name, size), []).append(run(options, list(WORKLOADS)))
    return {key: median_results(results) for key, results in runs.items()}


def _figure(
    results: dict[tuple[str, int], list[Result]], name: str, size: int, workload: str, attr: str
) -> float | None:
    found = results.get((name, size))
    result = next((r for r in found or [] if r.workload == workload), None)
    value = getattr(result, attr) if result is not None else None
    return float(value) if value is not None else None


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def format_table(results: dict[tuple[str, int], list[Result]], sizes: Sequence[int]) -> str:
    """Throughput and throughput per broker CPU-second, with the ratios, per workload and size."""
    names = list(dict.fromkeys(name for name, _ in results))
    ratios = [(a, b) for a, b in RATIOS if a in names and b in names]
    rows = [("workload", "size", "figure", *names, *(f"{a}/{b}" for a, b in ratios))]
    for workload in WORKLOADS:
        for size in sizes:
            for label, attr in (
                ("M msgs/s", "msgs_per_s"),
                ("broker CPU %", "broker_cpu_percent"),
                ("M msgs/CPU-s", "msgs_per_cpu_s"),
            ):
                scale = 1.0 if attr == "broker_cpu_percent" else 1e6
                values = {n: _figure(results, n, size, workload, attr) for n in names}
                cells = [
                    "-" if v is None else f"{v / scale:.{0 if scale == 1 else 3}f}" for v in values.values()
                ]
                shown = [
                    "-" if attr == "broker_cpu_percent" else _ratio(values[a], values[b]) for a, b in ratios
                ]
                rows.append((workload, f"{size} B", label, *cells, *shown))
    return render_rows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run the brokers in turns, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per broker and size (default 5)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="message bytes, comma-separated")
    parser.add_argument("--broker-cpu", type=int, default=0, help="CPU for the brokers (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU for the load generator (default 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.duration = 1, 0.3
    sizes = [int(s) for s in args.sizes.split(",") if s]
    raise_open_files_limit()
    opts = Options(duration=args.duration, warmup=0.2 if args.quick else 0.5, progress=sys.stderr.isatty())
    pin, client = _pins(args.broker_cpu, args.client_cpu)
    with tempfile.TemporaryDirectory(prefix="pigeon-tls-bench-") as directory:
        results = measure(opts, sizes, args.repeat, make_certificates(directory), pin)
    print(format_table(results, sizes))
    print()
    if not shutil.which("nats-server"):
        print("nats-server: not installed, skipped (Debian package nats-server)")
    print(f"brokers pinned with: {' '.join(pin) or '(not pinned)'}; load generator: {client}")
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, {_cpu_model()}, Python {platform.python_version()}, "
        f"median of {args.repeat} runs of {args.duration} s; pipe: 1 pub, 1 sub; queue: 1 pub, 4 subs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
