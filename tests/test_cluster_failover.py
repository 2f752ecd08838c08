"""Failover: kill -9 of a node; its clients reconnect to other nodes by themselves, what they had not
acknowledged is delivered again, and its topics are served by another node after its lease."""

from __future__ import annotations

import signal
import time

import pytest

from pigeon import Client
from pigeon.cluster.etcd import EtcdProcess
from pigeon.testing import ServerProcess
from tests.cluster_kit import TTL, connected, start_node, topic_owned_by, wait_balanced

pytestmark = pytest.mark.slow


def _client(nodes: dict[str, ServerProcess], first: str) -> Client:
    """A reconnecting client of node ``first`` that knows every node as a seed."""
    seeds = [(node.host, node.port) for node in nodes.values()]
    node = nodes[first]
    return Client(node.host, node.port, reconnect=True, reconnect_timeout=30, timeout=10, seeds=seeds)


def _subscribed_through_others(nodes: dict[str, ServerProcess], stem: str) -> tuple[str, Client, Client]:
    """A topic of n2's, a reconnecting subscriber of it on n0 and a reconnecting publisher on n1, once
    a first message ("before") has gone from one to the other."""
    owned = wait_balanced(list(nodes.values()))
    topic = topic_owned_by(owned, "n2", stem)
    consumer = _client(nodes, "n0")
    consumer.subscribe(topic)
    publisher = _client(nodes, "n1")
    publisher.publish(topic, "before")
    assert consumer.next_message(timeout=10).data == b"before"
    return topic, consumer, publisher


def _publish_until_served(publisher: Client, topic: str, deadline: float) -> None:
    """Publish "after" until it works: while n2's slots move, the publisher's commands fail or wait
    and it reconnects."""
    while True:
        try:
            publisher.publish(topic, "after")
            return
        except Exception:
            assert time.monotonic() < deadline, "the topic was not served again"
            time.sleep(0.2)


def test_clients_of_a_killed_node_reconnect_elsewhere_and_get_their_unacked_messages(
    etcd: EtcdProcess,
) -> None:
    nodes = {f"n{i}": start_node(etcd.endpoint, f"n{i}") for i in range(3)}
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "work")
        consumer = _client(nodes, "n1")
        consumer.subscribe(topic, ack=True, prefetch=5)
        publisher = connected(nodes["n2"])
        for i in range(5):
            publisher.publish(topic, f"m{i}")
        got = [consumer.next_message(timeout=10) for _ in range(5)]
        assert [m.data for m in got] == [f"m{i}".encode() for i in range(5)]
        consumer.ack(got[:2])
        consumer.ping()
        nodes.pop("n1").proc.send_signal(signal.SIGKILL)
        # the owner n0 gives the three unacknowledged messages back; the client finds another node
        again = sorted(consumer.next_message(timeout=30).data for _ in range(3))
        assert again == [b"m2", b"m3", b"m4"]
        assert consumer.reconnects >= 1
        consumer.close()
    finally:
        for node in nodes.values():
            node.stop()


def test_the_topics_of_a_killed_owner_are_served_again_within_the_lease(etcd: EtcdProcess) -> None:
    nodes = {f"n{i}": start_node(etcd.endpoint, f"n{i}") for i in range(3)}
    try:
        topic, consumer, publisher = _subscribed_through_others(nodes, "moving")
        nodes.pop("n2").proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # every node forwards to the dead owner until its lease expires: clients reconnect meanwhile
        _publish_until_served(publisher, topic, killed + TTL + 20)
        recovered = time.monotonic() - killed
        assert consumer.next_message(timeout=30).data == b"after"
        print(f"publishing to a killed owner's topic worked again after {recovered:.2f} s (TTL {TTL} s)")
        owned = wait_balanced(list(nodes.values()), timeout=TTL + 20)
        assert set(owned) == {"n0", "n1"}
        publisher.close()
        consumer.close()
    finally:
        for node in nodes.values():
            node.stop()


def test_the_clients_of_a_frozen_owner_are_served_again_by_the_node_that_takes_its_topics(
    etcd: EtcdProcess,
) -> None:
    """An owner that stops answering without closing its connections (SIGSTOP: as a frozen machine
    or a partition) leaves the member set when its lease runs out; then the nodes give up their
    connections to it, so their clients reconnect and subscribe again at the new owner (before, a
    subscriber through another node kept its connection and got nothing more)."""
    nodes = {f"n{i}": start_node(etcd.endpoint, f"n{i}") for i in range(3)}
    try:
        topic, consumer, publisher = _subscribed_through_others(nodes, "frozen")
        nodes["n2"].proc.send_signal(signal.SIGSTOP)
        try:
            _publish_until_served(publisher, topic, time.monotonic() + TTL + 30)
            assert consumer.next_message(timeout=TTL + 20).data == b"after"
            assert consumer.reconnects >= 1
        finally:
            nodes["n2"].proc.send_signal(signal.SIGCONT)
        publisher.close()
        consumer.close()
    finally:
        for node in nodes.values():
            node.stop()
