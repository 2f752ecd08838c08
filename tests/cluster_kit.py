"""Clusters for tests: real ``pigeon --cluster`` processes coordinated by a real etcd."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pigeon.cluster.etcd import EtcdProcess, etcd_binary
from pigeon.cluster.slots import SLOTS, preferred_owner, slot_of
from pigeon.testing import LineClient, ServerProcess
from tests.test_tls import TlsLineClient

# a short lease, so that failover tests wait seconds, not minutes
TTL = 2.0


def start_node(endpoint: str, name: str, *args: str) -> ServerProcess:
    """A node named ``name`` of the cluster at ``endpoint``, on a free port."""
    return ServerProcess("--cluster", endpoint, "--node-name", name, "--cluster-ttl", str(TTL), *args)


Cluster = tuple[dict[str, ServerProcess], dict[str, set[int]]]


@contextmanager
def running_cluster(count: int = 3) -> Iterator[Cluster]:
    """An etcd and ``count`` nodes n0, n1, ... with every slot served, and who serves which; skips
    the test where etcd or the cluster extra is missing. Every node must stop cleanly at the end."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    pytest.importorskip("aetcd", reason="the cluster extra is not installed")
    with EtcdProcess() as etcd:
        nodes = {f"n{i}": start_node(etcd.endpoint, f"n{i}") for i in range(count)}
        try:
            yield nodes, wait_preferred(list(nodes.values()))
        finally:
            for node in nodes.values():
                assert node.stop() in (0, -9), "".join(node.log)


def client_of(node: ServerProcess, tls: ssl.SSLContext | None = None, timeout: float = 10.0) -> LineClient:
    """A client of ``node``, over TLS with the client context ``tls`` where given."""
    return node.client(timeout) if tls is None else TlsLineClient(node, tls, timeout)


def status(node: ServerProcess, tls: ssl.SSLContext | None = None) -> dict[str, Any]:
    """``CLUSTER STATUS`` of one node, as a dict (over TLS with ``tls``)."""
    client = client_of(node, tls, timeout=5)
    try:
        reply = client.ask("CLUSTER STATUS")
    finally:
        client.close()
    assert reply.startswith(b"CLUSTER "), reply
    return dict(json.loads(reply[len(b"CLUSTER ") :]))


def wait_copies(
    read_status: Callable[[], dict[str, Any]], slot: int, expected: list[str], timeout: float = 60.0
) -> None:
    """Wait until a node's ``CLUSTER STATUS`` (``read_status()``) names ``expected`` as the nodes
    that hold every message of ``slot`` (``copies``: what etcd records for the slot it owns)."""
    deadline = time.monotonic() + timeout
    while (copies := read_status()["copies"]).get(str(slot)) != expected:
        assert time.monotonic() < deadline, f"slot {slot}: {copies.get(str(slot))}, not {expected}"
        time.sleep(0.05)


def owned_by_each(
    nodes: list[ServerProcess], skip_down: bool = False, tls: ssl.SSLContext | None = None
) -> dict[str, set[int]]:
    """The slots each node says it serves right now; with ``skip_down``, nodes that do not answer
    (killed, stopping) are left out."""
    owned: dict[str, set[int]] = {}
    for node in nodes:
        try:
            doc = status(node, tls)
        except (OSError, EOFError, AssertionError):
            if not skip_down:
                raise
            continue
        owned[doc["node"]] = set(doc["owned"])
    return owned


def served_twice(owned: dict[str, set[int]]) -> set[tuple[int, str, str]]:
    """(slot, node, node) for each slot in two nodes' own views."""
    seen: dict[int, str] = {}
    twice: set[tuple[int, str, str]] = set()
    for node, slots in sorted(owned.items()):
        for slot in slots:
            if slot in seen:
                twice.add((slot, seen[slot], node))
            seen[slot] = node
    return twice


class TwoOwnersWatch:
    """Looks at every node's own view, round after round, and fails when a slot is served by two
    nodes in two rounds in a row. The views of one round are read one node after the other, so a slot
    handed over between two reads can show in both once; a real second owner stays."""

    def __init__(self) -> None:
        self._last: set[tuple[int, str, str]] = set()

    def look(
        self, nodes: list[ServerProcess], skip_down: bool = False, tls: ssl.SSLContext | None = None
    ) -> dict[str, set[int]]:
        """One round: every node's view; raises AssertionError on a slot served twice twice in a row."""
        owned = owned_by_each(nodes, skip_down, tls)
        twice = served_twice(owned)
        assert not twice & self._last, f"slots served by two nodes: {sorted(twice & self._last)}"
        self._last = twice
        return owned


