"""The pytest plugin (entry point ``pytest11``): ``pigeon_server`` and ``pigeon_client`` fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pigeon.client import Client
from pigeon.testing import ServerThread


@pytest.fixture
def pigeon_server() -> Iterator[ServerThread]:
    """A Pigeon broker for one test, in a background thread on a free port."""
    with ServerThread() as server:
        yield server


@pytest.fixture
def pigeon_client(pigeon_server: ServerThread) -> Iterator[Client]:
    """A blocking ``pigeon.Client`` connected to ``pigeon_server``."""
    with Client(pigeon_server.host, pigeon_server.port) as client:
        yield client
