"""Durable publish throughput on a 3-node cluster with ``--replicas 0`` against ``--replicas 1``
(or the counts ``--compare`` names: ``0,1,2`` adds two successors per slot).

    python -m benchmarks.replicas [--repeats 3] [--duration 3] [--fsync everysec] [--compare 0,1]

Each setup: a real etcd and three ``pigeon --cluster`` nodes, each with its own ``--data-dir``
(and the roomy limits of ``pigeon.bench.brokers``). One publisher connected straight to the owner
of its topic pipelines 64-byte ``PUBLISH`` lines with a window of 1,000 unconfirmed and counts the
``PUBLISHED`` replies for ``--duration`` seconds; no consumer. The setups run in turns, ``--repeats``
times; the load average is printed before and after: read the ratio within one run. Needs etcd.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

from pigeon import Client
from pigeon.bench.brokers import ROOMY
from pigeon.cluster.etcd import EtcdProcess
from pigeon.cluster.slots import slot_of
from pigeon.testing import ServerProcess

WINDOW = 1000
CHUNK = 100
NODES = 3


def publish_rate(port: int, topic: str, duration: float) -> float:
    """Confirmed publishes per second of one pipelining publisher (window ``WINDOW``)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"CONNECT\n")
        client_id = sock.recv(100).split()[1]
        chunk = b"".join(b"PUBLISH %s %s %s\n" % (client_id, topic.encode(), b"x" * 64) for _ in range(CHUNK))
        sent = answered = 0
        started = time.perf_counter()
        while time.perf_counter() - started < duration:
            sock.sendall(chunk)
            sent += CHUNK
            while sent - answered > WINDOW:
                answered += sock.recv(1 << 18).count(b"\n")
        elapsed = time.perf_counter() - started
        while answered < sent:
            answered += sock.recv(1 << 18).count(b"\n")
        return answered / elapsed


def measure(etcd: EtcdProcess, replicas: int, fsync: str, duration: float) -> float:
    """One run: three fresh nodes, the rate of a publisher on the owner of its topic."""
    with tempfile.TemporaryDirectory(prefix="pigeon-replicas-") as scratch:
        nodes = [
            ServerProcess(
                "--cluster",
                etcd.endpoint,
                "--node-name",
                f"r{replicas}n{i}",
                "--cluster-ttl",
                "5",
                "--data-dir",
                os.path.join(scratch, str(i)),
                "--fsync",
                fsync,
                "--replicas",
                str(replicas),
                *ROOMY,
            )
            for i in range(NODES)
        ]
        try:
            deadline = time.monotonic() + 30
            while True:
                with Client("127.0.0.1", nodes[0].port) as client:
                    seen = client.cluster()
                if len(seen["members"]) == NODES and seen["unowned"] == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not settle: {seen}")
                time.sleep(0.1)
            owned = set(seen["owned"])
            topic = next(f"bench{n}" for n in range(10_000) if slot_of(f"bench{n}".encode()) in owned)
            time.sleep(1.0)  # the replication links are up
            return publish_rate(nodes[0].port, topic, duration)
        finally:
            # killed together: a node stopped alone hands its slots to the next, which would take
            # over every replicated message first (a failover, not what this measures)
            for node in nodes:
                node.proc.kill()
            for node in nodes:
                node.stop()


def main() -> int:
    """Run both setups in turns and print msgs/s per setup and the ratio."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--fsync", choices=("everysec", "always", "no"), default="everysec")
    parser.add_argument("--compare", default="0,1", help="the --replicas counts, the first the base")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    rates: dict[int, list[float]] = {int(count): [] for count in args.compare.split(",")}
    with EtcdProcess() as etcd:
        for _ in range(args.repeats):
            for replicas in rates:
                rate = measure(etcd, replicas, args.fsync, args.duration)
                rates[replicas].append(rate)
                print(f"--replicas {replicas} --fsync {args.fsync}: {rate:,.0f} msgs/s", flush=True)
    print(f"load average after: {os.getloadavg()}")
    base = statistics.median(next(iter(rates.values())))
    for replicas, values in rates.items():
        median = statistics.median(values)
        print(f"--replicas {replicas}: median {median:,.0f} msgs/s ({median / base:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
