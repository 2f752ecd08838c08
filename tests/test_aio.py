"""What only ``pigeon.AsyncClient`` does, against a real server, on the same kind of loop as the server.

Tasks sharing one client, background reading with back pressure, and
reconnecting in the background while a task waits. Everything both clients
do is tested once for both in tests/test_client.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from pigeon import (
    AsyncClient,
    ConnectionClosedError,
    Message,
    ServerThread,
)
from pigeon.server.loops import loop_factory
from pigeon.testing import ServerProcess

T = TypeVar("T")
StartServer = Callable[..., ServerProcess]


def run(server: ServerProcess, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on a new event loop of the server's kind (asyncio or uvloop)."""
    _, new_loop = loop_factory(server.loop_name)
    loop = new_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.smoke
def test_async_with_connects_and_closes(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(server.host, server.port) as sub, AsyncClient(server.host, server.port) as pub:
            assert sub.client_id.startswith("c") and sub.connected
            await sub.subscribe("jobs")
            await pub.publish("jobs", "héllo world")
            assert await sub.next_message(10) == Message("jobs", "héllo world".encode())
        assert not sub.connected
        with pytest.raises(ConnectionClosedError, match="closed"):
            await sub.ping()

    run(server, main)


def test_connect_and_close_without_context_manager(pigeon_server: ServerThread) -> None:
    async def main() -> None:
        client = await AsyncClient(pigeon_server.host, pigeon_server.port).connect()
        assert pigeon_server.stats()["connections"] == 1
        await client.close()
        await client.close()

    asyncio.run(main())
    commands = pigeon_server.stats()["commands"]
    assert (commands["hello"], commands["connect"], commands["disconnect"]) == (1, 1, 1)
    assert sum(commands.values()) == 3
    assert pigeon_server.stats()["connections"] == 0


def test_deliveries_interleaved_with_replies_and_concurrent_commands(server: ServerProcess) -> None:
    async def main() -> list[str]:
        async with AsyncClient(server.host, server.port) as client:
            await client.subscribe("self")

            async def publisher(name: str) -> None:
                for i in range(200):
                    await client.publish("self", f"{name} {i}")
                    await client.ping()

            await asyncio.gather(publisher("x"), publisher("y"), client.publish_many("self", ["z"] * 500))
            return [m.text async for m in client.messages(timeout=0.5)]

    got = run(server, main)
    assert len(got) == 900
    assert [t for t in got if t.startswith("x")] == [f"x {i}" for i in range(200)]
    assert [t for t in got if t.startswith("y")] == [f"y {i}" for i in range(200)]


def test_a_waiting_task_gets_the_first_message_after_a_server_restart(start_server: StartServer) -> None:
    first = start_server()
    restarted: list[ServerProcess] = []

    async def main() -> None:
        sub = await AsyncClient(first.host, first.port, reconnect=True).connect()
        pub = await AsyncClient(first.host, first.port, reconnect=True).connect()
        await sub.subscribe("jobs")
        waiting = asyncio.ensure_future(sub.next_message(20))
        assert await asyncio.to_thread(first.stop) == 0
        restarted.append(await asyncio.to_thread(start_server, "--port", str(first.port)))
        await pub.publish("jobs", "after the restart")
        assert await waiting == Message("jobs", b"after the restart")
        assert (pub.reconnects, sub.reconnects) == (1, 1)
        await pub.publish("jobs", "again")
        assert (await sub.next_message(10)).text == "again"
        await sub.close()
        await pub.close()

    run(first, main)
    assert restarted[0].port == first.port


def test_a_waiting_task_learns_that_reconnecting_gave_up(start_server: StartServer) -> None:
    server = start_server()

    async def main() -> None:
        client = await AsyncClient(server.host, server.port, reconnect=True, reconnect_timeout=0.3).connect()
        await client.subscribe("t")
        assert await asyncio.to_thread(server.stop) == 0
        with pytest.raises(ConnectionClosedError, match="could not reconnect"):
            await client.next_message(20)
        with pytest.raises(ConnectionClosedError):
            await client.ping()
        await client.close()

    run(server, main)


def test_a_client_that_does_not_consume_stops_reading_and_is_skipped(server: ServerProcess) -> None:
    # Without back pressure the idle subscriber would read (and hold) half of
    # everything; paused, it holds only what fits in the socket buffers.
    count = 50_000
    message = b"x" * 1000  # 50 MB: more than the kernel's socket buffers hold

    async def main() -> tuple[int, int]:
        async with (
            AsyncClient(server.host, server.port, max_queued=100) as idle,
            AsyncClient(server.host, server.port) as busy,
            AsyncClient(server.host, server.port) as pub,
        ):
            await idle.subscribe("t")
            await busy.subscribe("t")
            consumer = asyncio.ensure_future(_count_until_quiet(busy))
            assert await pub.publish_many("t", [message] * count) == []
            busy_got = await consumer
            idle_got = len([m async for m in idle.messages(timeout=0.5)])
            return busy_got, idle_got

    busy_got, idle_got = run(server, main)
    assert busy_got + idle_got == count, "every message is delivered once"
    assert busy_got > count * 0.6


async def _count_until_quiet(client: AsyncClient) -> int:
    return len([m async for m in client.messages(timeout=1.0)])
