"""The clients' side of TLS and credentials: URLs, ``from_url``, reconnecting over TLS, the
``pigeon-cli`` flags, the load generator and the pytest fixtures, against ``pigeon`` processes."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pigeon import AsyncClient, Client
from pigeon.client.address import Address, parse_url, tls_context
from pigeon.errors import (
    AuthFailedError,
    AuthRequiredError,
    ConnectionClosedError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from pigeon.testing import ServerProcess
from tests.certs import Certs
from tests.faces import OpenClient
from tests.test_client_cli import PIGEON_CLI
from tests.test_security_wire import users_toml

pytest_plugins = ["pytester"]

StartServer = Callable[..., ServerProcess]


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("pigeon://localhost", Address("localhost", 3333)),
        ("pigeon://10.0.0.5:4000/", Address("10.0.0.5", 4000)),
        ("pigeons://broker.example:3334", Address("broker.example", 3334, tls=True)),
        ("pigeon://[::1]:5000", Address("::1", 5000)),
        ("pigeons://worker:s3cret@h:1", Address("h", 1, "worker", "s3cret", True)),
        # percent-encoded: '@' ':' '/' '%' and non-ASCII in the password, a '+' stays a '+'
        ("pigeon://us%40er:p%3Aa%2Fs%25s+w%C3%B6rd@h", Address("h", 3333, "us@er", "p:a/s%s+wörd")),
    ],
)
def test_urls(url: str, address: Address) -> None:
    assert parse_url(url) == address


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://h:3333", "starts with pigeon:// or pigeons://"),
        ("h:3333", "starts with pigeon:// or pigeons://"),
        ("pigeon://", "no host"),
        ("pigeon://h:99999", "bad broker URL"),
        ("pigeon://h:port", "bad broker URL"),
        ("pigeon://user:@h", "one word"),
        ("pigeon://us%20er:pw@h", "one word"),
        ("pigeon://user:p%09w@h", "one word"),
        ("pigeon://h/topic", "no path or query"),
        ("pigeon://h?tls=1", "no path or query"),
    ],
)
def test_bad_urls(url: str, complaint: str) -> None:
    with pytest.raises(InvalidArgumentError, match=complaint):
        parse_url(url)


def test_a_url_user_without_a_password_is_refused_by_the_clients() -> None:
    assert parse_url("pigeon://user@h").password is None  # pigeon-cli may complete it
    for client in (Client, AsyncClient):
        with pytest.raises(InvalidArgumentError, match="a user needs a password"):
            client.from_url("pigeon://user@h")


def test_a_bad_url_error_hides_the_password() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_url("pigeon://user:hunter2@h:99999")
    assert "hunter2" not in str(caught.value)


def test_credentials_are_checked_before_connecting() -> None:
    for user, password in (("a", None), (None, "b"), ("a b", "c"), ("a", "b\tc"), ("", "x")):
        with pytest.raises(InvalidArgumentError):
            Client("127.0.0.1", 1, user=user, password=password)


def test_plain_url_refuses_a_tls_context(certs: Certs) -> None:
    with pytest.raises(InvalidArgumentError, match="use pigeons://"):
        Client.from_url("pigeon://127.0.0.1:1", tls=certs.client_context())


def test_from_url_both_clients_over_tls(start_server: StartServer, certs: Certs) -> None:
    server = start_server(*certs.server_flags())
    url = f"pigeons://anyone:anything@{server.host}:{server.port}"
    # without --users the credentials are ignored; the certificate is checked against the given CA
    with Client.from_url(url, tls=certs.client_context()) as client:
        client.subscribe("t")
        client.publish("t", "over tls")
        assert client.next_message(10).text == "over tls"
        assert client.user == "anyone"

    async def run_async() -> str:
        async with AsyncClient.from_url(url, tls=certs.client_context()) as client:
            await client.subscribe("t")
            await client.publish("t", "async over tls")
            return (await client.next_message(10)).text

    assert asyncio.run(run_async()) == "async over tls"
    # the system's CAs do not know the test CA
    with pytest.raises(ConnectionClosedError, match="CERTIFICATE_VERIFY_FAILED"):
        Client.from_url(url)


def test_reconnecting_over_tls_resubscribes(certs: Certs) -> None:
    first = ServerProcess(*certs.server_flags())
    client = Client(first.host, first.port, tls=certs.client_context(), reconnect=True)
    client.subscribe("jobs")
    assert first.stop() == 0
    second = ServerProcess(*certs.server_flags(), "--port", str(first.port))
    try:
        client.publish("jobs", "after the restart")  # reconnects: TLS handshake, CONNECT, SUBSCRIBE
        assert client.next_message(10).text == "after the restart"
        assert client.reconnects == 1
        client.close()
    finally:
        assert second.stop() == 0


def cli(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``pigeon-cli`` to completion."""
    return subprocess.run(
        [PIGEON_CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_over_tls(start_server: StartServer, certs: Certs) -> None:
    server = start_server(*certs.server_flags())
    url = f"pigeons://{server.host}:{server.port}"
    address = ["--host", server.host, "--port", str(server.port)]
    sub = subprocess.Popen(
        [PIGEON_CLI, "sub", "jobs", "--count", "2", "--url", url, "--ca", str(certs.ca)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert sub.stderr is not None
    assert sub.stderr.readline().startswith("subscribed to"), sub
    assert cli("pub", "jobs", "one", "--url", url, "--ca", str(certs.ca)).returncode == 0
    assert cli("pub", "jobs", "two", *address, "--tls", "--ca", str(certs.ca)).returncode == 0
    out, _ = sub.communicate(timeout=30)
    assert out.splitlines() == ["one", "two"]
    assert cli("ping", *address, "--ca", str(certs.ca)).returncode == 0
    stats = cli("stats", "--json", "--url", url, "--ca", str(certs.ca))
    assert json.loads(stats.stdout)["published"] == 2
    # the system's CAs do not know the test CA; a plain-text client gets nowhere
    for flags in (["--url", url], [*address, "--tls"], address):
        done = cli("ping", *flags)
        assert done.returncode == 1, done
        assert done.stderr.startswith("pigeon-cli: "), done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in cli("ping", "--url", url).stderr


def test_cli_credentials(server: ServerProcess) -> None:
    address = ["--host", server.host, "--port", str(server.port)]
    without = {k: v for k, v in os.environ.items() if k != "PIGEON_PASSWORD"}
    done = cli("ping", *address, "--user", "ops", env=without)
    assert done.returncode == 1
    assert "--user ops needs --password or the PIGEON_PASSWORD variable" in done.stderr
    # an anonymous server takes the credentials and ignores them
    assert cli("ping", *address, "--user", "ops", env=without | {"PIGEON_PASSWORD": "pw"}).returncode == 0
    assert cli("ping", *address, "--user", "ops", "--password", "pw", env=without).returncode == 0
    url = f"pigeon://ops:pw@{server.host}:{server.port}"
    assert cli("ping", "--url", url).returncode == 0
    # a URL's user without a password takes it from the variable, as --user does
    user_only = f"pigeon://ops@{server.host}:{server.port}"
    assert cli("ping", "--url", user_only, env=without | {"PIGEON_PASSWORD": "pw"}).returncode == 0
    assert "--user ops needs --password" in cli("ping", "--url", user_only, env=without).stderr
    done = cli("ping", "--url", url, "--host", server.host)
    assert done.returncode == 1 and "either --url or --host and --port" in done.stderr
    done = cli("ping", "--url", "redis://h")
    assert done.returncode == 1 and "pigeon:// or pigeons://" in done.stderr
    done = cli("ping", *address, "--ca", "/nonexistent/ca.pem")
    assert done.returncode == 1 and "cannot read the CA certificates of --ca" in done.stderr


def test_bench_over_tls(start_server: StartServer, certs: Certs) -> None:
    server = start_server(*certs.server_flags())
    short = ["--duration", "0.3", "--connections", "20", "--samples", "200", "--no-progress", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "pigeon.bench", "--port", str(server.port), "--ca", str(certs.ca), *short],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    results = {r["workload"]: r for r in json.loads(done.stdout)["results"]}
    for name in ("pipe", "queue", "fanin"):
        assert results[name]["msgs_per_s"] > 0, results[name]
    assert results["ackqueue"]["note"] == "not over TLS"
    assert results["latency"]["p50_us"] > 0
    assert results["connections"]["bytes_per_connection"] is not None
    plain = subprocess.run(
        [sys.executable, "-m", "pigeon.bench", "--port", str(server.port), "--workloads", "pipe", *short],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plain.returncode == 1, plain


PLUGIN_TEST = """
def test_uses_fixtures(pigeon_url, pigeon_client):
    assert pigeon_url == {url!r}
    pigeon_client.subscribe("t")
    pigeon_client.publish("t", "hello")
    assert pigeon_client.next_message(5).text == "hello"
"""


def test_plugin_fixtures_take_a_url(pytester: pytest.Pytester, server: ServerProcess) -> None:
    url = f"pigeon://{server.host}:{server.port}"
    pytester.makepyfile(PLUGIN_TEST.format(url=url))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--pigeon-url", url)
    result.assert_outcomes(passed=1)
    assert json.loads(server.client().ask("HELLO").split(b" ", 1)[1])["protocol"] >= 1


def test_plugin_fixtures_take_a_tls_url_from_the_ini_file(
    pytester: pytest.Pytester, start_server: StartServer, certs: Certs
) -> None:
    server = start_server(*certs.server_flags())
    url = f"pigeons://{server.host}:{server.port}"
    pytester.makeini(f"[pytest]\npigeon_url = {url}\npigeon_ca = {certs.ca}\n")
    pytester.makepyfile(PLUGIN_TEST.format(url=url))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_plugin_without_a_url_starts_a_server(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_uses_fixtures(pigeon_server, pigeon_url, pigeon_client):
            assert pigeon_url == f"pigeon://{pigeon_server.host}:{pigeon_server.port}"
            pigeon_client.publish("t", "x")
            assert pigeon_server.stats()["published"] == 1
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_tls_context_option_shapes(certs: Certs) -> None:
    """``tls=True`` is the system's default context: it verifies the host name."""
    context = tls_context(True)
    assert context is not None
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    given = certs.client_context()
    assert tls_context(given) is given
    assert tls_context(False) is None and tls_context(None) is None


# --- credentials against a broker with users (--users)


@pytest.fixture
def users_server(tmp_path: Path, certs: Certs) -> Iterator[tuple[ServerProcess, Path]]:
    """A broker with users and TLS, and its users file (worker: pw-worker, jobs only)."""
    path = tmp_path / "users.toml"
    path.write_text(users_toml({"worker": {"publish": ["jobs"], "subscribe": ["jobs"]}}))
    server = ServerProcess("--users", str(path), *certs.server_flags())
    yield server, path
    assert server.stop() == 0, "".join(server.log)


def test_both_clients_log_in_over_tls_and_log_in_again_after_a_restart(
    users_server: tuple[ServerProcess, Path], open_client: OpenClient, certs: Certs
) -> None:
    first, path = users_server
    client = open_client(
        first, user="worker", password="pw-worker", tls=certs.client_context(), reconnect=True
    )
    client.subscribe("jobs")
    with pytest.raises(PermissionDeniedError):
        client.publish("orders", "not mine")
    assert first.stop() == 0
    second = ServerProcess("--users", str(path), *certs.server_flags(), "--port", str(first.port))
    try:
        client.publish("jobs", "after the restart")  # a new connection: TLS, CONNECT worker pw-worker
        assert client.next_message(10).text == "after the restart"
        assert client.reconnects == 1
        assert client.stats()["logins"] == 1  # the new server saw the credentials
    finally:
        client.close()
        assert second.stop() == 0, "".join(second.log)


def test_refused_credentials_raise_at_once_and_are_not_retried(
    users_server: tuple[ServerProcess, Path], open_client: OpenClient, certs: Certs
) -> None:
    server, _ = users_server
    with pytest.raises(AuthFailedError, match="authentication failed"):
        open_client(server, user="worker", password="wrong", tls=certs.client_context(), reconnect=True)
    with pytest.raises(AuthRequiredError):
        open_client(server, tls=certs.client_context())
    # the wrong password was tried once, not again and again by the reconnection
    client = open_client(server, user="worker", password="pw-worker", tls=certs.client_context())
    assert client.stats()["auth_failures"] == 1


def test_cli_logs_in_with_the_password_from_the_environment(
    users_server: tuple[ServerProcess, Path], certs: Certs
) -> None:
    server, _ = users_server
    flags = ["--url", f"pigeons://{server.host}:{server.port}", "--ca", str(certs.ca), "--user", "worker"]
    without = {k: v for k, v in os.environ.items() if k != "PIGEON_PASSWORD"}
    assert cli("pub", "jobs", "hi", *flags, env=without | {"PIGEON_PASSWORD": "pw-worker"}).returncode == 0
    refused = cli("pub", "jobs", "hi", *flags, env=without | {"PIGEON_PASSWORD": "wrong"})
    assert refused.returncode == 1 and "authentication failed" in refused.stderr, refused
    # --password wins over the environment, and the URL's credentials are used as they are
    assert (
        cli(
            "pub", "jobs", "hi", *flags, "--password", "pw-worker", env=without | {"PIGEON_PASSWORD": "x"}
        ).returncode
        == 0
    )
    url = f"pigeons://worker:pw-worker@{server.host}:{server.port}"
    done = cli("stats", "--json", "--url", url, "--ca", str(certs.ca), env=without)
    assert json.loads(done.stdout)["published"] == 2, done
    denied = cli("pub", "orders", "hi", "--url", url, "--ca", str(certs.ca), env=without)
    assert denied.returncode == 1 and "permission denied for 'orders'" in denied.stderr, denied
