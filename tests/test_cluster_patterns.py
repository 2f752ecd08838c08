"""Wildcard patterns across a cluster: a pattern subscription is placed on every live node, so it gets
the matching topics of every owner, whichever node its client is connected to (docs/cluster.md,
"Wildcard patterns"). Real processes, a real etcd."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pigeon import AsyncClusterClient, ClusterClient, GroupInUseError, NoSuchGroupError, TimeoutError
from pigeon.client.cluster import PATTERN_CHECK
from pigeon.cluster.etcd import EtcdProcess
from pigeon.cluster.router import REMOTE_TAG_BASE
from pigeon.cluster.slots import preferred_owner, slot_of
from pigeon.server.users import hash_password
from pigeon.testing import ServerProcess
from tests.cluster_kit import (
    Cluster,
    connected,
    running_cluster,
    start_node,
    status,
    topic_owned_by,
    wait_balanced,
    wait_preferred,
)
from tests.test_cluster_users import _login, _spread
from tests.test_security_wire import USERS, password_of, users_toml

NAMES = ("n0", "n1", "n2")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three nodes n0, n1, n2 and who serves which slots, shared by this module's tests."""
    with running_cluster() as started:
        yield started


def _topics(owned: dict[str, set[int]], stem: str) -> dict[str, str]:
    """One topic under ``stem`` per node, owned by that node."""
    return {name: topic_owned_by(owned, name, stem) for name in owned}


def _address(node: ServerProcess) -> tuple[str, int]:
    return node.host, node.port


def _body(line: bytes) -> bytes:
    """The message of a MESSAGE or DELIVER line."""
    return line.rsplit(b" ", 1)[1]


