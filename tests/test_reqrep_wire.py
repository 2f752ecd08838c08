"""Request/reply over real sockets (issue 15, requirement 4): every rule of docs/protocol.md
"Request/reply" against a ``pigeon`` process, on each event loop (the ``connect`` fixture)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pigeon.cluster.router import split_commands
from pigeon.testing import LineClient, ServerProcess
from tests.test_monitoring import scrape

Connect = Callable[[], LineClient]


def stats(client: LineClient) -> Any:
    reply = client.ask("STATS").decode()
    assert reply.startswith("STATS "), reply
    return json.loads(reply[len("STATS ") :])


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def framed(connect: Connect) -> LineClient:
    """A connected client that sent HELLO 2 (deliveries as MSG/DMSG frames)."""
    client = connect()
    assert client.ask("HELLO 2").startswith(b'HELLO {"protocol":2')
    return client


def request(client: LineClient, topic: str, data: bytes) -> int:
    """Send a REQ frame; returns the request id of its REQUESTED reply."""
    client.send(b"REQ %s %s %d\n%s\n" % (client.client_id.encode(), topic.encode(), len(data), data))
    reply = client.line()
    assert reply.startswith(b"REQUESTED "), reply
    return int(reply.split()[1])


def request_frame(client: LineClient) -> tuple[str, str, bytes]:
    """The next delivery, a request: (topic, reply token, payload) of its ``MSG <topic> <token> <n>``."""
    header, payload = client.frame()
    fields = header.decode().split(" ")
    assert fields[0] == "MSG" and len(fields) == 4, header
    return fields[1], fields[2], payload


def reply(client: LineClient, token: str, data: bytes) -> None:
    client.send(b"REPLY %s %d\n%s\n" % (token.encode(), len(data), data))


def rmsg(client: LineClient) -> tuple[int, bytes]:
    """The next RMSG frame: (request id, payload)."""
    header, payload = client.frame()
    word, request_id, _ = header.split(b" ")
    assert word == b"RMSG", header
    return int(request_id), payload


def test_a_request_is_answered_straight_to_its_requester(connect: Connect) -> None:
    requester, responder = connect(), framed(connect)
    assert b'"request"' in requester.ask("HELLO")
    responder.subscribe("svc.time")
    first = request(requester, "svc.time", b"what\ntime?\x00")
    topic, token, payload = request_frame(responder)
    assert (topic, payload) == ("svc.time", b"what\ntime?\x00")
    reply(responder, token, b"noon\r\n")
    assert rmsg(requester) == (first, b"noon\r\n")
    # ids count up per connection; the requester needs no HELLO 2 to get RMSG frames
    assert request(requester, "svc.time", b"again") == first + 1
    _, token, _ = request_frame(responder)
    reply(responder, token, b"")
    assert rmsg(requester) == (first + 1, b"")
    figures = stats(requester)
    assert (figures["requests"], figures["replies"], figures["replies_dropped"]) == (2, 2, 0)
    assert figures["commands"]["req"] == 2 and figures["commands"]["reply"] == 2
    assert figures["topics"] == 1  # the replies made no topic


def test_the_first_reply_wins_and_later_ones_are_dropped_and_counted(connect: Connect) -> None:
    requester, billing, audit = connect(), framed(connect), framed(connect)
    assert billing.ask(f"SUBSCRIBE {billing.client_id} orders GROUP billing") == b"SUBSCRIBED orders"
    assert audit.ask(f"SUBSCRIBE {audit.client_id} orders GROUP audit") == b"SUBSCRIBED orders"
    request_id = request(requester, "orders", b"order 1")
    tokens = [request_frame(billing)[1], request_frame(audit)[1]]
    assert tokens[0] == tokens[1]  # one request, one token, each group a copy
    reply(audit, tokens[1], b"audited")
    reply(billing, tokens[0], b"billed")
    reply(billing, tokens[0], b"billed twice")
    assert rmsg(requester) == (request_id, b"audited")
    assert requester.quiet()
    assert billing.ask("PING") == b"PONG"  # a dropped reply gets no answer, as in NATS
    figures = stats(requester)
    assert (figures["replies"], figures["replies_dropped"], figures["replies_malformed"]) == (1, 2, 0)


def test_two_responders_in_one_group_get_one_copy(connect: Connect) -> None:
    requester, one, two = connect(), framed(connect), framed(connect)
    for responder in (one, two):
        assert responder.ask(f"SUBSCRIBE {responder.client_id} svc GROUP workers") == b"SUBSCRIBED svc"
    ids = [request(requester, "svc", b"job %d" % i) for i in range(4)]
    answered = []
    for responder in (one, two, one, two):  # round robin inside the group
        _, token, payload = request_frame(responder)
        reply(responder, token, payload.upper())
        answered.append(rmsg(requester))
    assert sorted(answered) == [(i, b"JOB %d" % n) for n, i in enumerate(ids)]
    assert one.quiet() and two.quiet()


def test_a_reply_to_a_closed_requester_is_dropped(connect: Connect) -> None:
    requester, responder = connect(), framed(connect)
    responder.subscribe("svc")
    request(requester, "svc", b"hello")
    _, token, _ = request_frame(responder)
    assert requester.ask("DISCONNECT") == b"DISCONNECTED"
    assert requester.at_eof()
    reply(responder, token, b"too late")
    assert responder.ask("PING") == b"PONG"
    assert stats(responder)["replies_dropped"] == 1


def test_a_reused_handle_never_gets_an_old_reply(server: ServerProcess, connect: Connect) -> None:
    responder = framed(connect)
    responder.subscribe("svc")
    old = server.client()
    old.connect()
    old_id = request(old, "svc", b"first")
    _, old_token, _ = request_frame(responder)
    old.close()
    # the core reuses the last freed handle first: the next connection gets old's handle again
    until(lambda: stats(responder)["connections"] == 1, "the server to see the close")
    new = connect()
    new_id = request(new, "svc", b"second")
    assert new_id == old_id == 1
    _, new_token, _ = request_frame(responder)
    handle, generation, _ = new_token.split(".")
    assert old_token.split(".")[0] == handle and old_token.split(".")[1] != generation
    reply(responder, old_token, b"for the old connection")
    assert new.quiet()
    reply(responder, new_token, b"for the new one")
    assert rmsg(new) == (new_id, b"for the new one")
    assert stats(new)["replies_dropped"] == 1


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "1.2",
        "1.2.3.4",
        "1..3",
        ".1.3",
        "1.2.",
        "1.2.0",
        "x.1.1",
        "-1.1.1",
        "99999999999.1.1",
        "1.2.3x",
    ],
)
def test_a_malformed_token_is_refused_and_its_payload_skipped(connect: Connect, token: str) -> None:
    responder = connect()
    reply(responder, token, b"PING\n")  # a payload that looks like a command is skipped unread
    assert responder.line() == b"ERROR BAD_REPLY_TOKEN not a reply token: '%s'" % token.encode()
    assert responder.ask("PING") == b"PONG"
    figures = stats(responder)
    assert (figures["replies_malformed"], figures["errors"]["bad_reply_token"]) == (1, 1)


def test_a_reply_needs_connect_and_a_frame_header_with_a_count(server: ServerProcess) -> None:
    client = server.client()
    reply(client, "0.1.1", b"x")
    assert client.line() == b"ERROR NOT_CONNECTED not connected: send CONNECT first"
    client.connect()
    client.send("REPLY 0.1.1")
    assert client.line().startswith(b"ERROR BAD_FRAME usage: REPLY <token> <nbytes>")
    assert client.at_eof()


def test_a_request_with_a_wrong_client_id_or_topic_is_refused(connect: Connect) -> None:
    client = connect()
    client.send(b"REQ c999 svc 2\nhi\n")
    assert client.line().startswith(b"ERROR WRONG_CLIENT_ID ")
    client.send(b"REQ %s bad\x01topic 2\nhi\n" % client.client_id.encode())
    assert client.line().startswith(b"ERROR BAD_TOPIC ")
    assert client.ask("PING") == b"PONG"
    assert stats(client)["requests"] == 0


def test_a_v1_subscriber_receives_a_request_as_a_plain_message(connect: Connect) -> None:
    requester, v1 = connect(), connect()
    v1.subscribe("svc")
    request(requester, "svc", b"line one\nline two")
    assert v1.line() == b"MESSAGE svc line one line two"  # the v1 rule: a LF becomes a space


def test_an_acknowledged_request_carries_its_token_in_dmsg(connect: Connect) -> None:
    requester, responder = connect(), framed(connect)
    assert responder.ask(f"SUBSCRIBE {responder.client_id} svc ACK") == b"SUBSCRIBED svc"
    request_id = request(requester, "svc", b"ack me")
    header, payload = responder.frame()
    word, topic, tag, attempt, token, nbytes = header.decode().split(" ")
    assert (word, topic, attempt, nbytes, payload) == ("DMSG", "svc", "1", "6", b"ack me")
    # NACK: redelivered with the same token
    responder.send(f"NACK {responder.client_id} {tag}")
    header, _ = responder.frame()
    assert header.decode().split(" ")[3:5] == ["2", token]
    reply(responder, token, b"acked")
    assert rmsg(requester) == (request_id, b"acked")


def test_a_request_waits_in_the_backlog_with_its_token(connect: Connect) -> None:
    requester = connect()
    request_id = request(requester, "later", b"queued")
    responder = framed(connect)
    responder.subscribe("later")
    _, token, payload = request_frame(responder)
    assert payload == b"queued"
    reply(responder, token, b"done")
    assert rmsg(requester) == (request_id, b"done")


def test_a_request_given_back_by_a_closed_subscriber_keeps_its_token(connect: Connect) -> None:
    requester, dying, survivor = connect(), framed(connect), framed(connect)
    for responder in (dying, survivor):
        assert responder.ask(f"SUBSCRIBE {responder.client_id} svc ACK") == b"SUBSCRIBED svc"
    request_id = request(requester, "svc", b"work")
    header, _ = dying.frame()
    token = header.decode().split(" ")[4]
    dying.close()  # unacknowledged: the request goes to the other subscriber
    header, _ = survivor.frame()
    assert header.decode().split(" ")[4] == token
    reply(survivor, token, b"finished")
    assert rmsg(requester) == (request_id, b"finished")


def test_16_requesters_never_get_another_ones_reply(connect: Connect) -> None:
    responder = framed(connect)
    assert responder.ask(f"SUBSCRIBE {responder.client_id} svc GROUP workers") == b"SUBSCRIBED svc"
    requesters = [connect() for _ in range(16)]
    asked: dict[str, tuple[LineClient, int, bytes]] = {}
    for round_ in range(5):
        for n, requester in enumerate(requesters):
            payload = b"%d/%d" % (n, round_)
            requester.send(b"REQ %s svc %d\n%s\n" % (requester.client_id.encode(), len(payload), payload))
        for n, requester in enumerate(requesters):
            line = requester.line()
            assert line.startswith(b"REQUESTED "), line
            asked[f"{n}/{round_}"] = (requester, int(line.split()[1]), b"%d/%d" % (n, round_))
        # answered in reverse order of arrival
        frames = [request_frame(responder) for _ in requesters]
        for _, token, payload in reversed(frames):
            reply(responder, token, b"re:" + payload)
        for requester, request_id, payload in (asked[f"{n}/{round_}"] for n in range(16)):
            assert rmsg(requester) == (request_id, b"re:" + payload)
    assert stats(responder)["replies"] == 80


def test_a_request_is_not_written_to_the_log(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server("--data-dir", str(tmp_path))
    client = server.client()
    client.connect()
    request(client, "jobs", b"a request")
    client.publish("jobs", "a message")
    assert stats(client)["log_live_messages"] == 1
    client.close()
    assert server.stop() == 0
    again = start_server("--data-dir", str(tmp_path))
    reader = again.client()
    reader.connect()
    reader.subscribe("jobs")
    assert reader.line() == b"MESSAGE jobs a message"
    assert reader.quiet()


def test_metrics_count_requests_and_replies(monitored: tuple[ServerProcess, str]) -> None:
    proc, url = monitored
    requester, responder = proc.client(), proc.client()
    requester.connect()
    responder.connect()
    assert responder.ask("HELLO 2").startswith(b"HELLO ")
    responder.subscribe("svc")
    request_id = request(requester, "svc", b"x")
    _, token, _ = request_frame(responder)
    reply(responder, token, b"y")
    reply(responder, token, b"y again")
    reply(responder, "nonsense", b"z")
    assert responder.line().startswith(b"ERROR BAD_REPLY_TOKEN ")
    assert rmsg(requester) == (request_id, b"y")
    samples = scrape(url)
    assert samples[("pigeon_requests_total", ())] == 1
    assert samples[("pigeon_replies_total", ())] == 1
    assert samples[("pigeon_replies_dropped_total", ())] == 1
    assert samples[("pigeon_replies_malformed_total", ())] == 1
    assert samples[("pigeon_requests_forgotten_total", ())] == 0


def test_a_cluster_node_takes_request_frames_whole() -> None:
    """The router's splitting (pigeon/cluster/router.py): a REQ or REPLY frame is one command, so its
    payload is never read as commands (tests over a real cluster need etcd and aetcd:
    test_cluster_reqrep.py)."""
    data = b"REQ c1 svc 9\nPING\nPING\nREPLY 0.1.1 4\nPING\nPING\n"
    items, used, _, _ = split_commands(data, 1 << 20)
    assert items == [b"REQ c1 svc 9\nPING\nPING", b"REPLY 0.1.1 4\nPING", b"PING"]
    assert used == len(data)


def test_past_4096_waiting_requests_the_oldest_is_forgotten(connect: Connect) -> None:
    requester = connect()
    cid = requester.client_id.encode()
    requester.send(b"".join(b"REQ %s pile 1\n%d\n" % (cid, i % 10) for i in range(4097)))
    assert requester.lines(4097)[-1] == b"REQUESTED 4097"
    responder = framed(connect)
    responder.subscribe("pile")
    tokens = [request_frame(responder)[1] for _ in range(4097)]
    assert tokens[0].endswith(".1") and tokens[-1].endswith(".4097")
    reply(responder, tokens[0], b"too late")  # forgotten when the 4097th was asked
    reply(responder, tokens[1], b"kept")
    assert rmsg(requester) == (2, b"kept")
    figures = stats(requester)
    assert (figures["requests_forgotten"], figures["replies_dropped"], figures["replies"]) == (1, 1, 1)
