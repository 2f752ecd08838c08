"""Runs the Python examples of docs/client.md and the README's client section against a live broker.

The examples connect to the default port; here each runs with that port
replaced by the port of a broker started for the test.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pigeon import Client, ServerThread
from pigeon.protocol import DEFAULT_PORT

ROOT = Path(__file__).resolve().parent.parent
if not (ROOT / "docs" / "client.md").exists():  # scripts/smoke.py runs a copy of tests/ alone
    pytest.skip("the docs are not beside tests/", allow_module_level=True)
FENCED_PYTHON = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def _examples() -> list[Any]:
    sources = {
        "docs/client.md": (ROOT / "docs" / "client.md").read_text(),
        "README.md": _section((ROOT / "README.md").read_text(), "## Client library"),
    }
    examples = []
    for name, text in sources.items():
        for number, match in enumerate(FENCED_PYTHON.finditer(text), 1):
            line = text[: match.start()].count("\n") + 2
            examples.append(pytest.param(match.group(1), id=f"{name}:{line}#{number}"))
    return examples


EXAMPLES = _examples()


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("source", EXAMPLES)
def test_example_runs(source: str, pigeon_server: ServerThread) -> None:
    code = re.sub(rf"\b{DEFAULT_PORT}\b", str(pigeon_server.port), source)
    namespace: dict[str, Any] = {"__name__": "example"}
    exec(compile(code, "<example>", "exec"), namespace)
    # an example of a test written with the pytest plugin: run it the way pytest would
    tests: list[Callable[..., None]] = [v for k, v in namespace.items() if k.startswith("test_")]
    for test in tests:
        with ServerThread() as server, Client(server.host, server.port) as client:
            test(server, client)
