"""Replication (``--replicas N``): a durable topic's messages are at its slot's successors before
``PUBLISHED``, so ``kill -9`` of the owner loses none of them, and they come back at the successor
with their consumer groups and delivery attempts; a node that comes back catches up. Real etcd,
real node processes, real kill -9 (docs/cluster.md, "Replication")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pigeon import Client
from pigeon._core import Broker
from pigeon.cluster import replication
from pigeon.cluster.etcd import EtcdProcess
from pigeon.cluster.replication import ACK, BATCH, ReplicaReceiver, ReplicaStore, split_records, successors_of
from pigeon.cluster.slots import owner_order, slot_of
from pigeon.testing import LineClient, ServerProcess, server_command
from tests.cluster_kit import TTL, connected, start_node, status, topic_owned_by, wait_balanced, wait_copies

pytestmark = pytest.mark.slow

NAMES = ("n0", "n1", "n2")


def _node(etcd: EtcdProcess, name: str, data: Path, *extra: str, replicas: int = 1) -> ServerProcess:
    data_dir = str(data / name)
    return start_node(etcd.endpoint, name, "--data-dir", data_dir, "--replicas", str(replicas), *extra)


def _cluster(etcd: EtcdProcess, data: Path, *extra: str, replicas: int = 1) -> dict[str, ServerProcess]:
    return {name: _node(etcd, name, data, *extra, replicas=replicas) for name in NAMES}


def _client(nodes: dict[str, ServerProcess], first: str, login: tuple[str, str] | None = None) -> Client:
    seeds = [(node.host, node.port) for node in nodes.values()]
    node = nodes[first]
    user, password = login or (None, None)
    return Client(
        node.host,
        node.port,
        reconnect=True,
        reconnect_timeout=60,
        timeout=30,
        seeds=seeds,
        user=user,
        password=password,
    )


def _successor(topic: str, owner: str, names: list[str]) -> str:
    return next(node for node in owner_order(slot_of(topic.encode()), names) if node != owner)


def _kill(node: ServerProcess) -> None:
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait()


def _stop(nodes: dict[str, ServerProcess]) -> None:
    for node in nodes.values():
        node.stop()


@pytest.mark.parametrize("fsync", ["everysec", "always"])
def test_a_killed_owners_backlog_is_served_by_its_successor(
    etcd: EtcdProcess, tmp_path: Path, fsync: str
) -> None:
    nodes = _cluster(etcd, tmp_path, "--fsync", fsync)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "jobs")
        publisher = connected(nodes["n1"])
        publisher.send("".join(f"PUBLISH {publisher.client_id} {topic} m{i}\n" for i in range(500)))
        assert publisher.lines(500) == [f"PUBLISHED {topic}".encode()] * 500
        publisher.close()
        nodes["n0"].proc.send_signal(signal.SIGKILL)
        nodes["n0"].proc.wait()
        live = {name: node for name, node in nodes.items() if name != "n0"}
        wait_balanced(list(live.values()), timeout=TTL + 30)
        consumer = _client(live, "n1")
        consumer.subscribe(topic)
        got = [consumer.next_message(timeout=TTL + 30).data for _ in range(500)]
        assert got == [f"m{i}".encode() for i in range(500)]
        consumer.close()
        successor = _successor(topic, "n0", list(NAMES))
        assert nodes[successor].wait_for_log("took over 500 replicated messages")
        for node in live.values():
            # the dead successor is retried until its lease expires, but warned about once
            assert sum("cannot reach n0 to keep replicas" in line for line in node.log) <= 1
            # and its snapshot is read once it answers, not at every attempt: at most the first one
            assert sum("snapshot of" in line and line.rstrip().endswith(" to n0") for line in node.log) <= 1
    finally:
        _stop(nodes)


class _Load:
    """A publisher (batches of pipelined publishes with unique bodies) and acknowledging consumers,
    each on its own thread and reconnecting client; what was confirmed, delivered and acked. With
    logins, ``publisher_login`` and ``consumer_login`` are the (user, password) of each."""

    def __init__(
        self,
        nodes: dict[str, ServerProcess],
        topic: str,
        publisher_on: str,
        consumers_on: list[str],
        publisher_login: tuple[str, str] | None = None,
        consumer_login: tuple[str, str] | None = None,
    ) -> None:
        self.topic = topic
        self.confirmed: set[bytes] = set()
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        self.stop_publishing = threading.Event()
        self.stop_consuming = threading.Event()
        self.whole_batches: list[tuple[float, float]] = []  # (sent, confirmed) of each batch confirmed whole
        self._publisher = _client(nodes, publisher_on, publisher_login)
        self._consumers = [_client(nodes, name, consumer_login) for name in consumers_on]
        for consumer in self._consumers:
            consumer.subscribe(topic, ack=True, prefetch=50)
        self._threads = [threading.Thread(target=self._publish)] + [
            threading.Thread(target=self._consume, args=(consumer,)) for consumer in self._consumers
        ]
        for thread in self._threads:
            thread.start()

    def _publish(self) -> None:
        n = 0
        while not self.stop_publishing.is_set():
            batch = [b"m%d" % i for i in range(n, n + 100)]
            n += 100
            sent = time.monotonic()
            try:
                refused = {r.index for r in self._publisher.publish_many(self.topic, batch)}
            except Exception:
                refused = set(range(len(batch)))
            with self.lock:
                self.confirmed.update(body for i, body in enumerate(batch) if i not in refused)
                if not refused:
                    self.whole_batches.append((sent, time.monotonic()))
            if refused:
                time.sleep(0.05)

    def _consume(self, consumer: Client) -> None:
        while not self.stop_consuming.is_set():
            try:
                message = consumer.next_message(timeout=0.5)
            except TimeoutError:
                continue
            except Exception:
                time.sleep(0.05)
                continue
            with self.lock:
                self.received.append(message.data)
            # a lost connection: the owner delivers it again (a duplicate)
            with contextlib.suppress(Exception):
                consumer.ack([message])

    def finish(self, timeout: float) -> tuple[int, int, int]:
        """Stop publishing, wait until every confirmed message came (or ``timeout``), stop:
        (confirmed, lost, duplicates)."""
        self.stop_publishing.set()
        self._threads[0].join(60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.confirmed <= set(self.received):
                    break
            time.sleep(0.2)
        time.sleep(1.0)  # late duplicates
        self.stop_consuming.set()
        for thread in self._threads[1:]:
            thread.join(60)
        for client in [self._publisher, *self._consumers]:
            client.close()
        with self.lock:
            lost = len(self.confirmed - set(self.received))
            duplicates = len(self.received) - len(set(self.received))
            return len(self.confirmed), lost, duplicates

    def recovered_after_kill(self, node: ServerProcess, log_of: ServerProcess) -> float:
        """``kill -9`` of ``node``; once a batch sent after the kill is confirmed whole, how long
        after the kill that was (``log_of``'s log tail in the failure message)."""
        node.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        node.proc.wait()
        deadline = killed + TTL + 60
        while True:
            assert time.monotonic() < deadline, f"publishing did not recover: {log_of.log[-20:]}"
            with self.lock:
                after = [done for sent, done in self.whole_batches if sent > killed]
            if after:
                return after[0] - killed
            time.sleep(0.05)


@pytest.mark.parametrize("fsync", ["everysec", "always"])
def test_a_successor_restarted_alone_after_the_whole_cluster_died_serves_what_it_held(
    etcd: EtcdProcess, tmp_path: Path, fsync: str
) -> None:
    """Every node is killed at once (a power cut) and only the successor of a busy topic comes
    back: it reads its replica of the owner's messages back from its data directory, and since etcd
    names it among the slot's copies, it takes the slot over with all of them. (Before, replica files
    were never read: it took the slot over with nothing.)"""
    nodes = _cluster(etcd, tmp_path, "--fsync", fsync)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "cut")
        successor = _successor(topic, "n0", list(NAMES))
        sent = [f"m{i}" for i in range(300)]
        _publish(nodes["n0"], topic, sent)
        wait_copies(lambda: status(nodes["n0"]), slot_of(topic.encode()), [successor])
        for node in nodes.values():
            _kill(node)
        nodes = {successor: _node(etcd, successor, tmp_path, "--fsync", fsync)}
        assert nodes[successor].wait_for_log("read back 300 replicated messages of 1 owners")
        assert nodes[successor].wait_for_log("took over 300 replicated messages", timeout=TTL + 30)
        assert _consume(nodes[successor], topic, len(sent)) == [body.encode() for body in sent]
        # taken over: the replica file no longer holds them (a later start must not bring them back)
        assert (tmp_path / successor / "replicas" / "n0.log").stat().st_size == 0
    finally:
        _stop(nodes)


