"""Users, passwords and permissions (issue 14) over real sockets against a ``pigeon --users FILE`` process:
logins, permission checks and wildcards, admin-only listings, reloads, throttling, protected mode."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pigeon.server.users import hash_password
from pigeon.testing import LineClient, ServerProcess, server_command
from tests.certs import Certs
from tests.conftest import LOOPS
from tests.monitoring import get, start_monitored
from tests.test_tls import TlsLineClient, wait_for_log

# cheap scrypt parameters keep the suite fast; the server checks them exactly as the default ones
FAST = {"n": 16, "r": 1, "p": 1}

AUTH_FAILED = b"ERROR AUTH_FAILED authentication failed"
AUTH_REQUIRED = b"ERROR AUTH_REQUIRED authentication required"

USERS: dict[str, dict[str, Any]] = {
    "orders-api": {"publish": ["orders.*"], "subscribe": []},
    "worker": {"subscribe": ["orders.>", "jobs"], "publish": ["results.>"]},
    "ops": {"admin": True},
    "edge": {"publish": ["orders.*", "logs.>", "exact", "ord*", "*.created"], "subscribe": ["a.*.c"]},
}


def password_of(user: str) -> str:
    return f"pw-{user}"


def users_toml(users: dict[str, dict[str, Any]]) -> str:
    """A users file: each user's password is pw-<name>."""
    lines = []
    for name, fields in users.items():
        lines.append(f"[users.{name}]")
        lines.append(f'password = "{hash_password(password_of(name), **FAST)}"')
        for key, value in fields.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.toml"
    path.write_text(users_toml(USERS))
    return path


@pytest.fixture(params=LOOPS)
def secured(request: pytest.FixtureRequest, users_file: Path) -> Iterator[ServerProcess]:
    """A server with the users above, on each event loop."""
    proc = ServerProcess("--users", str(users_file), loop=request.param)
    yield proc
    assert proc.stop() == 0, "".join(proc.log)


@pytest.fixture
def secured_once(users_file: Path) -> Iterator[ServerProcess]:
    """The same server on the default event loop only (for the slower tests)."""
    proc = ServerProcess("--users", str(users_file))
    yield proc
    assert proc.stop() == 0, "".join(proc.log)


def attempt(
    server: ServerProcess, user: str, password: str, source: str | None = None
) -> tuple[LineClient, bytes]:
    """A new connection that sent CONNECT <user> <password>, and the reply."""
    client = LineClient(server.host, server.port, source_address=(source, 0) if source else None)
    return client, client.ask(f"CONNECT {user} {password}")


def login(server: ServerProcess, user: str) -> LineClient:
    """A connection logged in as ``user`` (its right password)."""
    client, reply = attempt(server, user, password_of(user))
    assert reply.startswith(b"CONNECTED "), reply
    client.client_id = reply.split(b" ", 1)[1].decode()
    return client


def stats(client: LineClient, section: str = "") -> Any:
    reply = client.ask(f"STATS {section}".strip())
    assert reply.startswith(b"STATS "), reply
    return json.loads(reply[6:])


def reload(server: ServerProcess, path: Path, text: str, says: str = "pigeon: reloaded ") -> str:
    """Write the users file, SIGHUP, and return the server's log line with ``says``."""
    path.write_text(text)
    server.proc.send_signal(signal.SIGHUP)
    return wait_for_log(server, says)


# --- logging in


def test_right_password_connects_and_wrong_or_unknown_get_the_same_error_and_close(
    secured: ServerProcess,
) -> None:
    client = login(secured, "worker")
    assert client.ask("PING") == b"PONG"
    wrong, reply = attempt(secured, "worker", "pw-orders-api")
    assert reply == AUTH_FAILED
    assert wrong.at_eof()
    unknown, reply = attempt(secured, "nobody", "pw-worker")
    assert reply == AUTH_FAILED
    assert unknown.at_eof()
    figures = stats(client)
    assert (figures["logins"], figures["auth_failures"]) == (1, 2)


def test_bare_connect_needs_credentials_and_the_connection_stays_open(secured: ServerProcess) -> None:
    client = secured.client()
    assert client.ask("CONNECT") == AUTH_REQUIRED
    assert client.ask("PING") == b"PONG"
    reply = client.ask(f"CONNECT worker {password_of('worker')}")
    assert reply.startswith(b"CONNECTED ")
    assert client.ask("CONNECT").startswith(b"ERROR ALREADY_CONNECTED ")


