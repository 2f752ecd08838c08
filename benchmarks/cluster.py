"""Fan-in 8x8 on a Pigeon cluster against one Pigeon process and a 2-node NATS cluster (routes).

    python -m benchmarks.cluster [--repeats 3] [--duration 3]

Scenarios, each with the same generator (``pigeon.bench.load``, ``fanin``: 8 publishers over 8
topics, one subscriber per topic, 64-byte messages):

- ``pigeon 1 process``: ``pigeon`` alone;
- ``pigeon --workers 2``: every client on the shared port (the kernel spreads them over the two
  workers, so about half the commands are forwarded to the other worker);
- ``pigeon 2 nodes, same node``: two ``pigeon --cluster`` nodes, every client on the first;
- ``pigeon 2 nodes, across``: subscribers on the first node, publishers on the second;
- ``nats 2 nodes, same node`` / ``across``: two nats-server joined by a route, clients as above.

Nothing is pinned: the cluster's point is to use both cores. The load average is printed before and
after; read the ratios within one run. Needs etcd (etcd-server), nats-server and the bench extra.

    python -m benchmarks.cluster --clients [--repeats 3] [--duration 3]

compares the client library on ``pigeon --workers 2`` instead: fan-in 8x8 (8 publisher processes,
each ``publish_many`` of 64-byte messages in batches of 1,000 to its own topic, 8 subscriber
processes, one topic each; 4 topics owned by each worker) with ``ClusterClient`` (each client
connects to its topic's owner: nothing is forwarded) against ``Client`` on the shared port (the kernel
spreads the connections, so about half of the traffic is forwarded to the other worker). Both sides
are the same Python client, so the difference is the brokers' forwarding; msgs/s are deliveries, and
"broker us/msg" the workers' CPU time (user + system, psutil) per delivery during the measured span.

    python -m benchmarks.cluster --spread [--repeats 2] [--messages 100000]

times one client that pipelines ``--messages`` ``PUBLISH`` lines of one byte over several topics, on
two ``pigeon --cluster`` nodes, the client on n0: to 4 topics n0 owns, to 4 topics n1 owns, and to
topics of both in alternation (one line each, in turns: each switch of owner waits for the previous
one's answers), against one process with 8 topics; then the alternation with ``Client`` and with
``ClusterClient`` (``publish(..., wait=False)``, then ``flush()``). msgs/s are ``PUBLISHED`` replies.

    python -m benchmarks.cluster --patterns [--repeats 3] [--duration 3]

runs that fan-in with ``Client`` on the shared port twice: each subscriber subscribed to its topic
(``fanin<n>.t``), and each subscribed to a wildcard pattern that matches only its topic
(``fanin<n>.*``), which its node places on both workers (docs/cluster.md, "Wildcard patterns").
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from pigeon import Client, ClusterClient
from pigeon import TimeoutError as PigeonTimeout
from pigeon.bench.load import Options, run
from pigeon.cluster.etcd import EtcdProcess, free_port
from pigeon.cluster.slots import SLOTS, preferred_owner, slot_of
from pigeon.testing import ServerProcess

# (subscribers' port, publishers' port) of a running setup
Ports = tuple[int, int]


def wait_spread(port: int, nodes: int, timeout: float = 30.0) -> None:
    """Wait until the cluster behind ``port`` has ``nodes`` members and every slot is with its
    preferred owner (no handover left to happen during a run)."""
    deadline = time.monotonic() + timeout
    while True:
        with Client("127.0.0.1", port) as client:
            seen = client.cluster()
        members = seen["members"]
        settled = len(members) == nodes and all(
            slot in members.get(preferred_owner(slot, members) or "", {}).get("slots", [])
            for slot in range(SLOTS)
        )
        if settled:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not spread its slots over {nodes} nodes: {seen}")
        time.sleep(0.1)


@contextmanager
def pigeon_single() -> Iterator[Ports]:
    """One ``pigeon`` process."""
    proc = ServerProcess(loop="uvloop")
    try:
        yield proc.port, proc.port
    finally:
        proc.stop()


@contextmanager
def pigeon_workers() -> Iterator[Ports]:
    """``pigeon --workers 2`` with the etcd it starts; every client on the shared port."""
    proc = ServerProcess("--workers", "2", loop="uvloop")
    try:
        wait_spread(proc.port, 2)
        yield proc.port, proc.port
    finally:
        proc.stop()


def pigeon_nodes(across: bool) -> Callable[[], AbstractContextManager[Ports]]:
    """Two ``pigeon --cluster`` nodes and an etcd; publishers on the second node when ``across``."""

    @contextmanager
    def setup() -> Iterator[Ports]:
        with EtcdProcess() as etcd:
            nodes = [
                ServerProcess("--cluster", etcd.endpoint, "--node-name", f"n{i}", loop="uvloop")
                for i in (0, 1)
            ]
            try:
                wait_spread(nodes[0].port, 2)
                yield nodes[0].port, nodes[1 if across else 0].port
            finally:
                for node in nodes:
                    node.stop()

    return setup


def _nats(args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["nats-server", "-a", "127.0.0.1", *args],
        stderr=subprocess.STDOUT,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"GOMAXPROCS": str(os.cpu_count() or 1)},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if re.search(r"Server is ready", line):
            break
    return proc


def nats_nodes(across: bool) -> Callable[[], AbstractContextManager[Ports]]:
    """Two nats-server joined by a route; publishers on the second when ``across``."""

    @contextmanager
    def setup() -> Iterator[Ports]:
        ports = [free_port(), free_port()]
        routes = [free_port(), free_port()]
        first = _nats(
            ["-p", str(ports[0]), "-cluster", f"nats://127.0.0.1:{routes[0]}", "-cluster_name", "b"]
        )
        route = ["-routes", f"nats://127.0.0.1:{routes[0]}"]
        second = _nats(
            ["-p", str(ports[1]), "-cluster", f"nats://127.0.0.1:{routes[1]}", "-cluster_name", "b", *route]
        )
        try:
            # the route is up once a subscription on one node is seen on the other; give it a moment
            time.sleep(1)
            yield ports[0], ports[1 if across else 0]
        finally:
            for proc in (first, second):
                proc.terminate()
                proc.wait(10)

    return setup


SETUPS: dict[str, tuple[str, Callable[[], AbstractContextManager[Ports]]]] = {
    "pigeon 1 process": ("pigeon", pigeon_single),
    "pigeon --workers 2": ("pigeon", pigeon_workers),
    "pigeon 2 nodes, same node": ("pigeon", pigeon_nodes(False)),
    "pigeon 2 nodes, across": ("pigeon", pigeon_nodes(True)),
    "nats 2 nodes, same node": ("nats", nats_nodes(False)),
    "nats 2 nodes, across": ("nats", nats_nodes(True)),
}


FANIN = 8  # publishers, topics and subscribers of the client comparison
BATCH = [b"m" * 64] * 1000
WARM_UP = 0.5


def _topics_per_worker(port: int, timeout: float = 30.0) -> list[str]:
    """FANIN topics, half of them owned by each of the two workers behind ``port`` (as the worker
    that answers sees the slots: asked again until both hold some)."""
    deadline = time.monotonic() + timeout
    while True:
        with Client("127.0.0.1", port) as client:
            members = client.cluster()["members"]
        owners = [set(member["slots"]) for member in members.values()]
        if len(owners) == 2 and all(owners):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers do not both own slots: {members}")
        time.sleep(0.1)
    chosen: list[str] = []
    for owned in owners:
        mine = (f"fanin{n}.t" for n in range(100_000) if slot_of(f"fanin{n}.t".encode()) in owned)
        chosen += [next(mine) for _ in range(FANIN // len(owners))]
    return chosen


def _client(port: int, aware: bool) -> Client | ClusterClient:
    return ClusterClient("127.0.0.1", port) if aware else Client("127.0.0.1", port)


def _publisher(port: int, aware: bool, topic: str, start: float, end: float) -> None:
    with _client(port, aware) as client:
        while time.time() < start:
            time.sleep(0.01)
        while time.time() < end:
            client.publish_many(topic, BATCH)


def _subscriber(
    port: int, aware: bool, topic: str, start: float, end: float, counts: Any, i: int, pattern: bool
) -> None:
    """Count the deliveries between ``start + WARM_UP`` and ``end`` (read every 256 messages); with
    ``pattern``, of a subscription to ``<topic's first token>.*`` instead of the topic."""
    with _client(port, aware) as client:
        client.subscribe(topic.split(".")[0] + ".*" if pattern else topic)
        received = 0
        first: int | None = None
        while True:
            try:
                client.next_message(timeout=1.0)
            except PigeonTimeout:
                now = time.time()
            else:
                received += 1
                if received % 256:
                    continue
                now = time.time()
            if first is None and now >= start + WARM_UP:
                first = received
            if now >= end:
                counts[i] = received - (first or received)
                return


