"""Test helpers that speak the wire protocol over real sockets to a real server process."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

LISTENING = re.compile(r"listening on (\S+):(\d+) \((\w+)\)")

# Runs the suite against another build of the server (an installed wheel's
# ``pigeon``, the single-file binary): a shell-quoted command line.
SERVER_CMD_ENV = "PIGEON_TEST_SERVER_CMD"


def server_command() -> list[str]:
    """The command that starts the server under test: $PIGEON_TEST_SERVER_CMD, or this Python's pigeon."""
    external = os.environ.get(SERVER_CMD_ENV, "").strip()
    return shlex.split(external) if external else [sys.executable, "-m", "pigeon"]


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
                self.host = match.group(1)
                self.port = int(match.group(2))
                self.loop_name = match.group(3)
                return
        raise RuntimeError("server did not report its port")

    def client(self, timeout: float = 10.0) -> LineClient:
        """A new raw connection to this server."""
        return LineClient(self.host, self.port, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server and return its exit code; a second call just returns it again."""
        if self.proc.stderr is None or self.proc.stderr.closed:
            return self.proc.wait()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        assert self.proc.stderr is not None
        self.log.append(self.proc.stderr.read())
        self.proc.stderr.close()
        return code


class LineClient:
    """A blocking socket that sends command lines and reads reply lines."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.client_id = ""

    def send(self, data: bytes | str) -> None:
        """Send raw bytes (a str is encoded and gets a trailing newline)."""
        if isinstance(data, str):
            data = data.encode() + b"\n"
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line, without its newline; raises on timeout or EOF."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"connection closed; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

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
            return self.buf == b"" and self.sock.recv(1) == b""
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
        return False

    def close(self) -> None:
        """Close the socket without DISCONNECT."""
        self.sock.close()
