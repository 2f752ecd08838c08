"""``pigeon-cli stats`` and ``pigeon-cli top`` against a real server; top in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pigeon import Client
from pigeon.cli.top import Sample, screen_lines
from pigeon.client.codec import STATS_PAGE
from pigeon.testing import ServerProcess
from tests.monitoring import traffic

CLI = [sys.executable, "-m", "pigeon.cli.client"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run pigeon-cli with these arguments."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def rows(output: str) -> dict[str, list[str]]:
    """A printed table's rows by first column (the header included)."""
    return {line.split()[0]: line.split()[1:] for line in output.splitlines() if line.strip()}


def test_stats_tables(server: ServerProcess) -> None:
    sub, pub = traffic(server)
    port = str(server.port)
    figures = rows(cli("stats", "--port", port).stdout)
    assert figures["FIGURE"] == ["VALUE"]
    assert figures["published"] == ["7"] and figures["delivered"] == ["4"]
    assert figures["backlog_messages"] == ["3"] and figures["commands.publish"] == ["7"]
    topics = rows(cli("stats", "topics", "--port", port).stdout)
    assert topics["idle"] == ["0", "3", "3", "0"]
    assert topics["jobs"] == ["1", "0", "4", "4"]
    framed = server.client()
    assert framed.ask("HELLO 2").startswith(b'HELLO {"protocol":2')
    framed.connect()
    conns = rows(cli("stats", "connections", "--port", port).stdout)
    assert conns["CLIENT"][:3] == ["ADDRESS", "PROTO", "SUBS"]
    assert conns[sub.client_id][0] == "{}:{}".format(*sub.sock.getsockname()[:2])
    assert conns[sub.client_id][1:3] == ["1", "1"] and conns[sub.client_id][-3:-1] == ["0", "4"]
    assert conns[pub.client_id][-3:-1] == ["7", "0"]
    assert conns[framed.client_id][1] == "2", "the protocol its HELLO 2 chose"
    framed.close()
    raw = json.loads(cli("stats", "topics", "--json", "--port", port).stdout)
    assert sorted(t["name"] for t in raw) == ["idle", "jobs"]  # in the server's hash table order
    sub.close()
    pub.close()


def test_stats_groups_table(server: ServerProcess) -> None:
    member = server.client()
    member.connect()
    for line in ("SUBSCRIBE {} orders GROUP billing ACK", "SUBSCRIBE {} orders.*"):
        assert member.ask(line.format(member.client_id)).startswith(b"SUBSCRIBED ")
    member.publish("orders", "one")
    assert member.line().startswith(b"DELIVER orders 1 1 one")
    groups = rows(cli("stats", "groups", "--port", str(server.port)).stdout)
    assert groups["TOPIC"] == ["OR", "PATTERN", "GROUP", "SUBS", "BACKLOG", "DELIVERED", "UNACKED"]
    assert groups["orders"] == ["billing", "1", "0", "1", "1"]
    assert groups["orders.*"] == ["-", "1", "0", "0", "0"]
    member.close()


def test_stats_reports_an_unreachable_broker() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, then released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = cli("stats", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.startswith(f"pigeon-cli: cannot connect to 127.0.0.1:{port}: ")
    assert len(result.stderr.splitlines()) == 1


def test_stats_and_top_read_every_page_of_a_long_listing(server: ServerProcess) -> None:
    count = STATS_PAGE * 2 + 1
    with Client(server.host, server.port) as client:
        for i in range(count):
            client.publish(f"topic-{i}", "x", wait=False)
        assert client.flush() == []
        sample = Sample.read(client)
    assert len(sample.topics) == count and sample.stats["topics"] == count
    assert [c["client_id"] for c in sample.connections] == [client.client_id]
    result = cli("stats", "topics", "--json", "--timeout", "5", "--port", str(server.port))
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == count


def test_screen_lines_show_rates_between_two_samples() -> None:
    stats = {
        "uptime_seconds": 61,
        "connections": 2,
        "connections_total": 5,
        "topics": 1,
        "published": 100,
        "delivered": 90,
        "bytes_in": 1000,
        "bytes_out": 2000,
        "backlog_messages": 10,
        "backlog_bytes": 50,
        "refused": 0,
        "errors": {"usage": 1},
        "slow_consumers": 0,
    }
    topic = {"name": "jobs", "subscribers": 1, "backlog_messages": 10, "published": 100, "delivered": 90}
    before = Sample(10.0, stats, [topic], [])
    group = {
        "pattern": "orders.*",
        "group": "billing",
        "subscribers": 2,
        "backlog_messages": 5,
        "delivered": 40,
        "unacked": 3,
    }
    after = Sample(
        12.0,
        {**stats, "published": 300, "delivered": 250},
        [{**topic, "published": 300, "delivered": 250}],
        [],
        [group],
    )
    lines = screen_lines(after, before, "host:1")
    assert lines[0].startswith("pigeon host:1  up 1m01s  connections 2 (5 total)")
    assert "msgs/s in 100  out 80" in lines[1]
    assert "errors 1" in lines[2]
    jobs = next(line for line in lines if line.startswith("jobs"))
    assert jobs.split() == ["jobs", "1", "10", "100", "80", "300", "250"]
    assert "TOPIC OR PATTERN" in lines[lines.index(jobs) + 2]
    assert lines[lines.index(jobs) + 3].split() == ["orders.*", "billing", "2", "5", "40", "3"]
    assert not any(line.startswith("TOPIC OR PATTERN") for line in screen_lines(before, None, "host:1"))


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """A private tmux server (its own socket), killed afterwards."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    command = ["tmux", "-L", f"pigeon-test-{os.getpid()}-{time.monotonic_ns()}"]
    yield command
    subprocess.run([*command, "kill-server"], capture_output=True)


def test_top_in_a_terminal(server: ServerProcess, tmux: list[str]) -> None:
    sub, pub = traffic(server)
    assert sub.ask(f"SUBSCRIBE {sub.client_id} audit.* GROUP ops") == b"SUBSCRIBED audit.*"
    top = " ".join(shlex.quote(a) for a in [*CLI, "top", "--port", str(server.port), "--interval", "0.2"])
    done = f"{top}; echo top exited $?; sleep 30"
    subprocess.run([*tmux, "new-session", "-d", "-x", "120", "-y", "30", done], check=True)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout

    deadline = time.monotonic() + 20
    shown = ""
    while time.monotonic() < deadline:
        shown = screen()
        if "q: quit" in shown and "\nidle " in shown:
            break
        time.sleep(0.1)
    lines = rows(shown)
    assert shown.startswith(f"pigeon 127.0.0.1:{server.port}"), shown
    assert "connections 3 (3 total)" in shown, shown  # top's own connection counts
    assert "published 7  delivered 4  backlog 3" in shown, shown
    assert lines["idle"][:2] == ["0", "3"] and lines["jobs"][:2] == ["1", "0"], shown
    assert lines[sub.client_id][0] == "{}:{}".format(*sub.sock.getsockname()[:2]), shown
    assert lines["audit.*"] == ["ops", "1", "0", "0", "0"], shown
    pub.publish("jobs", "c")
    assert sub.line() == b"MESSAGE jobs c"
    while time.monotonic() < deadline and "published 8" not in screen():
        time.sleep(0.1)
    assert "published 8  delivered 5" in screen()
    subprocess.run([*tmux, "send-keys", "q"], check=True)
    while time.monotonic() < deadline and "top exited" not in screen():
        time.sleep(0.1)
    assert "top exited 0" in screen()
    sub.close()
    pub.close()
