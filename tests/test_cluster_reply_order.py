"""Replies in command order on a cluster node whose core holds ``PUBLISHED`` until the log is synced
(``--fsync always``; ``--replicas`` runs the core so too): a reply the router makes itself, or relays
from another node, after a local ``PUBLISH`` must not overtake that ``PUBLISHED`` (real etcd, real
nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pigeon.cluster.etcd import EtcdProcess
from tests.cluster_kit import connected, start_node, topic_owned_by, wait_balanced

ROUNDS = 50


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_a_reply_of_the_router_comes_after_a_published_that_waits_for_the_log(
    etcd: EtcdProcess, tmp_path: Path, fsync: str
) -> None:
    node = start_node(etcd.endpoint, "solo", "--data-dir", str(tmp_path / "solo"), "--fsync", fsync)
    try:
        wait_balanced([node])
        client = connected(node)
        for i in range(ROUNDS):
            client.send(f"PUBLISH {client.client_id} t{i} m\nCLUSTER STATUS\n")
            first, second = client.line(), client.line()
            assert (first.split()[0], second.split()[0]) == (b"PUBLISHED", b"CLUSTER"), (i, first[:40])
    finally:
        assert node.stop() == 0, "".join(node.log)


def test_a_forwarded_reply_comes_after_a_local_published_that_waits_for_the_log(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    nodes = [
        start_node(etcd.endpoint, f"n{i}", "--data-dir", str(tmp_path / f"n{i}"), "--fsync", "always")
        for i in range(2)
    ]
    try:
        owned = wait_balanced(nodes)
        local, remote = topic_owned_by(owned, "n0", "here"), topic_owned_by(owned, "n1", "there")
        client = connected(nodes[0])
        for _ in range(ROUNDS):
            client.send(f"PUBLISH {client.client_id} {local} m\nPUBLISH {client.client_id} {remote} m\n")
            assert client.lines(2) == [f"PUBLISHED {local}".encode(), f"PUBLISHED {remote}".encode()]
    finally:
        for node in nodes:
            assert node.stop() == 0, "".join(node.log)
