"""A cluster that requires logins (``--cluster`` with ``--users``; real etcd, real nodes): a node
forwards a client's commands logged in as that client's user, so the topic's owner checks that user's
permissions, exactly as a single server would."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pigeon import AuthFailedError, Client, ClusterClient, PermissionDeniedError, TimeoutError
from pigeon.cluster.etcd import EtcdProcess
from pigeon.cluster.slots import SLOTS
from pigeon.testing import ServerProcess
from tests.cluster_kit import all_preferred, connect_pipelined, start_node, topic_owned_by
from tests.test_security_wire import USERS, password_of, users_toml

Nodes = tuple[dict[str, ServerProcess], dict[str, set[int]]]


def _login(node: ServerProcess, user: str, **options: object) -> Client:
    return Client(node.host, node.port, user=user, password=password_of(user), **options)  # type: ignore[arg-type]


def _spread(nodes: dict[str, ServerProcess], timeout: float = 30.0) -> dict[str, set[int]]:
    """Wait until every slot is served by its preferred owner (asked as the admin); who serves what."""
    deadline = time.monotonic() + timeout
    while True:
        owned = {}
        for name, node in nodes.items():
            with _login(node, "ops") as admin:
                owned[name] = set(admin.cluster()["owned"])
        if len(set().union(*owned.values())) == SLOTS and all_preferred(owned):
            return owned
        assert time.monotonic() < deadline, f"not spread: { {n: len(s) for n, s in owned.items()} }"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """Three nodes n0, n1, n2 with the same users file (tests/test_security_wire.py's users)."""
    from pigeon.cluster.etcd import etcd_binary

    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    pytest.importorskip("aetcd", reason="the cluster extra is not installed")
    users: Path = tmp_path_factory.mktemp("users") / "users.toml"
    users.write_text(users_toml(USERS))
    with EtcdProcess() as etcd:
        nodes = {f"n{i}": start_node(etcd.endpoint, f"n{i}", "--users", str(users)) for i in range(3)}
        try:
            yield nodes, _spread(nodes)
        finally:
            for node in nodes.values():
                assert node.stop() == 0, "".join(node.log)


def test_a_forwarded_publish_and_subscribe_log_in_as_the_clients_user(secured: Nodes) -> None:
    nodes, owned = secured
    topic = topic_owned_by(owned, "n0", "orders.")
    with _login(nodes["n2"], "worker") as worker, _login(nodes["n1"], "orders-api") as publisher:
        worker.subscribe(topic)  # forwarded from n2 to n0 as the worker
        publisher.publish(topic, "paid")  # forwarded from n1 to n0 as orders-api
        assert worker.next_message(timeout=10).data == b"paid"


def test_the_owner_checks_the_clients_permissions_on_a_forwarded_command(secured: Nodes) -> None:
    nodes, owned = secured
    jobs = "jobs"  # worker may subscribe to it; orders-api may not publish to it
    owner = next(name for name, slots in owned.items() if SLOTS and _slot(jobs) in slots)
    entry = next(name for name in nodes if name != owner)
    with _login(nodes[owner], "worker") as worker, _login(nodes[entry], "orders-api") as publisher:
        worker.subscribe(jobs)
        with pytest.raises(PermissionDeniedError):
            publisher.publish(jobs, "not allowed")
        with pytest.raises(PermissionDeniedError):
            publisher.subscribe(jobs)
        with pytest.raises(TimeoutError):
            worker.next_message(timeout=0.5)
        publisher.publish(topic_owned_by(owned, owner, "orders.still"), "allowed")  # the connection goes on


def _slot(topic: str) -> int:
    from pigeon.cluster.slots import slot_of

    return slot_of(topic.encode())


def test_wrong_credentials_and_an_anonymous_cluster_status_are_refused(secured: Nodes) -> None:
    nodes, _ = secured
    node = nodes["n1"]
    with pytest.raises(AuthFailedError):
        Client(node.host, node.port, user="worker", password="wrong")
    anonymous = node.client()
    try:
        assert anonymous.ask("CLUSTER STATUS").startswith(b"ERROR NOT_CONNECTED")
    finally:
        anonymous.close()


# Commands pipelined right behind a login, and the start of their reply: the router answers some
# itself (CLUSTER, a REQ or PUB frame over --max-payload) and the core the others, while the core
# checks the password off the loop; every reply must come after CONNECTED.
BEHIND_LOGIN = [
    ("CLUSTER STATUS", b"CLUSTER {"),
    ("CLUSTER REDIRECT", b"CLUSTER REDIRECT"),
    ("CLUSTER NONSENSE", b"ERROR USAGE"),
    ("HELLO", b"HELLO {"),
    ("STATS", b"STATS {"),
    ("PING", b"PONG"),
    (f"REQ c9 jobs {9 << 20}\n" + "x" * (9 << 20), b"ERROR PAYLOAD_TOO_LARGE"),
    (f"PUB c9 jobs {9 << 20}\n" + "x" * (9 << 20), b"ERROR PAYLOAD_TOO_LARGE"),  # over the 8 MiB default
    ("SUBSCRIBE c9 jobs", b"ERROR WRONG_CLIENT_ID"),
]


@pytest.mark.parametrize(
    ("command", "reply"),
    BEHIND_LOGIN,
    ids=[c.split()[0] + "-" + str(i) for i, (c, _) in enumerate(BEHIND_LOGIN)],
)
def test_a_command_pipelined_after_a_login_is_answered_after_connected(
    secured: Nodes, command: str, reply: bytes
) -> None:
    nodes, _ = secured
    client = nodes["n0"].client()
    try:
        client.send(f"CONNECT worker {password_of('worker')}\n{command}\n")
        assert client.line().startswith(b"CONNECTED ")
        assert client.line().startswith(reply)
        assert client.ask("PING") == b"PONG"  # nothing else came, and the connection goes on
    finally:
        client.close()


def test_a_subscribe_pipelined_after_a_login_goes_to_its_topics_owner(secured: Nodes) -> None:
    nodes, owned = secured
    topic = topic_owned_by(owned, "n2", "orders.login")
    login = ("worker", password_of("worker"))
    # the core holds the SUBSCRIBE while it checks the password: only then is it routed, to n2
    subscriber = connect_pipelined(nodes["n0"], f"SUBSCRIBE {{id}} {topic}", login)
    try:
        assert subscriber.line() == f"SUBSCRIBED {topic}".encode()
        with _login(nodes["n1"], "orders-api") as publisher:
            publisher.publish(topic, "paid")
        assert subscriber.line() == f"MESSAGE {topic} paid".encode()
    finally:
        subscriber.close()


def test_the_cluster_client_logs_in_on_every_node_it_uses(secured: Nodes) -> None:
    nodes, owned = secured
    topics = [topic_owned_by(owned, name, "orders.cc") for name in nodes]
    options = {"user": "ops", "password": password_of("ops")}
    with ClusterClient(nodes["n0"].host, nodes["n0"].port, **options) as client:  # type: ignore[arg-type]
        for topic in topics:
            client.subscribe(topic)
            client.publish(topic, topic)
        assert sorted(client.next_message(timeout=10).text for _ in topics) == sorted(topics)
        assert len(client.nodes) == 3
    with (
        ClusterClient(
            nodes["n0"].host, nodes["n0"].port, user="worker", password=password_of("worker")
        ) as worker,
        pytest.raises(PermissionDeniedError),
    ):
        worker.publish(topics[1], "workers publish results only")


@pytest.mark.slow
def test_workers_with_users_require_logins_and_forward_as_the_clients_user(tmp_path: Path) -> None:
    from pigeon.cluster.etcd import etcd_binary

    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    users = tmp_path / "users.toml"
    users.write_text(users_toml(USERS))
    server = ServerProcess("--workers", "2", "--users", str(users))
    try:
        deadline = time.monotonic() + 30
        while True:  # both workers joined and every slot with its preferred owner, as etcd records them
            with _login(server, "ops") as admin:
                members = admin.cluster()["members"]
            slots = {name: set(member["slots"]) for name, member in members.items()}
            if len(slots) == 2 and len(set().union(*slots.values())) == SLOTS and all_preferred(slots):
                break
            assert time.monotonic() < deadline, f"the workers did not settle: {members}"
            time.sleep(0.1)
        subscribers = [_login(server, "worker") for _ in range(4)]  # the kernel spreads them over both
        for subscriber in subscribers:
            subscriber.subscribe("orders.new")
        with _login(server, "orders-api") as publisher:
            for i in range(8):
                publisher.publish("orders.new", f"o{i}")
            with pytest.raises(PermissionDeniedError):
                publisher.publish("jobs", "no")
        got = sorted(s.next_message(timeout=10).text for s in subscribers for _ in range(2))
        assert got == [f"o{i}" for i in range(8)]
        for subscriber in subscribers:
            subscriber.close()
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_a_pattern_is_placed_on_every_node_logged_in_as_the_clients_user(secured: Nodes) -> None:
    nodes, owned = secured
    topics = {name: topic_owned_by(owned, name, "orders.p") for name in nodes}
    with _login(nodes["n0"], "worker") as worker, _login(nodes["n1"], "ops") as ops:
        worker.subscribe("orders.*")  # allowed by the worker's orders.> on every node
        with pytest.raises(PermissionDeniedError):
            worker.subscribe("jobs.*")  # refused by every node: one error, nothing left subscribed
        assert worker.subscriptions == ("orders.*",)
        for name, topic in topics.items():
            ops.publish(topic, name)
        got = sorted((m.topic, m.data) for m in (worker.next_message(timeout=10) for _ in topics))
        assert got == sorted((topic, name.encode()) for name, topic in topics.items())
