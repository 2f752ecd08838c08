"""One broker's semantics across a 3-node cluster: clients spread over the nodes, commands for topics
another node owns forwarded to it (real processes, a real etcd)."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from pigeon.cluster.router import REMOTE_TAG_BASE
from pigeon.cluster.slots import slot_of
from pigeon.testing import LineClient, ServerProcess
from tests.cluster_kit import (
    Cluster,
    connect_pipelined,
    connected,
    running_cluster,
    silent_while_frozen,
    status,
    topic_owned_by,
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three nodes n0, n1, n2 and who serves which slots, shared by this module's tests."""
    with running_cluster() as started:
        yield started


def test_round_robin_across_subscribers_on_every_node(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "rr")
    subscribers = [connected(nodes[name]) for name in ("n1", "n0", "n2")]
    for sub in subscribers:
        sub.subscribe(topic)
    publisher = connected(nodes["n1"])
    for i in range(6):
        publisher.publish(topic, f"m{i}")
    assert [sub.lines(2) for sub in subscribers] == [
        [f"MESSAGE {topic} m{i}".encode(), f"MESSAGE {topic} m{i + 3}".encode()] for i in range(3)
    ]
    assert all(sub.quiet() for sub in subscribers)


def test_a_backlog_on_the_owner_goes_to_a_subscriber_on_another_node(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "backlog")
    publisher = connected(nodes["n1"])
    for i in range(5):
        publisher.publish(topic, f"m{i}")
    subscriber = connected(nodes["n0"])
    subscriber.subscribe(topic)
    assert subscriber.lines(5) == [f"MESSAGE {topic} m{i}".encode() for i in range(5)]


def test_unacknowledged_messages_of_a_remote_subscriber_are_redelivered_when_it_leaves(
    cluster: Cluster,
) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "acks")
    remote = connected(nodes["n1"])
    assert (
        remote.ask(f"SUBSCRIBE {remote.client_id} {topic} ACK PREFETCH 2") == f"SUBSCRIBED {topic}".encode()
    )
    publisher = connected(nodes["n0"])
    for i in range(3):
        publisher.publish(topic, f"m{i}")
    first, second = remote.lines(2)
    tags = [int(line.split()[2]) for line in (first, second)]
    assert first.endswith(b" 1 m0") and second.endswith(b" 1 m1")
    assert all(tag >= REMOTE_TAG_BASE for tag in tags)
    # acking the first opens the window: the third comes; the second stays unacknowledged
    remote.send(f"ACK {remote.client_id} {tags[0]}")
    third = remote.line()
    assert third.endswith(b" 1 m2")
    remote.close()
    local = connected(nodes["n2"])
    local.send(f"SUBSCRIBE {local.client_id} {topic} ACK")
    replies = local.lines(3)
    assert replies[0] == f"SUBSCRIBED {topic}".encode()
    assert sorted(line.split(b" ", 3)[3] for line in replies[1:]) == [b"2 m1", b"2 m2"]


def _settled(owner: ServerProcess, topic: str) -> tuple[int, int, int]:
    """(unacked, acked, nacked) of ``topic`` as its owner counts them."""
    reply = connected(owner).ask("STATS TOPICS 0 1000")
    (entry,) = [t for t in json.loads(reply[len(b"STATS ") :])["topics"] if t["name"] == topic]
    return entry["unacked"], entry["acked"], entry["nacked"]


