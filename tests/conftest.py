"""Fixtures: a real ``pigeon`` server process per test, on each event loop."""

from __future__ import annotations

import importlib.util
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pigeon import AsyncClient, Client
from pigeon.cluster.etcd import EtcdProcess, etcd_binary
from pigeon.testing import LineClient, ServerProcess
from tests.certs import Certs, make_certs
from tests.faces import Face, LoopThread, OpenClient, Target
from tests.monitoring import start_monitored

LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers here, not in pyproject.toml: scripts/smoke.py runs a copy of tests/ without it."""
    config.addinivalue_line(
        "markers", "smoke: end-to-end subset run against installed wheels and the binary (scripts/smoke.py)"
    )
    config.addinivalue_line(
        "markers", "slow: takes tens of seconds or more; the default run runs it too (-m 'not slow' skips)"
    )


@pytest.fixture
def etcd() -> Iterator[EtcdProcess]:
    """A real single-member etcd on free loopback ports, its data in a temporary directory."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    if importlib.util.find_spec("aetcd") is None:
        pytest.skip("the cluster extra is not installed (pip install -e '.[cluster]')")
    with EtcdProcess() as proc:
        yield proc


@pytest.fixture(params=LOOPS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """A server on a free port, run under each available event loop; must exit 0 on SIGTERM."""
    proc = ServerProcess(loop=request.param)
    assert proc.loop_name == request.param
    yield proc
    assert proc.stop() == 0, "".join(proc.log)


@pytest.fixture
def connect(server: ServerProcess) -> Iterator[Callable[[], LineClient]]:
    """A factory of connected clients (CONNECT already sent); closes them after the test."""
    clients: list[LineClient] = []

    def make() -> LineClient:
        client = server.client()
        client.connect()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(params=LOOPS)
def monitored(request: pytest.FixtureRequest) -> Iterator[tuple[ServerProcess, str]]:
    """A server with its HTTP monitoring listener on a free port, and that listener's base URL."""
    proc, url = start_monitored(loop=request.param)
    yield proc, url
    assert proc.stop() == 0, "".join(proc.log)


@pytest.fixture(params=LOOPS)
def start_server(request: pytest.FixtureRequest) -> Iterator[Callable[..., ServerProcess]]:
    """A factory of servers with extra flags, all on one event loop kind; each must exit 0."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        proc = ServerProcess(*args, loop=request.param)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.returncode is None:
            assert proc.stop() == 0, "".join(proc.log)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Certificates for the TLS tests (tests/certs.py), made once per run."""
    return make_certs(tmp_path_factory.mktemp("certs"))


FakeServer = Callable[[bytes], tuple[str, int]]


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A listening socket that answers the first read with fixed bytes: for replies no real server sends."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(answer: bytes) -> tuple[str, int]:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(answer)
                conn.recv(1024)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        host, port = listener.getsockname()[:2]
        return str(host), int(port)

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(5)


@pytest.fixture(params=["Client", "AsyncClient"])
def open_client(request: pytest.FixtureRequest) -> Iterator[OpenClient]:
    """A factory of connected clients of one kind: ``open_client(server, **options)``; closes them after."""
    loops: dict[str, LoopThread] = {}
    faces: list[Face] = []

    def open_(target: Target, **options: Any) -> Face:
        if request.param == "Client":
            face = Face(Client(target.host, target.port, **options), None)
        else:
            if target.loop_name not in loops:
                loops[target.loop_name] = LoopThread(target.loop_name)
            loop = loops[target.loop_name]
            face = Face(loop.run(AsyncClient(target.host, target.port, **options).connect()), loop)
        faces.append(face)
        return face

    yield open_
    for face in faces:
        face.close()
    for loop in loops.values():
        loop.close()
