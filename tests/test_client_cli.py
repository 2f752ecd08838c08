"""``pigeon-cli`` run as a subprocess against a real server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pigeon import Client
from pigeon.testing import ServerProcess
from tests.clients import figures

StartServer = Callable[..., ServerProcess]
StartSub = Callable[..., "subprocess.Popen[str]"]


def _script() -> str:
    beside = Path(sys.executable).with_name("pigeon-cli")
    found = str(beside) if beside.exists() else shutil.which("pigeon-cli")
    if not found:
        pytest.skip("pigeon-cli is not installed (pip install -e .)", allow_module_level=True)
    return found


PIGEON_CLI = _script()


def cli(server: ServerProcess, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``pigeon-cli`` to completion against ``server``."""
    command = [PIGEON_CLI, args[0], "--host", server.host, "--port", str(server.port), *args[1:]]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)


def _default_sigint() -> None:
    # A shell that runs the suite in the background (or `trap "" INT`) passes SIGINT on ignored, and
    # Python keeps an ignored SIGINT ignored: the child gets the default disposition back, so Ctrl-C works.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def start_sub(server: ServerProcess) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``pigeon-cli sub`` and return once it is subscribed; kills leftovers afterwards."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        command = [PIGEON_CLI, "sub", *args, "--host", server.host, "--port", str(server.port)]
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
        )
        procs.append(proc)
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("subscribed to"), "sub did not report its subscription"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.smoke
def test_sub_shows_what_pub_sends(server: ServerProcess, start_sub: StartSub) -> None:
    sub = start_sub("news", "--count", "4")
    assert cli(server, "pub", "news", "one message").returncode == 0
    piped = cli(server, "pub", "news", stdin="from stdin\r\nsecond  line\nno newline at the end")
    assert piped.returncode == 0, piped.stderr
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    assert out.splitlines() == ["one message", "from stdin", "second  line", "no newline at the end"]


def test_sub_json_output(server: ServerProcess, start_sub: StartSub) -> None:
    sub = start_sub("a", "b", "--count", "3", "--json")
    with Client(server.host, server.port) as client:
        client.publish("a", "héllo")
        client.publish("b", b"\xff\xfe")
        client.publish("a", '{"quoted": true}')
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [
        {"topic": "a", "data": "héllo"},
        {"topic": "b", "data_base64": "//4="},
        {"topic": "a", "data": '{"quoted": true}'},
    ]


def test_sub_gets_the_backlog_and_stops_at_count(server: ServerProcess) -> None:
    assert cli(server, "pub", "jobs", stdin="1\n2\n3\n").returncode == 0
    result = cli(server, "sub", "jobs", "--count", "2")
    assert result.returncode == 0
    assert result.stdout == "1\n2\n"


def test_sub_ack_acknowledges_each_printed_message(server: ServerProcess) -> None:
    assert cli(server, "pub", "jobs", stdin="1\n2\n3\n").returncode == 0
    first = cli(server, "sub", "jobs", "--ack", "--prefetch", "1", "--count", "2")
    assert (first.returncode, first.stdout) == (0, "1\n2\n")
    assert figures(server)["acks"] == 2
    # the third, if it was delivered before the first sub left, went back unacknowledged
    second = cli(server, "sub", "jobs", "--ack", "--count", "1", "--json")
    assert json.loads(second.stdout) == {"topic": "jobs", "data": "3"}
    stats = figures(server)
    assert (stats["acks"], stats["unacked"], stats["commands"]["ack"]) == (3, 0, 3)


def test_sub_prefetch_needs_ack(server: ServerProcess) -> None:
    result = cli(server, "sub", "jobs", "--prefetch", "5", "--count", "1")
    assert (result.returncode, result.stderr) == (1, "pigeon-cli: --prefetch needs --ack\n")


@pytest.mark.parametrize("options", [[], ["--reconnect"]])
def test_sub_exits_quietly_on_ctrl_c(server: ServerProcess, start_sub: StartSub, options: list[str]) -> None:
    sub = start_sub("t", *options)
    sub.send_signal(signal.SIGINT)
    _, err = sub.communicate(timeout=30)
    assert sub.returncode == 130
    assert err == ""


def test_sub_reconnect_keeps_subscribing_across_a_server_restart(start_server: StartServer) -> None:
    first = start_server()
    command = [PIGEON_CLI, "sub", "jobs", "--reconnect", "--count", "2", "--port", str(first.port)]
    sub = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sub.stderr is not None and sub.stderr.readline().startswith("subscribed to")
        assert cli(first, "pub", "jobs", "before").returncode == 0
        assert first.stop() == 0
        second = start_server("--port", str(first.port))
        assert cli(second, "pub", "jobs", "after the restart").returncode == 0
        out, err = sub.communicate(timeout=30)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    assert out.splitlines() == ["before", "after the restart"]


