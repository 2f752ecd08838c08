"""End to end: the STATS command, the HTTP monitoring endpoints and the logs, against a real server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pigeon._core import Broker
from pigeon.server.busiest import PAGE_MAX, busiest_topics
from pigeon.testing import LineClient, ServerProcess
from tests.clients import ipv6_loopback
from tests.monitoring import (
    ACK_FIGURES,
    ACK_FLAGS,
    ack_traffic,
    get,
    get_json,
    start_monitored,
    stats_of,
    traffic,
    wait_for_held,
)

Monitored = tuple[ServerProcess, str]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# the server-wide figures of acknowledgements and flow control, and their metrics
ACK_METRICS = {
    "unacked": "pigeon_messages_unacked",
    "delayed": "pigeon_messages_delayed",
    "publishers_held": "pigeon_publishers_held",
    "acks": "pigeon_messages_acked_total",
    "nacks": "pigeon_messages_nacked_total",
    "redelivered": "pigeon_messages_redelivered_total",
    "ack_timeouts": "pigeon_ack_timeouts_total",
    "dead_lettered": "pigeon_messages_dead_lettered_total",
    "dead_letters_dropped": "pigeon_dead_letters_dropped_total",
    "publish_holds": "pigeon_publish_holds_total",
}

# a topic's figures and their metrics (with --metrics-topics)
TOPIC_METRICS = {
    "subscribers": "pigeon_topic_subscribers",
    "backlog_messages": "pigeon_topic_backlog_messages",
    "unacked": "pigeon_topic_messages_unacked",
    "published": "pigeon_topic_messages_published_total",
    "delivered": "pigeon_topic_messages_delivered_total",
    "acked": "pigeon_topic_messages_acked_total",
    "nacked": "pigeon_topic_messages_nacked_total",
    "redelivered": "pigeon_topic_messages_redelivered_total",
    "dead_lettered": "pigeon_topic_messages_dead_lettered_total",
}


def scrape(url: str) -> Samples:
    """Every sample of /metrics, by name and labels."""
    status, kind, body = get(url + "metrics")
    assert status == 200 and kind.startswith("text/plain"), kind
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_stats_command_over_the_wire(connect: Callable[[], LineClient], server: ServerProcess) -> None:
    sub, pub = traffic(server)
    stranger = server.client()
    assert stranger.ask("STATS") == b"ERROR NOT_CONNECTED not connected: send CONNECT first"
    stats = stats_of(pub)
    assert stats["connections"] == 3
    assert (stats["published"], stats["delivered"], stats["backlogged"]) == (7, 4, 3)
    assert stats["backlog_messages"] == 3 and stats["topics"] == 2
    assert stats["commands"]["publish"] == 7 and stats["commands"]["unknown"] == 1
    assert stats["errors"]["unknown_command"] == 1
    page = stats_of(pub, "TOPICS")
    assert page["next"] == 0
    topics = {t["name"]: t for t in page["topics"]}
    assert topics["jobs"]["subscribers"] == 1 and topics["jobs"]["delivered"] == 4
    assert topics["idle"]["backlog_messages"] == 3
    conns = {c["client_id"]: c for c in stats_of(pub, "connections")["connections"]}
    assert conns[sub.client_id]["subscriptions"] == ["jobs"]
    assert conns[sub.client_id]["messages_out"] == 4
    assert conns[pub.client_id]["messages_in"] == 7
    host, port = pub.sock.getsockname()[:2]
    assert conns[pub.client_id]["address"] == f"{host}:{port}"
    assert (
        pub.ask("STATS everything") == b"ERROR USAGE usage: STATS [TOPICS|CONNECTIONS [<cursor> [<count>]]]"
    )
    sub.close()
    pub.close()


def test_metrics_parse_and_match_the_core(monitored: Monitored) -> None:
    proc, url = monitored
    sub, pub = traffic(proc)
    samples = scrape(url)
    assert samples[("pigeon_connections", ())] == 2
    assert samples[("pigeon_messages_published_total", ())] == 7
    assert samples[("pigeon_messages_delivered_total", ())] == 4
    assert samples[("pigeon_backlog_messages", ())] == 3
    assert samples[("pigeon_commands_total", (("command", "publish"),))] == 7
    assert samples[("pigeon_errors_total", (("kind", "unknown_command"),))] == 1
    assert samples[("process_open_fds", ())] > 0
    stats = get_json(url + "stats")
    assert samples[("pigeon_received_bytes_total", ())] == stats["bytes_in"]
    # every server-wide figure is exported, under its name
    exported = {
        "connections_rejected": "pigeon_connections_rejected_total",
        "idle_closed": "pigeon_idle_closed_total",
        "requeued": "pigeon_messages_requeued_total",
        "write_timeouts": "pigeon_write_timeouts_total",
        "lost": "pigeon_messages_lost_total",
        "read_pauses": "pigeon_read_pauses_total",
        "refused": "pigeon_messages_refused_total",
        "memory_limit_bytes": "pigeon_memory_limit_bytes",
        "reading_paused": "pigeon_connections_reading_paused",
    }
    for key, name in exported.items():
        assert samples[(name, ())] == stats[key], name
    assert 0 < samples[("pigeon_memory_bytes", ())] <= stats["memory_limit_bytes"]
    # per-topic series are opt-in: none by default, whatever clients do
    assert not [name for name, _ in samples if name.startswith("pigeon_topic_")]
    sub.close()
    pub.close()


def test_metrics_help_says_what_refused_counts(monitored: Monitored) -> None:
    _, url = monitored
    body = get(url + "metrics")[2].decode()
    refused = (
        "PUBLISH commands refused for a full backlog or memory where waiting cannot help "
        "(the publisher consumes the topic, or the message is over a quarter of --max-memory)."
    )
    assert f"# HELP pigeon_messages_refused_total {refused}" in body


@pytest.mark.parametrize("loop", ["asyncio"])
def test_metrics_topics_exports_only_the_busiest(loop: str) -> None:
    proc, url = start_monitored("--metrics-topics", "2", loop=loop)
    pub = proc.client()
    pub.connect()
    for topic, count in (("quiet", 1), ("busy", 5), ("middle", 3), ("calm", 2)):
        for i in range(count):
            pub.publish(topic, str(i))
    samples = scrape(url)
    published = {
        dict(labels)["topic"]: value
        for (name, labels), value in samples.items()
        if name == "pigeon_topic_messages_published_total"
    }
    assert published == {"busy": 5, "middle": 3}
    assert samples[("pigeon_topic_backlog_messages", (("topic", "busy"),))] == 5
    assert samples[("pigeon_topic_subscribers", (("topic", "middle"),))] == 0
    assert ("pigeon_topic_messages_delivered_total", (("topic", "busy"),)) in samples
    assert proc.stop() == 0


def topic_samples(samples: Samples, topic: str) -> dict[str, float]:
    """A topic's figures as /metrics exports them, by their STATS TOPICS key."""
    return {key: samples[(name, (("topic", topic),))] for key, name in TOPIC_METRICS.items()}