def _workers_cpu(supervisor: int) -> float:
    """CPU seconds used so far by the ``pigeon`` worker processes under ``supervisor`` (not etcd)."""
    import psutil

    total = 0.0
    for child in psutil.Process(supervisor).children(recursive=True):
        try:
            if "pigeon" in " ".join(child.cmdline()):
                times = child.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def client_fanin(aware: bool, duration: float, pattern: bool = False) -> tuple[float, float]:
    """Deliveries per second of fan-in 8x8 on a fresh ``pigeon --workers 2``, with ``ClusterClient``
    (``aware``) or ``Client`` on the shared port, and the workers' CPU microseconds per delivery;
    ``pattern``: each subscriber on a wildcard pattern that matches its topic only."""
    proc = ServerProcess("--workers", "2", loop="uvloop")
    try:
        wait_spread(proc.port, 2)
        topics = _topics_per_worker(proc.port)
        counts: Any = multiprocessing.Array("q", FANIN)
        start = time.time() + 2.0  # every process connected and subscribed by then
        end = start + WARM_UP + duration
        procs = [
            multiprocessing.Process(
                target=_subscriber, args=(proc.port, aware, t, start, end, counts, i, pattern)
            )
            for i, t in enumerate(topics)
        ] + [
            multiprocessing.Process(target=_publisher, args=(proc.port, aware, t, start, end)) for t in topics
        ]
        for p in procs:
            p.start()
        time.sleep(max(start + WARM_UP - time.time(), 0.0))
        cpu = _workers_cpu(proc.proc.pid)
        time.sleep(max(end - time.time(), 0.0))
        cpu = _workers_cpu(proc.proc.pid) - cpu
        for p in procs:
            p.join(duration + 60)
        delivered = float(sum(counts[:]))
        return delivered / duration, cpu / delivered * 1e6 if delivered else float("nan")
    finally:
        proc.stop()


