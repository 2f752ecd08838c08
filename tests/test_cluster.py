"""Cluster membership and slot ownership: real ``pigeon --cluster`` nodes, a real etcd, real kill -9."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import pytest

from pigeon.cluster.etcd import EtcdProcess, parse_endpoints
from pigeon.cluster.slots import SLOTS, owner_order, preferred_owner, slot_of
from tests.cluster_kit import (
    TTL,
    TwoOwnersWatch,
    connected,
    owned_by_each,
    start_node,
    status,
    wait_balanced,
    wait_preferred,
)
from tests.monitoring import get_json, start_monitored

SLOT_OF_JOBS = 188
SLOT_OF_ORDERS = 138


def test_endpoints_are_parsed_with_or_without_the_scheme() -> None:
    assert parse_endpoints("etcd://127.0.0.1:2379,10.0.0.2:2380") == [("127.0.0.1", 2379), ("10.0.0.2", 2380)]
    assert parse_endpoints("[::1]:2379") == [("::1", 2379)]
    for bad in ("etcd://", "host", "host:0", "host:x"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_slots_and_preferred_owners_are_the_same_in_every_process() -> None:
    # CRC-32C, not Python's per-process hash: these values are fixed
    assert [slot_of(topic) for topic in (b"jobs", b"orders", b"")] == [SLOT_OF_JOBS, SLOT_OF_ORDERS, 0]
    members = ["n1", "n2", "n3"]
    owners = [preferred_owner(slot, members) for slot in range(SLOTS)]
    assert set(owners) == set(members)
    assert owners == [owner_order(slot, reversed(members))[0] for slot in range(SLOTS)]
    # a member leaving moves only the slots it held
    without = [preferred_owner(slot, ["n1", "n2"]) for slot in range(SLOTS)]
    assert all(a == b for a, b in zip(owners, without, strict=True) if a != "n3")
    assert preferred_owner(0, []) is None


def test_a_free_slot_goes_to_the_first_live_node_that_holds_its_messages() -> None:
    """``ClusterNode.taker``: a dead owner's slot goes to the first live node, in the slot's order, of
    those etcd names as holding its messages; to its preferred owner when none of them is live, when
    its last owner is still a member (it handed the slot over), or when nothing is recorded."""
    from pigeon.cluster.node import ClusterNode

    node = ClusterNode([("127.0.0.1", 2379)], "n1", {})
    node.members = {name: {} for name in ("n1", "n2", "n3")}
    for slot in range(SLOTS):
        order = owner_order(slot, node.members)
        node.copies = {}
        assert node.taker(slot) == order[0]
        node.copies = {slot: ("gone", (order[2],))}  # the new successor order[0] had not caught up
        assert node.taker(slot) == order[2]
        node.copies = {slot: ("gone", (order[2], order[1]))}
        assert node.taker(slot) == order[1]
        node.copies = {slot: ("gone", ("dead",))}
        assert node.taker(slot) == order[0]
        node.copies = {slot: (order[1], (order[2],))}  # its owner lives: it was handed over
        assert node.taker(slot) == order[0]


@pytest.mark.parametrize(
    "argv",
    [["--node-name", "n1"], ["--cluster", "x"]],
)
def test_cluster_flags_are_checked(argv: list[str]) -> None:
    from pigeon.cli.server import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("mode", [["--cluster", "etcd://127.0.0.1:2379"], ["--workers", "2"]])
def test_a_cluster_refuses_certificate_mapped_users(
    mode: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from pigeon.cli.server import main

    with pytest.raises(SystemExit) as exit_info:
        main([*mode, "--users", "u.toml", "--tls-ca", "ca.pem", "--tls-map-user"])
    assert exit_info.value.code == 2
    assert "do not work with --tls-map-user" in capsys.readouterr().err


def test_every_slot_has_exactly_one_owner_in_etcd_and_in_the_nodes(etcd: EtcdProcess) -> None:
    nodes = [start_node(etcd.endpoint, f"n{i}") for i in range(3)]
    try:
        # settled: a balanced moment may come while slots still move to a node that joined, whose keys
        # are then briefly absent from etcd; once every slot is with its preferred owner none moves
        owned = wait_preferred(nodes)
        recorded = asyncio.run(_slot_keys(etcd))
        assert set(recorded) == set(range(SLOTS))
        for name, slots in owned.items():
            assert {slot for slot, owner in recorded.items() if owner == name} == slots
        doc = status(nodes[0])
        assert set(doc["members"]) == {"n0", "n1", "n2"}
        assert doc["etcd"] is True
    finally:
        for node in nodes:
            assert node.stop() == 0, "".join(node.log)


async def _slot_keys(etcd: EtcdProcess) -> dict[int, str]:
    import aetcd

    client = aetcd.Client("127.0.0.1", etcd.client_port)
    try:
        prefix = b"/pigeon/pigeon/slots/"
        return {int(kv.key[len(prefix) :]): kv.value.decode() for kv in await client.get_prefix(prefix)}
    finally:
        await client.close()


@pytest.mark.slow
def test_slots_move_after_kill_9_and_never_have_two_servers_while_nodes_come_and_go(
    etcd: EtcdProcess,
) -> None:
    nodes = {f"n{i}": start_node(etcd.endpoint, f"n{i}") for i in range(3)}
    # a look at every node's own view, over and over, the whole time (nodes that are down skipped)
    done = threading.Event()
    failures: list[BaseException] = []
    rounds = [0]

    def watch_all() -> None:
        watch = TwoOwnersWatch()
        while not done.is_set():
            try:
                current = list(nodes.values())
            except RuntimeError:  # the test changed the dict meanwhile
                continue
            try:
                watch.look(current, skip_down=True)
                rounds[0] += 1
            except BaseException as exc:
                failures.append(exc)
                return

    watcher = threading.Thread(target=watch_all, daemon=True)
    watcher.start()
    try:
        wait_balanced(list(nodes.values()))
        # kill -9 a node: its lease expires, the others take its slots within TTL + a few polls
        nodes.pop("n1").proc.send_signal(signal.SIGKILL)
        wait_balanced(list(nodes.values()), timeout=TTL + 20)
        # the node comes back under the same name, then another leaves cleanly
        nodes["n1"] = start_node(etcd.endpoint, "n1")
        wait_balanced(list(nodes.values()), timeout=TTL + 20)
        assert nodes.pop("n2").stop() == 0
        owned = wait_balanced(list(nodes.values()), timeout=TTL + 20)
        assert set(owned) == {"n0", "n1"}
        recorded = asyncio.run(_slot_keys(etcd))
        assert {slot for slot, node in recorded.items() if node == "n1"} == owned["n1"]
    finally:
        done.set()
        watcher.join(30)
        for node in nodes.values():
            node.stop()
    assert not failures, failures
    assert not watcher.is_alive()
    assert rounds[0] > 10, "the watch hardly looked"


@pytest.mark.slow
def test_an_etcd_restart_keeps_the_slots_served(etcd: EtcdProcess) -> None:
    nodes = [start_node(etcd.endpoint, f"n{i}") for i in range(2)]
    try:
        before = wait_balanced(nodes)
        etcd.stop()
        # while etcd is down (for less than the lease) every node keeps what it owns
        time.sleep(TTL / 4)
        assert owned_by_each(nodes) == before
        etcd.start()
        deadline = time.monotonic() + 10
        while not all(status(node)["etcd"] for node in nodes):
            assert time.monotonic() < deadline, "the nodes did not see etcd again"
            time.sleep(0.1)
        assert wait_balanced(nodes) == before
    finally:
        for node in nodes:
            assert node.stop() == 0, "".join(node.log)


def test_http_cluster_shows_the_nodes_and_a_plain_broker_says_null(etcd: EtcdProcess) -> None:
    node, url = start_monitored("--cluster", etcd.endpoint, "--node-name", "solo", "--cluster-ttl", str(TTL))
    plain, plain_url = start_monitored()
    try:
        deadline = time.monotonic() + 20
        while (doc := get_json(url + "cluster")["cluster"])["unowned"]:
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        assert doc["node"] == "solo" and doc["etcd"] is True
        assert doc["members"]["solo"]["address"] == f"{node.host}:{node.port}"
        assert len(doc["members"]["solo"]["slots"]) == SLOTS == len(doc["owned"])
        assert get_json(plain_url + "cluster") == {"cluster": None}
    finally:
        assert node.stop() == 0, "".join(node.log)
        assert plain.stop() == 0


def test_a_joining_node_takes_only_slots_that_hold_no_topic(etcd: EtcdProcess) -> None:
    first = start_node(etcd.endpoint, "n0")
    nodes = [first]
    try:
        sub = connected(first)
        topics = [f"held{i}" for i in range(20)]
        for topic in topics:
            sub.subscribe(topic)
        nodes.append(start_node(etcd.endpoint, "n1"))
        owned = wait_balanced(nodes)
        assert {slot_of(topic.encode()) for topic in topics} <= owned["n0"]
        publisher = connected(nodes[1])
        for topic in topics:
            publisher.publish(topic, "x")
        assert sorted(sub.lines(20)) == sorted(f"MESSAGE {topic} x".encode() for topic in topics)
    finally:
        for node in nodes:
            assert node.stop() == 0, "".join(node.log)


@pytest.mark.slow
def test_ownership_changes_wait_while_etcd_is_down(etcd: EtcdProcess) -> None:
    nodes = {f"n{i}": start_node(etcd.endpoint, f"n{i}") for i in range(3)}
    try:
        before = wait_balanced(list(nodes.values()))
        etcd.stop()
        nodes.pop("n2").proc.send_signal(signal.SIGKILL)
        time.sleep(TTL / 3)
        # nobody can take the dead node's slots without etcd: the others serve what they had
        assert owned_by_each(list(nodes.values())) == {name: before[name] for name in nodes}
        etcd.start()
        after = wait_balanced(list(nodes.values()), timeout=TTL + 20)
        assert set().union(*after.values()) == set(range(SLOTS))
        assert after["n0"] >= before["n0"] and after["n1"] >= before["n1"]
    finally:
        for node in nodes.values():
            node.stop()


@pytest.mark.slow
def test_a_node_whose_lease_expired_while_etcd_runs_serves_nothing_when_it_wakes(etcd: EtcdProcess) -> None:
    """Fencing: n1 is frozen (SIGSTOP) past its lease while etcd runs, n0 takes its slots; when n1
    wakes it must not serve them, even before it hears from etcd: its own clock fences it."""
    nodes = [start_node(etcd.endpoint, f"n{i}") for i in range(2)]
    try:
        before = wait_balanced(nodes)
        topic = next(f"fenced{n}" for n in range(10_000) if slot_of(f"fenced{n}".encode()) in before["n1"])
        subscriber = connected(nodes[0])
        subscriber.subscribe(topic)  # forwarded to n1, its owner now
        nodes[1].proc.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + TTL + 20
            while len(status(nodes[0])["owned"]) < SLOTS:
                assert time.monotonic() < deadline, "n0 did not take the frozen node's slots"
                time.sleep(0.1)
            # accepted by the kernel, read as soon as n1 wakes: before it can hear from etcd
            early = nodes[1].client(timeout=10)
            early.send("CONNECT\nCLUSTER STATUS\n")
        finally:
            nodes[1].proc.send_signal(signal.SIGCONT)
        try:
            assert early.line().startswith(b"CONNECTED ")
            reply = early.line()
            assert reply.startswith(b"CLUSTER "), reply
            assert json.loads(reply[len(b"CLUSTER ") :])["owned"] == [], "n1 woke still serving slots"
        except (EOFError, ConnectionResetError):
            pass  # n1 closed its clients first, which it does when it stops serving
        # the subscriber's path through n1 was closed (n1 lost its lease); one on n0 gets what n1 forwards
        subscriber.close()
        subscriber = connected(nodes[0])
        subscriber.subscribe(topic)
        publisher = connected(nodes[1])
        publisher.publish(topic, "after")
        assert subscriber.line() == f"MESSAGE {topic} after".encode()
        wait_balanced(nodes, timeout=TTL + 30)  # n1 joins again with a new lease
    finally:
        for node in nodes:
            node.proc.send_signal(signal.SIGCONT)
            assert node.stop() == 0, "".join(node.log)
