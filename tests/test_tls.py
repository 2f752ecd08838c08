"""TLS on the client port, over real sockets against a ``pigeon`` process on each event loop:
round trips with both clients and with ``openssl s_client``, mutual TLS, plain text on the TLS port,
the handshake timeout, old protocol versions, and the server's flags."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable

import pytest

from pigeon.errors import ConnectionClosedError
from pigeon.server.tls import certificate_user
from pigeon.testing import LineClient, ServerProcess, server_command
from tests.certs import Certs, old_tls_context
from tests.faces import OpenClient

StartServer = Callable[..., ServerProcess]


class TlsLineClient(LineClient):
    """``LineClient`` over TLS: the same line methods on an ``ssl.SSLSocket``."""

    def __init__(self, server: ServerProcess, context: ssl.SSLContext, timeout: float = 10.0) -> None:
        super().__init__(server.host, server.port, timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=server.host)


def wait_for_log(server: ServerProcess, text: str, timeout: float = 10.0) -> str:
    """The server's first log line (read as it comes) that contains ``text``."""
    assert server.proc.stderr is not None
    deadline = time.monotonic() + timeout
    for line in server.log:
        if text in line:
            return line
    while time.monotonic() < deadline:
        line = server.proc.stderr.readline()
        server.log.append(line)
        if text in line:
            return line
    raise AssertionError(f"no log line with {text!r}: {''.join(server.log)}")


def test_start_up_line_says_tls(start_server: StartServer, certs: Certs) -> None:
    plain = start_server()
    tls = start_server(*certs.server_flags())
    mutual = start_server(*certs.server_flags(mutual=True))
    assert "TLS" not in plain.log[-1]
    assert tls.log[-1].rstrip().endswith(", TLS on"), tls.log
    assert "TLS on (client certificates required)" in mutual.log[-1], mutual.log


def test_round_trip_with_the_client(start_server: StartServer, open_client: OpenClient, certs: Certs) -> None:
    server = start_server(*certs.server_flags())
    subscriber = open_client(server, tls=certs.client_context())
    publisher = open_client(server, tls=certs.client_context())
    subscriber.subscribe("jobs")
    big = b"x" * 200_000  # many TLS records in one message
    publisher.publish("jobs", "hello")
    publisher.publish("jobs", big)
    assert publisher.publish_many("jobs", [b"%d" % i for i in range(2000)]) == []
    got = subscriber.messages(1.0)
    assert [m.data for m in got[:2]] == [b"hello", big]
    assert [m.data for m in got[2:]] == [b"%d" % i for i in range(2000)]
    assert subscriber.stats()["delivered"] == 2002


def test_client_refuses_an_untrusted_server(
    start_server: StartServer, open_client: OpenClient, certs: Certs
) -> None:
    server = start_server(*certs.server_flags())
    untrusting = ssl.create_default_context(cafile=str(certs.stranger_ca))
    with pytest.raises(ConnectionClosedError, match="CERTIFICATE_VERIFY_FAILED"):
        open_client(server, tls=untrusting)


def test_plain_text_on_the_tls_port_is_closed(
    start_server: StartServer, open_client: OpenClient, certs: Certs
) -> None:
    server = start_server(*certs.server_flags())
    plain = server.client()
    plain.send("CONNECT")
    assert plain.at_eof()
    plain.close()
    with pytest.raises(ConnectionClosedError):
        open_client(server)  # the plain-text client library
    # the server still serves TLS clients, and never let a plain-text client reach the broker
    client = open_client(server, tls=certs.client_context())
    assert client.stats()["connections"] == 1
    assert client.stats()["connections_total"] == 1
    server.stop()
    assert "Traceback" not in "".join(server.log)


def test_a_stalled_handshake_is_closed(start_server: StartServer, certs: Certs) -> None:
    server = start_server(*certs.server_flags(), "--tls-handshake-timeout", "1")
    silent = server.client()  # connects, never says a word
    half = server.client()
    half.send(b"\x16\x03\x01\x02\x00")  # the start of a TLS record that never comes whole
    assert silent.at_eof(timeout=30)
    assert half.at_eof(timeout=30)
    client = TlsLineClient(server, certs.client_context())
    assert client.ask("PING") == b"PONG"
    client.close()


def test_a_slow_handshake_within_the_timeout_succeeds(start_server: StartServer, certs: Certs) -> None:
    server = start_server(*certs.server_flags(), "--tls-handshake-timeout", "30")
    raw = socket.create_connection((server.host, server.port), timeout=10)
    time.sleep(1.5)  # longer than the other test's timeout: the default here holds it open
    client = certs.client_context().wrap_socket(raw, server_hostname=server.host)
    client.sendall(b"PING\n")
    assert client.recv(100) == b"PONG\n"
    client.close()


def test_tls_1_1_is_refused(start_server: StartServer, certs: Certs) -> None:
    server = start_server(*certs.server_flags())
    with pytest.raises(ssl.SSLError):
        TlsLineClient(server, old_tls_context(certs))
    modern = TlsLineClient(server, certs.client_context())
    assert isinstance(modern.sock, ssl.SSLSocket)
    assert modern.sock.version() in ("TLSv1.2", "TLSv1.3")
    modern.close()