def compare_clients(repeats: int, duration: float, patterns: bool = False) -> None:
    """``client_fanin`` with each client in turns (with ``patterns``: ``Client`` with exact
    subscriptions and with patterns), ``repeats`` times; prints the medians."""
    print(f"load average before: {os.getloadavg()}")
    forwarded = "Client (shared port, forwarded)"
    # name -> (ClusterClient, pattern subscriptions)
    setups = {"ClusterClient (to the owner)": (True, False), forwarded: (False, False)}
    if patterns:
        setups = {forwarded: (False, False), "Client, pattern subscribers": (False, True)}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, values in runs.items():
            aware, pattern = setups[name]
            values.append(client_fanin(aware, duration, pattern))
    print(f"load average after: {os.getloadavg()}")
    base = statistics.median(rate for rate, _ in runs[forwarded])
    columns = f"{'msgs/s (median)':>15} {'vs forwarded':>12} {'broker us/msg':>13}"
    print(f"{'client on --workers 2':<32} {columns}  runs")
    for name, values in runs.items():
        median = statistics.median(rate for rate, _ in values)
        cpu = statistics.median(us for _, us in values)
        each = ", ".join(f"{rate:,.0f} ({us:.2f} us)" for rate, us in values)
        print(f"{name:<32} {median:>15,.0f} {median / base:>11.2f}x {cpu:>13.2f}  {each}")


def _pipelined(port: int, topics: list[str], messages: int) -> float:
    """``messages`` PUBLISH lines over ``topics`` in turns, sent on one connection by a thread while
    this one reads the replies: PUBLISHED per second."""
    with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rb") as replies:
        sock.sendall(b"CONNECT\n")
        me = replies.readline().split()[1]
        lines = b"".join(
            b"PUBLISH %s %s m\n" % (me, topics[i % len(topics)].encode()) for i in range(messages)
        )
        started = time.perf_counter()
        sender = threading.Thread(target=sock.sendall, args=(lines,), daemon=True)
        sender.start()
        for _ in range(messages):
            reply = replies.readline()
            if not reply.startswith(b"PUBLISHED "):
                raise RuntimeError(f"not published: {reply!r}")
        rate = messages / (time.perf_counter() - started)
        sender.join()
    return rate


