"""Request/reply through the client library (``Client`` and ``AsyncClient`` alike, by tests/faces.py) and
``pigeon-cli request``/``reply``, against a real server: answers, timeouts, 16 concurrent requesters,
a responder killed with SIGKILL and another one answering, ``respond`` on a message that is no request."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

import pigeon
from pigeon import AsyncClient, Client, InvalidArgumentError, RequestTimeoutError
from pigeon.testing import ServerProcess
from tests.faces import OpenClient
from tests.test_client_cli import PIGEON_CLI, cli


class Echo:
    """A responder on a thread: answers each request to ``topic`` with ``prefix`` + its data."""

    def __init__(self, server: ServerProcess, topic: str, prefix: bytes = b"", group: str | None = None):
        self.client = Client(server.host, server.port)
        self.client.subscribe(topic, group)
        self.prefix = prefix
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.client.next_message(timeout=0.1)
            except pigeon.TimeoutError:
                continue
            message.respond(self.prefix + message.data)
            self.answered += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()


@pytest.fixture
def echo(server: ServerProcess) -> Iterator[Echo]:
    responder = Echo(server, "svc.echo", b"re:")
    yield responder
    responder.stop()


def test_a_request_gets_its_reply(server: ServerProcess, open_client: OpenClient, echo: Echo) -> None:
    requester = open_client(server)
    answer = requester.request("svc.echo", b"ping\x00\n", timeout=10)
    assert (answer.topic, answer.data) == ("svc.echo", b"re:ping\x00\n")
    assert requester.request("svc.echo", "text", timeout=10).text == "re:text"


def test_a_request_without_responder_times_out(server: ServerProcess, open_client: OpenClient) -> None:
    requester = open_client(server)
    with pytest.raises(RequestTimeoutError, match=r"within 0\.3s"):
        requester.request("nobody.home", b"hello?", timeout=0.3)
    assert isinstance(RequestTimeoutError("x"), pigeon.TimeoutError)
    assert requester.ping() > 0  # the connection stays usable


def test_a_late_reply_is_dropped(server: ServerProcess, open_client: OpenClient) -> None:
    requester = open_client(server)
    slow = Client(server.host, server.port)
    try:
        slow.subscribe("svc.slow")
        with pytest.raises(RequestTimeoutError):
            requester.request("svc.slow", b"first", timeout=0.3)
        slow.next_message(timeout=10).respond(b"late")  # the requester gave up on it
        responder = Echo(server, "svc.slow2")
        try:
            assert requester.request("svc.slow2", b"second", timeout=10).data == b"second"
        finally:
            responder.stop()
    finally:
        slow.close()


def test_respond_to_a_plain_message_is_refused(server: ServerProcess, open_client: OpenClient) -> None:
    sub, pub = open_client(server), open_client(server)
    sub.subscribe("plain")
    pub.publish("plain", b"not a request")
    message = sub.next_message(5)
    assert message.reply_to is None
    with pytest.raises(InvalidArgumentError, match="not a request"):
        message.respond(b"to whom?")


def test_a_request_message_names_its_reply_token(server: ServerProcess, open_client: OpenClient) -> None:
    sub, requester = open_client(server), Client(server.host, server.port)
    try:
        sub.subscribe("svc.token")
        waiting = threading.Thread(target=lambda: requester.request("svc.token", b"q", timeout=10))
        waiting.start()
        message = sub.next_message(10)
        assert message.reply_to is not None and len(message.reply_to.split(".")) == 3
        message.respond(b"a")
        waiting.join(10)
        assert not waiting.is_alive()
    finally:
        requester.close()


def test_16_concurrent_requesters_get_their_own_replies(server: ServerProcess, echo: Echo) -> None:
    failures: list[str] = []

    def ask(n: int) -> None:
        with Client(server.host, server.port) as client:
            for i in range(25):
                payload = b"%d:%d" % (n, i)
                got = client.request("svc.echo", payload, timeout=30).data
                if got != b"re:" + payload:
                    failures.append(f"{payload!r} got {got!r}")

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == [] and echo.answered == 400


def test_16_concurrent_requests_on_one_async_client(server: ServerProcess, echo: Echo) -> None:
    async def main() -> list[bytes]:
        async with AsyncClient(server.host, server.port) as client:
            replies = await asyncio.gather(
                *(client.request("svc.echo", b"%d" % n, timeout=30) for n in range(16))
            )
            return [message.data for message in replies]

    assert asyncio.run(main()) == [b"re:%d" % n for n in range(16)]


def _reply_process(server: ServerProcess, *args: str) -> subprocess.Popen[str]:
    """``pigeon-cli reply`` in its own process group, once it is subscribed."""
    command = [PIGEON_CLI, "reply", "--host", server.host, "--port", str(server.port), *args]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("answering requests to"), "reply did not start"
    return proc


@pytest.mark.slow
def test_a_responder_killed_mid_request_then_another_answers(server: ServerProcess) -> None:
    # the first responder runs a command that hangs: it holds the request when it is killed
    stuck = _reply_process(server, "--group", "w", "svc.work", "--", "sleep", "60")
    try:
        with Client(server.host, server.port) as requester:
            with pytest.raises(RequestTimeoutError):
                requester.request("svc.work", b"job", timeout=1)
            os.killpg(stuck.pid, signal.SIGKILL)
            stuck.wait(10)
            healthy = _reply_process(server, "svc.work", "--group", "w", "--echo")
            try:
                assert requester.request("svc.work", b"job", timeout=20).data == b"job"
            finally:
                healthy.kill()
                healthy.communicate(timeout=10)
    finally:
        if stuck.poll() is None:
            os.killpg(stuck.pid, signal.SIGKILL)
        stuck.communicate(timeout=10)


def test_cli_request_and_reply_from_a_command(server: ServerProcess) -> None:
    upper = [sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"]
    responder = _reply_process(server, "--count", "1", "svc.upper", "--", *upper)
    try:
        done = cli(server, "request", "svc.upper", "hello", "--timeout", "20")
        assert (done.returncode, done.stdout, done.stderr) == (0, "HELLO\n\n", "")
        assert responder.wait(20) == 0
    finally:
        if responder.poll() is None:
            responder.kill()
        responder.communicate(timeout=10)


def test_cli_request_echo_and_timeout(server: ServerProcess) -> None:
    responder = _reply_process(server, "svc.echo", "--echo", "--count", "1")
    try:
        assert cli(server, "request", "svc.echo", "hi there").stdout == "hi there\n"
        assert responder.wait(20) == 0
    finally:
        if responder.poll() is None:
            responder.kill()
        responder.communicate(timeout=10)
    late = cli(server, "request", "svc.nobody", "x", "--timeout", "0.2")
    assert (late.returncode, late.stderr) == (
        1,
        "pigeon-cli: no reply to a request on 'svc.nobody' within 0.2s\n",
    )
    bad = cli(server, "reply", "svc.echo")
    assert (bad.returncode, bad.stderr) == (1, "pigeon-cli: give either --echo or -- COMMAND [ARGS...]\n")
