"""Replication where nodes require logins (``--replicas 1`` with ``--users``): each node logs in on
the others as its node user (``--node-user``, a user with ``cluster = true``, its password from a file
or the environment), and no other user may open a replication stream. Real etcd, real nodes, real
kill -9 (docs/cluster.md, "Replication"; docs/security.md, "A cluster")."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pigeon.cluster.etcd import EtcdProcess
from pigeon.cluster.slots import owner_order, slot_of
from pigeon.testing import ServerProcess, server_command
from tests.cluster_kit import TTL, connected, start_node, topic_owned_by, wait_copies
from tests.test_cluster_replicas import _Load, _publish, _successor
from tests.test_security_wire import USERS, password_of, users_toml

pytestmark = pytest.mark.slow

NAMES = ("n0", "n1", "n2")
NODE_USERS = {**USERS, "node": {"cluster": True}}


@pytest.fixture
def users(tmp_path: Path) -> Path:
    """The users of tests/test_security_wire.py and a node user ``node`` (password pw-node)."""
    path = tmp_path / "users.toml"
    path.write_text(users_toml(NODE_USERS))
    return path


def _password_file(tmp_path: Path, user: str) -> Path:
    path = tmp_path / f"{user}.password"
    path.write_text(password_of(user) + "\n")
    path.chmod(0o600)
    return path


def _node(etcd: EtcdProcess, name: str, data: Path, users: Path, *login: str) -> ServerProcess:
    return start_node(
        etcd.endpoint, name, "--data-dir", str(data / name), "--replicas", "1", "--users", str(users), *login
    )


def _login(user: str) -> tuple[str, str]:
    return user, password_of(user)


def test_kill_9_of_a_busy_owner_loses_no_confirmed_message_with_logins(
    etcd: EtcdProcess, tmp_path: Path, users: Path
) -> None:
    login = ("--node-user", "node", "--node-password-file", str(_password_file(tmp_path, "node")))
    nodes = {name: _node(etcd, name, tmp_path, users, *login) for name in NAMES}
    try:
        owned = wait_balanced_logged_in(nodes)
        topic = topic_owned_by(owned, "n0", "orders.busy")  # orders-api publishes it, worker consumes it
        load = _Load(nodes, topic, "n1", ["n1", "n2"], _login("orders-api"), _login("worker"))
        time.sleep(3)
        with load.lock:
            assert load.confirmed, "nothing was confirmed: the replication links did not log in"
        nodes["n0"].proc.send_signal(signal.SIGKILL)
        nodes["n0"].proc.wait()
        time.sleep(TTL + 3)  # the lease expires, n0's successors put its messages back
        confirmed, lost, duplicates = load.finish(timeout=60)
        print(f"kill -9 with logins: {confirmed} confirmed, {lost} lost, {duplicates} duplicates")
        assert lost == 0
        for node in (nodes["n1"], nodes["n2"]):
            assert not any("refused to keep replicas" in line for line in node.log), node.log[-20:]
    finally:
        for node in nodes.values():
            node.stop()


def test_a_killed_owners_backlog_is_taken_over_and_its_stale_copy_dropped_with_logins(
    etcd: EtcdProcess, tmp_path: Path, users: Path
) -> None:
    """The successor puts the replicated messages into its core through a connection of its own,
    which needs no login; so does a returning node dropping its stale copies (both were refused with
    AUTH_REQUIRED: the messages were taken out of the replica and lost, the node could not start)."""
    login = ("--node-user", "node", "--node-password-file", str(_password_file(tmp_path, "node")))
    nodes = {name: _node(etcd, name, tmp_path, users, *login) for name in NAMES}
    try:
        owned = wait_balanced_logged_in(nodes)
        topic = topic_owned_by(owned, "n0", "orders.backlog")
        successor = _successor(topic, "n0", list(NAMES))
        third = next(name for name in NAMES if name not in ("n0", successor))
        _publish(nodes[third], topic, [f"m{i}" for i in range(500)], _login("orders-api"))
        nodes["n0"].proc.send_signal(signal.SIGKILL)
        nodes["n0"].proc.wait()
        live = {name: node for name, node in nodes.items() if name != "n0"}
        wait_balanced_logged_in(live, timeout=TTL + 30)
        assert nodes[successor].wait_for_log("took over 500 replicated messages", timeout=TTL + 30)
        consumer = connected(nodes[third], _login("worker"), timeout=TTL + 30)
        consumer.subscribe(topic)
        got = [consumer.line() for _ in range(500)]
        assert got == [f"MESSAGE {topic} m{i}".encode() for i in range(500)]
        consumer.close()
        # n0 comes back: its log still holds all 500, which are stale now
        nodes["n0"] = _node(etcd, "n0", tmp_path, users, *login)
        assert nodes["n0"].wait_for_log("dropping the messages of 1 topics")
        wait_balanced_logged_in(nodes)
        assert not any("internal connection got" in line for node in nodes.values() for line in node.log)
    finally:
        for node in nodes.values():
            node.stop()


def _n2_refusing_node(tmp_path: Path) -> tuple[tuple[str, ...], Path, tuple[str, ...]]:
    """The node login of n0 and n1 (user ``node``), and n2's users file and login: n2's own node
    user is ``node2``, and it does not know the user the others log in as (it refuses them)."""
    node_login = ("--node-user", "node", "--node-password-file", str(_password_file(tmp_path, "node")))
    n2_users = tmp_path / "n2-users.toml"
    n2_users.write_text(users_toml({**USERS, "node2": {"cluster": True}}))
    n2_login = ("--node-user", "node2", "--node-password-file", str(_password_file(tmp_path, "node2")))
    return node_login, n2_users, n2_login


def _topic_in_order(prefix: str, order: list[str]) -> str:
    """The first topic ``<prefix><n>`` whose slot orders the three nodes as ``order``."""
    return next(
        f"{prefix}{n}" for n in range(10_000) if owner_order(slot_of(f"{prefix}{n}".encode()), NAMES) == order
    )


def test_a_publish_waits_for_a_new_successor_that_refuses_until_it_lets_the_owner_in(
    etcd: EtcdProcess, tmp_path: Path, users: Path
) -> None:
    """A publish waiting for its successor, which dies, then waits for the next one, even while that
    one's link is not ready (here: it refuses the owner's node login until its users file is fixed
    and reloaded); it used to be confirmed at once, held by no other node. The owner retries a
    refusing successor, and once it is let in the message is confirmed and survives the owner."""
    node_login, n2_users, n2_login = _n2_refusing_node(tmp_path)
    topic = _topic_in_order("orders.at-risk", ["n0", "n1", "n2"])
    nodes = {name: _node(etcd, name, tmp_path, users, *node_login) for name in ("n0", "n1")}
    try:
        wait_balanced_logged_in(nodes)
        nodes["n2"] = _node(etcd, "n2", tmp_path, n2_users, *n2_login)
        wait_balanced_logged_in(nodes)
        publisher = connected(nodes["n0"], _login("orders-api"))
        publisher.publish(topic, "m0")  # replicated to n1, its successor
        slots_of_n0 = _cluster_seen_by(nodes["n2"])["members"]["n0"]["slots"]
        nodes["n1"].proc.send_signal(signal.SIGSTOP)
        publisher.send(f"PUBLISH {publisher.client_id} {topic} m1")
        # n1's lease expires and n0 takes some of its slots, having made n2 the successor (as n2 sees it)
        deadline = time.monotonic() + TTL + 30
        while "n1" in (members := _cluster_seen_by(nodes["n2"])["members"]) or len(
            members["n0"]["slots"]
        ) <= len(slots_of_n0):
            assert time.monotonic() < deadline, f"n1's slots were not taken: {members}"
            time.sleep(0.1)
        publisher.sock.settimeout(TTL)
        with pytest.raises(TimeoutError):
            publisher.line()  # not PUBLISHED: no live successor holds m1
        assert nodes["n0"].wait_for_log("n2 refused to keep replicas")
        n2_users.write_text(users_toml(NODE_USERS | {"node2": {"cluster": True}}))
        nodes["n2"].proc.send_signal(signal.SIGHUP)
        publisher.sock.settimeout(30)
        assert publisher.line() == f"PUBLISHED {topic}".encode()  # n2 let n0 in and holds m1
        publisher.close()
        nodes["n0"].proc.send_signal(signal.SIGKILL)
        nodes["n0"].proc.wait()
        assert nodes["n2"].wait_for_log("took over 2 replicated messages", timeout=TTL + 30)
        consumer = connected(nodes["n2"], _login("worker"))
        consumer.subscribe(topic)
        assert consumer.lines(2) == [f"MESSAGE {topic} m0".encode(), f"MESSAGE {topic} m1".encode()]
        consumer.close()
    finally:
        nodes["n1"].proc.send_signal(signal.SIGCONT)
        for node in nodes.values():
            node.stop()


def test_a_new_successor_that_has_not_caught_up_does_not_take_over_the_old_one_does(
    etcd: EtcdProcess, tmp_path: Path, users: Path
) -> None:
    """The owner dies while its new successor (which outranks the old one) has not confirmed its
    snapshot (here it refuses the owner's login, so it never can): etcd still names the old
    successor as the node that holds the slot's messages, and the old successor takes the slot over
    with every confirmed message. Without the record, the new successor took the slot (the first
    live node in its order) with none of them, and the old one dropped its copy: all were lost."""
    node_login, n2_users, n2_login = _n2_refusing_node(tmp_path)
    topic = _topic_in_order("orders.moved", ["n0", "n2", "n1"])
    slot = slot_of(topic.encode())
    nodes = {name: _node(etcd, name, tmp_path, users, *node_login) for name in ("n0", "n1")}
    try:
        owned = wait_balanced_logged_in(nodes)
        assert slot in owned["n0"]
        sent = [f"m{i}" for i in range(100)]
        _publish(nodes["n0"], topic, sent, _login("orders-api"))  # confirmed by n1, its successor
        wait_copies(lambda: _cluster_seen_by(nodes["n0"]), slot, ["n1"], timeout=30)
        nodes["n2"] = _node(etcd, "n2", tmp_path, n2_users, *n2_login)
        assert nodes["n0"].wait_for_log("n2 refused to keep replicas")
        # n2 is the slot's successor now, but holds none of its messages: etcd still names n1
        assert _cluster_seen_by(nodes["n0"])["copies"][str(slot)] == ["n1"]
        nodes["n0"].proc.send_signal(signal.SIGKILL)
        nodes["n0"].proc.wait()
        assert nodes["n1"].wait_for_log("took over 100 replicated messages", timeout=TTL + 30)
        consumer = connected(nodes["n1"], _login("worker"))
        consumer.subscribe(topic)
        assert consumer.lines(100) == [f"MESSAGE {topic} {body}".encode() for body in sent]
        consumer.close()
        assert not any("took over" in line for line in nodes["n2"].log), nodes["n2"].log
    finally:
        for node in nodes.values():
            node.stop()


def _cluster_seen_by(node: ServerProcess) -> dict[str, Any]:
    from pigeon import Client

    with Client(node.host, node.port, user="ops", password=password_of("ops")) as admin:
        return admin.cluster()


def wait_balanced_logged_in(nodes: dict[str, ServerProcess], timeout: float = 60) -> dict[str, set[int]]:
    """``wait_balanced`` asked as the admin (``CLUSTER STATUS`` needs a login with --users)."""
    from pigeon import Client

    deadline = time.monotonic() + timeout
    while True:
        owned: dict[str, set[int]] = {}
        for name, node in nodes.items():
            with Client(node.host, node.port, user="ops", password=password_of("ops")) as admin:
                owned[name] = set(admin.cluster()["owned"])
        served = set().union(*owned.values())
        if len(served) == 256 and all(owned.values()) and sum(map(len, owned.values())) == 256:
            return owned
        assert time.monotonic() < deadline, f"not balanced: { {n: len(s) for n, s in owned.items()} }"
        time.sleep(0.1)


def test_only_a_node_user_may_open_a_replication_stream(
    etcd: EtcdProcess, tmp_path: Path, users: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIGEON_NODE_PASSWORD", password_of("node"))  # the environment, not a file, this time
    node = _node(etcd, "n0", tmp_path, users, "--node-user", "node")
    monkeypatch.delenv("PIGEON_NODE_PASSWORD")
    try:
        for user, allowed in (("worker", False), ("orders-api", False), ("node", True), ("ops", True)):
            client = node.client()
            try:
                client.send(f"CONNECT {user} {password_of(user)}\nCLUSTER REPLICATE intruder\n")
                assert client.line().startswith(b"CONNECTED ")
                reply = client.line()
                if allowed:
                    assert reply == b"CLUSTER REPLICATE intruder", (user, reply)
                else:
                    assert reply.startswith(b"ERROR PERMISSION_DENIED "), (user, reply)
                    assert client.ask("PING") == b"PONG"  # refused, not made a stream
            finally:
                client.close()
        anonymous = node.client()
        try:
            assert anonymous.ask("CLUSTER REPLICATE intruder").startswith(b"ERROR NOT_CONNECTED")
        finally:
            anonymous.close()
    finally:
        assert node.stop() == 0, "".join(node.log)


def _refusal(
    etcd: EtcdProcess, tmp_path: Path, users: Path, *args: str, env: dict[str, str] | None = None
) -> str:
    """What ``pigeon`` says when it refuses to start as a replicating node with these flags."""
    command = [
        *server_command(),
        "--port",
        "0",
        "--cluster",
        etcd.endpoint,
        "--node-name",
        "refused",
        "--data-dir",
        str(tmp_path / "refused"),
        "--replicas",
        "1",
        "--users",
        str(users),
        *args,
    ]
    environment = {k: v for k, v in os.environ.items() if k != "PIGEON_NODE_PASSWORD"} | (env or {})
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert done.returncode != 0, done.stderr
    return done.stderr


def test_a_node_without_a_usable_node_login_refuses_to_start(
    etcd: EtcdProcess, tmp_path: Path, users: Path
) -> None:
    assert "needs --node-user" in _refusal(etcd, tmp_path, users)
    assert "needs a password" in _refusal(etcd, tmp_path, users, "--node-user", "node")
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-it\n")
    assert "not that password" in _refusal(
        etcd, tmp_path, users, "--node-user", "node", "--node-password-file", str(wrong)
    )
    worker = str(_password_file(tmp_path, "worker"))
    assert "give it cluster = true" in _refusal(
        etcd, tmp_path, users, "--node-user", "worker", "--node-password-file", worker
    )
    assert "needs a password" not in _refusal(
        etcd, tmp_path, users, "--node-user", "worker", env={"PIGEON_NODE_PASSWORD": password_of("worker")}
    )
