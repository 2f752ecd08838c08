"""What a node does with its clients when a topic's owner does not answer the node's connection (its
address drops every SYN, as behind a firewall or a cut cable) or refuses it."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pigeon.cluster.etcd import EtcdProcess
from pigeon.cluster.router import QUEUED_MAX, UNROUTED_MAX
from pigeon.testing import LineClient, ServerProcess
from tests.cluster_kit import (
    TTL,
    UnansweredAddress,
    connected,
    start_node,
    status,
    topic_owned_by,
    wait_balanced,
)
from tests.test_security_wire import USERS, users_toml

pytestmark = pytest.mark.slow


Unanswered = tuple[dict[str, ServerProcess], UnansweredAddress, dict[str, set[int]]]


@pytest.fixture
def unanswered_n2(etcd: EtcdProcess) -> Iterator[Unanswered]:
    """Nodes n0, n1 and n2, where n2 advertises an ``UnansweredAddress``; and who serves which slots."""
    unanswered = UnansweredAddress()
    nodes = {f"n{i}": start_node(etcd.endpoint, f"n{i}") for i in range(2)}
    nodes["n2"] = start_node(etcd.endpoint, "n2", "--advertise", unanswered.address)
    try:
        yield nodes, unanswered, wait_balanced(list(nodes.values()))
    finally:
        unanswered.close()
        for node in nodes.values():
            node.stop()


def test_a_client_whose_node_is_still_connecting_to_an_owner_that_left_is_closed(
    unanswered_n2: Unanswered,
) -> None:
    """n2 advertises an address that never answers a connection (``UnansweredAddress``). A publish
    through n0 to a topic of n2's waits while n0 tries to connect; once n2 is killed and its lease
    runs out, n0 gives up that attempt and closes the client, which can then publish through n0 to
    the new owner (before, the client waited until the kernel gave up connecting: over two minutes)."""
    nodes, _, owned = unanswered_n2
    topic = topic_owned_by(owned, "n2", "unreachable")
    client = connected(nodes["n0"])
    client.send(f"PUBLISH {client.client_id} {topic} lost")
    client.sock.settimeout(1)
    with pytest.raises(TimeoutError):
        client.line()  # n0 is still connecting to n2
    nodes.pop("n2").proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert client.at_eof(timeout=TTL + 15), "n0 kept the client waiting on a node that left"
    closed = time.monotonic() - killed
    print(f"the client was closed {closed:.2f} s after its owner was killed (TTL {TTL} s)")
    client.close()
    wait_balanced(list(nodes.values()), timeout=TTL + 20)
    again = connected(nodes["n0"])
    again.publish(topic, "served")
    again.close()


def _sent_until_held(publisher: LineClient, data: bytes, timeout: float, kept: int) -> int:
    """Send ``data`` until ``timeout`` passes with nothing taken (the node stopped reading the client)
    and return the bytes that got in: they must leave more than ``kept`` unsent (what got in is in the
    kernel's buffers and at most ``kept`` of the node's memory, not all)."""
    publisher.sock.settimeout(timeout)
    sent = 0
    with pytest.raises(TimeoutError):
        while sent < len(data):
            sent += publisher.sock.send(data[sent : sent + (1 << 16)])
    print(f"the client got {sent} of {len(data)} bytes in before the node stopped reading it")
    assert sent < len(data) - kept
    return sent


def _all_through(
    unanswered_n2: Unanswered,
    publisher: LineClient,
    rest: bytes,
    replies: int,
    subscriber: LineClient,
    deliveries: int,
) -> tuple[list[bytes], list[bytes]]:
    """Let the connections to n2 through, send the ``rest`` of the publisher's commands meanwhile, and
    return its ``replies`` replies and the subscriber's ``deliveries`` lines."""
    nodes, unanswered, _ = unanswered_n2
    unanswered.forward_to(nodes["n2"].port)
    subscriber.sock.settimeout(30)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(subscriber.lines(deliveries)))
    reader.start()
    publisher.sock.settimeout(30)
    sender = threading.Thread(target=publisher.sock.sendall, args=(rest,))
    sender.start()
    answers = publisher.lines(replies)
    reader.join(60)
    sender.join()
    return answers, got


def test_a_node_holds_a_clients_input_while_the_owner_does_not_answer_then_forwards_all_of_it(
    unanswered_n2: Unanswered,
) -> None:
    """A publisher on n0 pipelines 400,000 publishes to a topic of n2's while n2's address does not
    answer. n0 keeps at most QUEUED_MAX bytes of them and stops reading the client, whose sends then
    block; once n2 answers, every message reaches n2's subscriber, in order, and every PUBLISHED
    comes back. (Before, n0 read everything it was sent and kept it: 2.9 M publishes in 20 s took
    660 MB.)"""
    nodes, _, owned = unanswered_n2
    topic = topic_owned_by(owned, "n2", "held")
    subscriber = connected(nodes["n2"])
    subscriber.subscribe(topic)
    publisher = connected(nodes["n0"])
    total = 400_000
    bodies = [f"m{i:07d}-{'x' * 40}" for i in range(total)]
    data = "".join(f"PUBLISH {publisher.client_id} {topic} {body}\n" for body in bodies).encode()
    sent = _sent_until_held(publisher, data, 3, QUEUED_MAX)
    replies, got = _all_through(unanswered_n2, publisher, data[sent:], total, subscriber, total)
    assert set(replies) == {f"PUBLISHED {topic}".encode()}
    assert got == [f"MESSAGE {topic} {body}".encode() for body in bodies]


