"""What the monitoring counters cost on the hot path: this tree's core against an older revision's.

Builds the core of ``--rev`` (default: the commit before the counters) in a
temporary directory, then alternates runs of the two cores in fresh
subprocesses, each pushing pipelined PUBLISH lines through ``Broker.feed`` to
one subscriber (parse, route, write MESSAGE, flush; no sockets), and prints
the median throughput of each and their ratio.

glibc's malloc moves its mmap threshold as large blocks come and go, so two
builds that differ only in struct sizes can differ by 1.5x in page faults
(older cores freed output buffers above OUT_KEEP after every flush). The runs pin
the threshold (MALLOC_MMAP_THRESHOLD_) so that the comparison measures the
code, not the allocator's state; ``--free-malloc`` leaves it alone.

    python benchmarks/counters_overhead.py --rounds 7 --messages 2000000

On a shared, busy machine the timings swing by 2x between runs; ``--instructions``
counts instructions per message under valgrind instead (callgrind, a run of
``--messages`` minus an empty run), which does not depend on the load.

``--patterns N`` (with ``--instructions``) also counts this tree's publisher
granted N permission patterns (issue 14), the last of which allows the topic
it publishes to, against the same publisher without permissions.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a subprocess with the tree to measure first on sys.path; prints messages per second.
WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pigeon._core import Broker
messages = int(sys.argv[2])
patterns = int(sys.argv[3])
broker = Broker(max_backlog=10)
sub = broker.open(lambda data: None)
pub = broker.open(lambda data: None)
broker.feed(sub, b"CONNECT\\nSUBSCRIBE c1 jobs\\n")
if patterns:
    broker.grant(pub, "bench", [f"other.{i}.*.>" for i in range(patterns - 1)] + ["jobs"], [])
broker.feed(pub, b"CONNECT\\n")
line = b"PUBLISH c2 jobs " + b"x" * 64 + b"\\n"
per_read = (256 * 1024) // len(line)
chunk = line * per_read
reads = messages // per_read
start = time.perf_counter()
for _ in range(reads):
    broker.feed(pub, chunk)
elapsed = time.perf_counter() - start
print(reads * per_read / elapsed)
"""


def build(rev: str, into: Path) -> Path:
    """Extract ``rev`` into ``into`` and build its core in place."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=into, check=True, capture_output=True
    )
    return into


PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def measure(tree: Path, messages: int, pin_malloc: bool = True) -> float:
    """Messages per second of one run of the worker against ``tree``'s core."""
    env = {**os.environ, **PINNED_MALLOC} if pin_malloc else None
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(tree), str(messages), "0"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return float(out.stdout)


def instructions(tree: Path, messages: int, patterns: int = 0) -> int:
    """Instructions executed by one run of the worker against ``tree``'s core, under callgrind
    (its publisher granted ``patterns`` permission patterns when not 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                "-c",
                WORKER,
                str(tree),
                str(messages),
                str(patterns),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **PINNED_MALLOC},
        )
    match = re.search(r"Collected : (\d+)", out.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {out.stderr[-500:]}")
    return int(match.group(1))


def per_message(tree: Path, messages: int, patterns: int = 0) -> float:
    """Instructions per message: a run of ``messages`` minus a run that publishes none."""
    return (instructions(tree, messages, patterns) - instructions(tree, 0, patterns)) / messages


def main() -> int:
    """Build the baseline, alternate the runs, print the medians and the ratio."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rev", default="d385ca5", help="the revision without the counters")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--messages", type=int, default=2_000_000)
    parser.add_argument("--free-malloc", action="store_true", help="do not pin glibc's mmap threshold")
    parser.add_argument("--instructions", action="store_true", help="count instructions (valgrind)")
    parser.add_argument(
        "--patterns",
        type=int,
        default=0,
        help="with --instructions: also this tree with N permission patterns",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = build(args.rev, Path(tmp))
        if args.instructions:
            base, new = per_message(baseline, args.messages), per_message(ROOT, args.messages)
            print(f"instructions per message: baseline {base:.1f}, counters {new:.1f}")
            print(f"counters / baseline: {new / base:.3f}")
            if args.patterns:
                granted = per_message(ROOT, args.messages, args.patterns)
                print(f"instructions per message with {args.patterns} permission patterns: {granted:.1f}")
                print(f"patterns / counters: {granted / new:.3f}")
            return 0
        runs: dict[str, list[float]] = {"baseline": [], "counters": []}
        for _ in range(args.rounds):
            runs["baseline"].append(measure(baseline, args.messages, not args.free_malloc))
            runs["counters"].append(measure(ROOT, args.messages, not args.free_malloc))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    for name, values in runs.items():
        print(f"{name:9} median {medians[name]:>12,.0f} msg/s  runs {', '.join(f'{v:,.0f}' for v in values)}")
    print(f"counters / baseline: {medians['counters'] / medians['baseline']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
