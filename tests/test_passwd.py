"""``pigeon passwd`` and ``pigeon-cli passwd`` on a terminal (a pty: getpass reads /dev/tty, without echo)."""

from __future__ import annotations

import os
import pty
import select
import sys
import time

import pytest

from pigeon.server.users import parse_hash

DEADLINE = 20.0


class Terminal:
    """A command run on a new pseudo-terminal, as its controlling terminal."""

    def __init__(self, *args: str) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: becomes the command
            os.execv(sys.executable, [sys.executable, *args])
        self.pid, self.fd = pid, fd
        self.seen = b""

    def expect(self, text: bytes) -> None:
        """Read until ``text`` has appeared; fails after the deadline or at the end of output."""
        deadline = time.monotonic() + DEADLINE
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in {self.seen!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = self._read()
                assert chunk, f"ended without {text!r}: {self.seen!r}"

    def _read(self) -> bytes:
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # Linux: EIO once the child has closed the terminal
            chunk = b""
        self.seen += chunk
        return chunk

    def type(self, line: str) -> None:
        """Type a line and Enter."""
        os.write(self.fd, line.encode() + b"\r")

    def finish(self) -> int:
        """Read to the end and return the exit status."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], deadline - time.monotonic())
            if ready and not self._read():
                break
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


COMMANDS = [("-m", "pigeon", "passwd"), ("-m", "pigeon.cli.client", "passwd")]


@pytest.mark.parametrize("command", COMMANDS, ids=["pigeon", "pigeon-cli"])
def test_passwd_reads_twice_without_echo_and_prints_a_hash_of_the_password(command: tuple[str, ...]) -> None:
    term = Terminal(*command)
    term.expect(b"Password: ")
    term.type("correct-horse")
    term.expect(b"Again: ")
    term.type("correct-horse")
    assert term.finish() == 0
    assert b"correct-horse" not in term.seen  # not echoed
    line = term.seen.decode().split("Again: ", 1)[1].strip()
    assert line.startswith("scrypt$")
    assert parse_hash(line).matches(b"correct-horse")


@pytest.mark.parametrize(
    ("first", "second", "says"),
    [
        ("two words", "two words", b"whitespace"),
        ("tab\there", "tab\there", b"whitespace"),
        ("", "", b"empty"),
        ("one", "other", b"differ"),
    ],
)
def test_passwd_refuses_whitespace_empty_or_different_passwords(first: str, second: str, says: bytes) -> None:
    term = Terminal("-m", "pigeon", "passwd")
    term.expect(b"Password: ")
    term.type(first)
    term.expect(b"Again: ")
    term.type(second)
    assert term.finish() == 1
    assert says in term.seen
    assert b"scrypt$" not in term.seen
