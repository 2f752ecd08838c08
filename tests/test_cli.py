"""The ``pigeon`` command as a user runs it: flags, start-up line, signals, errors."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import pigeon
from pigeon._core import LIMIT_NAMES
from pigeon.cli.server import build_parser
from pigeon.testing import ServerProcess, server_command
from tests.clients import ipv6_loopback


@pytest.fixture
def console_script() -> str:
    """The installed ``pigeon`` command beside this interpreter; the test is skipped without it."""
    found = shutil.which("pigeon", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the pigeon console script is not installed (pip install -e .)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*server_command(), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.smoke
def test_version_matches_the_package() -> None:
    # pigeon/_version.py is the one definition; the metadata is built from it.
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pigeon {pigeon.__version__}"
    assert version("pigeon-broker") == pigeon.__version__


def test_help_lists_every_flag() -> None:
    result = run("--help")
    assert result.returncode == 0
    limits = ["--" + name.replace("_", "-") for name in LIMIT_NAMES if name != "out_batch"]
    flags = (
        "--host",
        "--port",
        *limits,
        "--users",
        "--allow-anonymous",
        "--http-allow-host",
        "--metrics-topics",
    )
    for flag in (*flags, "--loop", "--version"):
        assert flag in result.stdout, flag


def test_defaults_are_a_drop_in_for_the_original() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.loop) == ("127.0.0.1", 3333, "auto")
    assert (args.max_line, args.max_backlog) == (1024 * 1024, 100_000)


@pytest.mark.parametrize(
    "flag",
    [
        "--max-line=0",
        "--max-backlog=-1",
        "--max-backlog=5000000000",
        "--max-connections=4294967296",
        "--loop=tornado",
        "--port=abc",
        "--port=99999",
        "--port=65536",
        "--port=-1",
        "--write-timeout=nan",
    ],
)
def test_bad_flag_values_are_one_line_and_exit_2(flag: str) -> None:
    result = run(flag)
    assert result.returncode == 2
    name = flag.split("=")[0]
    assert result.stderr.startswith(f"pigeon: error: argument {name}: "), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_console_script_logs_its_address_and_stops_cleanly_on_a_signal(console_script: str, sig: int) -> None:
    server = ServerProcess(command=[console_script])
    start_line = server.log[-1]
    assert f"pigeon {pigeon.__version__} listening on 127.0.0.1:{server.port}" in start_line
    assert server.loop_name in ("uvloop", "asyncio")
    client = server.client()
    client.connect()
    client.subscribe("t")
    assert server.stop(sig) == 0
    assert client.at_eof()
    assert "Traceback" not in "".join(server.log)


def test_a_port_in_use_is_one_clear_line() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = run("--port", str(port))
    finally:
        holder.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # as docs/operations.md shows it
    assert len(lines) == 1 and lines[0].endswith(
        f"ERROR pigeon: cannot listen on 127.0.0.1:{port}: address already in use"
    )


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_an_ipv6_address_is_logged_in_brackets() -> None:
    server = ServerProcess("--host", "::1")
    assert f"listening on [::1]:{server.port} (" in server.log[-1]
    assert server.host == "::1"
    client = server.client()
    assert client.ask("PING") == b"PONG"
    client.close()
    assert server.stop() == 0


def _published(server: ServerProcess, topic: str, count: int) -> None:
    client = server.client()
    client.connect()
    for i in range(count):
        client.publish(topic, str(i))
    client.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGQUIT])
def test_every_stop_signal_exits_0_and_says_what_it_drops(sig: int) -> None:
    server = ServerProcess()
    _published(server, "nobody-listens", 3)
    assert server.stop(sig) == 0
    log = "".join(server.log)
    assert f"{signal.Signals(sig).name}: shutting down" in log
    assert "shutting down: dropping 3 messages held in memory (backlogs and unsent output)" in log, log


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1])
def test_sighup_and_sigusr1_log_a_line_and_the_server_keeps_serving(sig: int) -> None:
    server = ServerProcess()
    _published(server, "t", 2)
    server.proc.send_signal(sig)
    assert server.proc.stderr is not None
    line = server.proc.stderr.readline()
    server.log.append(line)
    if sig == signal.SIGHUP:
        assert "SIGHUP: no users file to reload (pigeon --users FILE), still serving" in line
    else:
        figures = dict(pair.split("=") for pair in line.split("SIGUSR1: ", 1)[1].split())
        assert (figures["published"], figures["delivered"], figures["backlog_messages"]) == ("2", "0", "2")
        assert {"connections", "memory_bytes", "memory_limit_bytes", "write_timeouts"} <= set(figures)
    client = server.client()
    assert client.ask("PING") == b"PONG"
    client.close()
    assert server.stop() == 0


def test_shutdown_flushes_what_was_already_written() -> None:
    server = ServerProcess()
    pub, sub = server.client(), server.client()
    pub.connect()
    sub.connect()
    sub.subscribe("t")
    count = 20_000
    pub.send(b"".join(f"PUBLISH {pub.client_id} t {i}\n".encode() for i in range(count)))
    replies = pub.lines(count)
    assert replies[-1] == b"PUBLISHED t"
    assert server.stop(signal.SIGTERM) == 0
    assert sub.lines(count)[-1] == f"MESSAGE t {count - 1}".encode()
    assert sub.at_eof()