def test_ping_and_hello_work_before_connect_and_the_rest_does_not(secured: ServerProcess) -> None:
    client = secured.client()
    assert client.ask("PING") == b"PONG"
    assert client.ask("HELLO").startswith(b"HELLO {")
    assert client.ask("PUBLISH x orders.a hi").startswith(b"ERROR NOT_CONNECTED")
    assert client.ask("STATS").startswith(b"ERROR NOT_CONNECTED")


@pytest.mark.parametrize("line", ["CONNECT worker", "CONNECT worker pw extra"])
def test_connect_takes_no_credentials_or_exactly_two_words(secured_once: ServerProcess, line: str) -> None:
    client = secured_once.client()
    assert client.ask(line) == b"ERROR USAGE usage: CONNECT [<user> <password>]"
    assert client.ask("PING") == b"PONG"


def test_without_users_credentials_are_accepted_and_ignored() -> None:
    server = ServerProcess()
    client = server.client()
    reply = client.ask("CONNECT anyone anything")
    assert reply.startswith(b"CONNECTED ")
    client.client_id = reply.split(b" ", 1)[1].decode()
    client.publish("any.topic", "m")
    client.close()
    assert server.stop() == 0


def test_the_login_of_a_closed_connection_is_dropped(secured_once: ServerProcess) -> None:
    client = secured_once.client()
    client.send(f"CONNECT worker {password_of('worker')}")
    client.close()
    # the server stays well: the next login works
    assert login(secured_once, "worker").ask("PING") == b"PONG"


# --- permissions


def test_publish_outside_the_patterns_is_denied_and_changes_nothing(secured: ServerProcess) -> None:
    api, worker, ops = login(secured, "orders-api"), login(secured, "worker"), login(secured, "ops")
    worker.subscribe("jobs")
    before = stats(ops)["published"]
    reply = api.ask(f"PUBLISH {api.client_id} jobs do it")
    assert reply == b"ERROR PERMISSION_DENIED permission denied for 'jobs'"
    assert worker.quiet()
    assert stats(ops)["published"] == before
    api.publish("orders.new", "ok")


def test_subscribe_outside_the_patterns_is_denied_plain_or_with_ack(secured: ServerProcess) -> None:
    worker, ops = login(secured, "worker"), login(secured, "ops")
    for suffix in ("", " ACK", " ACK PREFETCH 5"):
        reply = worker.ask(f"SUBSCRIBE {worker.client_id} results.x{suffix}")
        assert reply == b"ERROR PERMISSION_DENIED permission denied for 'results.x'"
    ops.publish("results.x", "kept")
    assert worker.quiet()
    [entry] = [c for c in stats(ops, "CONNECTIONS")["connections"] if c["user"] == "worker"]
    assert entry["subscriptions_total"] == 0
    worker.subscribe("orders.eu.new")


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("orders.a", True),
        ("orders", False),  # `orders.*` needs one more token
        ("orders.a.b", False),  # and exactly one
        ("logs", False),  # `logs.>` needs at least one more token
        ("logs.x", True),
        ("logs.x.y.z", True),
        ("exact", True),
        ("exact.x", False),
        ("exactly", False),
        ("ord*", True),  # a literal: no partial-token wildcards
        ("ordx", False),
        ("user.created", True),
        ("created", False),
        ("a.b.created", False),
    ],
)
def test_wildcard_edges_for_publish(secured_once: ServerProcess, topic: str, allowed: bool) -> None:
    edge = login(secured_once, "edge")
    reply = edge.ask(f"PUBLISH {edge.client_id} {topic} m")
    expected = f"PUBLISHED {topic}" if allowed else f"ERROR PERMISSION_DENIED permission denied for '{topic}'"
    assert reply == expected.encode()


@pytest.mark.parametrize(("topic", "allowed"), [("a.b.c", True), ("a.c", False), ("a.b.b.c", False)])
def test_wildcard_edges_for_subscribe(secured_once: ServerProcess, topic: str, allowed: bool) -> None:
    edge = login(secured_once, "edge")
    reply = edge.ask(f"SUBSCRIBE {edge.client_id} {topic}")
    expected = (
        f"SUBSCRIBED {topic}" if allowed else f"ERROR PERMISSION_DENIED permission denied for '{topic}'"
    )
    assert reply == expected.encode()


