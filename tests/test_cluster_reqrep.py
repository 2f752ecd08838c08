"""Request/reply across a 3-node cluster (issue 17): the requester, the topic's owner and the
responder on any nodes, the semantics of one server (docs/protocol.md "Request/reply",
docs/cluster.md "Request/reply"); real processes, a real etcd."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from pigeon.client import AsyncClient, AsyncClusterClient, Client, Message
from pigeon.client.cluster import ClusterClient
from pigeon.cluster.etcd import EtcdProcess, etcd_binary
from pigeon.cluster.router import REMOTE_TAG_BASE, REQUEST_WINDOW, RelayedTokens
from pigeon.errors import ConnectionClosedError, RequestTimeoutError
from pigeon.testing import LineClient, ServerProcess
from tests.cluster_kit import (
    Cluster,
    connected,
    running_cluster,
    silent_while_frozen,
    start_node,
    topic_owned_by,
    wait_preferred,
)
from tests.test_reqrep_wire import reply, request, request_frame, rmsg, stats, until

NODES = ("n0", "n1", "n2")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three nodes n0, n1, n2 and who serves which slots, shared by this module's tests."""
    with running_cluster() as started:
        yield started


def framed(node: ServerProcess) -> LineClient:
    """A connected client of ``node`` that sent HELLO 2 (deliveries as MSG/DMSG frames)."""
    client = connected(node)
    assert client.ask("HELLO 2").startswith(b'HELLO {"protocol":2')
    return client


def address(node: ServerProcess) -> tuple[str, int]:
    return "127.0.0.1", node.port


@pytest.mark.parametrize(("requester_node", "responder_node"), list(itertools.product(NODES, NODES)))
def test_a_request_is_answered_whichever_nodes_hold_requester_owner_and_responder(
    cluster: Cluster, requester_node: str, responder_node: str
) -> None:
    """The topic is n0's: every placement of requester and responder, the three on different nodes
    (n1, n0, n2) included. The payloads hold line ends and what looks like commands."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", f"svc.{requester_node}.{responder_node}.")
    requester, responder = connected(nodes[requester_node]), framed(nodes[responder_node])
    responder.subscribe(topic)
    request_id = request(requester, topic, b"what\nPING\n")
    assert (request_id >= REMOTE_TAG_BASE) == (requester_node != "n0")  # renumbered when forwarded
    delivered_topic, token, payload = request_frame(responder)
    assert (delivered_topic, payload) == (topic, b"what\nPING\n")
    assert ("@" in token) == (responder_node != "n0")  # relayed: names the upstream it came on
    reply(responder, token, b"noon\r\nPING")
    assert rmsg(requester) == (request_id, b"noon\r\nPING")
    # the first reply wins; the second is dropped, the replier is not told
    reply(responder, token, b"again")
    assert responder.ask("PING") == b"PONG"
    assert requester.ask("PING") == b"PONG"


def test_request_ids_stay_unique_on_a_connection_whose_requests_go_to_several_owners(
    cluster: Cluster,
) -> None:
    """Ids from the node's core count from 1, those of each owner's are renumbered from 2^40 up: the
    replies, answered out of order, come back under the ids REQUESTED gave."""
    nodes, owned = cluster
    requester = connected(nodes["n1"])
    topics = [topic_owned_by(owned, name, f"ids.{name}.") for name in ("n1", "n0", "n2", "n0")]
    responders = {}
    for topic in dict.fromkeys(topics):
        responders[topic] = framed(nodes["n2"])
        responders[topic].subscribe(topic)
    ids = [request(requester, topic, f"q{i}".encode()) for i, topic in enumerate(topics)]
    assert len(set(ids)) == 4 and ids[0] < REMOTE_TAG_BASE <= min(ids[1:])
    tokens = []
    for topic in topics:
        _, token, payload = request_frame(responders[topic])
        tokens.append((responders[topic], token, payload))
    for responder, token, payload in reversed(tokens):
        reply(responder, token, b"re:" + payload)
    answers = dict(rmsg(requester) for _ in topics)
    assert answers == {request_id: f"re:q{i}".encode() for i, request_id in enumerate(ids)}


def test_a_v1_responder_on_another_node_gets_the_request_without_a_token(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "v1svc.")
    responder = connected(nodes["n0"])
    responder.subscribe(topic)
    requester = connected(nodes["n1"])
    request(requester, topic, b"plain")
    assert responder.line() == f"MESSAGE {topic} plain".encode()


def test_a_relayed_reply_is_applied_before_the_replier_gets_its_next_answer(cluster: Cluster) -> None:
    """A REPLY has no answer, but any answer after it means it was applied, as on one server: the
    node waits for the owner it relayed it to (before: the PONG came at once, and a second reply
    sent after it through the owner itself could win)."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n2", "applied.")
    requester, responder = connected(nodes["n0"]), framed(nodes["n1"])
    responder.subscribe(topic)
    request_id = request(requester, topic, b"q")
    _, token, _ = request_frame(responder)
    frame = b"REPLY %s 5\nfirst\n" % token.encode()
    silent_while_frozen(responder, nodes["n2"], frame + b"PING\n")
    assert responder.line() == b"PONG"
    late = framed(nodes["n2"])
    reply(late, token.split("@")[0], b"late")  # the owner's own token, straight to it: dropped
    assert late.ask("PING") == b"PONG"
    assert rmsg(requester) == (request_id, b"first")
    assert requester.ask("PING") == b"PONG"  # and nothing before it: the late reply went nowhere


