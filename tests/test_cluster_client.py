"""Cluster-aware clients over a real 3-node cluster (real etcd, real nodes): the cluster's error codes
as exception classes, and ``ClusterClient``/``AsyncClusterClient`` sending each topic's commands to
its owner, following MOVED, and carrying on when an owner is killed."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator

import pytest

from pigeon import (
    AsyncClusterClient,
    Client,
    ClusterClient,
    MovedError,
    StaleDeliveryError,
    TryAgainError,
)
from pigeon.cluster.etcd import EtcdProcess
from pigeon.cluster.slots import slot_of
from pigeon.testing import ServerProcess
from tests.cluster_kit import (
    TTL,
    Cluster,
    connected,
    running_cluster,
    start_node,
    status,
    topic_owned_by,
    wait_balanced,
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three nodes n0, n1, n2 and who serves which slots, shared by this module's tests."""
    with running_cluster() as started:
        yield started


def _address(node: ServerProcess) -> tuple[str, int]:
    return node.host, node.port


def _upstreams(nodes: dict[str, ServerProcess]) -> dict[str, int]:
    """How many connections each node has opened to owners to forward its clients' commands."""
    return {name: status(node)["upstreams_opened"] for name, node in nodes.items()}


def _published(node: ServerProcess) -> int:
    reply = connected(node).ask("STATS")
    return int(json.loads(reply[len(b"STATS ") :])["published"])


def _topic_counts(owner: ServerProcess, topic: str) -> tuple[int, int, int]:
    """(unacked, acked, nacked) of ``topic`` as its owner counts them."""
    reply = connected(owner).ask("STATS TOPICS 0 1000")
    (entry,) = [t for t in json.loads(reply[len(b"STATS ") :])["topics"] if t["name"] == topic]
    return entry["unacked"], entry["acked"], entry["nacked"]


# ------------------------------------------------------------ the error classes


def test_a_client_asking_for_redirects_gets_moved_error_naming_the_slot_and_owner(cluster: Cluster) -> None:
    nodes, owned = cluster
    theirs = topic_owned_by(owned, "n0", "moved")
    ours = topic_owned_by(owned, "n1", "moved")
    with Client(*_address(nodes["n1"]), redirects=True) as client:
        client.publish(ours, "here")
        with pytest.raises(MovedError) as caught:
            client.publish(theirs, "there")
        assert caught.value.code == "MOVED"
        assert caught.value.slot == slot_of(theirs.encode())
        assert caught.value.address == _address(nodes["n0"])
        with pytest.raises(MovedError):
            client.subscribe(theirs)
        assert client.subscriptions == ()
    before = status(nodes["n1"])["upstreams_opened"]
    with Client(*_address(nodes["n1"])) as forwarded:  # without redirects a node forwards
        forwarded.publish(theirs, "there")
    assert status(nodes["n1"])["upstreams_opened"] == before + 1


@pytest.mark.slow
def test_a_slot_without_owner_raises_try_again_error(etcd: EtcdProcess) -> None:
    node = start_node(etcd.endpoint, "alone")
    try:
        wait_balanced([node])
        etcd.stop()  # the node cannot renew its lease: it stops serving every slot after TTL
        deadline = time.monotonic() + TTL + 20
        while status(node)["owned"]:
            assert time.monotonic() < deadline, "the node kept serving without etcd"
            time.sleep(0.1)
        client = Client(node.host, node.port, redirects=True, timeout=TTL + 20)
        with client, pytest.raises(TryAgainError) as caught:
            client.publish("orphan", "x")  # waits TTL + 2 s for an owner, then TRYAGAIN
        assert caught.value.slot == slot_of(b"orphan")
        assert caught.value.code == "TRYAGAIN"
        etcd.start()
    finally:
        node.stop()


# ------------------------------------------------------------ routing


