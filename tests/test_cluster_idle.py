"""``--idle-timeout`` on a cluster (real etcd, real nodes): a client's idleness is judged on the node
it is connected to, by all it sends there, as on one server; the connections nodes open to each other
on behalf of their clients, and their replication streams, are never closed as idle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pigeon.cluster.etcd import EtcdProcess
from pigeon.testing import LineClient, ServerProcess
from tests import attack_kit as kit
from tests.cluster_kit import connected, start_node, topic_owned_by, wait_balanced

pytestmark = pytest.mark.slow

IDLE = 1.0  # --idle-timeout, seconds
Nodes = dict[str, ServerProcess]


def _subscribed_at(node: ServerProcess) -> list[str]:
    """The topics with subscribers on ``node``."""
    client = connected(node, timeout=5)
    try:
        topics, _ = kit.page_through(client, "TOPICS")
    finally:
        client.close()
    return [entry["name"] for entry in topics if entry["subscribers"]]


def _asked_for_a_while(client: LineClient, command: str) -> list[bytes]:
    """The replies to ``command`` sent every third of the idle timeout for four idle timeouts."""
    replies = []
    for _ in range(12):
        time.sleep(IDLE / 3)
        replies.append(client.ask(command))
    return replies


@pytest.fixture
def idle_nodes(etcd: EtcdProcess) -> Iterator[tuple[Nodes, str]]:
    """n0 and n1 with ``--idle-timeout IDLE``, and a topic of n1's."""
    nodes = {name: start_node(etcd.endpoint, name, "--idle-timeout", str(IDLE)) for name in ("n0", "n1")}
    try:
        yield nodes, topic_owned_by(wait_balanced(list(nodes.values())), "n1", "quiet")
    finally:
        for node in nodes.values():
            node.stop()


def test_a_client_whose_commands_all_go_to_another_owner_is_not_idle(idle_nodes: tuple[Nodes, str]) -> None:
    """A publisher on n0 that publishes only to a topic of n1's (before, n0's core saw none of it and
    closed the publisher after the timeout: ERROR IDLE_TIMEOUT)."""
    nodes, topic = idle_nodes
    publisher = connected(nodes["n0"])
    assert set(_asked_for_a_while(publisher, f"PUBLISH {publisher.client_id} {topic} m")) == {
        f"PUBLISHED {topic}".encode()
    }
    assert kit.stats(nodes["n0"])["idle_closed"] == 0


def test_a_subscriber_through_another_node_that_pings_is_kept_and_served(
    idle_nodes: tuple[Nodes, str],
) -> None:
    """A subscriber on n0 to a topic of n1's that PINGs, as the docs ask of one that only receives:
    n1 does not close n0's connection on its behalf, which carries nothing from n0 (before, it did,
    and the subscriber got n1's ERROR IDLE_TIMEOUT in place of a PONG and was closed)."""
    nodes, topic = idle_nodes
    subscriber = connected(nodes["n0"])
    subscriber.subscribe(topic)
    assert set(_asked_for_a_while(subscriber, "PING")) == {b"PONG"}
    publisher = connected(nodes["n1"])
    publisher.publish(topic, "served")
    assert subscriber.line() == f"MESSAGE {topic} served".encode()
    assert kit.stats(nodes["n1"])["idle_closed"] == 0


def test_a_silent_subscriber_through_another_node_is_closed_by_its_node_and_leaves_the_owner(
    idle_nodes: tuple[Nodes, str],
) -> None:
    """One that sends nothing is closed by its own node, as on one server, and its subscription at the
    owner goes with it: n1's connection on its behalf is not kept open by the exemption."""
    nodes, topic = idle_nodes
    subscriber = connected(nodes["n0"])
    subscriber.subscribe(topic)
    assert topic in _subscribed_at(nodes["n1"])
    subscriber.sock.settimeout(IDLE + 2)
    assert subscriber.line() == b"ERROR IDLE_TIMEOUT idle timeout"
    assert subscriber.at_eof()
    deadline = time.monotonic() + 5
    while topic in (held := _subscribed_at(nodes["n1"])):
        assert time.monotonic() < deadline, f"n1 keeps a subscriber of {topic}: {held}"
        time.sleep(0.1)


def test_a_quiet_replication_stream_is_not_closed_as_idle(etcd: EtcdProcess, tmp_path: Path) -> None:
    """With --replicas 1 each node's successor holds a stream from it that carries nothing while no
    one publishes: neither closes it (before, each closed the other's after the timeout, and the
    owner connected again and sent a new snapshot)."""
    flags = ("--idle-timeout", str(IDLE), "--replicas", "1")
    nodes = {
        name: start_node(etcd.endpoint, name, "--data-dir", str(tmp_path / name), *flags)
        for name in ("n0", "n1")
    }
    try:
        wait_balanced(list(nodes.values()))
        for node in nodes.values():
            node.wait_for_log("read and sent a snapshot")
        time.sleep(4 * IDLE)
        assert [kit.stats(node)["idle_closed"] for node in nodes.values()] == [0, 0]
    finally:
        for node in nodes.values():
            node.stop()