def test_a_relayed_token_is_good_on_its_node_while_its_upstream_is_open(cluster: Cluster) -> None:
    """Any connection of the node that relayed a token may answer with it (as on one server); a token
    whose upstream has closed, or replied on another node, is dropped without a word; one that is
    malformed gets BAD_REPLY_TOKEN as on one server."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "tokens.")
    requester = connected(nodes["n1"])
    responder = framed(nodes["n2"])
    responder.subscribe(topic)
    other = connected(nodes["n2"])
    first = request(requester, topic, b"1")
    _, token, _ = request_frame(responder)
    reply(other, token, b"from another connection")
    assert rmsg(requester) == (first, b"from another connection")
    # on another node the token names nothing
    second = request(requester, topic, b"2")
    _, token, _ = request_frame(responder)
    stranger = connected(nodes["n1"])
    reply(stranger, token, b"wrong node")
    assert stranger.ask("PING") == b"PONG"
    assert requester.quiet()
    # once the responder's connection (and its upstream to n0) closes, the token names nothing
    watcher = connected(nodes["n0"])
    upstreams = stats(watcher)["connections"]
    responder.close()
    until(lambda: stats(watcher)["connections"] == upstreams - 1, "n0 to see the upstream close")
    reply(other, token, b"too late")
    assert other.ask("PING") == b"PONG"
    assert requester.quiet()
    for bad in (token.replace("@", "@x"), token.split("@")[0] + "@"):
        reply(other, bad, b"x")
        assert other.line() == f"ERROR BAD_REPLY_TOKEN not a reply token: '{bad}'".encode()
    # the request still waits at n0 for its owner's token: a responder there answers it
    local = framed(nodes["n0"])
    local.subscribe(topic)
    third = request(requester, topic, b"3")
    _, owners_token, _ = request_frame(local)
    reply(local, owners_token, b"three")
    reply(local, token.split("@")[0], b"two")
    assert sorted([rmsg(requester), rmsg(requester)]) == [(second, b"two"), (third, b"three")]


def test_request_and_reply_frames_through_a_non_owner_are_taken_whole(cluster: Cluster) -> None:
    """A frame's payload is never run as commands; one over --max-payload is refused and skipped."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "whole.")
    client = connected(nodes["n1"])
    client.send(f"REQ {client.client_id} {topic} 5\nPING\n\n".encode())
    assert client.line().startswith(b"REQUESTED ")
    client.send(b"REPLY 0.1.1 5\nPING\n\n")
    assert client.ask("PING") == b"PONG"
    limit = 8 << 20  # the default --max-payload
    client.send(f"REQ {client.client_id} {topic} {limit + 1}\n".encode() + b"x" * (limit + 1) + b"\nPING\n")
    assert client.lines(2) == [
        f"ERROR PAYLOAD_TOO_LARGE payload of {limit + 1} bytes is over the limit of {limit} bytes".encode(),
        b"PONG",
    ]