def test_the_cluster_client_talks_to_each_topics_owner_and_nothing_is_forwarded(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = {name: topic_owned_by(owned, name, f"direct-{name}-") for name in nodes}
    before = _upstreams(nodes)
    published = {name: _published(node) for name, node in nodes.items()}
    with (
        ClusterClient(*_address(nodes["n0"])) as subscriber,
        ClusterClient(*_address(nodes["n1"]), seeds=[_address(nodes["n2"])]) as publisher,
    ):
        for topic in topics.values():
            subscriber.subscribe(topic)
        for name, topic in topics.items():
            assert publisher.owner_of(topic) == _address(nodes[name])
            for i in range(3):
                publisher.publish(topic, f"{name}-{i}")
        got = sorted(subscriber.next_message(timeout=10).data.decode() for _ in range(9))
        assert got == sorted(f"{name}-{i}" for name in nodes for i in range(3))
        assert set(subscriber.nodes) == set(publisher.nodes) == {_address(n) for n in nodes.values()}
        assert publisher.redirects_followed == subscriber.redirects_followed == 0
    assert _upstreams(nodes) == before, "a node forwarded a command of a cluster-aware client"
    assert {name: _published(node) - published[name] for name, node in nodes.items()} == dict.fromkeys(
        nodes, 3
    )


def test_a_stale_map_is_corrected_by_moved(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "stale")
    before = _upstreams(nodes)
    with ClusterClient(*_address(nodes["n0"])) as client:
        client._owners[slot_of(topic.encode())] = _address(nodes["n1"])  # as if the slot had moved
        client.subscribe(topic)
        assert client.redirects_followed == 1
        assert client.owner_of(topic) == _address(nodes["n2"])
        client.publish(topic, "found")
        assert client.next_message(timeout=10).data == b"found"
    assert _upstreams(nodes) == before


def test_pipelined_publishes_over_several_owners_keep_their_order_and_indexes(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = [topic_owned_by(owned, name, f"pipe-{name}-") for name in nodes]
    with ClusterClient(*_address(nodes["n1"])) as client:
        for topic in topics:
            client.subscribe(topic)
        for i in range(30):
            client.publish(topics[i % 3], f"w{i}", wait=False)
        assert client.flush() == []
        assert client.publish_many(topics[0], [f"b{i}" for i in range(100)]) == []
        client._owners[slot_of(topics[1].encode())] = _address(nodes["n0"])  # a stale map again
        assert client.publish_many(topics[1], [f"c{i}" for i in range(100)]) == []
        got: dict[str, list[str]] = {topic: [] for topic in topics}
        for _ in range(230):
            message = client.next_message(timeout=10)
            got[message.topic].append(message.text)
    assert got[topics[0]] == [f"w{i}" for i in range(0, 30, 3)] + [f"b{i}" for i in range(100)]
    assert got[topics[1]] == [f"w{i}" for i in range(1, 30, 3)] + [f"c{i}" for i in range(100)]
    assert got[topics[2]] == [f"w{i}" for i in range(2, 30, 3)]


def test_acks_and_nacks_go_to_the_node_that_delivered(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = {name: topic_owned_by(owned, name, f"acks-{name}-") for name in ("n0", "n2")}
    with ClusterClient(*_address(nodes["n1"])) as client:
        for topic in topics.values():
            client.subscribe(topic, ack=True, prefetch=10)
            client.publish_many(topic, ["a", "b"])
        first = [client.next_message(timeout=10) for _ in range(4)]
        assert {m.attempt for m in first} == {1}
        nacked = [m for m in first if m.data == b"b"]
        client.nack(nacked)
        again = [client.next_message(timeout=10) for _ in range(2)]
        assert sorted((m.topic, m.data, m.attempt) for m in again) == sorted(
            (m.topic, b"b", 2) for m in nacked
        )
        client.ack([m for m in first if m.data == b"a"])
        again[0].ack()  # through the message: its node's client
        client.ack(again[1:])
        assert client.check_acks() == []
        for name, topic in topics.items():
            assert _topic_counts(nodes[name], topic) == (0, 2, 1)


def test_a_plain_server_is_a_cluster_of_one() -> None:
    server = ServerProcess()
    try:
        with ClusterClient(server.host, server.port) as client:
            client.subscribe("solo")
            client.publish("solo", "one")
            assert client.next_message(timeout=10).data == b"one"
            assert client.nodes == ((server.host, server.port),)
    finally:
        server.stop()


def test_the_async_cluster_client_routes_and_receives_from_every_node(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = [topic_owned_by(owned, name, f"async-{name}-") for name in nodes]
    before = _upstreams(nodes)

    async def run() -> list[tuple[str, bytes, int | None]]:
        async with AsyncClusterClient(*_address(nodes["n2"])) as client:
            for topic in topics:
                await client.subscribe(topic, ack=True)
            for topic in topics:
                await client.publish(topic, "x")
                await client.publish(topic, "y", wait=False)
            assert await client.flush() == []
            got = [await client.next_message(timeout=10) for _ in range(6)]
            client.ack(got)
            assert await client.check_acks() == []
            assert len(client.nodes) == 3
            return sorted((m.topic, m.data, m.attempt) for m in got)

    assert asyncio.run(run()) == sorted((t, d, 1) for t in topics for d in (b"x", b"y"))
    assert _upstreams(nodes) == before


# ------------------------------------------------------------ failover


@pytest.mark.slow
def test_an_owner_killed_the_cluster_client_carries_on_with_its_new_owner() -> None:
    with running_cluster() as (nodes, owned):
        doomed = topic_owned_by(owned, "n2", "doomed")
        safe = topic_owned_by(owned, "n0", "safe")
        seeds = [_address(node) for node in nodes.values()]
        with (
            ClusterClient(*seeds[0], seeds=seeds, reconnect_timeout=TTL + 30) as consumer,
            ClusterClient(*seeds[1], seeds=seeds, reconnect_timeout=TTL + 30) as publisher,
        ):
            consumer.subscribe(doomed)
            consumer.subscribe(safe, ack=True)
            publisher.publish(doomed, "before")
            assert consumer.next_message(timeout=10).data == b"before"
            nodes["n2"].proc.send_signal(signal.SIGKILL)
            nodes["n2"].proc.wait(10)
            killed = time.monotonic()
            publisher.publish(safe, "unaffected")
            message = consumer.next_message(timeout=10)
            assert (message.topic, message.data) == (safe, b"unaffected")
            message.ack()
            publisher.publish(doomed, "after")  # waits until the slot has a new owner
            recovered = time.monotonic() - killed
            # the consumer notices its node is gone and subscribes on the new owner; "after" waits there
            message = consumer.next_message(timeout=TTL + 30)
            assert (message.topic, message.data) == (doomed, b"after")
            new_owner = consumer.owner_of(doomed)
            assert new_owner != _address(nodes["n2"]) and new_owner == publisher.owner_of(doomed)
            assert _address(nodes["n2"]) not in consumer.nodes
            print(f"the killed owner's topic was served again {recovered:.2f} s after the kill (TTL {TTL} s)")


@pytest.mark.slow
def test_an_owner_killed_the_async_cluster_client_carries_on_too() -> None:
    with running_cluster() as (nodes, owned):
        doomed = topic_owned_by(owned, "n1", "adoomed")
        seeds = [_address(node) for node in nodes.values()]

        async def run() -> None:
            consumer = await AsyncClusterClient(*seeds[0], seeds=seeds, reconnect_timeout=TTL + 30).connect()
            publisher = await AsyncClusterClient(*seeds[2], seeds=seeds, reconnect_timeout=TTL + 30).connect()
            async with consumer, publisher:
                await consumer.subscribe(doomed, ack=True)
                await publisher.publish(doomed, "before")
                before = await consumer.next_message(timeout=10)
                nodes["n1"].proc.send_signal(signal.SIGKILL)
                nodes["n1"].proc.wait(10)
                await asyncio.sleep(0.5)  # the event loop sees the connection end
                with pytest.raises(StaleDeliveryError):
                    before.ack()  # its node is gone, and its tag with it
                await publisher.publish(doomed, "after")  # waits until the slot has a new owner
                message = await consumer.next_message(timeout=TTL + 30)
                assert (message.topic, message.data, message.attempt) == (doomed, b"after", 1)
                message.ack()
                assert await consumer.check_acks() == []
                assert consumer.owner_of(doomed) != _address(nodes["n1"])

        asyncio.run(run())
