"""The end-to-end smoke subset: the whole wire protocol once, over real sockets.

These are the tests scripts/smoke.py runs against every build of the server (an
installed wheel, the single-file binary), so they stay few and fast; the
detailed behaviour is tested elsewhere in tests/.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from tests.wire import LineClient, ServerProcess, server_command

pytestmark = pytest.mark.smoke


def test_publish_reaches_a_subscriber(connect: Callable[[], LineClient]) -> None:
    subscriber, publisher = connect(), connect()
    subscriber.subscribe("news")
    publisher.publish("news", "hello pigeon")
    assert subscriber.line() == b"MESSAGE news hello pigeon"
    assert publisher.quiet()


def test_messages_alternate_between_subscribers(connect: Callable[[], LineClient]) -> None:
    first, second, publisher = connect(), connect(), connect()
    first.subscribe("jobs")
    second.subscribe("jobs")
    for n in range(4):
        publisher.publish("jobs", f"job {n}")
    evens = [b"MESSAGE jobs job 0", b"MESSAGE jobs job 2"]
    odds = [b"MESSAGE jobs job 1", b"MESSAGE jobs job 3"]
    # Round robin: each subscriber gets every other message, in order.
    assert sorted([first.lines(2), second.lines(2)]) == [evens, odds]
    assert first.quiet() and second.quiet()


def test_backlog_is_delivered_on_subscribe(connect: Callable[[], LineClient]) -> None:
    publisher = connect()
    publisher.publish("later", "kept")
    subscriber = connect()
    subscriber.subscribe("later")
    assert subscriber.line() == b"MESSAGE later kept"


def test_unsubscribe_ping_and_disconnect(connect: Callable[[], LineClient]) -> None:
    client = connect()
    client.subscribe("t")
    assert client.ask(f"UNSUBSCRIBE {client.client_id} t") == b"UNSUBSCRIBED t"
    assert client.ask("PING") == b"PONG"
    assert client.ask("DISCONNECT") == b"DISCONNECTED"
    assert client.at_eof()


def test_bad_input_gets_an_error_and_the_server_keeps_serving(server: ServerProcess) -> None:
    client = server.client()
    assert client.ask(b"NONSENSE \xff\r\n").startswith(b"ERROR ")
    assert client.ask("PUBLISH nobody t m").startswith(b"ERROR ")
    client.connect()
    assert client.ask("PING") == b"PONG"
    client.close()
    other = server.client()
    assert other.ask("PING") == b"PONG"
    other.close()


def test_version_agrees_everywhere() -> None:
    """``pigeon --version`` of the server under test, ``pigeon.__version__`` and the metadata agree."""
    from importlib.metadata import version

    import pigeon

    printed = subprocess.run(
        [*server_command(), "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert printed == ["pigeon", pigeon.__version__]
    assert version("pigeon-broker") == pigeon.__version__
