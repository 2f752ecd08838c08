"""``pigeon.AsyncClient`` against a real server process, the client on the same kind of loop as the server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

import pigeon
from pigeon import (
    AsyncClient,
    BacklogFullError,
    CommandError,
    ConnectionClosedError,
    InvalidArgumentError,
    Message,
    ProtocolError,
    ServerThread,
)
from pigeon.server.loops import loop_factory
from pigeon.testing import ServerProcess
from tests.conftest import FakeServer

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
def test_every_method_round_trip(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(server.host, server.port) as sub, AsyncClient(server.host, server.port) as pub:
            assert sub.client_id.startswith("c") and sub.connected
            await sub.subscribe("jobs")
            assert sub.subscriptions == ("jobs",)
            await pub.publish("jobs", "héllo world")
            await pub.publish("jobs", b"")
            assert await sub.next_message(10) == Message("jobs", "héllo world".encode())
            assert (await sub.next_message(10)).data == b""
            assert await pub.ping() > 0
            await sub.unsubscribe("jobs")
            await pub.publish("jobs", "to the backlog")
            with pytest.raises(pigeon.TimeoutError):
                await sub.next_message(0.2)
            with pytest.raises(CommandError, match="not subscribed to 'jobs'"):
                await sub.unsubscribe("jobs")
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
    stats = pigeon_server.stats()
    assert stats["commands"]["connect"] == 1 and stats["commands"]["disconnect"] == 1
    assert sum(stats["commands"].values()) == 2
    assert stats["connections"] == 0


def test_round_robin_and_async_iteration(server: ServerProcess) -> None:
    async def main() -> tuple[list[str], list[str]]:
        async with (
            AsyncClient(server.host, server.port) as a,
            AsyncClient(server.host, server.port) as b,
            AsyncClient(server.host, server.port) as pub,
        ):
            await a.subscribe("t")
            await b.subscribe("t")
            for i in range(6):
                await pub.publish("t", f"m{i}")
            got_a = [m.text async for m in a.messages(timeout=0.3)]
            got_b = [m.text async for m in b.messages(timeout=0.3)]
            return got_a, got_b

    assert run(server, main) == (["m0", "m2", "m4"], ["m1", "m3", "m5"])


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


def test_100k_pipelined_publishes_arrive_in_order(server: ServerProcess) -> None:
    count = 100_000

    async def main() -> list[bytes]:
        async with AsyncClient(server.host, server.port) as sub, AsyncClient(server.host, server.port) as pub:
            await sub.subscribe("bulk")
            consumer = asyncio.ensure_future(_collect(sub, count))
            assert await pub.publish_many("bulk", (b"%d" % i for i in range(count))) == []
            return await consumer

    assert run(server, main) == [b"%d" % i for i in range(count)]


async def _collect(client: AsyncClient, count: int) -> list[bytes]:
    return [(await client.next_message(10)).data for _ in range(count)]


def test_publish_without_waiting_then_flush(start_server: StartServer) -> None:
    server = start_server("--max-backlog", "3")

    async def main() -> None:
        async with AsyncClient(server.host, server.port) as client:
            for i in range(5):
                await client.publish("full", str(i), wait=False)
            refused = await client.flush()
            assert [r.index for r in refused] == [3, 4]
            assert all(isinstance(r.error, BacklogFullError) for r in refused)
            assert await client.flush() == []
            with pytest.raises(BacklogFullError):
                await client.publish("full", "x")
            refused = await client.publish_many("other", ["a", "b", "c", "d"])
            assert [r.index for r in refused] == [3]

    run(server, main)


def test_many_unwaited_publishes_are_throttled_not_lost(server: ServerProcess) -> None:
    async def main() -> list[bytes]:
        async with AsyncClient(server.host, server.port) as sub, AsyncClient(server.host, server.port) as pub:
            await sub.subscribe("t")
            consumer = asyncio.ensure_future(_collect(sub, 50_000))
            for i in range(50_000):
                await pub.publish("t", b"%d" % i, wait=False)
            assert await pub.flush() == []
            return await consumer

    got = run(server, main)
    assert got[0] == b"0" and got[-1] == b"49999" and len(set(got)) == 50_000


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda c: c.subscribe("two words"), "whitespace"),
        (lambda c: c.publish("t", "a\nb"), "newline"),
        (lambda c: c.publish("", "x", wait=False), "empty"),
        (lambda c: c.publish_many("t", ["ok", "bad\r"]), "carriage return"),
    ],
)
def test_bad_arguments_fail_before_anything_is_sent(
    pigeon_server: ServerThread, call: Callable[[AsyncClient], Awaitable[object]], problem: str
) -> None:
    async def main() -> None:
        async with AsyncClient(pigeon_server.host, pigeon_server.port) as client:
            before = _commands(pigeon_server)
            with pytest.raises(InvalidArgumentError, match=problem):
                await call(client)
            await client.flush()
            assert _commands(pigeon_server) == before

    asyncio.run(main())


def test_reply_timeout_leaves_the_connection_usable(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(server.host, server.port, timeout=0.3) as client:
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(pigeon.TimeoutError):
                    await client.ping()
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            await client.subscribe("t")
            await client.publish("t", "after the late PONG")
            assert (await client.next_message(10)).text == "after the late PONG"

    run(server, main)


def test_server_error_then_close(start_server: StartServer) -> None:
    server = start_server("--max-line", "64")

    async def main() -> None:
        async with AsyncClient(server.host, server.port) as client:
            await client.subscribe("t")
            with pytest.raises(CommandError, match="line too long"):
                await client.publish("t", "x" * 100)
            with pytest.raises(ConnectionClosedError):
                await client.next_message(10)
            with pytest.raises(ConnectionClosedError):
                await client.ping()

    run(server, main)


def test_cannot_connect(start_server: StartServer) -> None:
    server = start_server()
    probe = server.client()
    probe.connect()  # once it answers, its signal handlers are in place
    probe.close()
    assert server.stop() == 0

    async def main() -> None:
        with pytest.raises(ConnectionClosedError, match="cannot connect"):
            await AsyncClient(server.host, server.port).connect()

    run(server, main)


def test_reconnect_after_server_restart(start_server: StartServer) -> None:
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


def test_reconnect_gives_up_after_its_timeout(start_server: StartServer) -> None:
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


def test_nonsense_from_the_server_is_a_protocol_error(fake_server: FakeServer) -> None:
    host, port = fake_server(b"HELLO there\n")

    async def main() -> None:
        with pytest.raises(ProtocolError, match="expected CONNECTED"):
            await AsyncClient(host, port).connect()

    asyncio.run(main())


def _commands(server: ServerThread) -> int:
    return sum(server.stats()["commands"].values())