def test_acks_and_nacks_of_relayed_tags_reach_the_owner(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n1", "settle")
    sub = connected(nodes["n0"])
    assert sub.ask(f"SUBSCRIBE {sub.client_id} {topic} ACK PREFETCH 10") == f"SUBSCRIBED {topic}".encode()
    publisher = connected(nodes["n2"])
    for i in range(4):
        publisher.publish(topic, f"m{i}")
    tags = [int(line.split()[2]) for line in sub.lines(4)]
    sub.send(f"ACK {sub.client_id} {tags[0]}-{tags[2]}")
    sub.send(f"NACK {sub.client_id} {tags[3]}")
    again = sub.line().split()
    assert again[3:] == [b"2", b"m3"]
    sub.send(f"ACK {sub.client_id} {int(again[2])}")
    assert (
        sub.ask(f"ACK {sub.client_id} {tags[0]}")
        == f"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag {tags[0]}".encode()
    )
    assert sub.ask("PING") == b"PONG"
    assert _settled(nodes["n1"], topic) == (0, 4, 1)


def test_an_ack_the_owner_refuses_is_answered_in_order_naming_the_clients_tag(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "refused")
    subscriber = connected(nodes["n1"])
    assert subscriber.ask(f"SUBSCRIBE {subscriber.client_id} {topic} ACK") == f"SUBSCRIBED {topic}".encode()
    connected(nodes["n0"]).publish(topic, "x")
    tag = subscriber.line().split()[2].decode()
    assert int(tag) >= REMOTE_TAG_BASE
    assert subscriber.ask(f"UNSUBSCRIBE {subscriber.client_id} {topic}") == f"UNSUBSCRIBED {topic}".encode()
    # n0 no longer knows the delivery: its refusal comes before the PONG of n1's core, as one server
    # answers, naming the client's tag (before: after the PONG, naming n0's own tag)
    subscriber.send(f"ACK {subscriber.client_id} {tag}\nPING\n")
    assert subscriber.lines(2) == [f"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag {tag}".encode(), b"PONG"]


def test_a_disconnect_through_a_node_is_answered_once_the_owner_took_its_messages_back(
    cluster: Cluster,
) -> None:
    """As one server answers DISCONNECTED only after it took back the client's unacknowledged
    messages, a node waits for each owner to do so (before: it answered at once, and the owners took
    them back only when they saw its connections close, later)."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "leaving")
    leaving = connected(nodes["n0"])
    assert leaving.ask(f"SUBSCRIBE {leaving.client_id} {topic} ACK") == f"SUBSCRIBED {topic}".encode()
    connected(nodes["n1"]).publish(topic, "job")
    assert leaving.line().startswith(f"DELIVER {topic} ".encode())
    staying = connected(nodes["n2"])
    assert staying.ask(f"SUBSCRIBE {staying.client_id} {topic} ACK") == f"SUBSCRIBED {topic}".encode()
    silent_while_frozen(leaving, nodes["n2"], b"DISCONNECT\n")
    assert leaving.line() == b"DISCONNECTED"
    # the owner gave the message to the other subscriber before it answered the node
    staying.send("PING\n")
    redelivered, pong = staying.lines(2)
    assert redelivered.startswith(f"DELIVER {topic} ".encode()) and redelivered.endswith(b" 2 job")
    assert pong == b"PONG"


def test_an_upstream_that_connects_after_its_client_went_sends_nothing(cluster: Cluster) -> None:
    """A client that subscribes through a node and resets its connection at once: the node's
    connection to the owner may open only after the client is gone, and then sends nothing (before,
    it subscribed there: each such subscriber took its turn of the round robin, and the messages
    went nowhere)."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "vanishing")
    keeper = connected(nodes["n2"])
    keeper.subscribe(topic)
    for _ in range(20):
        client = connected(nodes["n0"])
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.send(f"SUBSCRIBE {client.client_id} {topic}\n")
        client.sock.close()
    watcher = connected(nodes["n2"])
    deadline = time.monotonic() + 10
    while (subscribers := _topic_stats(watcher, topic)["subscribers"]) != 1:
        assert time.monotonic() < deadline, f"{subscribers} subscribers at the owner, not 1"
        time.sleep(0.1)
    publisher = connected(nodes["n1"])
    for n in range(20):
        publisher.publish(topic, f"m{n}")
    assert keeper.lines(20) == [f"MESSAGE {topic} m{n}".encode() for n in range(20)]


def _topic_stats(client: LineClient, topic: str) -> dict[str, int]:
    listing = json.loads(client.ask("STATS TOPICS 0 1000")[len(b"STATS ") :])
    return next(entry for entry in listing["topics"] if entry["name"] == topic)


def test_pipelined_commands_for_different_owners_are_answered_in_order(cluster: Cluster) -> None:
    nodes, owned = cluster
    topics = [topic_owned_by(owned, name, f"order{name}") for name in ("n0", "n1", "n2", "n1", "n0")]
    client = connected(nodes["n0"])
    client.send(b"".join(f"PUBLISH {client.client_id} {topic} x\nPING\n".encode() for topic in topics))
    expected: list[bytes] = []
    for topic in topics:
        expected += [f"PUBLISHED {topic}".encode(), b"PONG"]
    assert client.lines(len(expected)) == expected


def test_commands_read_with_connect_go_to_their_topics_owner(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "withconnect")
    subscriber = connect_pipelined(nodes["n0"], f"SUBSCRIBE {{id}} {topic}")
    assert subscriber.line() == f"SUBSCRIBED {topic}".encode()
    publisher = connect_pipelined(nodes["n1"], f"PUBLISH {{id}} {topic} first\nPING")
    assert publisher.lines(2) == [f"PUBLISHED {topic}".encode(), b"PONG"]
    publisher.publish(topic, "second")
    # both went to n2, the owner, and from there to the subscriber of n0 (before, each stayed in the
    # core of the node it was sent to: n0 held the subscription, n1 the message, and nothing came)
    assert subscriber.lines(2) == [f"MESSAGE {topic} first".encode(), f"MESSAGE {topic} second".encode()]
    for name in ("n0", "n1"):  # neither keeps the topic in its own core
        client = connected(nodes[name])
        listing = json.loads(client.ask("STATS TOPICS 0 1000")[len(b"STATS ") :])
        client.close()
        assert topic not in [entry["name"] for entry in listing["topics"]]


def test_a_client_that_asks_for_redirects_is_told_the_owner(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "moved")
    client = connected(nodes["n0"])
    assert client.ask("CLUSTER REDIRECT") == b"CLUSTER REDIRECT"
    owner = status(nodes["n2"])["members"]["n2"]["address"]
    moved = f"ERROR MOVED {slot_of(topic.encode())} {owner}".encode()
    assert client.ask(f"PUBLISH {client.client_id} {topic} x") == moved
    assert client.ask(f"SUBSCRIBE {client.client_id} {topic}") == moved
    mine = topic_owned_by(owned, "n0", "mine")
    client.publish(mine, "here")
    assert client.ask("CLUSTER NONSENSE").startswith(b"ERROR USAGE")


def test_cli_cluster_lists_the_nodes_their_slots_and_health(cluster: Cluster) -> None:
    nodes, owned = cluster
    node = nodes["n1"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pigeon.cli.client",
            "cluster",
            "--host",
            node.host,
            "--port",
            str(node.port),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(run.stdout)
    assert report["seen_by"] == "n1" and report["unowned"] == 0
    assert {(r["node"], r["slots"], r["health"]) for r in report["nodes"]} == {
        (name, len(slots), "ok") for name, slots in owned.items()
    }
    table = subprocess.run(
        [sys.executable, "-m", "pigeon.cli.client", "cluster", "--host", node.host, "--port", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert table.splitlines()[0].split() == ["NODE", "ADDRESS", "SLOTS", "TOPICS", "HEALTH"]
    assert "256 of 256 slots owned (as n1 sees it)" in table
    topic = topic_owned_by(owned, "n2", "where")
    where = subprocess.run(
        [sys.executable, "-m", "pigeon.cli.client", "cluster", "--port", str(node.port), "--topic", topic],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert where == f"topic {topic}: slot {slot_of(topic.encode())}, owned by n2\n"


def test_a_client_that_half_closes_gets_every_forwarded_reply_then_the_end(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "halfclose")
    client = connected(nodes["n0"])
    client.send(b"".join(f"PUBLISH {client.client_id} {topic} m{i}\n".encode() for i in range(50)))
    client.sock.shutdown(socket.SHUT_WR)
    assert client.lines(50) == [f"PUBLISHED {topic}".encode()] * 50
    assert client.at_eof()
    backlog = connected(nodes["n1"])
    backlog.subscribe(topic)
    assert backlog.lines(50) == [f"MESSAGE {topic} m{i}".encode() for i in range(50)]


# -- protocol 2 through the router -----------------------------------------------------------------

# every byte value, both line ends, NUL, and lines that look like commands and frames
PAYLOAD = bytes(range(256)) + b"\r\n\x00\nMSG t 3\nDMSG t 1 1 3\nPUBLISH c1 t x\nPUB c1 t 2\nab\n\r"


def _pub(client: LineClient, topic: str, payload: bytes, end: bytes = b"\n") -> bytes:
    """A ``PUB`` frame of ``client`` to ``topic``, its payload followed by ``end``."""
    return b"PUB %s %s %d\n%s%s" % (client.client_id.encode(), topic.encode(), len(payload), payload, end)


def _hello2(node: ServerProcess) -> LineClient:
    """A connected client of ``node`` that speaks protocol 2."""
    client = connected(node)
    assert json.loads(client.ask("HELLO 2")[len(b"HELLO ") :])["protocol"] == 2
    return client


def _send_in_pieces(client: LineClient, data: bytes, size: int) -> None:
    """Send ``data`` ``size`` bytes at a time, so that frames are split across the router's reads."""
    for start in range(0, len(data), size):
        client.send(data[start : start + size])
        time.sleep(0.001)


@pytest.mark.parametrize("owner", ["n0", "n1"])
def test_framed_payloads_published_through_a_node_arrive_byte_exact_as_msg_on_a_third(
    cluster: Cluster, owner: str
) -> None:
    # the publisher is on n1: a topic of n0 goes to its owner upstream, one of n1 to n1's own core
    nodes, owned = cluster
    topic = topic_owned_by(owned, owner, f"frames{owner}")
    sub = _hello2(nodes["n2"])
    sub.subscribe(topic)
    pub = _hello2(nodes["n1"])
    text = f"PUBLISH {pub.client_id} {topic} text\n".encode()
    first = (
        _pub(pub, topic, PAYLOAD) + _pub(pub, topic, PAYLOAD[::-1], b"\r\n") + text + _pub(pub, topic, b"")
    )
    _send_in_pieces(pub, first, 7)
    assert pub.lines(4) == [f"PUBLISHED {topic}".encode()] * 4
    assert [sub.frame() for _ in range(4)] == [
        (f"MSG {topic} {len(PAYLOAD)}".encode(), PAYLOAD),
        (f"MSG {topic} {len(PAYLOAD)}".encode(), PAYLOAD[::-1]),
        (f"MSG {topic} 4".encode(), b"text"),
        (f"MSG {topic} 0".encode(), b""),
    ]
    # a pipelined batch of frames to the same topic (the router's shortcut), payloads that hold the
    # batch's own header
    payloads = [b"%d\n%s\n" % (i, _pub(pub, topic, b"x")) + PAYLOAD[i:] for i in range(200)]
    pub.send(b"".join(_pub(pub, topic, payload) for payload in payloads))
    assert pub.lines(200) == [f"PUBLISHED {topic}".encode()] * 200
    assert [sub.frame()[1] for _ in range(200)] == payloads
    assert sub.quiet() and pub.quiet()


def test_a_framed_payload_arrives_byte_exact_as_dmsg_and_its_acks_reach_the_owner(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "dframes")
    sub = _hello2(nodes["n2"])
    assert sub.ask(f"SUBSCRIBE {sub.client_id} {topic} ACK PREFETCH 10") == f"SUBSCRIBED {topic}".encode()
    pub = _hello2(nodes["n1"])
    _send_in_pieces(pub, b"".join(_pub(pub, topic, PAYLOAD) for _ in range(3)), 100)
    assert pub.lines(3) == [f"PUBLISHED {topic}".encode()] * 3
    frames = [sub.frame() for _ in range(3)]
    assert [payload for _, payload in frames] == [PAYLOAD] * 3
    headers = [header.split() for header, _ in frames]
    assert [(h[0], h[1], h[3], h[4]) for h in headers] == [
        (b"DMSG", topic.encode(), b"1", str(len(PAYLOAD)).encode())
    ] * 3
    tags = [int(h[2]) for h in headers]
    assert tags == list(range(tags[0], tags[0] + 3)) and tags[0] >= REMOTE_TAG_BASE
    sub.send(f"ACK {sub.client_id} {tags[0]}-{tags[1]}\nNACK {sub.client_id} {tags[2]}\n")
    header, payload = sub.frame()
    again = header.split()
    assert (again[0], again[3], payload) == (b"DMSG", b"2", PAYLOAD)
    sub.send(f"ACK {sub.client_id} {int(again[2])}")
    assert sub.ask("PING") == b"PONG"
    assert _settled(nodes["n0"], topic) == (0, 3, 1)


def test_a_v1_client_through_a_non_owner_gets_lines_and_may_switch_protocol(cluster: Cluster) -> None:
    nodes, owned = cluster
    plain, acked = topic_owned_by(owned, "n0", "v1plain"), topic_owned_by(owned, "n1", "v1acked")
    sub = connected(nodes["n2"])  # a raw socket that never says HELLO: protocol 1
    sub.subscribe(plain)
    assert sub.ask(f"SUBSCRIBE {sub.client_id} {acked} ACK PREFETCH 100") == f"SUBSCRIBED {acked}".encode()
    pub = connected(nodes["n1"])

    def publish_both(payload: bytes) -> None:
        pub.send(_pub(pub, plain, payload) + _pub(pub, acked, payload))
        assert pub.lines(2) == [f"PUBLISHED {plain}".encode(), f"PUBLISHED {acked}".encode()]

    publish_both(b"one")
    # the two owners' deliveries may come in either order
    first = sorted(sub.lines(2))
    assert first[0].startswith(f"DELIVER {acked} ".encode()) and first[0].endswith(b" 1 one")
    assert first[1] == f"MESSAGE {plain} one".encode()
    assert json.loads(sub.ask("HELLO 2")[len(b"HELLO ") :])["protocol"] == 2
    assert sub.quiet()  # the HELLO replies of the upstreams are not the client's
    publish_both(b"two\nlines")
    framed = sorted(sub.frame() for _ in range(2))
    assert framed[0][0].startswith(f"DMSG {acked} ".encode()) and framed[0][1] == b"two\nlines"
    assert framed[1] == (f"MSG {plain} 9".encode(), b"two\nlines")
    assert json.loads(sub.ask("HELLO 1")[len(b"HELLO ") :])["protocol"] == 1
    assert sub.quiet()
    publish_both(b"three")
    last = sorted(sub.lines(2))
    assert last[0].startswith(f"DELIVER {acked} ".encode()) and last[1] == f"MESSAGE {plain} three".encode()
    tags = [int(first[0].split()[2]), int(framed[0][0].split()[2]), int(last[0].split()[2])]
    assert len(set(tags)) == 3 and min(tags) >= REMOTE_TAG_BASE
    sub.send(b"".join(f"ACK {sub.client_id} {tag}\n".encode() for tag in tags))
    assert sub.ask("PING") == b"PONG"


def test_a_frame_with_a_wrong_count_through_a_non_owner_is_refused_and_closed(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "badframe")
    client = connected(nodes["n1"])
    client.send(f"PUB {client.client_id} {topic} 3\nhello\n".encode())
    assert client.line() == b"ERROR BAD_FRAME payload of 3 bytes is not followed by a line end"
    assert client.at_eof()


def test_a_frame_over_the_payload_limit_through_a_non_owner_is_refused_and_skipped(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "toolarge")
    client = connected(nodes["n1"])
    limit = 8 << 20  # the default --max-payload
    header = f"PUB {client.client_id} {topic} {limit + 1}\n".encode()
    # the header and the start of the payload in one write, the rest (and a frame) in several
    payload = b"PUBLISH x y z\n" * ((limit + 1) // 14) + b"\n" * ((limit + 1) % 14)
    client.send(header + payload[:1000])
    _send_in_pieces(client, payload[1000:] + b"\n" + _pub(client, topic, b"fine") + b"PING\n", 1 << 20)
    assert client.lines(3) == [
        f"ERROR PAYLOAD_TOO_LARGE payload of {limit + 1} bytes is over the limit of {limit} bytes".encode(),
        f"PUBLISHED {topic}".encode(),
        b"PONG",
    ]
    # the frame's bytes were all skipped, the skip ending inside a read
    client.send(header + payload + b"\n" + _pub(client, topic, b"again"))
    assert client.lines(2)[1] == f"PUBLISHED {topic}".encode()
    sub = connected(nodes["n2"])
    sub.subscribe(topic)
    assert sub.lines(2) == [f"MESSAGE {topic} fine".encode(), f"MESSAGE {topic} again".encode()]
    # before CONNECT too: the payload is skipped, the connection goes on
    stranger = nodes["n1"].client()
    stranger.send(f"PUB nobody {topic} {limit + 1}\n".encode() + payload + b"\nPING\n")
    assert stranger.lines(2) == [
        f"ERROR PAYLOAD_TOO_LARGE payload of {limit + 1} bytes is over the limit of {limit} bytes".encode(),
        b"PONG",
    ]


def test_a_node_reads_commands_with_odd_blanks_as_one_server_does(cluster: Cluster) -> None:
    """Only spaces and tabs separate fields, and a frame's verb begins its line, for the core: lines
    the router used to read otherwise (a frame after a blank, a vertical tab or a carriage return
    between fields) get one server's answers through a node that does not own their topic, and no
    message is published where one server publishes none."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "blanks")
    single = ServerProcess()
    try:
        replies = []
        for server in (single, nodes["n1"]):
            client = connected(server)
            me = client.client_id
            client.send(
                f" PUB {me} {topic} 3\nabc\n"
                f"PUBLISH\x0b{me} {topic} vt-verb\n"
                f"PUBLISH {me}\x0b{topic} vt-field\n"
                f"PUBLISH {me}\r{topic} cr-field\n"
                f"\tpublish {me} {topic} tab-first\r\n"
                f"Pub\t{me}\t{topic}\t2\r\nok\r\n"
                "PING\n".encode()
            )
            got: list[bytes] = []
            while not got or got[-1] != b"PONG":
                got.append(client.line())
            replies.append([line.replace(me.encode(), b"<id>") for line in got])
        assert replies[0] == replies[1]
        assert replies[1][-3:] == [f"PUBLISHED {topic}".encode()] * 2 + [b"PONG"]
        subscriber = connected(nodes["n0"])
        subscriber.subscribe(topic)
        assert sorted(subscriber.lines(2)) == [
            f"MESSAGE {topic} ok".encode(),
            f"MESSAGE {topic} tab-first".encode(),
        ]
        assert subscriber.quiet()
    finally:
        assert single.stop() == 0, "".join(single.log)


def test_publishes_to_several_topics_of_one_owner_go_through_a_node_as_one_server_answers_them(
    cluster: Cluster,
) -> None:
    """A client's pipelined PUBLISH lines to several topics go on as one batch when each topic is
    served where its last command went (``publish_slots``), else one by one (topics of two owners, a
    line without a topic, more blanks before one): answered as one server answers the same lines, and
    each topic's messages reach its subscriber in the order one server gives them."""
    nodes, owned = cluster
    of_n0 = [topic_owned_by(owned, "n0", f"batch{i}x") for i in range(3)]
    with_n2 = [*of_n0, topic_owned_by(owned, "n2", "batchn2")]
    single = ServerProcess()
    try:
        answers: list[list[bytes]] = []
        messages: list[dict[str, list[bytes]]] = []
        for server, subscribers_at in ((single, single), (nodes["n1"], nodes["n2"])):
            client = connected(server)
            me = client.client_id
            got: list[bytes] = [client.ask(f"PUBLISH {me} {of_n0[0]} first")]
            for topics in (of_n0, with_n2):
                # alone in their write (a PING after them in it would make the node read them one by
                # one), after a PUBLISH to n0 and after a PING answered by the node itself
                lines = [f"PUBLISH {me} {topics[i % len(topics)]} m{i}" for i in range(300)]
                client.send(("\n".join(lines) + "\n").encode())
                got += client.lines(300)
                got.append(client.ask("PING"))
            odd = [f"PUBLISH {me} {of_n0[1]}", f"PUBLISH {me}  {of_n0[2]} two-blanks", f"PUBLISH {me} \r"]
            client.send(("\n".join([f"PUBLISH {me} {of_n0[0]} m", *odd]) + "\nPING\n").encode())
            got += client.lines(5)
            answers.append([line.replace(me.encode(), b"<id>") for line in got])
            received: dict[str, list[bytes]] = {}
            for topic in with_n2:
                subscriber = connected(subscribers_at)
                subscriber.subscribe(topic)
                received[topic] = subscriber.lines(got.count(f"PUBLISHED {topic}".encode()))
                assert subscriber.quiet(), topic
                subscriber.close()
            messages.append(received)
        assert answers[0] == answers[1]
        assert answers[1].count(b"PONG") == 3
        assert not any(line.startswith(b"ERROR") for line in answers[1][:603])  # before the odd lines
        assert messages[0] == messages[1]
    finally:
        assert single.stop() == 0, "".join(single.log)


def test_consumer_groups_on_a_topic_work_across_nodes(cluster: Cluster) -> None:
    """Two groups on a topic owned by n2, their members on n0 and n1: each group gets every message
    published on n1, shared inside the group; DESTROY through a non-owner ends an idle group."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "groups")
    billing = [connected(nodes[name]) for name in ("n0", "n1")]
    audit = connected(nodes["n0"])
    for member in billing:
        assert (
            member.ask(f"SUBSCRIBE {member.client_id} {topic} GROUP billing")
            == f"SUBSCRIBED {topic}".encode()
        )
    assert audit.ask(f"SUBSCRIBE {audit.client_id} {topic} GROUP audit") == f"SUBSCRIBED {topic}".encode()
    publisher = connected(nodes["n1"])
    for i in range(4):
        publisher.publish(topic, f"m{i}")
    assert audit.lines(4) == [f"MESSAGE {topic} m{i}".encode() for i in range(4)]
    shared = billing[0].lines(2) + billing[1].lines(2)
    assert sorted(shared) == [f"MESSAGE {topic} m{i}".encode() for i in range(4)]
    assert all(member.quiet() for member in [*billing, audit])
    assert audit.ask(f"UNSUBSCRIBE {audit.client_id} {topic} GROUP audit") == f"UNSUBSCRIBED {topic}".encode()
    assert (
        publisher.ask(f"DESTROY {publisher.client_id} {topic} GROUP audit")
        == f"DESTROYED {topic} audit".encode()
    )


def test_an_unfinished_line_past_max_line_is_refused_by_the_node_after_the_commands_before_it(
    cluster: Cluster,
) -> None:
    """A publish to another node's topic, then 2 MiB without a line end: the node answers the publish,
    then refuses the line as one server does (LINE_TOO_LONG, limit 1 MiB) and closes. Before, it kept
    all of it waiting for a line end, and rescanned it on every read: 19 MB in one line took its
    event loop long enough to lose its lease, and every client of the node with it."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n1", "long")
    client = connected(nodes["n0"])
    data = f"PUBLISH {client.client_id} {topic} before\n".encode() + b"x" * (2 << 20)

    def send() -> None:
        with contextlib.suppress(OSError):  # the node may close before it has read all
            client.sock.sendall(data)

    sender = threading.Thread(target=send)
    sender.start()
    assert client.line() == f"PUBLISHED {topic}".encode()
    assert client.line() == b"ERROR LINE_TOO_LONG line too long (limit 1048576 bytes)"
    assert client.at_eof()
    sender.join()
    again = connected(nodes["n0"])
    again.publish(topic, "after")
    again.close()
