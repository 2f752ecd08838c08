"""Brokers for tests and tools: in-process (``ServerThread``) or as a ``pigeon`` process (``ServerProcess``).

``ServerThread`` runs a broker on its own event loop in a background thread,
for synchronous programs and tests; the pytest fixtures built on it live in
``pigeon.pytest_plugin``. ``ServerProcess`` starts the ``pigeon`` command on a
free port (or another server command: ``$PIGEON_TEST_SERVER_CMD``), and
``LineClient`` speaks the wire protocol to it line by line over a raw socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pigeon.protocol import DEFAULT_HOST
from pigeon.server.loops import loop_factory
from pigeon.server.protocol import Server

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pigeon.server.limits import ServerLimits

T = TypeVar("T")

START_TIMEOUT = 10.0

# the start-up line of the pigeon command: host (an IPv6 address in brackets), port, event loop
LISTENING = re.compile(
    r"listening on (?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^\s\[\]]+)):(?P<port>\d+) \((?P<loop>\w+)\)"
)

# Runs the suite against another build of the server (an installed wheel's
# ``pigeon``, the single-file binary): a shell-quoted command line.
SERVER_CMD_ENV = "PIGEON_TEST_SERVER_CMD"


class ServerThread:
    """Runs ``pigeon.Server`` in a daemon thread; ``port=0`` (the default) picks a free port.

    Use ``with ServerThread() as server:`` (or ``start()``/``stop()``) and
    connect to ``server.host``/``server.port``. ``loop`` is "auto" (uvloop
    when installed), "uvloop" or "asyncio"; the other keywords are ``Server``'s
    (``max_line``, ``max_backlog``, ..., ``idle_timeout``).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        loop: str = "auto",
        **limits: Unpack[ServerLimits],
    ) -> None:
        self.host = host
        self.loop_name, self._new_loop = loop_factory(loop)
        self.server = Server(host, port, **limits)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def port(self) -> int:
        """The port the broker listens on."""
        return self.server.port

    def start(self) -> ServerThread:
        """Start the thread and wait until the broker listens; raises OSError if it cannot bind."""
        if self._thread is not None or self._started.done():
            raise RuntimeError("a ServerThread can be started only once")
        self._thread = threading.Thread(target=self._run, name=f"pigeon-server-{id(self):x}", daemon=True)
        self._thread.start()
        try:
            self._started.result(START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection, stop the broker and wait for the thread to end."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            # a closed loop means the thread is already on its way out
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self._thread = None

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the broker's thread and return its result (the core is not thread-safe)."""
        if self._loop is None:
            raise RuntimeError("ServerThread not started")

        async def run() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(START_TIMEOUT)

    def stats(self) -> dict[str, Any]:
        """The broker's counters (``Broker.stats()``), read on its own thread."""
        return self.call(self.server.broker.stats)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerThread {self.host}:{self.port} ({self.loop_name})>"

    def _run(self) -> None:
        loop = self._new_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        await self.server.start()
        self._started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            await self.server.stop()


def server_command() -> list[str]:
    """The command that starts the server under test: $PIGEON_TEST_SERVER_CMD, or this Python's pigeon."""
    external = os.environ.get(SERVER_CMD_ENV, "").strip()
    return shlex.split(external) if external else [sys.executable, "-m", "pigeon"]


def signal_and_wait(proc: subprocess.Popen[str], sig: int, timeout: float) -> int:
    """Send ``sig`` to ``proc`` if it still runs and return its exit code; kill it and raise
    subprocess.TimeoutExpired when it has not ended after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


class ServerProcess:
    """A ``pigeon`` server started as a subprocess on a free port."""

    def __init__(self, *args: str, loop: str = "auto", command: Sequence[str] | None = None) -> None:
        cmd = list(command) if command else server_command()
        self.args = [*cmd, "--port", "0", "--loop", loop, *args]
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.log: list[str] = []
        deadline = time.monotonic() + 20
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"server exited early: {''.join(self.log)}")
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                self.host = match.group("ipv6") or match.group("host")
                self.port = int(match.group("port"))
                self.loop_name = match.group("loop")
                return
        raise RuntimeError("server did not report its port")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> str:
        """The first line of the server's log holding ``text``, reading further lines until one
        comes; RuntimeError when the server ends first, or is killed after ``timeout`` seconds."""
        found = next((line for line in self.log if text in line), None)
        if found is not None:
            return found
        assert self.proc.stderr is not None
        # readline blocks: past the deadline the server is killed, and readline sees the end
        killer = threading.Timer(timeout, self.proc.kill)
        killer.start()
        try:
            for line in iter(self.proc.stderr.readline, ""):
                self.log.append(line)
                if text in line:
                    return line
        finally:
            killer.cancel()
        raise RuntimeError(f"the server ended without logging {text!r}: {''.join(self.log)}")

    def client(self, timeout: float = 10.0) -> LineClient:
        """A new raw connection to this server."""
        return LineClient(self.host, self.port, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server and return its exit code; a second call just returns it again. When it
        has not ended ``timeout`` seconds after the signal, it is killed and AssertionError says so
        with its log (what it was doing)."""
        if self.proc.stderr is None or self.proc.stderr.closed:
            return self.proc.wait()
        try:
            code = signal_and_wait(self.proc, sig, timeout)
        except subprocess.TimeoutExpired:
            # the processes it started may still hold its stderr open: read for a while, not to the end
            rest: list[str] = []
            stderr = self.proc.stderr
            reader = threading.Thread(target=lambda: rest.append(stderr.read()), daemon=True)
            reader.start()
            reader.join(2)
            self.log += rest
            raise AssertionError(
                f"the server did not stop within {timeout} s of {signal.Signals(sig).name} and was "
                f"killed; its log:\n{''.join(self.log)}"
            ) from None
        self.log.append(self.proc.stderr.read())
        self.proc.stderr.close()
        return code


def inspect_data_dir(data: os.PathLike[str] | str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """What ``pigeon --data-dir DATA --inspect`` prints and exits with (it never changes DATA)."""
    return subprocess.run(
        [sys.executable, "-m", "pigeon", "--data-dir", os.fspath(data), "--inspect"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class LineClient:
    """A blocking socket that sends command lines and reads reply lines."""

    def __init__(
        self, host: str, port: int, timeout: float = 10.0, source_address: tuple[str, int] | None = None
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=source_address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # what was received and not read yet is _data[_pos:]: reading a line moves _pos instead of
        # copying the rest, which made draining a flood of small lines quadratic
        self._data = b""
        self._pos = 0
        self.client_id = ""
        self._peer_closed = False  # quiet() saw the end of the connection

    def __repr__(self) -> str:
        # what a failed ``assert client.quiet()`` shows: what came instead of silence
        unread = self._data[self._pos : self._pos + 300]
        ended = ", closed by the peer" if self._peer_closed else ""
        return f"<LineClient {self.client_id or '-'} unread {unread!r}{ended}>"

    @classmethod
    def over(cls, sock: socket.socket) -> LineClient:
        """A client on a socket made elsewhere (e.g. with a small receive buffer), already connected."""
        client = cls.__new__(cls)
        client.sock, client._data, client._pos, client.client_id = sock, b"", 0, ""
        client._peer_closed = False
        return client

    @property
    def buf(self) -> bytes:
        """What was received and not read yet."""
        if self._pos:
            self._data, self._pos = self._data[self._pos :], 0
        return self._data

    @buf.setter
    def buf(self, value: bytes) -> None:
        self._data, self._pos = value, 0

    def _receive(self) -> None:
        """Append one read of the socket to what is unread; raises on EOF."""
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"connection closed; unread: {self.buf[:200]!r}")
        self._data, self._pos = self._data[self._pos :] + chunk, 0

    def send(self, data: bytes | str) -> None:
        """Send raw bytes (a str is encoded and gets a trailing newline)."""
        if isinstance(data, str):
            data = data.encode() + b"\n"
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line, without its newline; raises on timeout or EOF."""
        end = self._data.find(b"\n", self._pos)
        while end < 0:
            searched = len(self._data) - self._pos
            self._receive()
            end = self._data.find(b"\n", searched)
        line, self._pos = self._data[self._pos : end], end + 1
        return line

    def take(self, n: int) -> bytes:
        """The next n bytes; raises on timeout or EOF."""
        while len(self._data) - self._pos < n:
            self._receive()
        data, self._pos = self._data[self._pos : self._pos + n], self._pos + n
        return data

    def frame(self) -> tuple[bytes, bytes]:
        """The next line, a ``MSG`` or ``DMSG`` frame header (protocol 2), and the payload it announces."""
        header = self.line()
        payload = self.take(int(header.rsplit(b" ", 1)[1]) + 1)
        assert payload.endswith(b"\n"), f"a frame not followed by a line end: {header!r}"
        return header, payload[:-1]

    def lines(self, n: int) -> list[bytes]:
        """The next n lines."""
        return [self.line() for _ in range(n)]

    def ask(self, command: bytes | str) -> bytes:
        """Send one command and return the next line."""
        self.send(command)
        return self.line()

    def connect(self) -> str:
        """CONNECT and remember the id."""
        reply = self.ask("CONNECT").decode()
        assert reply.startswith("CONNECTED "), reply
        self.client_id = reply.split(" ", 1)[1]
        return self.client_id

    def subscribe(self, topic: str) -> None:
        """SUBSCRIBE with this connection's id; asserts the reply."""
        assert self.ask(f"SUBSCRIBE {self.client_id} {topic}") == f"SUBSCRIBED {topic}".encode()

    def publish(self, topic: str, message: str) -> None:
        """PUBLISH with this connection's id; asserts the reply."""
        assert self.ask(f"PUBLISH {self.client_id} {topic} {message}") == f"PUBLISHED {topic}".encode()

    def at_eof(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection with nothing more to read."""
        self.sock.settimeout(timeout)
        try:
            return not self.buf and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def quiet(self, wait: float = 0.2) -> bool:
        """True when nothing arrives within ``wait`` seconds."""
        if self.buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(old)
        self.buf += data
        self._peer_closed = not data
        return False

    def close(self) -> None:
        """Close the socket without DISCONNECT."""
        self.sock.close()