def test_sub_without_reconnect_ends_when_the_server_stops(start_server: StartServer) -> None:
    server = start_server()
    command = [PIGEON_CLI, "sub", "jobs", "--port", str(server.port)]
    sub = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert sub.stderr is not None and sub.stderr.readline().startswith("subscribed to")
    assert server.stop() == 0
    _, err = sub.communicate(timeout=30)
    assert sub.returncode == 1
    assert err.startswith("pigeon-cli: connection closed by the server") and len(err.splitlines()) == 1


def test_pub_sends_argument_bytes_as_they_are(server: ServerProcess) -> None:
    with Client(server.host, server.port) as client:
        client.subscribe("jobs")
        # what `pigeon-cli pub jobs $'\xff\xfe binary'` receives: argv decoded with surrogateescape
        result = cli(server, "pub", "jobs", os.fsdecode(b"\xff\xfe binary"))
        assert result.returncode == 0, result.stderr
        assert client.next_message(10).data == b"\xff\xfe binary"


def test_ping_prints_round_trips(server: ServerProcess) -> None:
    result = cli(server, "ping", "--count", "3")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        word, millis, unit = line.split()
        assert (word, unit) == ("PONG", "ms") and float(millis) > 0


def test_refused_lines_are_reported(start_server: StartServer) -> None:
    server = start_server("--max-topics", "1")
    with Client(server.host, server.port) as client:
        client.publish("other", "keeps the only topic")
    result = cli(server, "pub", "refused", stdin="one\ntwo\n")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "pigeon-cli: line 1 refused: too many topics (limit 1)",
        "pigeon-cli: line 2 refused: too many topics (limit 1)",
    ]


def test_pub_to_a_full_backlog_waits_for_a_consumer(start_server: StartServer) -> None:
    server = start_server("--max-backlog", "2")
    command = [PIGEON_CLI, "pub", "full", "--host", server.host, "--port", str(server.port)]
    pub = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with contextlib.suppress(subprocess.TimeoutExpired):  # held by flow control, as it should be
        pub.communicate("1\n2\n3\n4\n5\n", timeout=1)
    assert pub.poll() is None, "pub waits while the backlog is full"
    with Client(server.host, server.port) as consumer:
        consumer.subscribe("full")
        assert [consumer.next_message(10).text for _ in range(5)] == ["1", "2", "3", "4", "5"]
    _, stderr = pub.communicate(timeout=30)
    assert (pub.returncode, stderr) == (0, "")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CANNOT_CONNECT = "pigeon-cli: cannot connect to 127.0.0.1:"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pub", "two words", "x"], "pigeon-cli: topic 'two words' must not contain whitespace"),
        (["pub", os.fsdecode(b"\xff"), "x"], "pigeon-cli: topic b'\\xff' is not valid UTF-8"),
        (["sub", "", "--count", "1"], "pigeon-cli: topic must not be empty"),
        (["pub", "t", "x", "--port", str(_closed_port())], "pigeon-cli: cannot connect to 127.0.0.1:"),
        (["ping", "--port", str(_closed_port())], "pigeon-cli: cannot connect to 127.0.0.1:"),
        (
            ["stats", "--timeout", "2", "--port", str(_closed_port())],
            "pigeon-cli: cannot connect to 127.0.0.1:",
        ),
        (["top", "--timeout", "2"], "pigeon-cli: top needs a terminal"),
    ],
)
def test_errors_are_one_line_and_exit_1(server: ServerProcess, args: list[str], message: str) -> None:
    result = cli(server, *args)  # a later --port overrides the server's
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message)


@pytest.mark.parametrize("args", [[], ["pub"], ["sub", "t", "--count", "0"], ["ping", "--port", "x"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = subprocess.run([PIGEON_CLI, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "usage: pigeon-cli" in result.stderr
    assert "Traceback" not in result.stderr


def test_other_modules_subcommands_are_registered(server: ServerProcess) -> None:
    result = cli(server, "stats", "--json", "--timeout", "2")
    assert result.returncode == 0, result.stderr
    assert "connections" in json.loads(result.stdout)


def test_bench_without_psutil_says_what_to_install(server: ServerProcess) -> None:
    hide = "import sys; sys.modules['psutil'] = None; from pigeon.cli.client import main; sys.exit(main())"
    command = [sys.executable, "-c", hide, "bench", "--port", str(server.port), "--workloads", "pipe"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["bench: needs psutil: pip install 'pigeon-broker[bench]'"]


def test_sub_group_joins_a_consumer_group_on_a_pattern(server: ServerProcess, start_sub: StartSub) -> None:
    first = start_sub("orders.*", "--group", "billing", "--count", "2", "--json")
    other = start_sub("orders.*", "--group", "shipping", "--count", "2")
    with Client(server.host, server.port) as client:
        client.publish("orders.eu", "one")
        client.publish("orders.us", "two")
    out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [
        {"topic": "orders.eu", "data": "one"},
        {"topic": "orders.us", "data": "two"},
    ]
    out, err = other.communicate(timeout=30)
    assert other.returncode == 0, err
    assert out.splitlines() == ["one", "two"]  # each group gets every message
