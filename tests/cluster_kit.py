"""Clusters for tests: real ``pigeon --cluster`` processes coordinated by a real etcd."""

from __future__ import annotations

import json
import time
from typing import Any

from pigeon.cluster.slots import SLOTS, slot_of
from pigeon.testing import LineClient, ServerProcess

# a short lease, so that failover tests wait seconds, not minutes
TTL = 2.0


def start_node(endpoint: str, name: str, *args: str) -> ServerProcess:
    """A node named ``name`` of the cluster at ``endpoint``, on a free port."""
    return ServerProcess("--cluster", endpoint, "--node-name", name, "--cluster-ttl", str(TTL), *args)


def status(node: ServerProcess) -> dict[str, Any]:
    """``CLUSTER STATUS`` of one node, as a dict."""
    client = node.client(timeout=5)
    try:
        reply = client.ask("CLUSTER STATUS")
    finally:
        client.close()
    assert reply.startswith(b"CLUSTER "), reply
    return dict(json.loads(reply[len(b"CLUSTER ") :]))


def owned_by_each(nodes: list[ServerProcess]) -> dict[str, set[int]]:
    """The slots each node says it serves right now."""
    return {(doc := status(node))["node"]: set(doc["owned"]) for node in nodes}


def assert_no_slot_served_twice(owned: dict[str, set[int]]) -> None:
    """No slot is in two nodes' own views at once."""
    seen: dict[int, str] = {}
    for node, slots in owned.items():
        for slot in slots:
            assert slot not in seen, f"slot {slot} served by both {seen[slot]} and {node}"
            seen[slot] = node


def wait_balanced(nodes: list[ServerProcess], timeout: float = 30.0) -> dict[str, set[int]]:
    """Wait until every slot is served by exactly one of ``nodes`` and each serves some; returns who
    serves what. Checks on every look that no slot is served twice."""
    deadline = time.monotonic() + timeout
    while True:
        owned = owned_by_each(nodes)
        assert_no_slot_served_twice(owned)
        served = set().union(*owned.values())
        if len(served) == SLOTS and all(owned.values()):
            return owned
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not balanced after {timeout} s: { ({n: len(s) for n, s in owned.items()}) }"
            )
        time.sleep(0.1)


def connected(node: ServerProcess) -> LineClient:
    """A client of ``node`` that has sent CONNECT."""
    client = node.client()
    client.connect()
    return client


def topic_owned_by(owned: dict[str, set[int]], node: str, stem: str) -> str:
    """A topic name starting with ``stem`` whose slot ``node`` serves."""
    for n in range(10_000):
        topic = f"{stem}{n}"
        if slot_of(topic.encode()) in owned[node]:
            return topic
    raise AssertionError(f"no topic of {node}")