@pytest.mark.parametrize("loop", ["asyncio"])
def test_acks_and_flow_control_are_exported_as_stats_counts_them(loop: str) -> None:
    proc, url = start_monitored(*ACK_FLAGS, "--metrics-topics", "10", loop=loop)
    consumer, pub = ack_traffic(proc)
    stats = get_json(url + "stats")
    samples = scrape(url)
    assert {key: stats[key] for key in ACK_FIGURES} == ACK_FIGURES
    assert {key: samples[(name, ())] for key, name in ACK_METRICS.items()} == {
        key: stats[key] for key in ACK_METRICS
    }
    assert samples[("pigeon_commands_total", (("command", "nack"),))] == 3
    # the held publisher is not read, and counted so
    assert samples[("pigeon_connections_reading_paused", ())] == stats["reading_paused"] == 1
    topics = {t["name"]: t for t in get_json(url + "topics")["topics"]}
    assert set(topics) == {"work", "work.dead", "full"}
    for name, topic in topics.items():
        assert topic_samples(samples, name) == {key: topic[key] for key in TOPIC_METRICS}, name
    assert topic_samples(samples, "work") == {
        "subscribers": 1,
        "backlog_messages": 0,
        "unacked": 1,
        "published": 7,
        "delivered": 8,
        "acked": 4,
        "nacked": 3,
        "redelivered": 1,
        "dead_lettered": 1,
    }
    assert topic_samples(samples, "work.dead")["backlog_messages"] == 1
    conns = {c["client_id"]: c for c in get_json(url + "connections")["connections"]}
    assert (conns[consumer.client_id]["unacked"], conns[consumer.client_id]["held"]) == (1, False)
    assert (conns[pub.client_id]["unacked"], conns[pub.client_id]["held"]) == (0, True)
    assert proc.stop() == 0


@pytest.mark.parametrize("loop", ["asyncio"])
def test_ack_timeouts_and_dropped_dead_letters_are_exported(loop: str) -> None:
    proc, url = start_monitored(
        "--ack-timeout", "0.3", "--max-deliveries", "1", "--max-backlog", "1", loop=loop
    )
    consumer, pub = proc.client(), proc.client()
    cid = consumer.connect()
    pub.connect()
    assert consumer.ask(f"SUBSCRIBE {cid} late ACK") == b"SUBSCRIBED late"
    pub.publish("late", "m1")
    pub.publish("late", "m2")
    assert consumer.lines(2) == [b"DELIVER late 1 1 m1", b"DELIVER late 2 1 m2"]
    # neither is acked: both time out; m1 fills late.dead's backlog of one, m2 finds it full
    deadline = time.monotonic() + 30
    while (stats := get_json(url + "stats"))["dead_letters_dropped"] == 0:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    samples = scrape(url)
    assert (stats["ack_timeouts"], stats["dead_lettered"], stats["dead_letters_dropped"]) == (2, 1, 1)
    assert {key: samples[(name, ())] for key, name in ACK_METRICS.items()} == {
        key: stats[key] for key in ACK_METRICS
    }
    assert proc.stop() == 0


