"""End to end: the STATS command, the HTTP monitoring endpoints and the logs, against a real server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pigeon.testing import LineClient, ServerProcess
from tests.monitoring import get, get_json, traffic

Monitored = tuple[ServerProcess, str]


def stats_command(client: LineClient, section: str = "") -> Any:
    """Send STATS (with a section) and decode the JSON of the one-line reply."""
    reply = client.ask(f"STATS {section}".strip())
    word, _, payload = reply.partition(b" ")
    assert word == b"STATS", reply
    return json.loads(payload)


def test_stats_command_over_the_wire(connect: Callable[[], LineClient], server: ServerProcess) -> None:
    sub, pub = traffic(server)
    stats = stats_command(server.client())  # STATS needs no CONNECT
    assert stats["connections"] == 3
    assert (stats["published"], stats["delivered"], stats["backlogged"]) == (7, 4, 3)
    assert stats["backlog_messages"] == 3 and stats["topics"] == 2
    assert stats["commands"]["publish"] == 7 and stats["commands"]["unknown"] == 1
    assert stats["errors"]["unknown_command"] == 1
    topics = {t["name"]: t for t in stats_command(pub, "TOPICS")}
    assert topics["jobs"]["subscribers"] == 1 and topics["jobs"]["delivered"] == 4
    assert topics["idle"]["backlog_messages"] == 3
    conns = {c["client_id"]: c for c in stats_command(pub, "connections")}
    assert conns[sub.client_id]["subscriptions"] == ["jobs"]
    assert conns[sub.client_id]["messages_out"] == 4
    assert conns[pub.client_id]["messages_in"] == 7
    host, port = pub.sock.getsockname()[:2]
    assert conns[pub.client_id]["address"] == f"{host}:{port}"
    assert pub.ask("STATS everything") == b"ERROR USAGE usage: STATS [TOPICS|CONNECTIONS]"
    sub.close()
    pub.close()


def test_metrics_parse_and_match_the_core(monitored: Monitored) -> None:
    proc, url = monitored
    sub, pub = traffic(proc)
    status, kind, body = get(url + "metrics")
    assert status == 200 and kind.startswith("text/plain"), kind
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("pigeon_connections", ())] == 2
    assert samples[("pigeon_messages_published_total", ())] == 7
    assert samples[("pigeon_messages_delivered_total", ())] == 4
    assert samples[("pigeon_backlog_messages", ())] == 3
    assert samples[("pigeon_commands_total", (("command", "publish"),))] == 7
    assert samples[("pigeon_errors_total", (("kind", "unknown_command"),))] == 1
    assert samples[("pigeon_topic_subscribers", (("topic", "jobs"),))] == 1
    assert samples[("pigeon_topic_backlog_messages", (("topic", "idle"),))] == 3
    assert samples[("pigeon_topic_messages_delivered_total", (("topic", "jobs"),))] == 4
    assert samples[("process_open_fds", ())] > 0
    stats = get_json(url + "stats")
    assert samples[("pigeon_received_bytes_total", ())] == stats["bytes_in"]
    sub.close()
    pub.close()


def test_json_endpoints(monitored: Monitored) -> None:
    proc, url = monitored
    sub, pub = traffic(proc)
    assert get_json(url + "healthz") == {"status": "ok"}
    stats = get_json(url + "stats")
    assert (stats["connections"], stats["published"], stats["delivered"]) == (2, 7, 4)
    assert [(t["name"], t["subscribers"], t["backlog_messages"]) for t in get_json(url + "topics")] == [
        ("idle", 0, 3),
        ("jobs", 1, 0),
    ]
    conns = {c["client_id"]: c for c in get_json(url + "connections")}
    assert set(conns) == {sub.client_id, pub.client_id}
    assert conns[sub.client_id]["pending_bytes"] == 0
    assert conns[pub.client_id]["messages_in"] == 7
    status, kind, body = get(url)
    assert status == 200 and kind.startswith("text/html") and b"<canvas" in body
    assert get(url + "nothing-here")[0] == 404
    sub.close()
    pub.close()


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
    client = proc.client()
    client.connect()
    client.publish("q", "a")
    assert client.ask(f"PUBLISH {client.client_id} q b").startswith(b"ERROR BACKLOG_FULL backlog full")
    assert client.ask(f"PUBLISH {client.client_id} q c").startswith(b"ERROR BACKLOG_FULL backlog full")
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
    assert len(warnings) == 1 and "backlog full" in warnings[0], warnings


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
    assert f"cannot listen on 127.0.0.1:{port} for HTTP" in result.stderr