def test_stats_connections_is_for_admins_and_stats_for_everyone(secured: ServerProcess) -> None:
    worker, ops = login(secured, "worker"), login(secured, "ops")
    assert worker.ask("STATS CONNECTIONS") == b"ERROR PERMISSION_DENIED permission denied"
    assert "published" in stats(worker)
    users = sorted(str(c["user"]) for c in stats(ops, "CONNECTIONS")["connections"])
    assert users == ["ops", "worker"]


# --- reloading the users file


def test_reload_adds_and_removes_users_and_changes_permissions(
    secured_once: ServerProcess, users_file: Path
) -> None:
    api, gone = login(secured_once, "orders-api"), login(secured_once, "worker")
    _, reply = attempt(secured_once, "newbie", password_of("newbie"))
    assert reply == AUTH_FAILED
    changed = {k: v for k, v in USERS.items() if k != "worker"}
    changed["orders-api"] = {"publish": ["billing.*"]}
    changed["newbie"] = {"publish": ["x"]}
    line = reload(secured_once, users_file, users_toml(changed))
    assert "4 users (1 added, 1 removed); 1 connections closed, 1 re-granted" in line, line
    assert gone.at_eof()
    assert api.ask(f"PUBLISH {api.client_id} orders.new m") == (
        b"ERROR PERMISSION_DENIED permission denied for 'orders.new'"
    )
    api.publish("billing.due", "m")
    login(secured_once, "newbie").publish("x", "hello")
    assert attempt(secured_once, "worker", password_of("worker"))[1] == AUTH_FAILED


def test_reload_ends_an_ack_subscription_no_longer_allowed_and_redelivers_its_messages(
    secured_once: ServerProcess, users_file: Path
) -> None:
    first, second, ops = (
        login(secured_once, "worker"),
        login(secured_once, "edge"),
        login(secured_once, "ops"),
    )
    assert first.ask(f"SUBSCRIBE {first.client_id} jobs ACK PREFETCH 10") == b"SUBSCRIBED jobs"
    for i in range(3):
        ops.publish("jobs", f"job-{i}")
    assert [line.split(b" ", 4)[4] for line in first.lines(3)] == [b"job-0", b"job-1", b"job-2"]
    changed = dict(USERS)
    changed["worker"] = {"subscribe": ["orders.>"], "publish": ["results.>"]}
    changed["edge"] = {**USERS["edge"], "subscribe": ["jobs"]}
    line = reload(secured_once, users_file, users_toml(changed))
    assert "2 re-granted" in line, line
    assert "user 'worker'" in wait_for_log(secured_once, "subscription to 'jobs' ended: no longer allowed")
    assert second.ask(f"SUBSCRIBE {second.client_id} jobs ACK PREFETCH 10") == b"SUBSCRIBED jobs"
    redelivered = sorted(line.decode().split(" ", 4)[4] for line in second.lines(3))
    assert redelivered == ["job-0", "job-1", "job-2"]
    # the first consumer got no line about it, and stays connected
    assert first.ask("PING") == b"PONG"
    assert (
        first.ask(f"SUBSCRIBE {first.client_id} jobs")
        == b"ERROR PERMISSION_DENIED permission denied for 'jobs'"
    )


def test_a_malformed_file_on_reload_is_refused_and_the_old_rules_stay(
    secured_once: ServerProcess, users_file: Path
) -> None:
    worker = login(secured_once, "worker")
    line = reload(secured_once, users_file, '[users.worker]\npassword = "plain"\n', "reload refused")
    assert "reload refused, the previous 4 users stay" in line and "user 'worker': password:" in line, line
    assert worker.ask("PING") == b"PONG"
    worker.subscribe("jobs")
    login(secured_once, "ops").publish("jobs", "still")
    assert worker.line() == b"MESSAGE jobs still"
    assert attempt(secured_once, "orders-api", password_of("orders-api"))[1].startswith(b"CONNECTED ")


# --- throttling


