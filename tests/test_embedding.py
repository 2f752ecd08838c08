"""``pigeon.Server`` inside an asyncio program, ``ServerThread``, and the pytest plugin's fixtures."""

from __future__ import annotations

import asyncio
import inspect
import socket

import pytest

from pigeon import AsyncClient, Client, PigeonError, Server, ServerThread
from pigeon._core import LIMIT_NAMES
from pigeon.server.limits import ServerLimits

pytest_plugins = ["pytester"]


def test_server_runs_inside_an_asyncio_program() -> None:
    async def main() -> str:
        async with Server(port=0) as server, AsyncClient(port=server.port) as client:
            await client.subscribe("t")
            await client.publish("t", "embedded")
            return (await client.next_message(10)).text

    assert asyncio.run(main()) == "embedded"


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_server_thread_serves_blocking_clients(loop: str) -> None:
    with ServerThread(loop=loop) as server:
        assert server.port != 0
        with Client(server.host, server.port) as client:
            client.subscribe("t")
            client.publish("t", "threaded")
            assert client.next_message(10).text == "threaded"
            stats = server.stats()
        assert stats["connections"] == 1 and stats["published"] == 1
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.port), timeout=5)


def test_server_thread_options_reach_the_broker() -> None:
    with ServerThread(max_backlog=7, max_line=100, write_timeout=2.5) as server:
        limits = server.call(lambda: server.server.broker.limits)
        assert (limits["max_backlog"], limits["max_line"], limits["write_timeout"]) == (7, 100, 2.5)


def test_server_thread_takes_every_keyword_of_server() -> None:
    keywords = [p.name for p in inspect.signature(Server).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert list(ServerLimits.__annotations__) == keywords
    # every limit of the core but its internal out_batch is a keyword of Server, the log's settings,
    # the users file, TLS and a port shared with other processes (pigeon --workers)
    settings = {"data_dir", "fsync", "repair", "users_file", "tls", "tls_handshake_timeout", "tls_map_user"}
    settings.add("reuse_port")
    assert set(keywords) == set(LIMIT_NAMES) - {"out_batch"} | settings
    with ServerThread(max_connections=1, idle_timeout=30.0) as server:
        assert server.server.broker.limits["idle_timeout"] == 30.0
        with Client(server.host, server.port), pytest.raises(PigeonError, match="too many connections"):
            Client(server.host, server.port)


def test_an_out_of_range_limit_names_itself() -> None:
    with pytest.raises(ValueError, match="max_backlog must be from 0 to"):
        ServerThread(max_backlog=5_000_000_000)


def test_server_thread_reports_a_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        thread = ServerThread(port=port)
        with pytest.raises(OSError):
            thread.start()
        thread.stop()


def test_stop_without_start_and_twice() -> None:
    server = ServerThread()
    server.stop()
    server.start()
    server.stop()
    server.stop()
    with pytest.raises(RuntimeError):
        server.start()


@pytest.mark.smoke
def test_plugin_fixtures(pigeon_server: ServerThread, pigeon_client: Client) -> None:
    assert pigeon_client.port == pigeon_server.port
    pigeon_client.subscribe("fixture")
    pigeon_client.publish("fixture", "works")
    assert pigeon_client.next_message(10).text == "works"
    assert pigeon_server.stats()["connections"] == 1


def test_plugin_is_registered_for_users(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_uses_fixtures(pigeon_server, pigeon_client):
            pigeon_client.subscribe("t")
            pigeon_client.publish("t", "hello")
            assert pigeon_client.next_message(5).text == "hello"
            assert pigeon_server.port == pigeon_client.port
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
