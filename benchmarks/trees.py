"""Before and after in one sitting: Pigeon servers built from several source trees, one load generator.

Each tree (a checkout with its core built in place, e.g. a ``git worktree`` of an
older commit) runs as ``python -m pigeon`` from its own folder, pinned to one CPU,
while this process (the generator of this tree, ``pigeon.bench.load``) runs on
another. The trees take turns within each repeat, so they share whatever else
the machine does; the table gives each tree's median and its ratio to the first.

    python benchmarks/trees.py --repeat 5 v1=../pigeon-v1 now=.
    python benchmarks/trees.py --workloads queue,fanin --repeat 8 before=/tmp/old after=.
    python benchmarks/trees.py --workloads durable --fsync always --repeat 8 before=/tmp/old after=.

With ``--fsync``, every server gets a fresh data directory (``--data-dir``, under the system's
temporary directory) with that policy. With ``--fsync`` or the ``durable`` workload, the servers
get backlog and memory limits that hold a whole run without a consumer (brokers.ROOMY).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from pigeon.bench.brokers import ROOMY
from pigeon.bench.load import Options, run

LISTENING = re.compile(r"listening on \S+:(\d+)")


def _serve(tree: Path, cpu: int, flags: list[str]) -> tuple[subprocess.Popen[str], int]:
    """Start the server of ``tree`` on ``cpu`` with ``flags``; returns the process and its port."""
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(cpu),
            sys.executable,
            "-m",
            "pigeon",
            "--port",
            "0",
            "--loop",
            "uvloop",
            *flags,
        ],
        cwd=tree,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        match = LISTENING.search(line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(match.group(1))
    raise RuntimeError(f"the server of {tree} did not start")


def _tree(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not (Path(path) / "pigeon" / "__init__.py").exists():
        raise argparse.ArgumentTypeError(f"want NAME=PATH to a source tree, not {text!r}")
    return name, Path(path).resolve()


def main() -> None:
    """Parse the trees, measure them in turns, print the medians and the ratios to the first."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="+", type=_tree, metavar="NAME=PATH")
    parser.add_argument("--workloads", default="pipe,queue,fanin")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--broker-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument(
        "--fsync", choices=("no", "everysec", "always"), help="durable servers with this policy"
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.client_cpu})
    workloads = args.workloads.split(",")
    rates: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeat):
        for name, tree in args.trees:
            data = tempfile.mkdtemp(prefix="pigeon-trees-")
            # the durable workload publishes without a consumer: the default bounds would hold it
            flags = [*ROOMY] if args.fsync or "durable" in workloads else []
            if args.fsync:
                flags += ["--data-dir", data, "--fsync", args.fsync]
            proc, port = _serve(tree, args.broker_cpu, flags)
            try:
                opts = replace(Options(), port=port, pid=proc.pid, duration=args.duration, progress=False)
                for result in run(opts, workloads):
                    rate = result.msgs_per_s or 0.0
                    rates.setdefault((name, result.workload), []).append(rate)
                    print(f"repeat {repeat}: {name} {result.workload} {rate:,.0f} msgs/s", flush=True)
            finally:
                proc.terminate()
                proc.wait()
                shutil.rmtree(data)
    first = args.trees[0][0]
    print(f"\nmedians of {args.repeat} (msgs/s), and the ratio to {first}:")
    for workload in workloads:
        base = statistics.median(rates[(first, workload)])
        cells = []
        for name, _ in args.trees:
            values = rates[(name, workload)]
            median = statistics.median(values)
            spread = f"{min(values) / 1e6:.2f}-{max(values) / 1e6:.2f}"
            cells.append(f"{name} {median / 1e6:.2f} M ({median / base:.2f}; {spread})")
        print(f"{workload:>6}: " + "   ".join(cells))


if __name__ == "__main__":
    main()
