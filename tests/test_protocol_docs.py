"""The example sessions of docs/protocol.md, replayed against a real server.

A session is a fenced block whose lines typed by the client start with ``> ``;
every other line is what the server must answer, in order. The block of
STATS one-liners (``command -> reply``) is checked for its replies' shapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pigeon.testing import ServerProcess

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
if not PROTOCOL.exists():
    pytest.skip("docs/ is not next to this copy of the tests", allow_module_level=True)

BLOCK = re.compile(r"```\n(.*?)```", re.S)


def sessions() -> list[list[str]]:
    """Every fenced block of the protocol doc that holds a session (lines starting with '> ')."""
    return [block.splitlines() for block in BLOCK.findall(PROTOCOL.read_text()) if block.startswith("> ")]


def test_the_doc_has_a_session() -> None:
    assert sessions()


@pytest.mark.parametrize("session", sessions())
def test_example_session(server: ServerProcess, session: list[str]) -> None:
    client = server.client()
    for line in session:
        if line.startswith("> "):
            client.send(line[2:])
        else:
            assert client.line().decode() == line
    assert client.at_eof()


def test_stats_examples_have_the_documented_shapes(server: ServerProcess) -> None:
    block = next(b for b in BLOCK.findall(PROTOCOL.read_text()) if b.startswith("STATS "))
    client = server.client()
    client.connect()
    client.subscribe("jobs")
    for line in block.splitlines():
        command, _, expected = (part.strip() for part in line.partition("->"))
        expected = expected.split("  ")[0]
        reply = client.ask(command).decode()
        word, _, payload = reply.partition(" ")
        assert word == expected.split(" ")[0], (command, reply)
        if word == "ERROR":
            assert reply == expected
            continue
        documented = json.loads(
            expected.partition(" ")[2].replace("...", "").replace(",]", "]").replace(",}", "}")
        )
        got = json.loads(payload)
        assert type(got) is type(documented)
        assert set(documented) <= set(got), (command, sorted(got))