def wait_balanced(
    nodes: list[ServerProcess], timeout: float = 30.0, tls: ssl.SSLContext | None = None
) -> dict[str, set[int]]:
    """Wait until every slot is served by exactly one of ``nodes`` and each serves some; returns who
    serves what. Checks on every look that no slot is served twice (``TwoOwnersWatch``)."""
    watch = TwoOwnersWatch()
    deadline = time.monotonic() + timeout
    while True:
        owned = watch.look(nodes, tls=tls)
        served = set().union(*owned.values())
        if len(served) == SLOTS and all(owned.values()) and not served_twice(owned):
            return owned
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not balanced after {timeout} s: { ({n: len(s) for n, s in owned.items()}) }"
            )
        time.sleep(0.1)


def all_preferred(owned: dict[str, set[int]]) -> bool:
    """Whether every slot is served by its preferred owner among the nodes of ``owned``: no idle slot
    is left to hand over, so who owns what stays put while nothing dies."""
    return all(slot in owned[preferred_owner(slot, owned) or ""] for slot in range(SLOTS))


def wait_preferred(
    nodes: list[ServerProcess], timeout: float = 30.0, tls: ssl.SSLContext | None = None
) -> dict[str, set[int]]:
    """``wait_balanced``, then wait until every slot is with its preferred owner; who serves what."""
    deadline = time.monotonic() + timeout
    while True:
        owned = wait_balanced(nodes, timeout, tls)
        if all_preferred(owned):
            return owned
        assert time.monotonic() < deadline, "the slots did not settle with their preferred owners"
        time.sleep(0.1)


def connected(
    node: ServerProcess,
    login: tuple[str, str] | None = None,
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> LineClient:
    """A client of ``node`` that has sent CONNECT (with ``login``'s user and password, where given;
    over TLS with ``tls``)."""
    client = client_of(node, tls, timeout)
    if login is None:
        client.connect()
    else:
        user, password = login
        reply = client.ask(f"CONNECT {user} {password}").decode()
        assert reply.startswith("CONNECTED "), reply
        client.client_id = reply.split(" ", 1)[1]
    return client


def connect_pipelined(node: ServerProcess, command: str, login: tuple[str, str] | None = None) -> LineClient:
    """A new client of ``node`` that sent ``CONNECT`` (with ``login``'s user and password, where given)
    and ``command`` in one write, its ``CONNECTED`` read. ``{id}`` in ``command`` is the id that
    ``CONNECT`` is to give: the next after a client's made just before (ids are a counter), tried again
    when another connection took it meanwhile."""
    connect = "CONNECT" if login is None else "CONNECT {} {}".format(*login)
    for _ in range(10):
        probe = connected(node, login)
        guess = f"c{int(probe.client_id[1:]) + 1}"
        probe.close()
        client = client_of(node)
        client.send(f"{connect}\n{command.format(id=guess)}\n")
        if client.line() == f"CONNECTED {guess}".encode():
            client.client_id = guess
            return client
        client.close()
    raise AssertionError("another connection took every id guessed")


def topic_owned_by(owned: dict[str, set[int]], node: str, stem: str) -> str:
    """A topic name starting with ``stem`` whose slot ``node`` serves."""
    for n in range(10_000):
        topic = f"{stem}{n}"
        if slot_of(topic.encode()) in owned[node]:
            return topic
    raise AssertionError(f"no topic of {node}")


def silent_while_frozen(
    client: LineClient, owner: ServerProcess, command: bytes, seconds: float = 0.5
) -> None:
    """Send ``command`` while ``owner`` is stopped (SIGSTOP, well within its lease): ``client`` gets
    nothing for ``seconds`` (what answers it must wait for the owner), then ``owner`` goes on."""
    timeout = client.sock.gettimeout()
    owner.proc.send_signal(signal.SIGSTOP)
    try:
        client.send(command)
        client.sock.settimeout(seconds)
        with pytest.raises(TimeoutError):
            client.line()
    finally:
        owner.proc.send_signal(signal.SIGCONT)
        client.sock.settimeout(timeout)


class UnansweredAddress:
    """A loopback address for a node to advertise where nothing answers a connection at first: a
    listener whose accept queue is full, so the kernel drops each SYN (as a firewall or a cut cable
    would) and a connect waits. ``forward_to(port)`` then lets the connections through to ``port``
    (the kernel's next SYN retry, within seconds), with a thread per direction."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self._filler = socket.create_connection(self._listener.getsockname())
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._filler]

    def forward_to(self, port: int) -> None:
        """Accept from now on, each connection forwarded to ``port`` on loopback."""
        threading.Thread(target=self._accept, args=(port,), daemon=True).start()

    def _accept(self, port: int) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if client.getpeername() == self._filler.getsockname():
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", port))
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._listener.close()
        for sock in self._sockets:
            sock.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(1 << 16):
            sink.sendall(chunk)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
