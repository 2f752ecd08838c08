"""The pytest plugin (entry point ``pytest11``): ``pigeon_server``, ``pigeon_url`` and ``pigeon_client``.

By default ``pigeon_client`` talks to a broker started for the test
(``pigeon_server``). Given a URL (``--pigeon-url pigeons://user:pass@host:3333``
or the ini option ``pigeon_url``), it connects to that broker instead, over TLS
for ``pigeons://``, trusting the CA file of ``--pigeon-ca`` (ini ``pigeon_ca``)
or else the system's CAs.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest

from pigeon.client import Client
from pigeon.testing import ServerThread

URL_OPTION = "pigeon_url"
CA_OPTION = "pigeon_ca"


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--pigeon-url`` and ``--pigeon-ca``, and their ini options."""
    group = parser.getgroup("pigeon")
    group.addoption(
        "--pigeon-url", dest=URL_OPTION, metavar="URL", help="broker for the pigeon_client fixture"
    )
    group.addoption(
        "--pigeon-ca", dest=CA_OPTION, metavar="FILE", help="CA certificates (PEM) for pigeons://"
    )
    parser.addini(URL_OPTION, "broker URL for the pigeon_client fixture (pigeon:// or pigeons://)")
    parser.addini(CA_OPTION, "CA certificates (PEM) that sign the broker's certificate, for pigeons://")


def _setting(config: pytest.Config, name: str) -> str | None:
    """A plugin setting: the command-line option, else the ini option, else None."""
    value = config.getoption(name) or config.getini(name)
    return str(value) if value else None


@pytest.fixture
def pigeon_server() -> Iterator[ServerThread]:
    """A Pigeon broker for one test, in a background thread on a free port."""
    with ServerThread() as server:
        yield server


@pytest.fixture
def pigeon_url(request: pytest.FixtureRequest) -> str:
    """The broker's URL: the one configured (``--pigeon-url``, ini ``pigeon_url``), else that of
    ``pigeon_server``, started for the test."""
    configured = _setting(request.config, URL_OPTION)
    if configured is not None:
        return configured
    server: ServerThread = request.getfixturevalue("pigeon_server")
    return f"pigeon://{server.host}:{server.port}"


@pytest.fixture
def pigeon_client(pigeon_url: str, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A blocking ``pigeon.Client`` connected to ``pigeon_url``."""
    ca = _setting(request.config, CA_OPTION)
    tls = ssl.create_default_context(cafile=ca) if ca is not None else None
    with Client.from_url(pigeon_url, tls=tls if pigeon_url.startswith("pigeons:") else None) as client:
        yield client