def test_a_pattern_responders_replies_and_commands_pipelined_on_one_upstream_keep_their_order(
    cluster: Cluster,
) -> None:
    """A responder on n1 subscribed to a pattern gets n0's request over the upstream that holds the
    pattern; its replies (whose PONG the node keeps), a pattern command (whose answer from n0 the node
    keeps), and commands forwarded to n0 then share that upstream: each answer goes where it belongs."""
    nodes, owned = cluster
    topic, published, asked = (
        topic_owned_by(owned, "n0", stem) for stem in ("mixreq.", "mixpub.", "mixown.")
    )
    responder = framed(nodes["n1"])
    cid = responder.client_id
    assert responder.ask(f"SUBSCRIBE {cid} mixreq.*") == b"SUBSCRIBED mixreq.*"
    requester = connected(nodes["n2"])
    request_id = request(requester, topic, b"q")
    _, token, _ = request_frame(responder)
    assert "@" in token
    responder.send(
        f"REPLY {token} 2\nok\nSUBSCRIBE {cid} mixnext.>\nPUBLISH {cid} {published} x\n"
        f"REQ {cid} {asked} 1\nq\nREPLY {token} 5\nagain\nUNSUBSCRIBE {cid} mixnext.>\nPING\n".encode()
    )
    answers = responder.lines(5)
    assert answers[:2] == [b"SUBSCRIBED mixnext.>", f"PUBLISHED {published}".encode()]
    assert answers[2].startswith(b"REQUESTED ") and int(answers[2].split()[1]) >= REMOTE_TAG_BASE
    assert answers[3:] == [b"UNSUBSCRIBED mixnext.>", b"PONG"]
    assert rmsg(requester) == (request_id, b"ok")
    assert responder.quiet()
    assert requester.quiet()


def test_the_form_of_relayed_tokens() -> None:
    """An owner's token with one suffix per node that relayed it; a REPLY with it goes to the upstream
    the last suffix names, with the token it had there."""
    tokens = RelayedTokens()
    assert tokens.is_relayed(b"1.2.3@0123abcd.4")
    assert tokens.is_relayed(b"1.2.3@0123abcd.4@89abcdef.5")
    for bad in (
        b"1.2.3",
        b"1.2.3@",
        b"1.2.0@0123abcd.4",
        b"1.2@0123abcd.4",
        b"1.2.3@0123abc.4",
        b"1.2.3@0123abcd.x",
    ):
        assert not tokens.is_relayed(bad), bad
    assert tokens.route(b"1.2.3@0123abcd.4@%s.1" % tokens.nonce) is None  # no upstream has serial 1


def _answer(responder: LineClient, count: int) -> None:
    """Answer ``count`` requests, each with its own payload behind ``re:``."""
    for _ in range(count):
        _, token, payload = request_frame(responder)
        reply(responder, token, b"re:" + payload)


