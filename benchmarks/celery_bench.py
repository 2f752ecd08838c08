"""Celery with Pigeon, Redis and RabbitMQ as its broker: no-op tasks per second and delay()-to-start latency.

For each repeat, each worker pool (``solo``, ``prefork -c 2``) and each broker in turn (same run,
same Celery): the queue is filled with ``--tasks`` no-op tasks by ``delay()`` (the publishing
rate is noted), then a ``celery worker`` starts and the queue's ready count is read every 20 ms;
the rate is the messages taken between the first drop and the empty queue, over that time.
Then, with a prefork worker idle, ``--latency`` tasks are sent 10 ms apart and each records when
it started: p50 and p99 of delay()-to-start. Brokers are started fresh for the run
(benchmarks/compare.py's starters: a throwaway RabbitMQ node on its own port, redis-server
without persistence, pigeon) and stopped after. Every figure is the median of the repeats.

    python -m benchmarks.celery_bench                      # 20,000 tasks, 3 repeats (about 15 minutes)
    python -m benchmarks.celery_bench --tasks 2000 --repeats 1 --latency 50   # a quick look

Needs celery, kombu and redis (``pip install -e ".[test]" redis``), redis-server and rabbitmq-server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from kombu import Connection

from benchmarks.celery_tasks import NOOP, STAMP, bench_app
from pigeon.bench.brokers import Broker, brokers, running

ROOT = Path(__file__).resolve().parent.parent
POOLS = {"solo": ["--pool", "solo"], "prefork -c 2": ["--pool", "prefork", "--concurrency", "2"]}
POLL = 0.02  # seconds between reads of the queue's ready count
WAIT = 300.0  # the longest any phase may take
GOAL = 1.5  # Pigeon's tasks/s over the faster of Redis and RabbitMQ


def broker_url(name: str, port: int) -> str:
    """The Celery broker URL of a broker started by benchmarks/compare.py."""
    scheme = {"pigeon": "pigeon", "redis": "redis", "rabbitmq": "amqp"}[name]
    auth = "guest:guest@" if name == "rabbitmq" else ""
    return f"{scheme}://{auth}127.0.0.1:{port}/"


def ready_count(connection: Connection) -> int:
    """Messages ready in the default queue ``celery`` (not counting those delivered to a worker)."""
    with connection.channel() as channel:
        try:
            return int(channel.queue_declare("celery", passive=True).message_count)
        except connection.channel_errors:
            return 0  # Redis deletes an empty list: its queue is then "not found"


def purge(connection: Connection) -> None:
    """Empty the default queue ``celery`` (which RabbitMQ may not have yet)."""
    with connection.channel() as channel, suppress(*connection.channel_errors):
        channel.queue_purge("celery")


@contextmanager
def worker(env: dict[str, str], pool: str) -> Iterator[subprocess.Popen[bytes]]:
    """A ``celery worker`` on the benchmark app, quiet (logging each task would be what is measured)."""
    command = [sys.executable, "-m", "celery", "-A", "benchmarks.celery_tasks", "worker", "-l", "WARNING"]
    flags = ["--without-mingle", "--without-gossip", "--without-heartbeat", *POOLS[pool]]
    proc = subprocess.Popen([*command, *flags], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(condition: str, check: Callable[[], bool]) -> None:
    """Poll ``check()`` until true, for at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {condition}")
        time.sleep(POLL)


def throughput(url: str, pool: str, tasks: int) -> tuple[float, float]:
    """(no-op tasks consumed per second by one worker, delay() calls per second that filled the queue)."""
    env = os.environ | {"PIGEON_BENCH_BROKER": url, "PYTHONPATH": str(ROOT)}
    app = bench_app(url)
    noop = app.tasks[NOOP]
    with Connection(url) as connection:
        purge(connection)
        started = time.perf_counter()
        for _ in range(tasks):
            noop.delay()
        wait_until("the queue to fill", lambda: ready_count(connection) >= tasks)
        published = tasks / (time.perf_counter() - started)
        with worker(env, pool):
            wait_until("the worker to start", lambda: ready_count(connection) < tasks)
            first_seen, left = time.perf_counter(), ready_count(connection)
            wait_until("the queue to empty", lambda: ready_count(connection) == 0)
            consumed = left / (time.perf_counter() - first_seen)
    app.close()
    return consumed, published