def _with_library(port: int, aware: bool, topics: list[str], messages: int) -> float:
    """The same with the client library: ``publish(..., wait=False)`` each, then ``flush()``."""
    with _client(port, aware) as client:
        started = time.perf_counter()
        for i in range(messages):
            client.publish(topics[i % len(topics)], b"m", wait=False)
        refused = client.flush()
        rate = messages / (time.perf_counter() - started)
    if refused:
        raise RuntimeError(f"refused: {refused[:1]}")
    return rate


def _owned_topics(port: int, node: str, count: int) -> list[str]:
    """``count`` topics whose slots ``node`` serves, as the node behind ``port`` sees them."""
    with Client("127.0.0.1", port) as client:
        slots = set(client.cluster()["members"][node]["slots"])
    names = (f"{node}.t{n}" for n in range(100_000) if slot_of(f"{node}.t{n}".encode()) in slots)
    return [next(names) for _ in range(count)]


def spread_publisher(repeats: int, messages: int) -> None:
    """Time one pipelining client over topics of one owner and of two, ``repeats`` times in turns;
    prints the medians."""
    print(f"load average before: {os.getloadavg()}")
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        with pigeon_single() as (port, _):
            runs.setdefault("one process, 8 topics", []).append(
                _pipelined(port, [f"t{i}" for i in range(8)], messages)
            )
        with pigeon_nodes(False)() as (port, _):
            local, remote = _owned_topics(port, "n0", 4), _owned_topics(port, "n1", 4)
            alternating = [topic for pair in zip(local, remote, strict=True) for topic in pair]
            measured = {
                "through n0, 4 topics of n0": _pipelined(port, local, messages),
                "through n0, 4 topics of n1": _pipelined(port, remote, messages),
                "through n0, n0 and n1 in turns": _pipelined(port, alternating, messages),
                "Client, n0 and n1 in turns": _with_library(port, False, alternating, messages),
                "ClusterClient, n0 and n1 in turns": _with_library(port, True, alternating, messages),
            }
            for name, rate in measured.items():
                runs.setdefault(name, []).append(rate)
    print(f"load average after: {os.getloadavg()}")
    print(f"{'one pipelining publisher':<36} {'msgs/s (median)':>16}  runs")
    for name, values in runs.items():
        print(f"{name:<36} {statistics.median(values):>16,.0f}  {', '.join(f'{v:,.0f}' for v in values)}")


def main() -> int:
    """Run every setup ``--repeats`` times, in turns, and print the median msgs/s of each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--clients", action="store_true", help="ClusterClient against Client on --workers 2")
    parser.add_argument("--patterns", action="store_true", help="exact against pattern subscribers")
    parser.add_argument("--spread", action="store_true", help="one publisher over topics of several owners")
    parser.add_argument("--messages", type=int, default=100_000, help="publishes per --spread run")
    args = parser.parse_args()
    if args.spread:
        if shutil.which("etcd") is None:
            print("needs etcd (apt-get install etcd-server)")
            return 1
        spread_publisher(args.repeats, args.messages)
        return 0
    if args.clients or args.patterns:
        if shutil.which("etcd") is None:
            print("needs etcd (apt-get install etcd-server)")
            return 1
        compare_clients(args.repeats, args.duration, args.patterns)
        return 0
    if shutil.which("nats-server") is None or shutil.which("etcd") is None:
        print("needs nats-server and etcd (apt-get install nats-server etcd-server)")
        return 1
    print(f"load average before: {os.getloadavg()}")
    rates: dict[str, list[float]] = {name: [] for name in SETUPS}
    for _ in range(args.repeats):
        for name, (dialect, setup) in SETUPS.items():
            with setup() as (sub_port, pub_port):
                opts = Options(
                    port=sub_port,
                    pub_port=pub_port,
                    dialect=dialect,
                    duration=args.duration,
                    publishers=8,
                    topics=8,
                    progress=False,
                )
                (result,) = run(opts, ["fanin"])
                rates[name].append(result.msgs_per_s or 0.0)
    print(f"load average after: {os.getloadavg()}")
    base = statistics.median(rates["pigeon 1 process"])
    print(f"{'setup':<28} {'msgs/s (median)':>16} {'vs 1 process':>13}  runs")
    for name, values in rates.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<28} {median:>16,.0f} {median / base:>12.2f}x  {runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