@pytest.mark.slow
def test_many_concurrent_requests_are_each_answered_once_to_their_requester(cluster: Cluster) -> None:
    """Three requesters (one per node) pipeline requests with unique bodies to n0's topic; two
    responders on n1 and n2 share them round robin and answer: each requester gets exactly its own,
    under the ids REQUESTED gave."""
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "busy.")
    per_requester = 300
    responders = [framed(nodes["n1"]), framed(nodes["n2"])]
    for responder in responders:
        responder.subscribe(topic)
    requesters = {name: connected(nodes[name]) for name in NODES}
    answering = [
        threading.Thread(target=_answer, args=(responder, len(NODES) * per_requester // 2))
        for responder in responders
    ]
    for thread in answering:
        thread.start()
    for name, requester in requesters.items():
        frames = (
            b"REQ %s %s %d\n%s\n" % (requester.client_id.encode(), topic.encode(), len(body), body)
            for body in (f"{name}-{i}".encode() for i in range(per_requester))
        )
        requester.send(b"".join(frames))
    for name, requester in requesters.items():
        ids: list[int] = []
        replies: dict[int, bytes] = {}
        while len(replies) < per_requester:
            word, request_id, *nbytes = requester.line().split(b" ")
            if word == b"RMSG":  # a reply may come before the REQUESTED of later requests
                assert int(request_id) not in replies
                replies[int(request_id)] = requester.take(int(nbytes[0]) + 1)[:-1]
            else:
                assert word == b"REQUESTED" and not nbytes, (word, request_id)
                ids.append(int(request_id))
        assert len(set(ids)) == per_requester
        assert replies == {request_id: f"re:{name}-{i}".encode() for i, request_id in enumerate(ids)}
    for thread in answering:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert all(requester.quiet() for requester in requesters.values())


@pytest.mark.slow
def test_past_the_window_a_node_forgets_the_oldest_request_it_forwarded(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "pile.")
    requester = connected(nodes["n1"])
    cid = requester.client_id.encode()
    requester.send(
        b"".join(b"REQ %s %s 1\n%d\n" % (cid, topic.encode(), i % 10) for i in range(REQUEST_WINDOW + 1))
    )
    ids = [int(line.split()[1]) for line in requester.lines(REQUEST_WINDOW + 1)]
    assert ids == list(range(REMOTE_TAG_BASE, REMOTE_TAG_BASE + REQUEST_WINDOW + 1))
    responder = framed(nodes["n2"])
    responder.subscribe(topic)
    tokens = [request_frame(responder)[1] for _ in range(REQUEST_WINDOW + 1)]
    reply(responder, tokens[0], b"too late")  # forgotten when the 4097th was asked
    reply(responder, tokens[1], b"kept")
    assert rmsg(requester) == (ids[1], b"kept")
    assert requester.quiet()


def test_cluster_client_requests_and_responds_on_each_topics_owner(cluster: Cluster) -> None:
    nodes, owned = cluster
    seeds = [address(nodes[name]) for name in NODES]
    topics = [topic_owned_by(owned, name, f"cc.{name}.") for name in NODES]
    with ClusterClient(*seeds[1], seeds=seeds) as responder, ClusterClient(*seeds[2], seeds=seeds) as client:
        for topic in topics:
            responder.subscribe(topic)

        def serve() -> None:
            for _ in topics:
                message = responder.next_message(timeout=20)
                message.respond(b"re:" + message.data)

        server = threading.Thread(target=serve)
        server.start()
        try:
            for topic in topics:
                answer = client.request(topic, topic.encode(), timeout=20)
                assert (answer.topic, answer.data) == (topic, b"re:" + topic.encode())
        finally:
            server.join(timeout=30)
        assert client.cluster()["node"] in NODES
    # a plain client of any node answers a ClusterClient's request, and is answered by it
    with ClusterClient(*seeds[0], seeds=seeds) as cluster_client, Client(*seeds[2]) as plain:
        plain.subscribe(topics[1])
        cluster_client.subscribe(topics[0])
        asked = threading.Thread(target=lambda: plain.next_message(timeout=20).respond(b"plain"))
        asked.start()
        assert cluster_client.request(topics[1], b"q", timeout=20).data == b"plain"
        asked.join(timeout=30)
        asking = threading.Thread(target=lambda: cluster_client.next_message(timeout=20).respond(b"cluster"))
        asking.start()
        assert plain.request(topics[0], b"q", timeout=20).data == b"cluster"
        asking.join(timeout=30)


def test_async_cluster_client_requests_and_responds(cluster: Cluster) -> None:
    nodes, owned = cluster
    seeds = [address(nodes[name]) for name in NODES]
    topic = topic_owned_by(owned, "n2", "acc.")

    async def run() -> bytes:
        responder, client = (AsyncClusterClient(*seed, seeds=seeds) for seed in seeds[:2])
        async with responder, client:
            await responder.subscribe(topic)

            async def serve() -> None:
                message = await responder.next_message(timeout=20)
                message.respond(b"re:" + message.data)

            answer, _ = await asyncio.gather(client.request(topic, b"async", timeout=20), serve())
            return answer.data

    assert asyncio.run(run()) == b"re:async"


def test_pigeon_cli_request_and_reply_through_cluster_nodes(cluster: Cluster) -> None:
    nodes, owned = cluster
    topic = topic_owned_by(owned, "n0", "cli.")
    cli = [sys.executable, "-c", "from pigeon.cli.client import main; main()"]
    with subprocess.Popen(
        [*cli, "reply", "--port", str(nodes["n2"].port), "--count", "1", topic, "--echo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as replier:
        try:
            # the replier subscribes when it has started: ask until it answers
            for _ in range(20):
                asked = subprocess.run(
                    [*cli, "request", "--port", str(nodes["n1"].port), "--timeout", "2", topic, "hello"],
                    capture_output=True,
                    timeout=60,
                )
                if asked.returncode == 0:
                    break
            assert asked.returncode == 0, asked.stderr
            assert asked.stdout.strip() == b"hello"
            assert replier.wait(timeout=30) == 0
        finally:
            if replier.poll() is None:
                replier.kill()


@pytest.mark.slow
def test_nodes_killed_with_requests_in_flight() -> None:
    """Requests delivered to responders on n2, unanswered, when n2 is killed: those of an acknowledged
    subscription go back to the owner's topic and another responder answers them; those of a plain
    subscription are lost with their responder (at most once, as on one server), and the requester's
    client times out. Then the owner n0 is killed with a request waiting there: the requester's node
    closes its connection, and its client raises ConnectionClosedError. No request hangs."""
    with running_cluster() as (nodes, owned):
        acked = topic_owned_by(owned, "n0", "acked.")
        plain = topic_owned_by(owned, "n0", "plain.")
        doomed = framed(nodes["n2"])
        assert (
            doomed.ask(f"SUBSCRIBE {doomed.client_id} {acked} ACK PREFETCH 100")
            == f"SUBSCRIBED {acked}".encode()
        )
        doomed.subscribe(plain)

        async def ask_all() -> list[Message | BaseException]:
            async with AsyncClient(*address(nodes["n1"])) as requester:
                calls = [
                    asyncio.ensure_future(requester.request(topic, f"{topic}-{i}".encode(), timeout=15))
                    for topic in (acked, plain)
                    for i in range(5)
                ]
                await asyncio.to_thread(_kill_and_take_over, nodes, doomed, acked, plain)
                return await asyncio.gather(*calls, return_exceptions=True)

        results = [r.data if isinstance(r, Message) else r for r in asyncio.run(ask_all())]
        assert results[:5] == [f"re:{acked}-{i}".encode() for i in range(5)]
        assert all(isinstance(r, RequestTimeoutError) for r in results[5:]), results[5:]

        async def ask_the_doomed_owner() -> None:
            async with AsyncClient(*address(nodes["n1"])) as requester:
                call = asyncio.ensure_future(requester.request(plain, b"lost with n0", timeout=60))
                await asyncio.to_thread(_kill_once_waiting, nodes["n0"])
                with pytest.raises(ConnectionClosedError):
                    await call

        asyncio.run(ask_the_doomed_owner())


def _kill_once_waiting(owner: ServerProcess) -> None:
    """Kill ``owner`` once it has taken one more request (11: the ten before, then this one)."""
    watcher = connected(owner)
    until(lambda: stats(watcher)["requests"] == 11, "the request to reach its owner")
    assert owner.stop(signal.SIGKILL) == -9


def _kill_and_take_over(nodes: dict[str, ServerProcess], doomed: LineClient, acked: str, plain: str) -> None:
    """Once the responder on n2 holds the ten requests, kill n2; a responder on n1 then takes the
    acknowledged topic's requests back from the owner and answers them."""
    for _ in range(10):
        doomed.frame()
    assert nodes["n2"].stop(signal.SIGKILL) == -9
    rescuer = framed(nodes["n1"])
    rescuer.subscribe(plain)
    assert rescuer.ask(f"SUBSCRIBE {rescuer.client_id} {acked} ACK") == f"SUBSCRIBED {acked}".encode()
    for _ in range(5):
        header, payload = rescuer.frame()
        fields = header.decode().split(" ")
        assert fields[0] == "DMSG" and fields[1] == acked and fields[3] == "2", header
        reply(rescuer, fields[4], b"re:" + payload)
        rescuer.send(f"ACK {rescuer.client_id} {fields[2]}")
    assert rescuer.quiet(1.0)


@pytest.mark.slow
def test_a_reply_the_owner_refuses_is_not_taken_for_an_answer_to_the_responders_commands() -> None:
    """n0 takes payloads of at most 1,000 bytes, n1 up to 8 MiB: a reply of 2,000 bytes from a
    responder on n1 to a request of n0's is refused by n0, and the responder's commands that follow
    get their own answers; the requester still waits, and a shorter reply reaches it."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    pytest.importorskip("aetcd", reason="the cluster extra is not installed")
    with EtcdProcess() as etcd:
        nodes = {"n0": start_node(etcd.endpoint, "n0", "--max-payload", "1000")}
        nodes["n1"] = start_node(etcd.endpoint, "n1")
        try:
            owned = wait_preferred(list(nodes.values()))
            topic, other = (topic_owned_by(owned, "n0", stem) for stem in ("big.", "next."))
            requester, responder = connected(nodes["n0"]), framed(nodes["n1"])
            responder.subscribe(topic)
            request_id = request(requester, topic, b"q")
            _, token, _ = request_frame(responder)
            assert "@" in token
            reply(responder, token, b"x" * 2000)
            responder.subscribe(other)  # its answer is SUBSCRIBED, not n0's refusal of the reply
            assert responder.ask("PING") == b"PONG"
            assert requester.quiet()
            reply(responder, token, b"short")
            assert rmsg(requester) == (request_id, b"short")
            assert responder.quiet()
        finally:
            for node in nodes.values():
                assert node.stop() == 0, "".join(node.log)