@pytest.mark.parametrize("fsync", ["everysec", "no"])
def test_a_successors_file_is_synced_within_a_second_under_everysec(
    etcd: EtcdProcess, tmp_path: Path, fsync: str
) -> None:
    """Under everysec a successor syncs its replica files about once a second, as the owner syncs its
    log (before, only under always: a machine crash could lose whatever the kernel had not written
    back); under no, never. CLUSTER STATUS says what it holds and how many syncs it made."""
    nodes = _cluster(etcd, tmp_path, "--fsync", fsync)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "synced")
        successor = nodes[_successor(topic, "n0", list(NAMES))]
        _publish(nodes["n0"], topic, [f"m{i}" for i in range(100)])
        held = status(successor)["replicas"]
        assert (held["owners"], held["messages"]) == (1, 100) and held["file_bytes"] > 0, held
        deadline = time.monotonic() + 5
        while status(successor)["replicas"]["syncs"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (status(successor)["replicas"]["syncs"] > 0) == (fsync == "everysec")
    finally:
        _stop(nodes)


def test_kill_9_of_a_busy_owner_loses_no_confirmed_message(etcd: EtcdProcess, tmp_path: Path) -> None:
    nodes = _cluster(etcd, tmp_path)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "busy")
        load = _Load(nodes, topic, "n1", ["n1", "n2"])
        time.sleep(3)
        with load.lock:
            before = len(load.confirmed)
        assert before > 0
        recovered = load.recovered_after_kill(nodes["n0"], nodes["n1"])
        time.sleep(3)
        confirmed, lost, duplicates = load.finish(timeout=60)
        print(
            f"kill -9 of the owner under load: {confirmed} confirmed, {lost} lost, {duplicates} duplicates; "
            f"a batch sent after the kill was confirmed {recovered:.2f} s after it (TTL {TTL} s)"
        )
        assert lost == 0
    finally:
        _stop(nodes)


def test_kill_9_of_two_busy_owners_one_after_the_other_with_two_replicas_loses_nothing_confirmed(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    nodes = _cluster(etcd, tmp_path, replicas=2)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "busy")
        first, last = owner_order(slot_of(topic.encode()), list(NAMES))[1:]
        # the clients are on the node that outlives the others
        load = _Load(nodes, topic, last, [last, last])
        time.sleep(3)
        recovered = [load.recovered_after_kill(nodes["n0"], nodes[last])]
        time.sleep(3)  # the first successor serves the topic, and replicates it to the last node
        recovered.append(load.recovered_after_kill(nodes[first], nodes[last]))
        time.sleep(3)
        confirmed, lost, duplicates = load.finish(timeout=60)
        print(
            f"kill -9 of the owner, then of the new owner, under load with --replicas 2: {confirmed} "
            f"confirmed, {lost} lost, {duplicates} duplicates; a batch sent after each kill was confirmed "
            f"{recovered[0]:.2f} s and {recovered[1]:.2f} s after it (TTL {TTL} s)"
        )
        assert lost == 0
    finally:
        _stop(nodes)


def _consume(
    node: ServerProcess,
    topic: str,
    count: int,
    last: bool = True,
    group: str = "",
    tls: ssl.SSLContext | None = None,
) -> list[bytes]:
    """``count`` messages of ``topic`` (of its consumer ``group``) through ``node`` (over TLS with
    ``tls``), each acknowledged; with ``last``, nothing more comes (else the one delivered after
    them goes back when the client leaves)."""
    client = connected(node, timeout=TTL + 30, tls=tls)
    member = f" GROUP {group}" if group else ""
    reply = client.ask(f"SUBSCRIBE {client.client_id} {topic}{member} ACK PREFETCH 1")
    assert reply == f"SUBSCRIBED {topic}".encode()
    got = []
    for _ in range(count):
        fields = client.line().split(b" ", 4)
        assert fields[0] == b"DELIVER", fields
        got.append(fields[4])
        client.send(f"ACK {client.client_id} {fields[2].decode()}\n")
    assert not last or client.quiet(0.5), "more messages than expected"
    client.close()
    return got