def test_json_endpoints(monitored: Monitored) -> None:
    proc, url = monitored
    sub, pub = traffic(proc)
    assert get_json(url + "healthz") == {"status": "ok"}
    stats = get_json(url + "stats")
    assert (stats["connections"], stats["published"], stats["delivered"]) == (2, 7, 4)
    page = get_json(url + "topics")
    assert page["next"] == 0
    assert sorted((t["name"], t["subscribers"], t["backlog_messages"]) for t in page["topics"]) == [
        ("idle", 0, 3),
        ("jobs", 1, 0),
    ]
    busiest = get_json(url + "topics/busiest?count=1")["topics"]
    assert [(t["name"], t["published"], t["delivered"]) for t in busiest] == [("jobs", 4, 4)]
    page = get_json(url + "connections")
    assert page["next"] == 0
    conns = {c["client_id"]: c for c in page["connections"]}
    assert set(conns) == {sub.client_id, pub.client_id}
    assert conns[sub.client_id]["pending_bytes"] == 0
    assert conns[pub.client_id]["messages_in"] == 7
    status, kind, body = get(url)
    assert status == 200 and kind.startswith("text/html") and b"<canvas" in body
    assert get(url + "nothing-here")[0] == 404
    sub.close()
    pub.close()


def test_topics_and_connections_are_served_in_pages(monitored: Monitored) -> None:
    proc, url = monitored
    clients = [proc.client() for _ in range(5)]
    for client in clients:
        client.connect()
    names = {f"t{i}" for i in range(25)}
    for name in names:
        clients[0].publish(name, "x")
    for path, key, expected in (
        ("topics", "topics", names),
        ("connections", "connections", {c.client_id for c in clients}),
    ):
        seen: list[str] = []
        cursor, pages = 0, 0
        while True:
            page = get_json(f"{url}{path}?cursor={cursor}&count=2")
            assert len(page[key]) <= 2 or path == "topics"  # a topic page ends at a bucket's end
            seen += [entry["name"] if key == "topics" else entry["client_id"] for entry in page[key]]
            pages += 1
            cursor = page["next"]
            if cursor == 0 or pages > 100:
                break
        assert cursor == 0
        assert pages > 2, path
        assert sorted(seen) == sorted(expected), path
    bad_counts = ("count=0", f"count={PAGE_MAX + 1}", "count=x")
    for path, bad in [
        (p, b) for p in ("topics", "connections") for b in (*bad_counts, "cursor=-1", "cursor=1.5")
    ] + [("topics/busiest", b) for b in bad_counts]:
        status, _, body = get(f"{url}{path}?{bad}")
        assert status == 400, (path, bad, body)
    for client in clients:
        client.close()


def test_busiest_topics_are_ranked_by_messages_published(monitored: Monitored) -> None:
    proc, url = monitored
    pub = proc.client()
    pub.connect()
    for n in range(1, 31):
        for _ in range(n):
            pub.send(f"PUBLISH {pub.client_id} topic-{n:02d} x\n")
    assert pub.lines(sum(range(1, 31))) == [
        f"PUBLISHED topic-{n:02d}".encode() for n in range(1, 31) for _ in range(n)
    ]
    busiest = get_json(url + "topics/busiest?count=3")["topics"]
    assert [(t["name"], t["published"]) for t in busiest] == [
        ("topic-30", 30),
        ("topic-29", 29),
        ("topic-28", 28),
    ]
    assert len(get_json(url + "topics/busiest")["topics"]) == 30
    pub.close()


def _broker_with_topics(count: int, busy: int = 0) -> Broker:
    """A core holding ``count`` topics of one message each; topic-0 to topic-<busy - 1> got more."""
    broker = Broker()
    handle = broker.open(lambda data: None)
    lines = [b"CONNECT\n"] + [b"PUBLISH c1 topic-%d %d\n" % (i, i) for i in range(count)]
    lines += [b"PUBLISH c1 topic-%d more\n" % i for i in range(busy) for _ in range(busy - i)]
    assert broker.feed(handle, b"".join(lines))
    return broker