def test_a_node_stops_reading_a_client_whose_commands_wait_behind_an_owner_that_does_not_answer(
    unanswered_n2: Unanswered,
) -> None:
    """A publish to a topic of n2's (whose address does not answer), then 200,000 to a topic of
    n1's, pipelined through n0: those must wait for n2's answer (replies come in command order), and
    n0 keeps at most UNROUTED_MAX bytes of them before it stops reading the client; once n2 answers,
    every reply comes in order and n1's subscriber gets every message. (Before, n0 read all the
    client sent meanwhile: 9.2 M commands took 910 MB of it in 20 s.)"""
    nodes, _, owned = unanswered_n2
    waiting, flooded = topic_owned_by(owned, "n2", "first"), topic_owned_by(owned, "n1", "behind")
    subscriber = connected(nodes["n1"])
    subscriber.subscribe(flooded)
    publisher = connected(nodes["n0"])
    total = 200_000
    bodies = [f"m{i:07d}-{'x' * 30}" for i in range(total)]
    data = (
        f"PUBLISH {publisher.client_id} {waiting} first\n".encode()
        + "".join(f"PUBLISH {publisher.client_id} {flooded} {body}\n" for body in bodies).encode()
    )
    sent = _sent_until_held(publisher, data, 5, UNROUTED_MAX)
    replies, got = _all_through(unanswered_n2, publisher, data[sent:], total + 1, subscriber, total)
    assert replies[0] == f"PUBLISHED {waiting}".encode()
    assert set(replies[1:]) == {f"PUBLISHED {flooded}".encode()}
    assert got == [f"MESSAGE {flooded} {body}".encode() for body in bodies]


def _closed(client: LineClient) -> bool:
    """Whether the server closes ``client`` within half a second (with nothing more to read)."""
    try:
        return client.at_eof(timeout=0.5)
    except TimeoutError:
        return False


def _publishes_through_n0(etcd: EtcdProcess, n1_flags: tuple[str, ...], clients: int) -> list[bytes]:
    """Start n0 and n1 (with ``n1_flags``); ``clients`` clients of n0, one after the other and all
    kept open, each publish to a topic of n1's: the reply each got, with " (then closed)" added where
    the connection was closed after it."""
    nodes = {"n0": start_node(etcd.endpoint, "n0"), "n1": start_node(etcd.endpoint, "n1", *n1_flags)}
    try:
        deadline = time.monotonic() + 30
        while not (seen := status(nodes["n0"]))["members"].get("n1", {}).get("slots") or seen["unowned"]:
            assert time.monotonic() < deadline, f"n1 serves nothing: {seen}"
            time.sleep(0.1)
        topic = topic_owned_by({"n1": set(seen["members"]["n1"]["slots"])}, "n1", "refused")
        kept = [connected(nodes["n0"]) for _ in range(clients)]
        replies = []
        for client in kept:
            reply = client.ask(f"PUBLISH {client.client_id} {topic} m")
            replies.append(reply + b" (then closed)" if _closed(client) else reply)
        return replies
    finally:
        for node in nodes.values():
            node.stop()


def test_a_client_whose_owner_refuses_the_connection_is_told_why(etcd: EtcdProcess) -> None:
    """n1 takes 2 connections (--max-connections 2): the third client of n0 that publishes to a
    topic of n1's gets n1's refusal, naming n1, before n0 closes it (before, it was closed without a
    word)."""
    replies = _publishes_through_n0(etcd, ("--max-connections", "2"), 3)
    assert replies[:2] == [replies[0]] * 2 and replies[0].startswith(b"PUBLISHED "), replies
    assert replies[2] == b"ERROR TOO_MANY_CONNECTIONS too many connections (limit 2) (node n1) (then closed)"


def test_a_client_whose_owner_requires_a_login_its_node_does_not_is_told_why(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    """Only n1 has --users (a mistake in the nodes' flags): a client of n0, which takes a bare CONNECT,
    gets n1's AUTH_REQUIRED, naming n1, and is closed (before, n1 kept the connection open, and the
    client waited for ever)."""
    users = tmp_path / "users.toml"
    users.write_text(users_toml(USERS))
    replies = _publishes_through_n0(etcd, ("--users", str(users)), 1)
    assert replies == [b"ERROR AUTH_REQUIRED authentication required (node n1) (then closed)"]