def _publish(
    node: ServerProcess,
    topic: str,
    bodies: list[str],
    login: tuple[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    publisher = connected(node, login, tls=tls)
    publisher.send("".join(f"PUBLISH {publisher.client_id} {topic} {body}\n" for body in bodies))
    assert publisher.lines(len(bodies)) == [f"PUBLISHED {topic}".encode()] * len(bodies)
    publisher.close()


def test_a_returning_node_drops_its_stale_copies_and_catches_up_before_it_takes_over_again(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    nodes = _cluster(etcd, tmp_path)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "back")
        successor = _successor(topic, "n0", list(NAMES))
        third = next(name for name in NAMES if name not in ("n0", successor))
        _publish(nodes[third], topic, [f"a{i}" for i in range(200)])
        nodes["n0"].proc.send_signal(signal.SIGKILL)
        nodes["n0"].proc.wait()
        wait_balanced([nodes[successor], nodes[third]], timeout=TTL + 30)
        # half of the backlog is consumed at the successor; the other half keeps the topic there
        assert _consume(nodes[third], topic, 100, last=False) == [b"a%d" % i for i in range(100)]
        # n0 comes back: its log still holds all 200, which are stale now
        nodes["n0"] = _node(etcd, "n0", tmp_path)
        assert nodes["n0"].wait_for_log("dropping the messages of 1 topics")
        wait_balanced(list(nodes.values()))
        _publish(nodes[third], topic, [f"b{i}" for i in range(100)])
        # the topic's owner dies: n0, its successor now, has caught up and takes it over
        nodes[successor].proc.send_signal(signal.SIGKILL)
        nodes[successor].proc.wait()
        wait_balanced([nodes["n0"], nodes[third]], timeout=TTL + 30)
        got = _consume(nodes[third], topic, 200)
        assert got == [b"a%d" % i for i in range(100, 200)] + [b"b%d" % i for i in range(100)]
        assert nodes["n0"].wait_for_log("took over 200 replicated messages")
    finally:
        _stop(nodes)


def test_each_consumer_group_gets_its_messages_not_done_back_after_a_failover(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    nodes = _cluster(etcd, tmp_path)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "grouped")
        successor = _successor(topic, "n0", list(NAMES))
        third = next(name for name in NAMES if name not in ("n0", successor))
        # two groups, made by a first member that leaves: they keep the messages for --group-ttl
        for group in ("g1", "g2"):
            assert _consume(nodes[third], topic, 0, group=group) == []
        _publish(nodes[third], topic, [f"a{i}" for i in range(100)])
        # g1 gets 40 of them acknowledged (the 41st, out when its member leaves, goes back)
        assert _consume(nodes[third], topic, 40, last=False, group="g1") == [b"a%d" % i for i in range(40)]
        time.sleep(1.0)  # the owner's DONE records reach its successor (nothing waits for them)
        _kill(nodes["n0"])
        wait_balanced([nodes[successor], nodes[third]], timeout=TTL + 30)
        assert _consume(nodes[third], topic, 60, group="g1") == [b"a%d" % i for i in range(40, 100)]
        assert _consume(nodes[third], topic, 100, group="g2") == [b"a%d" % i for i in range(100)]
        # the topic's own subscribers had no copy: no group but these took the messages
        assert _consume(nodes[third], topic, 0) == []
        assert nodes[successor].wait_for_log("took over 160 replicated messages")
    finally:
        _stop(nodes)


def _stats(node: ServerProcess) -> dict[str, object]:
    """``STATS`` of one node's own core."""
    client = connected(node)
    reply = client.ask("STATS")
    client.close()
    assert reply.startswith(b"STATS "), reply
    return dict(json.loads(reply[len(b"STATS ") :]))


class _Acking(LineClient):
    """A client with one acknowledged subscription (prefetch 1): ``tag`` is its last delivery's."""

    tag = ""


def _acking(node: ServerProcess, topic: str) -> _Acking:
    """A client of ``node`` subscribed to ``topic`` with acknowledgements, one message at a time."""
    client = _Acking(node.host, node.port, TTL + 30)
    client.connect()
    assert (
        client.ask(f"SUBSCRIBE {client.client_id} {topic} ACK PREFETCH 1") == f"SUBSCRIBED {topic}".encode()
    )
    return client


def _delivery(client: _Acking) -> tuple[bytes, int]:
    """The next delivery's message and attempt (its tag in ``client.tag``)."""
    fields = client.line().split(b" ", 4)
    assert fields[0] == b"DELIVER", fields
    client.tag = fields[2].decode()
    return fields[4], int(fields[3])


def test_delivery_attempts_carry_over_a_failover_and_dead_lettering_counts_them(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    nodes = _cluster(etcd, tmp_path, "--max-deliveries", "3")
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "tries")
        successor = _successor(topic, "n0", list(NAMES))
        third = next(name for name in NAMES if name not in ("n0", successor))
        _publish(nodes[third], topic, ["x"])
        consumer = _acking(nodes[third], topic)
        assert _delivery(consumer) == (b"x", 1)
        consumer.send(f"NACK {consumer.client_id} {consumer.tag}\n")
        assert _delivery(consumer) == (b"x", 2)
        # the second NACK puts it off for long: it is NACKed twice and not out when the owner dies
        consumer.send(f"NACK {consumer.client_id} {consumer.tag} 600000\n")
        assert consumer.quiet(0.5)
        # y is out for delivery when the owner dies
        _publish(nodes[third], topic, ["y"])
        assert _delivery(consumer) == (b"y", 1)
        time.sleep(1.0)  # the owner's DELIVERED records reach its successor (nothing waits for them)
        _kill(nodes["n0"])
        consumer.close()
        wait_balanced([nodes[successor], nodes[third]], timeout=TTL + 30)
        consumer = _acking(nodes[third], topic)
        # delivered twice before: this is attempt 3, the last --max-deliveries allows
        assert _delivery(consumer) == (b"x", 3)
        consumer.send(f"NACK {consumer.client_id} {consumer.tag}\n")
        # x is dead-lettered rather than delivered a fourth time; y was out: this is its attempt 2
        assert _delivery(consumer) == (b"y", 2)
        consumer.send(f"ACK {consumer.client_id} {consumer.tag}\n")
        assert consumer.quiet(1.0), "more deliveries than expected"
        consumer.close()
        assert _stats(nodes[successor])["dead_lettered"] == 1
    finally:
        _stop(nodes)


def test_two_replicas_lose_nothing_confirmed_when_two_owners_die_one_after_the_other(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    nodes = _cluster(etcd, tmp_path, replicas=2)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "twice")
        first, second = owner_order(slot_of(topic.encode()), list(NAMES))[1:]
        _publish(nodes[second], topic, [f"a{i}" for i in range(200)])
        _kill(nodes["n0"])
        wait_balanced([nodes[first], nodes[second]], timeout=TTL + 30)
        # the first successor serves the topic; one other node is live: it is the only replica
        assert _consume(nodes[second], topic, 50, last=False) == [b"a%d" % i for i in range(50)]
        _publish(nodes[second], topic, [f"b{i}" for i in range(100)])
        time.sleep(1.0)  # the new owner's DONE records reach the last node (nothing waits for them)
        _kill(nodes[first])
        wait_balanced([nodes[second]], timeout=TTL + 30)
        # every message not done comes back once: the last node dropped its stale copies of n0's
        # messages when the first successor took them over
        got = _consume(nodes[second], topic, 250)
        assert got == [b"a%d" % i for i in range(50, 200)] + [b"b%d" % i for i in range(100)]
        assert nodes[second].wait_for_log("dropped 200 replicated messages of n0")
        assert nodes[second].wait_for_log("took over 250 replicated messages")
        # alone, with --replicas 2: PUBLISHED waits for its own log only
        _publish(nodes[second], topic, ["alone"])
    finally:
        _stop(nodes)


@pytest.mark.parametrize("replicas", [1, 2])
def test_published_waits_for_every_successor(etcd: EtcdProcess, tmp_path: Path, replicas: int) -> None:
    nodes = _cluster(etcd, tmp_path, replicas=replicas)
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "held")
        # the last of its successors: with --replicas 2 the first one confirms, this one cannot
        last = owner_order(slot_of(topic.encode()), list(NAMES))[replicas]
        publisher = connected(nodes["n0"])
        publisher.publish(topic, "first")  # the links to the successors are up
        nodes[last].proc.send_signal(signal.SIGSTOP)
        try:
            publisher.send(f"PUBLISH {publisher.client_id} {topic} second\n")
            # the owner has the message, but a successor cannot confirm it: no PUBLISHED yet
            assert publisher.quiet(1.0)
        finally:
            nodes[last].proc.send_signal(signal.SIGCONT)
        assert publisher.line() == f"PUBLISHED {topic}".encode()
        publisher.close()
    finally:
        _stop(nodes)


class _Pinger:
    """A thread that asks one node PING over and over: how many PONGs came."""

    def __init__(self, node: ServerProcess) -> None:
        self.pongs = 0
        self._client = node.client(timeout=60)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            assert self._client.ask("PING") == b"PONG"
            self.pongs += 1

    def stop(self) -> int:
        """Stop asking; how many PONGs came."""
        self._stop.set()
        self._thread.join(60)
        self._client.close()
        return self.pongs


@pytest.mark.parametrize("replicas", [1, 2])
def test_an_owner_serves_while_a_snapshot_is_read_and_the_snapshot_goes_first(
    etcd: EtcdProcess, tmp_path: Path, replicas: int
) -> None:
    """A node joins and becomes the successor of a slot whose owner holds a large log: the owner reads
    the snapshot off its loop (it answers meanwhile, and says how many commands it served), and what
    is published meanwhile reaches the new successor after the snapshot, so that after kill -9 of the
    owner the successor has every message, in order. With ``--replicas 2`` the new node is the first
    of the slot's two successors: its link's snapshot is read on the thread the same way while the
    other successor's link goes on."""
    # a lease long enough for the successor's take-over of 40 MB on its loop, on a loaded machine
    ttl = ("--cluster-ttl", "10")
    nodes = {name: _node(etcd, name, tmp_path, *ttl, replicas=replicas) for name in ("n0", "n1")}
    try:
        wait_balanced(list(nodes.values()))
        topic = next(
            f"big{n}"
            for n in range(10_000)
            if owner_order(slot_of(f"big{n}".encode()), list(NAMES))[:2] == ["n0", "n2"]
            and slot_of(f"big{n}".encode()) in status(nodes["n0"])["owned"]
        )
        body = "x" * 4000
        count = 10_000  # about 40 MB of log for the snapshot to read
        publisher = connected(nodes["n0"])

        def publish(first: int, last: int) -> None:
            lines = (f"PUBLISH {publisher.client_id} {topic} {i}-{body}\n" for i in range(first, last))
            publisher.send("".join(lines))

        for start in range(0, count, 1000):
            publish(start, start + 1000)
            assert publisher.lines(1000) == [f"PUBLISHED {topic}".encode()] * 1000
        pinger = _Pinger(nodes["n0"])
        nodes["n2"] = _node(etcd, "n2", tmp_path, *ttl, replicas=replicas)
        live = 200  # published while the snapshot is (most likely) being read: they must come after it
        publish(count, count + live)
        sent = nodes["n0"].wait_for_log(" bytes) to n2\n", timeout=120)
        pongs = pinger.stop()
        served = int(sent.split("while ", 1)[1].split(" ", 1)[0])
        print(f"the snapshot: {sent.strip()}; {pongs} PONGs in all")
        assert served > 0, sent  # on the loop, nothing could run between its start and its end
        assert publisher.lines(live) == [f"PUBLISHED {topic}".encode()] * live
        # n2 confirmed its snapshot and etcd names it (before that, n1 would take the slot over: it
        # still holds every message, tests/test_cluster_node_users.py)
        slot = slot_of(topic.encode())
        wait_copies(lambda: status(nodes["n0"]), slot, owner_order(slot, list(NAMES))[1 : 1 + replicas])
        nodes["n0"].proc.send_signal(signal.SIGKILL)
        nodes["n0"].proc.wait()
        took = nodes["n2"].wait_for_log(f"took over {count + live} replicated messages", timeout=70)
        print(f"the take-over: {took.strip()}")
        got = _consume(nodes["n2"], topic, count + live)
        assert [int(message.split(b"-", 1)[0]) for message in got] == list(range(count + live))
    finally:
        _stop(nodes)


class _Proxy:
    """A TCP proxy on loopback to a node (the address it advertises, so other nodes reach it through
    here): each connection waits until ``target`` (the node's port) is set and ``targeted``, then
    ``_connected`` starts its pumps. ``cut()`` breaks every connection made so far."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.target = 0
        self.targeted = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.targeted.wait()
            server = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, server]
            self._connected(client, server)

    def _connected(self, client: socket.socket, server: socket.socket) -> None:
        raise NotImplementedError

    @staticmethod
    def _end(source: socket.socket, sink: socket.socket) -> None:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Break every connection made so far."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        self.cut()


class _StallingProxy(_Proxy):
    """A proxy (``_Proxy``) where, once ``stalling`` is set, a new connection passes its first line
    to the node and nothing after it (the node's answers pass: ``answered`` is set at the first)."""

    def __init__(self) -> None:
        self.stalling = False
        self.first_line_passed = threading.Event()
        self.answered = threading.Event()
        super().__init__()

    def _connected(self, client: socket.socket, server: socket.socket) -> None:
        stall = self.stalling
        threading.Thread(target=self._pump, args=(client, server, stall), daemon=True).start()
        answered = self.answered if stall else None
        threading.Thread(target=self._pump, args=(server, client, False, answered), daemon=True).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, stall: bool, passed: threading.Event | None = None
    ) -> None:
        held = b""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not stall:
                    sink.sendall(data)
                    if passed is not None:
                        passed.set()
                elif not self.first_line_passed.is_set():
                    held += data
                    if b"\n" in held:
                        sink.sendall(held[: held.index(b"\n") + 1])
                        self.first_line_passed.set()
        self._end(source, sink)


def test_a_successor_whose_link_broke_keeps_its_copy_until_the_new_snapshot_comes(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    """The link from the owner to its only successor breaks; the owner connects again and the
    successor answers, but the snapshot does not come (a proxy holds it back); the owner dies. The
    successor takes the slot over with every confirmed message: it kept its copy for the snapshot
    to replace (it emptied it at the new connection, and took over nothing)."""
    proxy = _StallingProxy()
    nodes = {"n0": _node(etcd, "n0", tmp_path)}
    try:
        nodes["n1"] = _node(etcd, "n1", tmp_path, "--advertise", f"127.0.0.1:{proxy.port}")
        proxy.target = nodes["n1"].port
        proxy.targeted.set()
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "kept")
        sent = [f"m{i}" for i in range(100)]
        _publish(nodes["n0"], topic, sent)  # confirmed by n1, through the proxy
        proxy.stalling = True
        proxy.cut()
        assert proxy.first_line_passed.wait(30)  # CLUSTER REPLICATE n0
        assert proxy.answered.wait(30)  # n1 took the new link (its snapshot is held back by the proxy)
        nodes["n0"].proc.send_signal(signal.SIGKILL)
        nodes["n0"].proc.wait()
        assert nodes["n1"].wait_for_log("took over 100 replicated messages", timeout=TTL + 30)
        assert _consume(nodes["n1"], topic, len(sent)) == [body.encode() for body in sent]
    finally:
        proxy.close()
        _stop(nodes)


class _FreezingProxy(_Proxy):
    """A proxy (``_Proxy``) that passes everything both ways until ``freeze(first_line)``, after
    which what a connection that began with ``first_line`` sends the node is held back (the node's
    answers still pass)."""

    def __init__(self) -> None:
        self._frozen: set[bytes] = set()
        super().__init__()

    def freeze(self, first_line: bytes) -> None:
        self._frozen.add(first_line)

    def _connected(self, client: socket.socket, server: socket.socket) -> None:
        threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, to_node: bool) -> None:
        first = b""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if to_node and b"\n" not in first:
                    first += data
                if not (to_node and first.split(b"\n", 1)[0] in self._frozen):
                    sink.sendall(data)
        self._end(source, sink)