def latency(url: str, count: int, scratch: str) -> tuple[float, float]:
    """(p50, p99) seconds from delay() to the task's start, tasks sent 10 ms apart to an idle worker."""
    stamps = Path(scratch) / "stamps"
    stamps.unlink(missing_ok=True)
    env = os.environ | {
        "PIGEON_BENCH_BROKER": url,
        "PYTHONPATH": str(ROOT),
        "PIGEON_BENCH_STAMPS": str(stamps),
    }
    app = bench_app(url)
    stamp = app.tasks[STAMP]
    with worker(env, "prefork -c 2"), Connection(url) as connection:
        stamp.delay(time.time())  # the worker is up once its first task has run
        wait_until("the worker to start", lambda: stamps.exists())
        stamps.unlink()
        for _ in range(count):
            stamp.delay(time.time())
            time.sleep(0.01)
        wait_until("every stamp", lambda: stamps.exists() and stamps.read_text().count("\n") >= count)
        assert ready_count(connection) == 0
    app.close()
    values = sorted(float(line) for line in stamps.read_text().split())
    return statistics.median(values), values[min(len(values) - 1, int(len(values) * 0.99))]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks per throughput run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency", type=int, default=300, help="tasks per latency run (0: skip)")
    parser.add_argument("--brokers", default="pigeon,redis,rabbitmq")
    args = parser.parse_args(argv)
    wanted = args.brokers.split(",")
    active: list[Broker] = [b for b in brokers(include_sink=False) if b.name in wanted and b.executable]
    print(f"uptime before: {os.getloadavg()}", flush=True)
    rates: dict[tuple[str, str], list[float]] = {}
    publish: dict[str, list[float]] = {}
    delays: dict[str, list[tuple[float, float]]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="pigeon-celery-bench-") as scratch:
        urls = {b.name: broker_url(b.name, stack.enter_context(running(b, []))[1]) for b in active}
        for repeat in range(args.repeats):
            for pool in POOLS:
                for b in active:
                    consumed, published = throughput(urls[b.name], pool, args.tasks)
                    rates.setdefault((b.name, pool), []).append(consumed)
                    publish.setdefault(b.name, []).append(published)
                    print(
                        f"repeat {repeat + 1} {pool:13} {b.name:9} {consumed:8.0f} tasks/s "
                        f"(delay() {published:6.0f}/s)",
                        flush=True,
                    )
            if args.latency:
                for b in active:
                    delays.setdefault(b.name, []).append(latency(urls[b.name], args.latency, scratch))
                    p50, p99 = delays[b.name][-1]
                    print(
                        f"repeat {repeat + 1} latency {b.name:9} "
                        f"p50 {p50 * 1e3:.2f} ms p99 {p99 * 1e3:.2f} ms",
                        flush=True,
                    )
    print(f"uptime after: {os.getloadavg()}")
    print(format_table(active, rates, publish, delays, args))
    return 0


def format_table(
    active: list[Broker],
    rates: dict[tuple[str, str], list[float]],
    publish: dict[str, list[float]],
    delays: dict[str, list[tuple[float, float]]],
    args: argparse.Namespace,
) -> str:
    """The medians as a Markdown table, with Pigeon's ratio to the faster peer per pool."""
    header = (
        "| broker | " + " | ".join(f"{pool} tasks/s" for pool in POOLS) + " | delay()/s | p50 ms | p99 ms |"
    )
    lines = [f"{args.tasks:,} no-op tasks, median of {args.repeats}", "", header, "|" + " --- |" * 6]
    for b in active:
        cells = [f"{statistics.median(rates[b.name, pool]):,.0f}" for pool in POOLS]
        cells.append(f"{statistics.median(publish[b.name]):,.0f}")
        if b.name in delays:
            cells += [f"{statistics.median(d[i] for d in delays[b.name]) * 1e3:.2f}" for i in (0, 1)]
        else:
            cells += ["", ""]
        lines.append(f"| {b.version or b.name} | " + " | ".join(cells) + " |")
    lines.append("")
    for pool in POOLS:
        peers = [statistics.median(rates[b.name, pool]) for b in active if b.name != "pigeon"]
        if "pigeon" in {b.name for b in active} and peers:
            ratio = statistics.median(rates["pigeon", pool]) / max(peers)
            verdict = "met" if ratio >= GOAL else "not met"
            lines.append(f"{pool}: Pigeon / faster peer = {ratio:.2f}x (goal {GOAL}x: {verdict})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
