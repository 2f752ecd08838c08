"""The limits of one server on a cluster node, for what its router holds of a client's input before
routing it (real etcd, real nodes): ``--max-memory`` counts it, as the core counts its own, and an
idle client costs a node little more than it costs one server."""

from __future__ import annotations

import contextlib

import pytest

from pigeon.cluster.etcd import EtcdProcess
from tests import attack_kit as kit
from tests.cluster_kit import connected, start_node, topic_owned_by, wait_balanced

pytestmark = pytest.mark.slow

MAX_MEMORY = 64 << 20


def test_unfinished_frames_a_node_holds_count_against_max_memory(etcd: EtcdProcess) -> None:
    """Twelve clients of n0 each send a PUB frame of 8 MiB to a topic of n1's and 6 MiB of it: n0's
    router would hold 72 MiB while they arrive, past --max-memory 64 MiB, so some are refused
    (MEMORY_FULL) and closed, as one server refuses them, and n0 goes on serving. Before, n0 held all
    of them, past its limit."""
    flags = ("--max-memory", str(MAX_MEMORY))
    nodes = {name: start_node(etcd.endpoint, name, *flags) for name in ("n0", "n1")}
    try:
        topic = topic_owned_by(wait_balanced(list(nodes.values())), "n1", "big")
        size = 8 << 20
        clients = [connected(nodes["n0"]) for _ in range(12)]
        for client in clients:
            client.send(f"PUB {client.client_id} {topic} {size}\n".encode())
            with contextlib.suppress(OSError):  # a refused one is closed
                client.sock.sendall(b"x" * (6 << 20))
        refused = []
        for client in clients:
            client.sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                refused.append(client.line())
        assert refused and all(
            line.startswith(b"ERROR MEMORY_FULL memory limit reached: cannot hold ") for line in refused
        ), refused
        held = kit.stats(nodes["n0"])["memory_bytes"]
        assert held <= MAX_MEMORY, held
        for client in clients:
            client.close()
        again = connected(nodes["n0"])
        again.publish(topic, "served")
    finally:
        for node in nodes.values():
            node.stop()


def test_an_idle_client_connection_costs_a_node_little_memory(etcd: EtcdProcess) -> None:
    """1,000 idle clients (connected, nothing more) raise a node's RSS by under 16 MiB. Before, each
    had a read buffer of its own in the router: 64 KiB each, 66 MiB for 1,000 (one server takes
    about 1.7 KiB per connection)."""
    count = 1000
    if not kit.room_for_sockets(count + 100):
        pytest.skip("the open-files hard limit is too low for 1,000 connections")
    nodes = {name: start_node(etcd.endpoint, name) for name in ("n0", "n1")}
    try:
        wait_balanced(list(nodes.values()))
        before = kit.memory_kib(nodes["n0"].proc.pid)[0]
        clients = [connected(nodes["n0"]) for _ in range(count)]
        grown = kit.memory_kib(nodes["n0"].proc.pid)[0] - before
        assert grown < 16 * 1024, f"{count} idle clients took {grown} KiB"
        for client in clients:
            client.close()
    finally:
        for node in nodes.values():
            node.stop()


def test_clients_that_send_junk_and_never_read_do_not_cost_a_node_its_lease(etcd: EtcdProcess) -> None:
    """The never-read attack of one server (tests/test_attacks_write_timeout.py) on a node: 30 clients
    send 4.5 MB of junk lines each (every one answered by an ERROR) and never read. The node keeps
    its lease, closes them all and serves newcomers. Before, its router parsed each line in Python:
    the node was too busy to renew its lease (TTL 5 s) and stopped serving every slot."""
    flags = ("--idle-timeout", "2", "--write-timeout", "2", "--max-connections", "40")
    node = kit.Server("--cluster", etcd.endpoint, "--node-name", "n0", "--cluster-ttl", "5", *flags)
    try:
        wait_balanced([node])
        result = kit.never_read(node, wait_closed=15.0)
        assert result.closed_after is not None, f"{result.connections_after} attackers never closed"
        assert result.new_clients_ok == 20, result.first_refusal
        assert "stopped serving" not in node.text(), node.text()
        client = connected(node)
        assert client.ask("PING") == b"PONG"
    finally:
        assert node.stop() == 0, node.text()
