"""What wildcard subscriptions cost the exact-topic publish path (issue 15, requirement 3).

Alternates runs, in fresh subprocesses, of one core with no pattern subscription and with N of
them (``--patterns``, default 10,000: ``w.<i>.*`` and ``w.<i>.>`` from as many connections as the
subscription limit needs), and prints the medians of two figures:

- ``exact``: pipelined PUBLISH lines to one topic through ``Broker.feed`` to one plain subscriber
  (parse, route, write MESSAGE, flush; no sockets), messages per second. With patterns present a
  topic that none matches takes the v1 path after one comparison of its cached generation.
- ``new topics``: PUBLISH to ``--topics`` distinct topics of four tokens (``t.<i>.x.y``) that no
  pattern matches, each new: every one is resolved once through the pattern trie, O(tokens)
  lookups however many patterns there are.

    python benchmarks/wildcards.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a subprocess; prints "<exact msgs/s> <new topics/s>".
WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pigeon._core import Broker
messages, patterns, topics = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
broker = Broker(max_backlog=10, max_subscriptions=10_000, max_topics=10_000_000)
sub = broker.open(lambda data: None)
pub = broker.open(lambda data: None)
broker.feed(sub, b"CONNECT\\nSUBSCRIBE c1 jobs\\n")
broker.feed(pub, b"CONNECT\\n")
done = 0
while done < patterns:
    holder = broker.open(lambda data: None)
    broker.feed(holder, b"CONNECT\\n")
    cid = broker.client_id(holder).encode()
    n = min(10_000, patterns - done)
    lines = [b"SUBSCRIBE %s w.%d.%s\\n" % (cid, done + i, b"*" if i % 2 else b">") for i in range(n)]
    broker.feed(holder, b"".join(lines))
    done += n
assert broker.stats()["wildcard_subscriptions"] == patterns, broker.stats()["wildcard_subscriptions"]
line = b"PUBLISH c2 jobs " + b"x" * 64 + b"\\n"
per_read = (256 * 1024) // len(line)
chunk = line * per_read
start = time.perf_counter()
for _ in range(messages // per_read):
    broker.feed(pub, chunk)
exact = (messages // per_read) * per_read / (time.perf_counter() - start)
lines = [b"PUBLISH c2 t.%d.x.y m\\n" % i for i in range(topics)]
start = time.perf_counter()
for k in range(0, topics, 1000):
    broker.feed(pub, b"".join(lines[k : k + 1000]))
fresh = topics / (time.perf_counter() - start)
print(exact, fresh)
"""


def run_once(patterns: int, messages: int, topics: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(ROOT), str(messages), str(patterns), str(topics)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    """Alternate the runs and print the medians and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument(
        "--patterns", type=int, default=10_000, help="wildcard subscriptions (default 10,000)"
    )
    parser.add_argument("--messages", type=int, default=2_000_000, help="exact-topic messages per run")
    parser.add_argument("--topics", type=int, default=100_000, help="new topics per run (default 100,000)")
    args = parser.parse_args()
    runs: dict[int, list[tuple[float, float]]] = {0: [], args.patterns: []}
    for _ in range(args.rounds):
        for n in runs:
            runs[n].append(run_once(n, args.messages, args.topics))
    base_exact = statistics.median(r[0] for r in runs[0])
    base_fresh = statistics.median(r[1] for r in runs[0])
    print(f"{'patterns':>9}  {'exact msgs/s':>13}  {'ratio':>6}  {'new topics/s':>13}  {'ratio':>6}")
    for n, results in runs.items():
        exact = statistics.median(r[0] for r in results)
        fresh = statistics.median(r[1] for r in results)
        print(
            f"{n:>9,}  {exact:>13,.0f}  {exact / base_exact:>6.2f}"
            f"  {fresh:>13,.0f}  {fresh / base_fresh:>6.2f}"
        )


if __name__ == "__main__":
    main()
