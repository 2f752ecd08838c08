"""``pigeon --workers N``: node processes sharing one port, with the etcd pigeon starts for them."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from pigeon.cluster.etcd import etcd_binary
from pigeon.cluster.workers import without_flags
from pigeon.testing import LineClient, ServerProcess

needs_etcd = pytest.mark.skipif(
    etcd_binary() is None, reason="etcd is not installed (apt-get install etcd-server)"
)


def test_the_supervisor_sets_its_own_flags_for_each_worker() -> None:
    argv = ["--workers", "2", "--max-backlog=10", "--data-dir", "d", "--http-port=0", "--port", "5"]
    assert without_flags(argv, {"--workers": 1, "--data-dir": 1, "--http-port": 1}) == [
        "--max-backlog=10",
        "--port",
        "5",
    ]


def _node(client: LineClient) -> str:
    reply = client.ask("CLUSTER STATUS")
    return str(json.loads(reply[len(b"CLUSTER ") :])["node"])


@needs_etcd
@pytest.mark.slow
def test_workers_share_one_port_as_one_broker_and_a_killed_worker_comes_back() -> None:
    pytest.importorskip("aetcd", reason="the cluster extra is not installed")
    broker = ServerProcess("--workers", "2", "--cluster-ttl", "2")
    try:
        assert broker.loop_name == "workers"
        clients = [broker.client() for _ in range(16)]
        for client in clients:
            client.connect()
        by_node: dict[str, list[LineClient]] = {}
        for client in clients:
            by_node.setdefault(_node(client), []).append(client)
        assert len(by_node) == 2, "the kernel spread 16 connections over one worker only"
        (first, *_), (second, *_) = by_node.values()
        publisher = by_node[next(iter(by_node))][-1]
        for topic in ("spread0", "spread1", "spread2"):
            first.subscribe(topic)
            second.subscribe(topic)
            for i in range(4):
                publisher.publish(topic, f"m{i}")
            assert sorted(first.lines(2) + second.lines(2)) == [
                f"MESSAGE {topic} m{i}".encode() for i in range(4)
            ]
        pids = {
            line.split("started worker ")[1].split()[0]: int(line.split("(pid ")[1].split(")")[0])
            for line in broker.log
            if "started worker " in line
        }
        assert set(pids) == {"w0", "w1"}
        os.kill(pids["w1"], signal.SIGKILL)
        # the supervisor starts it again; it rejoins, and the kernel sends it connections again
        deadline = time.monotonic() + 60
        while True:
            try:
                probe = broker.client()
                try:
                    seen = json.loads(probe.ask("CLUSTER STATUS")[len(b"CLUSTER ") :])
                finally:
                    probe.close()
            except (ConnectionError, EOFError):
                # a connection queued at the killed worker's socket is reset with it
                assert time.monotonic() < deadline
                continue
            if seen["node"].endswith("-w1") and seen["unowned"] == 0 and len(seen["members"]) == 2:
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
    finally:
        assert broker.stop() == 0, "".join(broker.log)
