"""The kombu transport with logins and TLS (pigeon.kombu.address) against real ``pigeon`` processes
started with ``--users`` and with trustme certificates (tests/certs.py): ``pigeon://user:password@``,
``pigeons://`` with kombu's ``ssl`` option in its three shapes, refused credentials, and a Celery
worker on ``pigeons://user:password@``."""

from __future__ import annotations

import os
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu.serialization  # noqa: F401  (see below)
import pytest
from kombu import Connection
from kombu.exceptions import OperationalError

from pigeon.errors import AuthFailedError, AuthRequiredError, InvalidArgumentError, PermissionDeniedError
from pigeon.server.users import hash_password
from pigeon.testing import ServerProcess
from tests.certs import Certs
from tests.test_security_wire import FAST

# Importing kombu.serialization loads Pigeon's entry point, which registers pigeon:// and pigeons://;
# kombu 5.7's Connection() resolves the URL's scheme before importing it (Celery imports it early).

# a password that needs percent-encoding in a URL: "@", ":" and "%" as %40, %3A and %25
PASSWORD = "p@ss:w%rd"
QUOTED = "p%40ss%3Aw%25rd"


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two users: ``celery`` may use every topic, ``jobs-only`` only ``jobs``."""
    path = tmp_path_factory.mktemp("users") / "users.toml"
    password = hash_password(PASSWORD, **FAST)
    path.write_text(
        f'[users.celery]\npassword = "{password}"\npublish = [">"]\nsubscribe = [">"]\n'
        f'[users.jobs-only]\npassword = "{password}"\npublish = ["jobs"]\nsubscribe = ["jobs"]\n'
    )
    return path


@pytest.fixture(scope="module")
def server(users_file: Path, certs: Certs) -> Iterator[ServerProcess]:
    """A broker with users and TLS (ack timeout off, as Celery needs)."""
    proc = ServerProcess("--users", str(users_file), *certs.server_flags(), "--ack-timeout", "0")
    yield proc
    assert proc.stop() == 0, "".join(proc.log)


@pytest.fixture
def name() -> str:
    """A queue name no other test uses."""
    return f"q-{uuid.uuid4().hex[:12]}"


def round_trip(connection: Connection, queue_name: str, body: Any) -> Any:
    """Put ``body`` on a SimpleQueue and get it back (acknowledged)."""
    queue = connection.SimpleQueue(queue_name)
    try:
        queue.put(body)
        message = queue.get(timeout=10)
        message.ack()
        return message.payload
    finally:
        queue.close()


def test_a_url_with_percent_encoded_credentials_logs_in(
    server: ServerProcess, certs: Certs, name: str
) -> None:
    url = f"pigeons://celery:{QUOTED}@localhost:{server.port}"
    with Connection(url, ssl={"ca_certs": str(certs.ca)}) as connection:
        assert round_trip(connection, name, {"n": 1}) == {"n": 1}
        # the broker requires a login (--users): the round trip means CONNECT celery p@ss:w%rd was taken
        assert PASSWORD not in connection.as_uri()  # kombu shows the URL with the password masked


def test_the_users_permissions_apply_to_kombu(server: ServerProcess, certs: Certs) -> None:
    url = f"pigeons://jobs-only:{QUOTED}@localhost:{server.port}"
    with Connection(url, ssl=certs.client_context()) as connection:
        assert round_trip(connection, "jobs", "allowed") == "allowed"
        queue = connection.SimpleQueue("not-jobs")
        with pytest.raises(PermissionDeniedError):
            queue.get(timeout=1)  # SUBSCRIBE not-jobs is refused
        queue.close()  # the refused consumer is gone: closing does not UNSUBSCRIBE it
        assert round_trip(connection, "jobs", "still usable") == "still usable"


def test_a_wrong_password_is_an_error_kombu_does_not_retry(server: ServerProcess, certs: Certs) -> None:
    connection = Connection(f"pigeons://celery:wrong@localhost:{server.port}", ssl=certs.client_context())
    retries: list[Exception] = []
    try:
        with pytest.raises(AuthFailedError, match="authentication failed"):
            connection.ensure_connection(
                errback=lambda exc, interval: retries.append(exc), max_retries=3, interval_start=0
            )
        assert retries == []  # raised at the first attempt, not after retrying
    finally:
        connection.release()


def test_no_credentials_with_a_users_file_is_a_clear_connection_error(
    server: ServerProcess, certs: Certs
) -> None:
    connection = Connection(f"pigeons://localhost:{server.port}", ssl=certs.client_context())
    try:
        with pytest.raises(AuthRequiredError):
            connection.ensure_connection(max_retries=3, interval_start=0)
    finally:
        connection.release()


def test_keywords_instead_of_a_url(server: ServerProcess, certs: Certs, name: str) -> None:
    with Connection(
        hostname="localhost",
        port=server.port,
        userid="celery",
        password=PASSWORD,  # not percent-encoded: it is no URL
        transport="pigeons",
        ssl={"ca_certs": str(certs.ca), "cert_reqs": ssl.CERT_REQUIRED},
    ) as connection:
        assert round_trip(connection, name, [1, 2]) == [1, 2]


@pytest.mark.parametrize(
    "ssl_option", ["dict", "context", "cert_none"], ids=["dict", "SSLContext", "CERT_NONE"]
)
def test_tls_round_trip_of_many_and_large_messages(
    server: ServerProcess, certs: Certs, name: str, ssl_option: str
) -> None:
    option: Any = {
        "dict": {"ca_certs": str(certs.ca)},
        "context": certs.client_context(),
        "cert_none": {"cert_reqs": ssl.CERT_NONE},  # checks nothing: the system's CAs do not know trustme's
    }[ssl_option]
    # many TLS records each way: sends that find no room and reads that end mid-record
    bodies = [{"i": i, "pad": "x" * (200_000 if i % 10 == 0 else 100)} for i in range(200)]
    with Connection(f"pigeons://celery:{QUOTED}@127.0.0.1:{server.port}", ssl=option) as connection:
        queue = connection.SimpleQueue(name)
        for body in bodies:
            queue.put(body)
        received = []
        for _ in bodies:
            message = queue.get(timeout=10)
            received.append(message.payload)
            message.ack()
        queue.close()
    assert received == bodies


def test_the_systems_cas_do_not_trust_a_private_ca(server: ServerProcess) -> None:
    connection = Connection(f"pigeons://celery:{QUOTED}@localhost:{server.port}", ssl=True)
    try:
        with pytest.raises(OperationalError, match="CERTIFICATE_VERIFY_FAILED"):
            connection.ensure_connection(max_retries=1, interval_start=0)
    finally:
        connection.release()


def test_plain_pigeon_urls_refuse_a_tls_option_and_bad_ssl_keys_are_named(certs: Certs) -> None:
    for url, option, complaint in (
        ("pigeon://127.0.0.1:1", {"ca_certs": str(certs.ca)}, "use pigeons://"),
        ("pigeons://127.0.0.1:1", {"ca_file": "x"}, "unknown ssl option"),
        ("pigeons://user@127.0.0.1:1", None, "a user needs a password"),
    ):
        connection = Connection(url, ssl=option)
        try:
            with pytest.raises(InvalidArgumentError, match=complaint):
                connection.connect()
        finally:
            connection.release()


@pytest.mark.slow
def test_a_celery_worker_runs_tasks_from_a_pigeons_url_with_credentials(
    server: ServerProcess, certs: Certs, tmp_path: Path
) -> None:
    from celery import Celery

    from tests.test_celery import WAIT, Worker

    url = f"pigeons://celery:{QUOTED}@localhost:{server.port}"
    env = dict(
        os.environ,
        PIGEON_CELERY_BROKER=url,
        PIGEON_CELERY_CA=str(certs.ca),
        PIGEON_CELERY_RESULTS=str(tmp_path),
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    # an application of its own to send with (tests.celery_app's is configured by tests/test_celery.py)
    sender = Celery("sender", broker=url, backend=f"file://{tmp_path}")
    sender.conf.broker_use_ssl = {"ca_certs": str(certs.ca), "cert_reqs": ssl.CERT_REQUIRED}
    worker = Worker(env, tmp_path / "worker.log", "tls", "--pool", "prefork", "--concurrency", "2")
    try:
        results = [sender.send_task("tests.celery_app.add", (i, i)) for i in range(50)]
        assert [result.get(timeout=WAIT) for result in results] == [2 * i for i in range(50)], worker.tail()
    finally:
        worker.stop()
        sender.close()


@pytest.mark.slow
def test_a_celery_worker_with_a_wrong_password_stops_instead_of_retrying(
    server: ServerProcess, certs: Certs, tmp_path: Path
) -> None:
    from tests.test_celery import WAIT, Worker

    env = dict(
        os.environ,
        PIGEON_CELERY_BROKER=f"pigeons://celery:wrong@localhost:{server.port}",
        PIGEON_CELERY_CA=str(certs.ca),
        PIGEON_CELERY_RESULTS=str(tmp_path),
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    worker = Worker(env, tmp_path / "worker.log", "refused", "--pool", "solo")
    try:
        assert worker.proc.wait(WAIT) != 0
        assert "authentication failed" in worker.tail(), worker.tail()
    finally:
        worker.stop()