def test_the_other_successors_keep_their_copies_until_the_new_owners_successors_hold_what_it_put_back(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    """With --replicas 2 the owner n0 dies and n1 takes its slot over, putting its messages back into
    its log; their records never reach n2 (a proxy holds back n1's link to it), and n1 dies too. n2
    takes the slot with every message: it kept n0's copy, as etcd named none of n1's successors for
    the slot yet. (Before, n2 dropped that copy once etcd showed n1 serving the slot, and the two
    failures lost all of them.)"""
    proxy = _FreezingProxy()
    nodes = {name: _node(etcd, name, tmp_path, replicas=2) for name in ("n0", "n1")}
    try:
        nodes["n2"] = _node(etcd, "n2", tmp_path, "--advertise", f"127.0.0.1:{proxy.port}", replicas=2)
        proxy.target = nodes["n2"].port
        proxy.targeted.set()
        owned = wait_balanced(list(nodes.values()))
        topic = next(
            f"cut{n}"
            for n in range(10_000)
            if slot_of(f"cut{n}".encode()) in owned["n0"]
            and owner_order(slot_of(f"cut{n}".encode()), list(NAMES)) == list(NAMES)
        )
        slot = slot_of(topic.encode())
        sent = [f"m{i}" for i in range(300)]
        _publish(nodes["n0"], topic, sent)
        wait_copies(lambda: status(nodes["n0"]), slot, ["n1", "n2"])
        proxy.freeze(b"CLUSTER REPLICATE n1")
        _kill(nodes["n0"])
        assert nodes["n1"].wait_for_log("took over 300 replicated messages", timeout=TTL + 30)
        # n2 has read etcd since n1 took the slot (it drops the copies it may drop on that read)
        deadline = time.monotonic() + 30
        while slot not in status(nodes["n2"])["members"].get("n1", {}).get("slots", []):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _kill(nodes["n1"])
        assert nodes["n2"].wait_for_log("took over 300 replicated messages", timeout=TTL + 30)
        assert _consume(nodes["n2"], topic, len(sent)) == [body.encode() for body in sent]
    finally:
        proxy.close()
        _stop({name: node for name, node in nodes.items() if node.proc.poll() is None})


def test_min_replicas_refuses_publishes_and_holds_published_while_too_few_successors_are_live(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    """With ``--min-replicas 1``, an owner whose only successor dies neither confirms what that
    successor had not confirmed (it would be confirmed with the owner's copy alone) nor takes new
    publishes (ERROR NOT_ENOUGH_REPLICAS, retryable); once a successor is back and has the
    message from its snapshot, the held PUBLISHED comes and publishes are taken again."""
    guarded = ("--min-replicas", "1")
    nodes = {name: _node(etcd, name, tmp_path, *guarded) for name in ("n0", "n1")}
    try:
        owned = wait_balanced(list(nodes.values()))
        topic = topic_owned_by(owned, "n0", "guarded")
        publisher = connected(nodes["n0"])
        publisher.publish(topic, "first")
        nodes["n1"].proc.send_signal(signal.SIGSTOP)
        publisher.send(f"PUBLISH {publisher.client_id} {topic} second\n")
        # n1's lease expired: n0 took its slots
        assert nodes["n0"].wait_for_log(f"took {len(owned['n1'])} slots, handed 0", timeout=TTL + 30)
        assert publisher.quiet(1.0), "PUBLISHED with no live successor holding the message"
        refused = connected(nodes["n0"])
        assert refused.ask(f"PUBLISH {refused.client_id} {topic} third") == (
            b"ERROR NOT_ENOUGH_REPLICAS only 0 successors live, --min-replicas is 1"
        )
        _kill(nodes["n1"])
        nodes["n1"] = _node(etcd, "n1", tmp_path, *guarded)
        publisher.sock.settimeout(TTL + 30)
        assert publisher.line() == f"PUBLISHED {topic}".encode()  # n1 is back and holds second
        deadline = time.monotonic() + 30
        while (answer := refused.ask(f"PUBLISH {refused.client_id} {topic} fourth")) != (
            f"PUBLISHED {topic}".encode()
        ):
            assert answer.startswith(b"ERROR NOT_ENOUGH_REPLICAS "), answer
            assert time.monotonic() < deadline, "publishes still refused with a successor back"
            time.sleep(0.1)
        errors = _stats(nodes["n0"])["errors"]
        assert isinstance(errors, dict) and errors["not_enough_replicas"] >= 1
        publisher.close()
        refused.close()
        assert _consume(nodes["n0"], topic, 3) == [b"first", b"second", b"fourth"]
    finally:
        nodes["n1"].proc.send_signal(signal.SIGCONT)
        _stop(nodes)


def test_replicas_need_a_cluster_and_a_data_dir_and_with_users_a_node_user(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("")
    cluster = ["--cluster", "etcd://127.0.0.1:1"]
    refused = [
        (["--replicas", "1"], 2, "--replicas needs --cluster and --data-dir"),
        (["--replicas", "1", *cluster], 2, "--replicas needs --cluster and --data-dir"),
        (
            ["--replicas", "1", *cluster, "--data-dir", str(tmp_path), "--users", str(users)],
            1,
            "--replicas with --users needs --node-user",
        ),
        (["--replicas", "-1"], 2, "--replicas: must be 0 or more, not -1"),
        (["--min-replicas", "1"], 2, "--min-replicas cannot be more than --replicas"),
    ]
    for args, code, message in refused:
        done = subprocess.run(
            [*server_command(), *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert (done.returncode, message in done.stderr) == (code, True), (args, done.stderr)


class _Core:
    """A real durable core in this process, its connections fed by the test: the log records it
    writes, and what each connection is sent."""

    def __init__(self) -> None:
        self.broker = Broker(durable=True)
        self.written: list[bytes] = []
        self.broker.on_log = lambda data, new_segment: self.written.append(bytes(data))
        self.broker.on_sync = lambda position: None
        self.output: dict[int, list[bytes]] = {}
        self.ids: dict[int, bytes] = {}

    def connect(self) -> int:
        """A new connection, connected: its handle (its client id in ``ids``)."""
        sent: list[bytes] = []
        handle = self.broker.open(lambda data: sent.append(bytes(data)), "test")
        self.output[handle] = sent
        self.feed(handle, b"CONNECT\n")
        self.ids[handle] = self.lines(handle)[0].split()[1]
        return handle

    def feed(self, handle: int, commands: bytes) -> None:
        """Commands from ``handle``, processed and flushed."""
        self.broker.feed(handle, commands)
        self.broker.flush()

    def lines(self, handle: int) -> list[bytes]:
        """What ``handle`` was sent so far (and not read before), line by line."""
        data = b"".join(self.output[handle])
        self.output[handle].clear()
        return data.splitlines()

    def records(self) -> bytes:
        """Every log record written so far."""
        return b"".join(self.written)


def _core_records(commands: list[bytes]) -> bytes:
    """The log records a real durable core writes for ``commands``, fed by one connection each."""
    core = _Core()
    for command in commands:
        core.feed(core.connect(), command)
    return core.records()


def _put_back(taken: list[bytes]) -> _Core:
    """A core that took over ``taken`` (``ReplicaStore.take``'s records)."""
    core = _Core()
    for records in taken:
        core.broker.take_over(records)
    return core


def _drained(core: _Core, topic: bytes) -> list[bytes]:
    """Every message a plain subscriber of ``topic`` gets from ``core``."""
    handle = core.connect()
    core.feed(handle, b"SUBSCRIBE %s %s\n" % (core.ids[handle], topic))
    return [line.split(b" ", 2)[2] for line in core.lines(handle) if line.startswith(b"MESSAGE ")]


def test_a_replica_keeps_the_messages_not_done_and_gives_each_slot_its_own_in_order(tmp_path: Path) -> None:
    topics = [f"t{n}" for n in range(50)]
    a, b = (next(t for t in topics if slot_of(t.encode()) % 2 == parity) for parity in (0, 1))
    publishes = b"".join(
        b"PUBLISH c1 %s %s%d\n" % (t.encode(), t.encode(), i) for i in range(5) for t in (a, b)
    )
    # a plain subscriber takes a's messages: they are done (a DONE record)
    records = _core_records([publishes + b"SUBSCRIBE c1 %s\n" % a.encode()])
    store = ReplicaStore(tmp_path, "no")
    try:
        store.open("owner")
        store.keep("owner", records)
        assert store.take({slot_of(a.encode())}, "me") == []
        assert store.take({slot_of(b.encode())}, "owner") == []  # never its own messages
        taken = store.take({slot_of(b.encode())}, "me")
        assert _drained(_put_back(taken), b.encode()) == [b"%s%d" % (b.encode(), i) for i in range(5)]
        assert store.take({slot_of(b.encode())}, "me") == []  # taken once
    finally:
        store.close()


def _in_two_slots(first: str, second: str) -> tuple[str, str]:
    """Two topics, named from ``first`` and ``second``, in two different slots."""
    return (
        next(f"{first}{n}" for n in range(50) if slot_of(f"{first}{n}".encode()) % 2 == 0),
        next(f"{second}{n}" for n in range(50) if slot_of(f"{second}{n}".encode()) % 2 == 1),
    )


def test_an_owner_sends_each_successor_the_publishes_of_its_slots_and_every_done(tmp_path: Path) -> None:
    x, y = _in_two_slots("x", "y")
    # x's message is taken by a plain subscriber (done); y's waits
    records = _core_records([f"PUBLISH c1 {x} one\nPUBLISH c1 {y} two\nSUBSCRIBE c1 {x}\n".encode()])
    successors = {slot_of(x.encode()): ("n1",), slot_of(y.encode()): ("n2", "n1")}
    parts = split_records(records, lambda slot: successors.get(slot, ()), ["n1", "n2"])
    everything = {slot_of(x.encode()), slot_of(y.encode())}
    got = {}
    for node in ("n1", "n2"):
        store = ReplicaStore(tmp_path / node, "no")
        try:
            store.open("owner")
            store.keep("owner", b"".join(parts[node]))
            core = _put_back(store.take(everything, "me"))
            got[node] = (_drained(core, x.encode()), _drained(core, y.encode()))
        finally:
            store.close()
    # n1 got x's message and its DONE, and y's (it is y's second successor)
    assert got == {"n1": ([], [b"two"]), "n2": ([], [b"two"])}


@pytest.mark.parametrize("piece", [1, 7, 100, 1 << 20])
def test_a_successor_confirms_each_read_with_its_last_whole_batch_however_the_bytes_arrive(
    tmp_path: Path, piece: int
) -> None:
    records = _core_records([b"".join(b"PUBLISH c1 t m%d\n" % i for i in range(30))])
    # (records, the owner's position after them); a batch may be empty
    batches = [(b"", 1000), (records, 2000), (b"", 3000)]
    stream, ends = b"", []  # ends: where each batch ends in the stream
    for chunk, position in batches:
        stream += BATCH.pack(len(chunk), position) + chunk
        ends.append(len(stream))
    store = ReplicaStore(tmp_path, "no")
    replies: list[bytes] = []
    receiver = ReplicaReceiver(store, "owner", replies.append, lambda: None)
    try:
        for start in range(0, len(stream), piece):
            read = stream[start : start + piece]
            completed = [
                position
                for end, (_, position) in zip(ends, batches, strict=True)
                if start < end <= start + piece
            ]
            before = len(replies)
            receiver.take(read)
            assert [ACK.unpack(reply)[0] for reply in replies[before:]] == completed[-1:]
        assert _drained(_put_back(store.take({slot_of(b"t")}, "me")), b"t") == [b"m%d" % i for i in range(30)]
    finally:
        store.close()


def test_a_successor_keeps_its_copy_until_the_owners_next_snapshot_replaces_it(tmp_path: Path) -> None:
    """A new connection from the owner (its link broke) empties nothing until its first batch, the
    owner's whole snapshot, has come: that replaces the copy. (The copy was emptied at the new
    connection: an owner that died before its snapshot arrived left its successor with nothing.)"""
    before = _core_records([b"".join(b"PUBLISH c1 t m%d\n" % i for i in range(10))])
    owner = _Core()  # the owner after the break: what its snapshot holds, then a live record
    owner.feed(owner.connect(), b"".join(b"PUBLISH c1 t n%d\n" % i for i in range(3)))
    after = owner.records()
    owner.feed(owner.connect(), b"PUBLISH c2 u live\n")
    live = owner.records()[len(after) :]
    store = ReplicaStore(tmp_path, "no")
    try:
        first = ReplicaReceiver(store, "owner", lambda reply: None, lambda: None)
        first.take(BATCH.pack(len(before), 100) + before)
        assert len(store.messages["owner"]) == 10
        second = ReplicaReceiver(store, "owner", lambda reply: None, lambda: None)
        assert len(store.messages["owner"]) == 10  # the owner may die now: the copy is whole
        second.take(BATCH.pack(len(after), 200) + after + BATCH.pack(len(live), 300) + live)
        assert len(store.messages["owner"]) == 4
        core = _put_back(store.take({slot_of(b"t"), slot_of(b"u")}, "me"))
        assert _drained(core, b"t") == [b"n0", b"n1", b"n2"]
        assert _drained(core, b"u") == [b"live"]
    finally:
        store.close()


def _received(store: ReplicaStore, owner: str, *batches: bytes) -> None:
    """``batches`` (records each) through a new connection from ``owner``, on an event loop, until
    the store confirmed them (under --fsync always, once synced)."""

    async def receive() -> None:
        replies: list[bytes] = []
        receiver = ReplicaReceiver(store, owner, replies.append, lambda: None)
        receiver.take(b"".join(BATCH.pack(len(records), n) + records for n, records in enumerate(batches)))
        while not replies:
            await asyncio.sleep(0.001)

    asyncio.run(receive())


def _loaded(directory: Path) -> tuple[tuple[int, int], ReplicaStore]:
    """A store that read back ``directory``'s files (as a start does), and what ``load`` said."""
    store = ReplicaStore(directory, "no")
    return store.load(), store


@pytest.mark.parametrize("fsync", ["everysec", "always"])
def test_a_successors_file_is_read_back_at_a_start_with_a_torn_record_cut_off(
    tmp_path: Path, fsync: str
) -> None:
    records = _core_records([b"".join(b"PUBLISH c1 t m%d\n" % i for i in range(10))])
    more = _core_records([b"PUBLISH c1 t late\n"])
    store = ReplicaStore(tmp_path, fsync)
    _received(store, "127.0.0.1:4331", records)
    store.close()
    path = tmp_path / "127.0.0.1%3A4331.log"
    assert path.read_bytes() == records
    with path.open("ab") as f:
        f.write(more[: len(more) // 2])  # the run was killed mid-write
    (tmp_path / "127.0.0.1%3A4331.log.new.7").write_bytes(b"half written anew")
    (counted, store) = _loaded(tmp_path)
    try:
        assert counted == (10, 1)
        assert path.read_bytes() == records  # the torn record cut off
        assert not (tmp_path / "127.0.0.1%3A4331.log.new.7").exists()
        taken = store.take({slot_of(b"t")}, "me")
        assert _drained(_put_back(taken), b"t") == [b"m%d" % i for i in range(10)]
    finally:
        store.close()


def test_a_snapshot_replaces_the_successors_file_too(tmp_path: Path) -> None:
    """What a start reads back is the copy as memory held it: the owner's last snapshot and what
    came after, not what that snapshot replaced."""
    before = _core_records([b"".join(b"PUBLISH c1 t m%d\n" % i for i in range(10))])
    after = _core_records([b"PUBLISH c1 t n0\nPUBLISH c1 t n1\n"])
    store = ReplicaStore(tmp_path, "always")
    try:
        _received(store, "owner", before)
        store.open("owner")  # the owner's next connection: its snapshot has not come yet
        assert (tmp_path / "owner.log").read_bytes() == before
        _received(store, "owner", after)
    finally:
        store.close()
    assert [path.name for path in tmp_path.iterdir()] == ["owner.log"]  # each written anew, renamed over it
    (counted, store) = _loaded(tmp_path)
    try:
        assert counted == (2, 1)
        assert _drained(_put_back(store.take({slot_of(b"t")}, "me")), b"t") == [b"n0", b"n1"]
    finally:
        store.close()


def test_a_successors_file_stays_bounded_while_its_messages_are_never_all_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One message is never done while thousands pass (published, delivered, done): the file is
    written anew from what is left whenever it grows REWRITE_RATIO times past it (it only grew: it
    was emptied only when nothing was left), and reads back the same."""
    monkeypatch.setattr(replication, "REWRITE_MIN", 16 << 10)
    core = _Core()
    subscriber = core.connect()
    core.feed(subscriber, b"SUBSCRIBE %s t\n" % core.ids[subscriber])
    publisher = core.connect()
    core.feed(publisher, b"PUBLISH %s stuck waits\n" % core.ids[publisher])
    store = ReplicaStore(tmp_path, "no")
    path = tmp_path / "owner.log"
    largest = 0
    try:
        store.open("owner")
        store.keep("owner", core.records())
        for n in range(300):
            core.written.clear()
            core.feed(
                publisher,
                b"".join(b"PUBLISH %s t m%d\n" % (core.ids[publisher], n * 10 + i) for i in range(10)),
            )
            store.keep("owner", core.records())
            largest = max(largest, path.stat().st_size)
        assert len(store.messages["owner"]) == 1
        assert largest <= (16 << 10) + len(core.records())
    finally:
        store.close()
    (counted, store) = _loaded(tmp_path)
    try:
        assert counted == (1, 1)
        assert _drained(_put_back(store.take({slot_of(b"stuck")}, "me")), b"stuck") == [b"waits"]
    finally:
        store.close()


def test_a_copy_read_back_keeps_only_the_slots_etcd_still_names_this_node_for(tmp_path: Path) -> None:
    a, b = _in_two_slots("a", "b")
    records = _core_records([f"PUBLISH c1 {a} one\nPUBLISH c1 {b} two\n".encode()])
    store = ReplicaStore(tmp_path, "no")
    store.open("n0")
    store.keep("n0", records)
    store.close()
    (counted, store) = _loaded(tmp_path)
    try:
        assert counted == (2, 1)
        # a's slot: n0 recorded this node (n0 died with it); b's: n0 went on without it
        copies = {slot_of(a.encode()): ("n0", ("n2", "me")), slot_of(b.encode()): ("n0", ("n2",))}
        store.forget_unrecorded(copies, "me")
        core = _put_back(store.take({slot_of(a.encode()), slot_of(b.encode())}, "me"))
        assert (_drained(core, a.encode()), _drained(core, b.encode())) == ([b"one"], [])
    finally:
        store.close()
    assert (tmp_path / "n0.log").stat().st_size == 0  # nothing left: the file says so too


def test_the_successors_of_a_slot_are_the_next_live_members_in_its_order() -> None:
    names = ["n0", "n1", "n2", "n3"]
    for slot in range(20):
        order = owner_order(slot, names)
        owner = order[0]
        assert successors_of(slot, owner, names, 1) == tuple(order[1:2])
        assert successors_of(slot, owner, names, 2) == tuple(order[1:3])
        # fewer live members than replicas: every other live one
        assert successors_of(slot, owner, names, 5) == tuple(order[1:])
        assert successors_of(slot, owner, [owner], 2) == ()


def test_a_taken_over_message_keeps_its_group_and_its_attempt_and_so_does_the_successors_log(
    tmp_path: Path,
) -> None:
    owner = _Core()
    g1, g2, publisher = owner.connect(), owner.connect(), owner.connect()
    owner.feed(g1, b"SUBSCRIBE c1 t GROUP g1 ACK PREFETCH 1\n")
    owner.feed(g2, b"SUBSCRIBE c2 t GROUP g2 ACK PREFETCH 1\n")
    owner.feed(publisher, b"PUBLISH c3 t m0\nPUBLISH c3 t m1\nPUBLISH c3 t m2\n")
    # g1 NACKs m0 twice: it is out for delivery at attempt 3; g2 acks m0 and m1 and holds m2
    assert [owner.ids[g1], owner.ids[g2], owner.ids[publisher]] == [b"c1", b"c2", b"c3"]
    owner.feed(g1, b"NACK c1 1\n")
    owner.feed(g1, b"NACK c1 2\n")
    owner.feed(g2, b"ACK c2 1\n")
    owner.feed(g2, b"ACK c2 2\n")
    assert owner.lines(g1)[-1] == b"DELIVER t 3 3 m0"
    assert owner.lines(g2)[-1] == b"DELIVER t 3 1 m2"
    store = ReplicaStore(tmp_path, "no")
    try:
        store.open("owner")
        store.keep("owner", b"".join(split_records(owner.records(), lambda slot: ("me",), ["me"])["me"]))
        taken = store.take(set(range(256)), "me")
    finally:
        store.close()
    successor = _put_back(taken)

    def members(core: _Core) -> tuple[list[bytes], list[bytes]]:
        """What a new member of g1 and one of g2 get."""
        a, b = core.connect(), core.connect()
        core.feed(a, b"SUBSCRIBE %s t GROUP g1 ACK\n" % core.ids[a])
        core.feed(b, b"SUBSCRIBE %s t GROUP g2 ACK\n" % core.ids[b])
        return core.lines(a), core.lines(b)

    # each group gets its messages not done, each once, with its attempt (+1 when it was out)
    expected = (
        [b"SUBSCRIBED t", b"DELIVER t 1 4 m0", b"DELIVER t 2 1 m1", b"DELIVER t 3 1 m2"],
        [b"SUBSCRIBED t", b"DELIVER t 1 2 m2"],
    )
    assert members(successor) == expected
    # the successor's own log holds them with their groups and attempts: a restart of it brings
    # them back the same (the members above left without acking: one more attempt each)
    restarted = _Core()
    log = successor.records()
    restarted.broker.recover_segment()
    assert restarted.broker.recover(log) == (len(log), None)
    restarted.broker.recover_scanned()
    assert restarted.broker.recover_restore(log, 1 << 20) == (len(log), None)
    restarted.broker.recover_finish()
    assert members(restarted) == (
        [b"SUBSCRIBED t", b"DELIVER t 1 5 m0", b"DELIVER t 2 2 m1", b"DELIVER t 3 2 m2"],
        [b"SUBSCRIBED t", b"DELIVER t 1 3 m2"],
    )


def test_a_take_over_checks_the_records_as_a_restore_checks_a_sealed_segment() -> None:
    """Handed-over records are checked as a start checks a sealed segment of its own log: the scan
    checks every record's length and fields (damage there: nothing is put back), and leaves the
    checksums of the PUBLISH records to the restore, which checks each before its message goes back
    (a mismatch: the messages before it are back, none after it, and the error says where)."""
    records = _core_records([b"".join(b"PUBLISH c1 t m%d\n" % i for i in range(3))])
    starts = [0]
    while starts[-1] < len(records):
        starts.append(starts[-1] + 8 + int.from_bytes(records[starts[-1] : starts[-1] + 4], "little"))
    assert len(starts) == 4  # three PUBLISH records, and the end
    damaged = bytearray(records)
    damaged[starts[2] - 1] ^= 0xFF  # the last byte of the second message: its checksum no longer matches
    core = _Core()
    with pytest.raises(ValueError) as raised:
        core.broker.take_over(bytes(damaged))
    assert str(raised.value) == (
        f"a record whose checksum does not match at offset {starts[1]}: messages put back before it: 1, "
        "none after it"
    )
    assert _drained(core, b"t") == [b"m0"]
    core = _Core()
    with pytest.raises(ValueError, match=f"a record cut short at offset {starts[2]}"):
        core.broker.take_over(records[: starts[3] - 1])
    assert _drained(core, b"t") == []
    core = _Core()
    assert core.broker.take_over(records) == 3
    assert _drained(core, b"t") == [b"m0", b"m1", b"m2"]