def test_tls_1_2_is_accepted(start_server: StartServer, certs: Certs) -> None:
    server = start_server(*certs.server_flags())
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    client = TlsLineClient(server, context)
    assert isinstance(client.sock, ssl.SSLSocket)
    assert client.sock.version() == "TLSv1.2"
    assert client.ask("PING") == b"PONG"
    client.close()


def test_mutual_tls(start_server: StartServer, open_client: OpenClient, certs: Certs) -> None:
    server = start_server(*certs.server_flags(mutual=True), "--log-level", "debug")
    client = open_client(server, tls=certs.client_context(certs.client))
    client.subscribe("a")
    wait_for_log(server, "(certificate of 'alice')")
    # without a certificate, and with one from another CA: no session
    for cert in (None, certs.stranger):
        with pytest.raises(ConnectionClosedError):
            open_client(server, tls=certs.client_context(cert))
    assert client.stats()["connections"] == 1
    assert client.stats()["connections_total"] == 1


def test_a_client_that_does_not_read_is_paused(start_server: StartServer, certs: Certs) -> None:
    """The core's write accounting and pausing hold over TLS transports: a subscriber that stops
    reading is paused, its held output is counted, and every message arrives once it reads."""
    server = start_server(*certs.server_flags())
    subscriber = TlsLineClient(server, certs.client_context())
    subscriber.connect()
    subscriber.subscribe("t")
    publisher = TlsLineClient(server, certs.client_context())
    publisher.connect()
    payload = "y" * 1000
    count = 10_000
    for _ in range(count // 500):
        publisher.send(f"PUBLISH {publisher.client_id} t {payload}\n" * 500)
        publisher.lines(500)
    deadline = time.monotonic() + 30
    while True:
        stats = json.loads(publisher.ask("STATS").split(b" ", 1)[1])
        connections = json.loads(publisher.ask("STATS CONNECTIONS").split(b" ", 1)[1])["connections"]
        paused = [c for c in connections if c["client_id"] == subscriber.client_id and c["paused"]]
        if paused and stats["memory_in_transports_bytes"] > 0:
            break
        assert time.monotonic() < deadline, (stats, connections)
        time.sleep(0.1)
    got = 0
    while got < count:
        line = subscriber.line()
        assert line == f"MESSAGE t {payload}".encode()
        got += 1
    assert subscriber.quiet()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_openssl_s_client(start_server: StartServer, certs: Certs) -> None:
    server = start_server(*certs.server_flags())
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{server.host}:{server.port}",
            "-CAfile",
            str(certs.ca),
            "-verify_return_error",
            "-quiet",
        ],
        input=b"CONNECT\nPING\nDISCONNECT\n",
        capture_output=True,
        timeout=30,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith(b"CONNECTED "), done
    assert lines[1:] == [b"PONG", b"DISCONNECTED"], done


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "{key}"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "{ca}"], "--tls-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "{cert}", "--tls-key", "{ca}"], "cannot use the TLS files"),
        (["--tls-cert", "{cert}", "--tls-key", "/nonexistent/key.pem"], "cannot use the TLS files"),
        (
            ["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-handshake-timeout", "0"],
            "must be more than 0",
        ),
    ],
)
def test_bad_tls_flags_are_refused(certs: Certs, flags: list[str], complaint: str) -> None:
    files = {"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca}
    args = [flag.format(**files) for flag in flags]
    done = subprocess.run(
        [*server_command(), "--port", "0", *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done
    assert complaint in done.stderr, done.stderr


class _Peer:
    """What ``certificate_user`` reads of a transport: ``get_extra_info("peercert")``."""

    def __init__(self, cert: dict[str, object] | None) -> None:
        self.cert = cert

    def get_extra_info(self, name: str) -> object:
        return self.cert if name == "peercert" else None


def test_certificate_user_needs_exactly_one_common_name() -> None:
    """The shapes of ``getpeercert()`` that a test CA does not make (the one-CN case is on the wire
    in test_mutual_tls)."""
    cn = (("commonName", "alice"),)
    org = (("organizationName", "Example"),)
    assert certificate_user(_Peer({"subject": (org, cn)})) == "alice"  # type: ignore[arg-type]
    for cert in ({"subject": (cn, (("commonName", "bob"),))}, {"subject": (org,)}, {}, None):
        assert certificate_user(_Peer(cert)) is None  # type: ignore[arg-type]


def test_a_client_closing_tls_first_is_closed_without_warnings(
    start_server: StartServer, certs: Certs
) -> None:
    """A client that ends its TLS session (close_notify) gets the server's close_notify back,
    and the server logs no asyncio complaint about the client's end of input."""
    server = start_server(*certs.server_flags())
    client = TlsLineClient(server, certs.client_context())
    client.send("CONNECT\nPING\n")
    assert client.line().startswith(b"CONNECTED ")
    assert client.line() == b"PONG"
    assert isinstance(client.sock, ssl.SSLSocket)
    plain = client.sock.unwrap()
    assert plain.recv(1) == b""  # the server answered the client's end by closing
    server.stop()
    assert not [line for line in server.log if "eof_received" in line], server.log
