"""Replies in command order on a cluster node whose core holds ``PUBLISHED`` until the log is confirmed
(``--fsync always``; ``--replicas`` runs the core so too): a reply the router makes itself, or relays
from another node, after a local ``PUBLISH`` must not overtake that ``PUBLISHED``, and need not wait
for another connection's (real etcd, real nodes)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from pigeon.cluster.etcd import EtcdProcess
from tests.cluster_kit import connected, start_node, topic_owned_by, wait_balanced
from tests.test_cluster_replicas import NAMES, _cluster, _stop, _successor

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


def test_a_command_the_node_answers_waits_for_its_own_connections_held_published_only(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    """While a PUBLISHED waits for a successor (stopped), a command the node's router answers itself
    (``CLUSTER STATUS``) on another connection is answered at once: it used to wait for every record
    appended before it, whoever published it. On the publisher's own connection it comes after that
    PUBLISHED, as replies come in command order."""
    # a lease that outlasts the stop: the stopped successor stays a member, PUBLISHED keeps waiting
    nodes = _cluster(etcd, tmp_path, "--cluster-ttl", "10")
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "held")
        successor = nodes[_successor(topic, "n0", list(NAMES))]
        held = connected(nodes["n0"])
        held.publish(topic, "first")  # the link to the successor is up
        successor.proc.send_signal(signal.SIGSTOP)
        try:
            held.send(f"PUBLISH {held.client_id} {topic} second\nCLUSTER STATUS\n")
            other = connected(nodes["n0"], timeout=5)
            started = time.monotonic()
            assert other.ask("CLUSTER STATUS").startswith(b"CLUSTER {")
            print(f"CLUSTER STATUS beside a held PUBLISHED: {time.monotonic() - started:.4f} s")
            other.close()
            assert held.quiet(1.0)  # neither the PUBLISHED nor the status after it
        finally:
            successor.proc.send_signal(signal.SIGCONT)
        assert held.line() == f"PUBLISHED {topic}".encode()
        assert held.line().startswith(b"CLUSTER {")
        held.close()
    finally:
        _stop(nodes)