def test_a_pattern_subscriber_gets_the_matching_topics_of_every_owner(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = _topics(owned, "every.t")
    subscriber = connected(nodes["n0"])
    # one answer, as on one server, though every node took the subscription
    assert subscriber.ask(f"SUBSCRIBE {subscriber.client_id} every.>") == b"SUBSCRIBED every.>"
    assert subscriber.quiet()
    publisher = connected(nodes["n1"])
    for name, topic in topics.items():
        publisher.publish(topic, f"to-{name}")
    publisher.publish("elsewhere.x", "not matched")
    got = sorted(subscriber.lines(3))
    assert got == sorted(f"MESSAGE {topic} to-{name}".encode() for name, topic in topics.items())
    assert subscriber.quiet()


def test_a_refused_pattern_is_answered_once_with_the_error_of_one_server(cluster: Cluster) -> None:
    nodes, _ = cluster
    client = connected(nodes["n2"])
    assert client.ask(f"SUBSCRIBE {client.client_id} bad.>.x") == (
        b"ERROR BAD_TOPIC '>' may only be the last token of a pattern"
    )
    assert client.ask(f"SUBSCRIBE {client.client_id} bad.* PREFETCH 3").startswith(
        b"ERROR USAGE usage: SUBSCRIBE "
    )
    assert (
        client.ask(f"UNSUBSCRIBE {client.client_id} never.*")
        == b"ERROR NOT_SUBSCRIBED not subscribed to 'never.*'"
    )
    assert client.ask("PING") == b"PONG"
    # nothing was left subscribed on any node
    publisher = connected(nodes["n0"])
    for topic in _topics(cluster[1], "bad.t").values():
        publisher.publish(topic, "x")
    assert client.quiet()


def test_a_pattern_refused_by_its_own_node_alone_is_left_on_no_node(etcd: EtcdProcess) -> None:
    # n0 allows one subscription per connection, n1 and n2 the default: n0 alone refuses the second
    nodes = {name: start_node(etcd.endpoint, name) for name in ("n1", "n2")}
    nodes["n0"] = start_node(etcd.endpoint, "n0", "--max-subscriptions", "1")
    try:
        owned = wait_preferred(list(nodes.values()))
        client = connected(nodes["n0"])
        mine = topic_owned_by(owned, "n0", "own.t")
        assert client.ask(f"SUBSCRIBE {client.client_id} {mine}") == f"SUBSCRIBED {mine}".encode()
        assert client.ask(f"SUBSCRIBE {client.client_id} own.>") == (
            b"ERROR TOO_MANY_SUBSCRIPTIONS too many subscriptions on this connection (limit 1)"
        )
        others = [nodes["n1"], nodes["n2"]]
        _wait_for(
            "n1 and n2 drop the refused pattern", lambda: not any(map(_wildcard_subscriptions, others)), 10
        )
        publisher = connected(nodes["n1"])
        theirs = {name: topic_owned_by(owned, name, "own.t") for name in ("n1", "n2")}
        for topic in theirs.values():
            publisher.publish(topic, "refused")
        assert client.quiet()
        # forgotten, not only dropped: the reads of the member set (every second) do not place it again
        time.sleep(2.5)
        assert not any(map(_wildcard_subscriptions, others))
        # with room for it on n0, the same pattern is placed everywhere
        assert client.ask(f"UNSUBSCRIBE {client.client_id} {mine}") == f"UNSUBSCRIBED {mine}".encode()
        assert client.ask(f"SUBSCRIBE {client.client_id} own.>") == b"SUBSCRIBED own.>"
        for topic in theirs.values():
            publisher.publish(topic, "taken")
        assert sorted(client.lines(2)) == sorted(
            f"MESSAGE {topic} taken".encode() for topic in theirs.values()
        )
    finally:
        for node in nodes.values():
            assert node.stop() == 0, "".join(node.log)


def test_two_members_of_a_group_on_different_nodes_split_each_topic_and_redeliver(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = _topics(owned, "split.t")
    first, second = connected(nodes["n0"]), connected(nodes["n2"])
    for sub in (first, second):
        assert sub.ask(f"SUBSCRIBE {sub.client_id} split.* GROUP g ACK PREFETCH 100") == b"SUBSCRIBED split.*"
    publisher = connected(nodes["n1"])
    for topic in topics.values():
        for i in range(6):
            publisher.publish(topic, f"{topic}-{i}")
    one, two = first.lines(9), second.lines(9)
    for topic in topics.values():
        # round robin on each topic's owner: each member gets every other message of it
        mine = [_body(line) for line in one if line.split()[1] == topic.encode()]
        theirs = [_body(line) for line in two if line.split()[1] == topic.encode()]
        assert len(mine) == len(theirs) == 3
        assert sorted(mine + theirs) == sorted(f"{topic}-{i}".encode() for i in range(6))
    assert first.quiet() and second.quiet()
    # the second member acks its share; the first leaves without acking: its share goes to the second
    for line in two:
        second.send(f"ACK {second.client_id} {line.split()[2].decode()}")
    first.close()
    again = second.lines(9)
    assert sorted(_body(line) for line in again) == sorted(_body(line) for line in one)
    assert all(line.split()[3] == b"2" for line in again)  # the second attempt
    tags = [int(line.split()[2]) for line in again]
    assert any(tag >= REMOTE_TAG_BASE for tag in tags)  # relayed from other owners, tags of this connection
    for tag in tags:
        second.send(f"ACK {second.client_id} {tag}")
    assert second.ask("PING") == b"PONG" and second.quiet()


def test_unsubscribe_and_destroy_reach_every_node(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = _topics(owned, "gone.t")
    client = connected(nodes["n1"])
    assert client.ask(f"SUBSCRIBE {client.client_id} gone.> GROUP keep") == b"SUBSCRIBED gone.>"
    assert client.ask(f"DESTROY {client.client_id} gone.> GROUP keep").startswith(b"ERROR GROUP_IN_USE ")
    assert client.ask(f"UNSUBSCRIBE {client.client_id} gone.> GROUP keep") == b"UNSUBSCRIBED gone.>"
    assert client.quiet()
    publisher = connected(nodes["n0"])
    for topic in topics.values():
        publisher.publish(topic, "kept")  # the named group keeps it on each owner
    assert client.quiet()
    assert client.ask(f"DESTROY {client.client_id} gone.> GROUP keep") == b"DESTROYED gone.> keep"
    assert client.ask(f"DESTROY {client.client_id} gone.> GROUP keep") == (
        b"ERROR NO_SUCH_GROUP no such group on 'gone.>'"
    )
    # made again, the group is empty on every node: the backlogs went with DESTROY
    assert client.ask(f"SUBSCRIBE {client.client_id} gone.> GROUP keep") == b"SUBSCRIBED gone.>"
    assert client.quiet()
    # a plain pattern subscription: after UNSUBSCRIBED no node delivers to it
    assert client.ask(f"UNSUBSCRIBE {client.client_id} gone.> GROUP keep") == b"UNSUBSCRIBED gone.>"
    assert client.ask(f"SUBSCRIBE {client.client_id} gone.*") == b"SUBSCRIBED gone.*"
    assert client.ask(f"UNSUBSCRIBE {client.client_id} gone.*") == b"UNSUBSCRIBED gone.*"
    for topic in topics.values():
        publisher.publish(topic, "nobody")
    assert client.quiet()


def test_a_pattern_unsubscribed_while_a_node_is_slow_to_answer_is_not_placed_there_again(
    etcd: EtcdProcess,
) -> None:
    # n1 is frozen while the UNSUBSCRIBE waits for its answer; the reads of the member set meanwhile
    # (every second) must not send the subscription there again behind it. A long lease keeps n1 a
    # member while it is frozen.
    nodes = {name: start_node(etcd.endpoint, name, "--cluster-ttl", "8") for name in ("n0", "n1")}
    try:
        owned = wait_preferred(list(nodes.values()))
        client = connected(nodes["n0"])
        assert client.ask(f"SUBSCRIBE {client.client_id} slow.>") == b"SUBSCRIBED slow.>"
        nodes["n1"].proc.send_signal(signal.SIGSTOP)
        try:
            client.send(f"UNSUBSCRIBE {client.client_id} slow.>")
            assert client.quiet(2.5)  # no answer before n1 has dropped it
        finally:
            nodes["n1"].proc.send_signal(signal.SIGCONT)
        assert client.line() == b"UNSUBSCRIBED slow.>"
        publisher = connected(nodes["n1"])
        for name in nodes:
            publisher.publish(topic_owned_by(owned, name, "slow.t"), "nobody")
        assert client.quiet(0.5)
        assert _wildcard_subscriptions(nodes["n1"]) == 0
    finally:
        for node in nodes.values():
            assert node.stop() == 0, "".join(node.log)


def test_a_pattern_on_a_group_made_on_another_node_is_destroyed_from_here(cluster: Cluster) -> None:
    nodes, _ = cluster
    member = connected(nodes["n0"])
    assert member.ask(f"SUBSCRIBE {member.client_id} far.> GROUP g") == b"SUBSCRIBED far.>"
    assert member.ask(f"UNSUBSCRIBE {member.client_id} far.> GROUP g") == b"UNSUBSCRIBED far.>"
    other = connected(nodes["n2"])
    assert other.ask(f"DESTROY {other.client_id} far.> GROUP g") == b"DESTROYED far.> g"
    assert json.loads(other.ask("STATS")[len(b"STATS ") :])["groups_destroyed"] >= 1


def test_the_cluster_client_subscribes_a_pattern_on_every_node(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = _topics(owned, "cc.t")
    with (
        ClusterClient(*_address(nodes["n1"])) as subscriber,
        ClusterClient(*_address(nodes["n2"])) as publisher,
    ):
        subscriber.subscribe("cc.*", group="workers", ack=True)
        assert subscriber.subscriptions == ("cc.*",)
        assert sorted(subscriber.nodes) == sorted(_address(node) for node in nodes.values())
        for name, topic in topics.items():
            publisher.publish(topic, f"from-{name}")
        got = [subscriber.next_message(timeout=10) for _ in topics]
        assert sorted((m.topic, m.data) for m in got) == sorted(
            (topic, f"from-{name}".encode()) for name, topic in topics.items()
        )
        subscriber.ack(got)
        assert subscriber.check_acks() == []
        with pytest.raises(GroupInUseError):
            subscriber.destroy_group("cc.*", "workers")
        subscriber.unsubscribe("cc.*", group="workers")
        assert not subscriber.subscriptions
        subscriber.destroy_group("cc.*", "workers")
        with pytest.raises(NoSuchGroupError):
            subscriber.destroy_group("cc.*", "workers")


def _wildcard_subscriptions(node: ServerProcess) -> int:
    client = connected(node)
    try:
        return int(json.loads(client.ask("STATS")[len(b"STATS ") :])["wildcard_subscriptions"])
    finally:
        client.close()


def _wait_for(condition: str, check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {condition}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_node_that_joins_gets_the_patterns_and_one_that_dies_leaves_them_working() -> None:
    with running_cluster(2) as (nodes, _):
        subscriber = connected(nodes["n0"])
        assert subscriber.ask(f"SUBSCRIBE {subscriber.client_id} join.>") == b"SUBSCRIBED join.>"
        cluster_client = ClusterClient(*_address(nodes["n1"]))
        cluster_client.subscribe("join.*", group="cc")
        # a topic whose slot moves to n2 when it joins: published to all along, every message arrives
        moving = (f"join.move.{i}" for i in range(10_000))
        move = next(t for t in moving if preferred_owner(slot_of(t.encode()), NAMES) == "n2")
        mover = connected(nodes["n1"])
        endpoint = nodes["n0"].args[nodes["n0"].args.index("--cluster") + 1]
        nodes["n2"] = start_node(endpoint, "n2")
        sent = 0
        deadline = time.monotonic() + 60
        while slot_of(move.encode()) not in status(nodes["n2"])["owned"] or sent < 3:
            assert time.monotonic() < deadline, "the slot did not move to n2"
            mover.publish(move, f"m{sent}")
            sent += 1
            time.sleep(0.05)
        mover.publish(move, "last")
        bodies = [*(f"m{i}" for i in range(sent)), "last"]
        assert sorted(subscriber.lines(sent + 1)) == sorted(f"MESSAGE {move} {m}".encode() for m in bodies)
        owned = wait_balanced(list(nodes.values()))
        # the node that holds the subscriber's connection places its pattern on the new node by itself
        _wait_for("the node's pattern is placed on n2", lambda: _wildcard_subscriptions(nodes["n2"]) == 1)
        # the cluster client does it while it waits for messages (it reads the members every second)
        with pytest.raises(TimeoutError):
            cluster_client.next_message(timeout=PATTERN_CHECK * 2)
        _wait_for("the client's pattern is placed on n2", lambda: _wildcard_subscriptions(nodes["n2"]) == 2)
        topics = _topics(owned, "join.t")
        publisher = connected(nodes["n1"])
        for name, topic in topics.items():
            publisher.publish(topic, f"to-{name}")
        expected = sorted((topic.encode(), f"to-{name}".encode()) for name, topic in topics.items())
        assert sorted((line.split()[1], _body(line)) for line in subscriber.lines(3)) == expected
        got = [cluster_client.next_message(timeout=10) for _ in topics]
        assert sorted((m.topic.encode(), m.data) for m in got) == expected
        # n2 dies: its slots go to n0 and n1, which hold the patterns already; nobody is closed
        nodes["n2"].stop(signal.SIGKILL)
        survivors = wait_balanced([nodes["n0"], nodes["n1"]])
        # topics of slots n2 owned, now n0's and n1's
        taken = {name: survivors[name] & owned["n2"] for name in ("n0", "n1")}
        after = {name: topic_owned_by(taken, name, "join.after") for name in taken}
        publisher = connected(nodes["n1"])  # the first one was closed: it had published through n2
        for topic in after.values():
            publisher.publish(topic, "after")
        assert sorted(subscriber.lines(2)) == sorted(
            f"MESSAGE {topic} after".encode() for topic in after.values()
        )
        got = [cluster_client.next_message(timeout=10) for _ in after]
        assert sorted(m.topic for m in got) == sorted(after.values())
        assert subscriber.ask("PING") == b"PONG"
        cluster_client.close()


SLOW_USER = "slow-worker"


def _users_with_a_slow_login(tmp_path: Path) -> Path:
    """tests/test_security_wire.py's users and SLOW_USER, who may subscribe to ``orders.>``, with a
    password that costs 8 times the default scrypt (a third of a second) on each node that checks it."""
    users = tmp_path / "users.toml"
    slow = hash_password(password_of(SLOW_USER), n=1 << 17)
    users.write_text(
        users_toml(USERS) + f'[users.{SLOW_USER}]\npassword = "{slow}"\nsubscribe = ["orders.>"]\n'
    )
    return users


@pytest.mark.slow
def test_a_pattern_subscribe_accepted_while_the_clients_output_is_paused_runs_once_it_drains(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    users = _users_with_a_slow_login(tmp_path)
    nodes = {name: start_node(etcd.endpoint, name, "--users", str(users)) for name in NAMES}
    try:
        owned = _spread(nodes)
        flooded, theirs = topic_owned_by(owned, "n0", "orders.f"), topic_owned_by(owned, "n1", "orders.t")
        subscriber = connected(nodes["n0"], (SLOW_USER, password_of(SLOW_USER)))
        subscriber.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        subscriber.subscribe(flooded)
        # n1 and n2 answer the pattern after checking the slow password; meanwhile the subscriber
        # reads nothing and its node's core stops taking its input (its output over the high mark)
        subscriber.send(f"SUBSCRIBE {subscriber.client_id} orders.>")
        publisher = connected(nodes["n0"], ("orders-api", password_of("orders-api")))
        body = "x" * 700_000
        publisher.send("".join(f"PUBLISH {publisher.client_id} {flooded} {body}\n" for _ in range(16)))
        assert publisher.lines(16) == [f"PUBLISHED {flooded}".encode()] * 16
        time.sleep(1.5)
        lines = [subscriber.line() for _ in range(17)]
        assert lines.count(b"SUBSCRIBED orders.>") == 1
        assert lines.count(f"MESSAGE {flooded} {body}".encode()) == 16
        # the pattern is on n1 too: n0's core said it subscribed, once it ran the command
        publisher.publish(theirs, "placed")
        assert subscriber.line() == f"MESSAGE {theirs} placed".encode()
    finally:
        for node in nodes.values():
            assert node.stop() == 0, "".join(node.log)


@pytest.mark.slow
def test_a_node_that_joins_gets_slots_only_once_a_slow_login_has_placed_the_patterns(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    # the subscriber's password costs 8 times the default scrypt (a third of a second) on every node
    # that checks it: n0 places its pattern on n2 only after such a check there, and the owner of a
    # slot hands it to n2 only JOIN_GRACE after it joined; with no grace the slot moves at once, and
    # what is published to it meanwhile stays on n2, where the pattern has no subscriber yet
    users = _users_with_a_slow_login(tmp_path)
    nodes = {name: start_node(etcd.endpoint, name, "--users", str(users)) for name in ("n0", "n1")}
    try:
        _spread(nodes)
        # a topic whose slot moves to n2 when it joins, idle (nothing was ever published to it), and
        # one whose slot stays
        candidates = [f"orders.grace{i}" for i in range(10_000)]
        moving = next(t for t in candidates if preferred_owner(slot_of(t.encode()), NAMES) == "n2")
        staying = next(t for t in candidates if preferred_owner(slot_of(t.encode()), NAMES) != "n2")
        subscriber = connected(nodes["n0"], (SLOW_USER, password_of(SLOW_USER)))
        assert subscriber.ask(f"SUBSCRIBE {subscriber.client_id} orders.>") == b"SUBSCRIBED orders.>"
        publisher = connected(nodes["n1"], ("orders-api", password_of("orders-api")))
        publisher.publish(staying, "before")
        assert subscriber.line() == f"MESSAGE {staying} before".encode()
        nodes["n2"] = start_node(etcd.endpoint, "n2", "--users", str(users))
        deadline = time.monotonic() + 30
        with _login(nodes["n2"], "ops") as admin:
            while slot_of(moving.encode()) not in admin.cluster()["owned"]:
                assert time.monotonic() < deadline, "the slot did not move to n2"
                time.sleep(0.01)
        # published to n2 as soon as it serves the topic: the pattern is there already
        for i in range(20):
            publisher.publish(moving, f"m{i}")
        received: list[bytes] = []
        while len(received) < 20 and not subscriber.quiet(2.0):
            received.append(subscriber.line())
        expected = [f"MESSAGE {moving} m{i}".encode() for i in range(20)]
        assert received == expected, f"{len(set(expected) - set(received))} of 20 lost"
    finally:
        for node in nodes.values():
            assert node.stop() == 0, "".join(node.log)


def test_a_pattern_from_another_nodes_upstream_stays_on_the_node_it_reaches(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = _topics(owned, "up.t")
    upstream = connected(nodes["n1"])
    assert upstream.ask("CLUSTER UPSTREAM") == b"CLUSTER UPSTREAM"
    assert upstream.ask(f"SUBSCRIBE {upstream.client_id} up.>") == b"SUBSCRIBED up.>"
    publisher = connected(nodes["n0"])
    for topic in topics.values():
        publisher.publish(topic, "x")
    # only n1's own topic reaches it: the other nodes never got the subscription
    assert upstream.line() == f"MESSAGE {topics['n1']} x".encode()
    assert upstream.quiet()


def test_pipelined_pattern_commands_are_answered_in_command_order(cluster: Cluster) -> None:
    nodes, owned = cluster
    theirs = topic_owned_by(owned, "n1", "pipe.t")
    client = connected(nodes["n0"])
    cid = client.client_id
    client.send(
        f"SUBSCRIBE {cid} pipe.>\nPUBLISH {cid} {theirs} x\nSUBSCRIBE {cid} pipe.* GROUP g\n"
        f"UNSUBSCRIBE {cid} pipe.>\nUNSUBSCRIBE {cid} pipe.* GROUP g\nPING\n"
    )
    lines = client.lines(7)
    assert [line for line in lines if not line.startswith(b"MESSAGE ")] == [
        b"SUBSCRIBED pipe.>",
        f"PUBLISHED {theirs}".encode(),
        b"SUBSCRIBED pipe.*",
        b"UNSUBSCRIBED pipe.>",
        b"UNSUBSCRIBED pipe.*",
        b"PONG",
    ]
    assert lines.count(f"MESSAGE {theirs} x".encode()) == 1
    assert client.quiet()


def test_the_async_cluster_client_subscribes_a_pattern_on_every_node(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = _topics(owned, "acc.t")

    async def run() -> list[tuple[str, bytes]]:
        async with AsyncClusterClient(*_address(nodes["n0"])) as client:
            await client.subscribe("acc.>", ack=True)
            for name, topic in topics.items():
                await client.publish(topic, name)
            got = [await client.next_message(timeout=10) for _ in topics]
            client.ack(got)
            assert await client.check_acks() == []
            await client.unsubscribe("acc.>")
            return sorted((m.topic, m.data) for m in got)

    assert asyncio.run(run()) == sorted((topic, name.encode()) for name, topic in topics.items())
