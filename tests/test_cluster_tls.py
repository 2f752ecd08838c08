"""TLS between cluster nodes: nodes that speak TLS on their port (``--tls-cert``) open their
forwarding and replication connections to each other over TLS too, checking each peer's certificate
against ``--node-tls-ca`` (else ``--tls-ca``) and presenting their own. Real etcd, real nodes, real
kill -9 (docs/cluster.md, "TLS between nodes"; docs/security.md)."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from pigeon.cluster.etcd import EtcdProcess, etcd_binary
from pigeon.testing import LineClient, ServerProcess, server_command
from tests.certs import Certs
from tests.cluster_kit import (
    TTL,
    client_of,
    connected,
    start_node,
    topic_owned_by,
    wait_balanced,
    wait_preferred,
)
from tests.test_cluster_replicas import _consume, _kill, _publish, _stop, _successor
from tests.test_cluster_workers import _node as node_of

pytestmark = pytest.mark.slow

NAMES = ("n0", "n1", "n2")


def _node(etcd: EtcdProcess, certs: Certs, name: str, *args: str) -> ServerProcess:
    """A node with mutual TLS on its port: clients and other nodes present certificates of the CA."""
    return start_node(etcd.endpoint, name, *certs.server_flags(mutual=True), *args)


def test_forwarding_and_replication_run_over_tls_and_a_killed_owner_loses_nothing(
    etcd: EtcdProcess, certs: Certs, tmp_path: Path
) -> None:
    tls = certs.client_context(certs.client)
    nodes = {
        name: _node(etcd, certs, name, "--data-dir", str(tmp_path / name), "--replicas", "1")
        for name in NAMES
    }
    try:
        owned = wait_preferred(list(nodes.values()), tls=tls)
        topic = topic_owned_by(owned, "n1", "secure")
        successor = _successor(topic, "n1", list(NAMES))
        third = next(name for name in NAMES if name not in ("n1", successor))
        # forwarded from the third node to the owner, copied to its successor: both links are TLS
        _publish(nodes[third], topic, [f"m{i}" for i in range(50)], tls=tls)
        _kill(nodes["n1"])
        live = [nodes[successor], nodes[third]]
        wait_balanced(live, timeout=TTL + 30, tls=tls)
        assert _consume(nodes[third], topic, 50, tls=tls) == [b"m%d" % i for i in range(50)]
        assert nodes[successor].wait_for_log("took over 50 replicated messages")
        # a client that ends its TLS session (close_notify) after a command its node forwards
        leaving = connected(nodes[third], tls=tls)
        assert leaving.ask(f"SUBSCRIBE {leaving.client_id} {topic}") == f"SUBSCRIBED {topic}".encode()
        assert isinstance(leaving.sock, ssl.SSLSocket)
        with contextlib.suppress(OSError):
            leaving.sock.unwrap()
        leaving.close()
        time.sleep(0.5)
        _stop(nodes)
        for node in live:
            # no failed handshake, no warning per TLS connection that ends
            assert not any("SSL" in line or "eof_received" in line for line in node.log), node.log
    finally:
        _stop(nodes)


def test_a_node_that_does_not_trust_the_others_certificates_reaches_none_of_them(
    etcd: EtcdProcess, certs: Certs
) -> None:
    tls = certs.client_context(certs.client)
    nodes = {"n0": _node(etcd, certs, "n0")}
    nodes["n1"] = _node(etcd, certs, "n1", "--node-tls-ca", str(certs.stranger_ca))
    try:
        owned = wait_preferred(list(nodes.values()), tls=tls)
        topic = topic_owned_by(owned, "n0", "elsewhere")
        publisher = connected(nodes["n1"], tls=tls)
        publisher.send(f"PUBLISH {publisher.client_id} {topic} never\n")
        # the client's connection is closed (it reconnects, as after an owner's failure), unconfirmed
        assert publisher.at_eof(timeout=10), publisher.buf
        line = nodes["n1"].wait_for_log("cannot reach n0 for a client")
        assert "CERTIFICATE_VERIFY_FAILED" in line, line
        assert _consume(nodes["n0"], topic, 0, tls=tls) == []
    finally:
        _stop(nodes)


def test_node_tls_ca_needs_a_cluster_and_tls_on_the_port(certs: Certs) -> None:
    cluster = ["--cluster", "etcd://127.0.0.1:1"]
    ca = ["--node-tls-ca", str(certs.ca)]
    refused = [
        (ca, "--node-tls-ca need --cluster"),
        ([*ca, *cluster], "--node-tls-ca needs --tls-cert and --tls-key"),
    ]
    for args, message in refused:
        done = subprocess.run(
            [*server_command(), *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert (done.returncode, message in done.stderr) == (2, True), (args, done.stderr)


@pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (apt-get install etcd-server)")
def test_workers_with_tls_forward_to_each_other_over_tls(certs: Certs) -> None:
    """``pigeon --workers 2`` with mutual TLS on the shared port: each worker's node port speaks TLS
    too, so the workers forward to each other over TLS (presenting the certificate of --tls-cert);
    clients on different workers get each other's messages."""
    tls = certs.client_context(certs.client)
    broker = ServerProcess("--workers", "2", "--cluster-ttl", "2", *certs.server_flags(mutual=True))
    try:
        clients = [client_of(broker, tls) for _ in range(16)]
        by_node: dict[str, list[LineClient]] = {}
        for client in clients:
            client.connect()
            by_node.setdefault(node_of(client), []).append(client)
        assert len(by_node) == 2, "the kernel spread 16 connections over one worker only"
        (subscriber, *_), (publisher, *_) = by_node.values()
        for topic in ("across0", "across1", "across2"):  # owned by one worker or the other
            subscriber.subscribe(topic)
            publisher.publish(topic, "over tls")
            assert subscriber.line() == f"MESSAGE {topic} over tls".encode()
        for client in clients:
            client.close()
    finally:
        assert broker.stop() == 0, "".join(broker.log)
    assert not any("SSL" in line or "Traceback" in line for line in broker.log), "".join(broker.log)