def test_after_five_failures_an_address_gets_delayed_answers_and_others_do_not(users_file: Path) -> None:
    server, url = start_monitored("--users", str(users_file))
    try:
        for _ in range(5):
            assert attempt(server, "worker", "wrong")[1] == AUTH_FAILED
        started = time.monotonic()
        sixth = LineClient(server.host, server.port)
        sixth.send("CONNECT worker wrong")
        assert sixth.quiet(0.5)  # not answered before its delay of 1 s
        assert sixth.line() == AUTH_FAILED
        assert time.monotonic() - started >= 1.0
        # right or wrong, the next answer waits too (2 s): a guess cannot be told right sooner
        started = time.monotonic()
        login(server, "worker")
        assert time.monotonic() - started >= 2.0
        # another address is not slowed down
        _, reply = attempt(server, "worker", password_of("worker"), source="127.0.0.2")
        assert reply.startswith(b"CONNECTED ")
        _, _, body = get(url + "metrics")
        assert re.search(rb"^pigeon_logins_throttled_total 2\.0$", body, re.MULTILINE), body
        assert "authentication failed for user 'worker'" in wait_for_log(server, "authentication failed")
    finally:
        assert server.stop() == 0


# --- protected mode and start-up


def run_pigeon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*server_command(), "--port", "0", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "example.invalid"])
def test_a_reachable_host_without_users_refuses_to_start(host: str) -> None:
    result = run_pigeon("--host", host)
    assert result.returncode == 1
    assert "--users FILE" in result.stderr and "--allow-anonymous" in result.stderr, result.stderr


def test_allow_anonymous_or_users_lets_it_listen_on_every_interface(users_file: Path) -> None:
    start: Callable[..., ServerProcess] = ServerProcess
    for flags in (("--allow-anonymous",), ("--users", str(users_file))):
        server = start("--host", "0.0.0.0", *flags)
        client = LineClient("127.0.0.1", server.port)
        reply = client.ask("CONNECT")
        assert reply.startswith(b"CONNECTED ") if flags[0] == "--allow-anonymous" else reply == AUTH_REQUIRED
        client.close()
        assert server.stop() == 0


def test_a_malformed_users_file_stops_the_start_naming_the_user_and_field(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text('[users.bob]\npassword = "x"\npublish = ["a..b"]\n')
    result = run_pigeon("--users", str(path))
    assert result.returncode == 1
    assert f"{path}: user 'bob': password: not a scrypt" in result.stderr, result.stderr


# --- client certificates as users (--tls-map-user)


def test_a_client_certificate_names_its_user(tmp_path: Path, certs: Certs) -> None:
    path = tmp_path / "users.toml"
    path.write_text(users_toml({"alice": {"publish": ["orders.*"]}, "ops": {"admin": True}}))
    server = ServerProcess("--users", str(path), *certs.server_flags(mutual=True), "--tls-map-user")
    try:
        alice = TlsLineClient(server, certs.client_context(certs.client))
        reply = alice.ask("CONNECT")  # no password: the certificate's CN is alice
        assert reply.startswith(b"CONNECTED ")
        alice.client_id = reply.split(b" ", 1)[1].decode()
        alice.publish("orders.new", "m")
        assert (
            alice.ask(f"PUBLISH {alice.client_id} jobs m")
            == b"ERROR PERMISSION_DENIED permission denied for 'jobs'"
        )
        # a certificate login can still be ended by a reload that removes the user
        path.write_text(users_toml({"ops": {"admin": True}}))
        server.proc.send_signal(signal.SIGHUP)
        assert "1 connections closed" in wait_for_log(server, "pigeon: reloaded ")
        assert alice.at_eof()
        # the CN names no user now: a bare CONNECT needs credentials, and a password still works
        again = TlsLineClient(server, certs.client_context(certs.client))
        assert again.ask("CONNECT") == AUTH_REQUIRED
        assert again.ask(f"CONNECT ops {password_of('ops')}").startswith(b"CONNECTED ")
    finally:
        assert server.stop() == 0


def test_without_tls_map_user_a_certificate_is_no_login(users_file: Path, certs: Certs) -> None:
    server = ServerProcess("--users", str(users_file), *certs.server_flags(mutual=True))
    try:
        client = TlsLineClient(server, certs.client_context(certs.client))
        assert client.ask("CONNECT") == AUTH_REQUIRED
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("flags", [["--tls-map-user"], ["--tls-map-user", "--users", "u.toml"]])
def test_tls_map_user_needs_client_certificates_and_users(flags: list[str]) -> None:
    result = run_pigeon(*flags)
    assert result.returncode == 2
    assert "--tls-map-user needs --tls-ca (client certificates) and --users" in result.stderr
