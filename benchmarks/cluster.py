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
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from pigeon import Client
from pigeon.bench.load import Options, run
from pigeon.cluster.etcd import EtcdProcess, free_port
from pigeon.cluster.slots import SLOTS, preferred_owner
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


def main() -> int:
    """Run every setup ``--repeats`` times, in turns, and print the median msgs/s of each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
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
