"""One broker's semantics across a 3-node cluster: clients spread over the nodes, commands for topics
another node owns forwarded to it (real processes, a real etcd)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pigeon.cluster.etcd import EtcdProcess
from pigeon.cluster.router import REMOTE_TAG_BASE
from pigeon.cluster.slots import slot_of
from pigeon.testing import ServerProcess
from tests.cluster_kit import connected, start_node, status, topic_owned_by, wait_balanced

Cluster = tuple[dict[str, ServerProcess], dict[str, set[int]]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three nodes n0, n1, n2 and who serves which slots, shared by this module's tests."""
    from pigeon.cluster.etcd import etcd_binary

    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    pytest.importorskip("aetcd", reason="the cluster extra is not installed")
    with EtcdProcess() as etcd:
        nodes = {f"n{i}": start_node(etcd.endpoint, f"n{i}") for i in range(3)}
        try:
            yield nodes, wait_balanced(list(nodes.values()))
        finally:
            for node in nodes.values():
                assert node.stop() == 0, "".join(node.log)


def test_round_robin_across_subscribers_on_every_node(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "rr")
    subscribers = [connected(nodes[name]) for name in ("n1", "n0", "n2")]
    for sub in subscribers:
        sub.subscribe(topic)
    publisher = connected(nodes["n1"])
    for i in range(6):
        publisher.publish(topic, f"m{i}")
    assert [sub.lines(2) for sub in subscribers] == [
        [f"MESSAGE {topic} m{i}".encode(), f"MESSAGE {topic} m{i + 3}".encode()] for i in range(3)
    ]
    assert all(sub.quiet() for sub in subscribers)


def test_a_backlog_on_the_owner_goes_to_a_subscriber_on_another_node(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "backlog")
    publisher = connected(nodes["n1"])
    for i in range(5):
        publisher.publish(topic, f"m{i}")
    subscriber = connected(nodes["n0"])
    subscriber.subscribe(topic)
    assert subscriber.lines(5) == [f"MESSAGE {topic} m{i}".encode() for i in range(5)]


def test_unacknowledged_messages_of_a_remote_subscriber_are_redelivered_when_it_leaves(
    cluster: Cluster,
) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "acks")
    remote = connected(nodes["n1"])
    assert (
        remote.ask(f"SUBSCRIBE {remote.client_id} {topic} ACK PREFETCH 2") == f"SUBSCRIBED {topic}".encode()
    )
    publisher = connected(nodes["n0"])
    for i in range(3):
        publisher.publish(topic, f"m{i}")
    first, second = remote.lines(2)
    tags = [int(line.split()[2]) for line in (first, second)]
    assert first.endswith(b" 1 m0") and second.endswith(b" 1 m1")
    assert all(tag >= REMOTE_TAG_BASE for tag in tags)
    # acking the first opens the window: the third comes; the second stays unacknowledged
    remote.send(f"ACK {remote.client_id} {tags[0]}")
    third = remote.line()
    assert third.endswith(b" 1 m2")
    remote.close()
    local = connected(nodes["n2"])
    local.send(f"SUBSCRIBE {local.client_id} {topic} ACK")
    replies = local.lines(3)
    assert replies[0] == f"SUBSCRIBED {topic}".encode()
    assert sorted(line.split(b" ", 3)[3] for line in replies[1:]) == [b"2 m1", b"2 m2"]


def test_acks_and_nacks_of_relayed_tags_reach_the_owner(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n1", "settle")
    sub = connected(nodes["n0"])
    assert sub.ask(f"SUBSCRIBE {sub.client_id} {topic} ACK PREFETCH 10") == f"SUBSCRIBED {topic}".encode()
    publisher = connected(nodes["n2"])
    for i in range(4):
        publisher.publish(topic, f"m{i}")
    tags = [int(line.split()[2]) for line in sub.lines(4)]
    sub.send(f"ACK {sub.client_id} {tags[0]}-{tags[2]}")
    sub.send(f"NACK {sub.client_id} {tags[3]}")
    again = sub.line().split()
    assert again[3:] == [b"2", b"m3"]
    sub.send(f"ACK {sub.client_id} {int(again[2])}")
    assert (
        sub.ask(f"ACK {sub.client_id} {tags[0]}")
        == f"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag {tags[0]}".encode()
    )
    assert sub.ask("PING") == b"PONG"
    owner = connected(nodes["n1"])
    reply = owner.ask("STATS TOPICS 0 1000")
    (entry,) = [t for t in json.loads(reply[len(b"STATS ") :])["topics"] if t["name"] == topic]
    assert (entry["unacked"], entry["acked"], entry["nacked"]) == (0, 4, 1)


def test_pipelined_commands_for_different_owners_are_answered_in_order(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = [topic_owned_by(owned, name, f"order{name}") for name in ("n0", "n1", "n2", "n1", "n0")]
    client = connected(nodes["n0"])
    client.send(b"".join(f"PUBLISH {client.client_id} {topic} x\nPING\n".encode() for topic in topics))
    expected: list[bytes] = []
    for topic in topics:
        expected += [f"PUBLISHED {topic}".encode(), b"PONG"]
    assert client.lines(len(expected)) == expected


def test_a_client_that_asks_for_redirects_is_told_the_owner(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "moved")
    client = connected(nodes["n0"])
    assert client.ask("CLUSTER REDIRECT") == b"CLUSTER REDIRECT"
    owner = status(nodes["n2"])["members"]["n2"]["address"]
    moved = f"ERROR MOVED {slot_of(topic.encode())} {owner}".encode()
    assert client.ask(f"PUBLISH {client.client_id} {topic} x") == moved
    assert client.ask(f"SUBSCRIBE {client.client_id} {topic}") == moved
    mine = topic_owned_by(owned, "n0", "mine")
    client.publish(mine, "here")
    assert client.ask("CLUSTER NONSENSE").startswith(b"ERROR USAGE")


def test_cli_cluster_lists_the_nodes_their_slots_and_health(cluster: Cluster) -> None:
    nodes, owned = cluster
    node = nodes["n1"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pigeon.cli.client",
            "cluster",
            "--host",
            node.host,
            "--port",
            str(node.port),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(run.stdout)
    assert report["seen_by"] == "n1" and report["unowned"] == 0
    assert {(r["node"], r["slots"], r["health"]) for r in report["nodes"]} == {
        (name, len(slots), "ok") for name, slots in owned.items()
    }
    table = subprocess.run(
        [sys.executable, "-m", "pigeon.cli.client", "cluster", "--host", node.host, "--port", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert table.splitlines()[0].split() == ["NODE", "ADDRESS", "SLOTS", "TOPICS", "HEALTH"]
    assert "256 of 256 slots owned (as n1 sees it)" in table
    topic = topic_owned_by(owned, "n2", "where")
    where = subprocess.run(
        [sys.executable, "-m", "pigeon.cli.client", "cluster", "--port", str(node.port), "--topic", topic],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert where == f"topic {topic}: slot {slot_of(topic.encode())}, owned by n2\n"


def test_a_client_that_half_closes_gets_every_forwarded_reply_then_the_end(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "halfclose")
    client = connected(nodes["n0"])
    client.send(b"".join(f"PUBLISH {client.client_id} {topic} m{i}\n".encode() for i in range(50)))
    client.sock.shutdown(socket.SHUT_WR)
    assert client.lines(50) == [f"PUBLISHED {topic}".encode()] * 50
    assert client.at_eof()
    backlog = connected(nodes["n1"])
    backlog.subscribe(topic)
    assert backlog.lines(50) == [f"MESSAGE {topic} m{i}".encode() for i in range(50)]