def test_the_walk_over_every_topic_yields_to_the_loop_between_pages() -> None:
    broker = _broker_with_topics(10_000, busy=3)

    async def walk_beside_a_bystander() -> tuple[list[dict[str, Any]], int]:
        walk = asyncio.ensure_future(busiest_topics(broker, 3))
        turns = 0
        while not walk.done():
            turns += 1
            await asyncio.sleep(0)
        return walk.result(), turns

    busiest, turns = asyncio.run(walk_beside_a_bystander())
    # 10,000 topics take about ten pages: the bystander ran between them, not only before and after
    assert turns >= 5
    assert [(t["name"], t["published"]) for t in busiest] == [("topic-0", 4), ("topic-1", 3), ("topic-2", 2)]
    assert asyncio.run(busiest_topics(broker, 0)) == []


def test_busiest_topics_counts_each_topic_once() -> None:
    broker = _broker_with_topics(5000)
    busiest = asyncio.run(busiest_topics(broker, 10_000))
    assert sorted(t["name"] for t in busiest) == sorted(f"topic-{i}" for i in range(5000))


@pytest.mark.parametrize("loop", ["asyncio"])
def test_the_host_header_must_name_this_listener(loop: str) -> None:
    proc, url = start_monitored(
        "--http-allow-host", "pigeon.example", "--http-allow-host", "other.example:81", loop=loop
    )
    port = int(url.rsplit(":", 1)[1].strip("/"))
    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"LOCALHOST:{port}",
        "pigeon.example",
        "pigeon.example:8080",
        "other.example:81",
    ):
        assert get(url + "healthz", {"Host": host})[0] == 200, host
    for host in (
        "evil.example",
        f"evil.example:{port}",
        f"127.0.0.1:{port + 1}",
        "other.example",
        "other.example:82",
        "127.0.0.1",
        f"localhost:{port}x",
        "",
        f"pigeon.example.evil:{port}",
    ):
        status, _, body = get(url + "stats", {"Host": host})
        assert status == 421 and b"Misdirected" in body, (host, status, body)
    assert proc.stop() == 0


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_an_ipv6_listener_answers_its_bracketed_address() -> None:
    proc, url = start_monitored("--http-host", "::1", loop="asyncio")
    assert url.startswith("http://[::1]:"), url
    port = int(url.rsplit(":", 1)[1].strip("/"))
    assert get(url + "healthz", {"Host": f"[::1]:{port}"})[0] == 200
    assert get(url + "healthz", {"Host": f"localhost:{port}"})[0] == 200
    assert get(url + "healthz", {"Host": f"[::2]:{port}"})[0] == 421
    assert proc.stop() == 0


def test_monitoring_is_off_by_default(server: ServerProcess) -> None:
    assert not any("monitoring on" in line for line in server.log)


def test_http_port_without_the_monitor_extra_is_a_clear_error() -> None:
    hide = "import sys; sys.modules['aiohttp'] = None; from pigeon.cli.server import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", hide, "--port", "0", "--http-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "pigeon-broker[monitor]" in result.stderr


def test_json_logs_show_connections_and_backlog_warnings() -> None:
    proc = ServerProcess("--log-format", "json", "--log-level", "debug", "--max-backlog", "1")
    client, other, sub = proc.client(), proc.client(), proc.client()
    client.connect()
    other.connect()
    sub.connect()
    client.publish("q", "a")
    # both wait for the full backlog; the operator is told once
    client.send(f"PUBLISH {client.client_id} q b")
    other.send(f"PUBLISH {other.client_id} q c")
    wait_for_held(sub, 2)
    sub.subscribe("q")
    assert sorted(sub.lines(3)) == [b"MESSAGE q a", b"MESSAGE q b", b"MESSAGE q c"]
    assert (client.line(), other.line()) == (b"PUBLISHED q", b"PUBLISHED q")
    address = "{}:{}".format(*client.sock.getsockname()[:2])
    assert client.ask("DISCONNECT") == b"DISCONNECTED"
    assert client.at_eof()
    assert proc.stop() == 0
    entries = [json.loads(line) for line in "".join(proc.log).splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    debug = [e["message"] for e in entries if e["level"] == "debug"]
    assert any("opened" in m and address in m for m in debug), debug
    assert any("closed" in m and "client c1" in m and address in m for m in debug), debug
    warnings = [e["message"] for e in entries if e["level"] == "warning"]
    assert warnings == ["topic 'q': backlog full (1 messages): publishers wait until a subscriber drains it"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_format_choice(fmt: str) -> None:
    proc = ServerProcess("--log-format", fmt)
    assert proc.stop() == 0
    first = proc.log[0]
    assert first.startswith("{") == (fmt == "json"), first


def test_http_port_out_of_range_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pigeon", "--http-port", "70000"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "must be a TCP port from 0 to 65535" in result.stderr


def test_http_port_in_use_stops_the_server_with_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "pigeon", "--port", "0", "--http-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port} for HTTP: address already in use" in result.stderr
