"""Replication (``--replicas 1``): a durable topic's messages are at its slot's successor before
``PUBLISHED``, so ``kill -9`` of the owner loses none of them; a node that comes back catches up.
Real etcd, real node processes, real kill -9 (docs/cluster.md, "Replication")."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from pigeon import Client
from pigeon.cluster.etcd import EtcdProcess
from pigeon.cluster.slots import owner_order, slot_of
from pigeon.testing import ServerProcess
from tests.cluster_kit import TTL, connected, start_node, topic_owned_by, wait_balanced

pytestmark = pytest.mark.slow

NAMES = ("n0", "n1", "n2")


def _node(etcd: EtcdProcess, name: str, data: Path, *extra: str) -> ServerProcess:
    return start_node(etcd.endpoint, name, "--data-dir", str(data / name), "--replicas", "1", *extra)


def _cluster(etcd: EtcdProcess, data: Path, *extra: str) -> dict[str, ServerProcess]:
    return {name: _node(etcd, name, data, *extra) for name in NAMES}


def _client(nodes: dict[str, ServerProcess], first: str) -> Client:
    seeds = [(node.host, node.port) for node in nodes.values()]
    node = nodes[first]
    return Client(node.host, node.port, reconnect=True, reconnect_timeout=60, timeout=30, seeds=seeds)


def _successor(topic: str, owner: str, names: list[str]) -> str:
    return next(node for node in owner_order(slot_of(topic.encode()), names) if node != owner)


def _stop(nodes: dict[str, ServerProcess]) -> None:
    for node in nodes.values():
        node.stop()


@pytest.mark.parametrize("fsync", ["everysec", "always"])
def test_a_killed_owners_backlog_is_served_by_its_successor(
    etcd: EtcdProcess, tmp_path: Path, fsync: str
) -> None:
    nodes = _cluster(etcd, tmp_path, "--fsync", fsync)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "jobs")
        publisher = connected(nodes["n1"])
        publisher.send("".join(f"PUBLISH {publisher.client_id} {topic} m{i}\n" for i in range(500)))
        assert publisher.lines(500) == [f"PUBLISHED {topic}".encode()] * 500
        publisher.close()
        nodes["n0"].proc.send_signal(signal.SIGKILL)
        nodes["n0"].proc.wait()
        live = {name: node for name, node in nodes.items() if name != "n0"}
        wait_balanced(list(live.values()), timeout=TTL + 30)
        consumer = _client(live, "n1")
        consumer.subscribe(topic)
        got = [consumer.next_message(timeout=TTL + 30).data for _ in range(500)]
        assert got == [f"m{i}".encode() for i in range(500)]
        consumer.close()
        successor = _successor(topic, "n0", list(NAMES))
        assert nodes[successor].wait_for_log("took over 500 replicated messages")
    finally:
        _stop(nodes)
