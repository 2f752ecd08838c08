"""The monitoring port locked down: the bearer token (``--http-token``, ``--http-token-file``), the
refusal to listen on a non-loopback address without one, and per-connection data kept for the token's
holders when the broker has users."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import pytest
from aiohttp import ClientSession

from pigeon._core import Broker
from pigeon.server.monitor import Monitor
from pigeon.testing import server_command
from tests.conftest import LOOPS
from tests.monitoring import get, start_monitored

TOKEN = "s3cret-t0ken"
ENDPOINTS = ("", "metrics", "stats", "topics", "topics/busiest", "connections")


def bearer(token: str) -> dict[str, str]:
    """The header that shows ``token``."""
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("loop", LOOPS)
def test_every_endpoint_but_healthz_needs_the_token(loop: str) -> None:
    proc, url = start_monitored("--http-token", TOKEN, loop=loop)
    for path in ENDPOINTS:
        status, _, body = get(url + path)
        assert status == 401 and b"Bearer" in body, (path, status, body)
        for wrong in (bearer(TOKEN + "x"), bearer(TOKEN[:-1]), {"Authorization": TOKEN}, bearer("")):
            assert get(url + path, wrong)[0] == 401, (path, wrong)
        assert get(url + path, bearer(TOKEN))[0] == 200, path
    assert get(url + "healthz")[0] == 200
    assert proc.stop() == 0


def test_the_token_can_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    proc, url = start_monitored("--http-token-file", str(path))
    assert get(url + "stats")[0] == 401
    assert get(url + "stats", bearer(TOKEN))[0] == 200
    assert TOKEN not in " ".join(proc.args)
    assert proc.stop() == 0


def test_without_a_token_loopback_monitoring_is_open() -> None:
    proc, url = start_monitored()
    for path in ENDPOINTS:
        assert get(url + path)[0] == 200, path
    assert proc.stop() == 0


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``pigeon`` with ``args`` to its end (it must refuse to start)."""
    return subprocess.run(
        [*server_command(), "--port", "0", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "pigeon.example"])
def test_a_non_loopback_listener_without_a_token_is_refused(host: str) -> None:
    done = run_server("--http-port", "0", "--http-host", host)
    assert done.returncode == 2, done
    assert f"refusing to serve monitoring on {host} without a token" in done.stderr
    assert "--http-token" in done.stderr and "--http-token-file" in done.stderr


def test_a_non_loopback_listener_with_a_token_serves() -> None:
    address = non_loopback_address()
    proc, url = start_monitored("--http-host", "0.0.0.0", "--http-token", TOKEN)
    port = url.rsplit(":", 1)[1].strip("/")
    base = f"http://{address or '127.0.0.1'}:{port}/"
    assert get(base + "stats")[0] == 401
    assert get(base + "stats", bearer(TOKEN))[0] == 200
    assert proc.stop() == 0


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--http-token", " "], "the monitoring token is empty"),
        (["--http-token-file", "/nonexistent/token"], "cannot read --http-token-file"),
        (["--http-token", "a", "--http-token-file", "f"], "not allowed with argument"),
    ],
)
def test_bad_token_flags_are_refused(args: list[str], complaint: str) -> None:
    done = run_server("--http-port", "0", *args)
    assert done.returncode == 2, done
    assert complaint in done.stderr, done.stderr


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    done = run_server("--http-port", "0", "--http-token-file", str(path))
    assert done.returncode == 2 and "the monitoring token is empty" in done.stderr, done


async def _statuses(monitor: Monitor, headers: dict[str, str]) -> dict[str, int]:
    await monitor.start()
    try:
        base = f"http://127.0.0.1:{monitor.port}/"
        async with ClientSession() as session:
            statuses = {}
            for path in ("stats", "connections"):
                async with session.get(base + path, headers=headers) as response:
                    statuses[path] = response.status
            return statuses
    finally:
        await monitor.stop()


def test_with_users_per_connection_data_needs_the_token() -> None:
    """``admin_only`` (set when the broker has users): /connections only for the token's holders."""
    without = Monitor(Broker(), "127.0.0.1", admin_only=True)
    assert asyncio.run(_statuses(without, {})) == {"stats": 200, "connections": 403}
    with_token = Monitor(Broker(), "127.0.0.1", admin_only=True, token=TOKEN)
    assert asyncio.run(_statuses(with_token, {})) == {"stats": 401, "connections": 401}
    with_token = Monitor(Broker(), "127.0.0.1", admin_only=True, token=TOKEN)
    assert asyncio.run(_statuses(with_token, bearer(TOKEN))) == {"stats": 200, "connections": 200}
