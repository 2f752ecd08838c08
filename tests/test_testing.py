"""pigeon.testing, the kit the tests (and users' tests, through the pytest plugin) start servers with."""

from __future__ import annotations

import sys

import pytest

from pigeon.testing import ServerProcess

# stands for a server that hangs in its shutdown: says it listens, then ignores SIGTERM
HANGING = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM: stuck in the shutdown", file=sys.stderr, flush=True))
print("pigeon 0 listening on 127.0.0.1:1 (asyncio)", file=sys.stderr, flush=True)
time.sleep(60)
"""


def test_a_server_that_does_not_stop_is_killed_and_reported_with_its_log() -> None:
    server = ServerProcess(command=[sys.executable, "-c", HANGING])
    with pytest.raises(AssertionError) as failed:
        server.stop(timeout=1.0)
    assert "did not stop within 1.0 s of SIGTERM and was killed" in str(failed.value)
    assert "SIGTERM: stuck in the shutdown" in str(failed.value)
    assert server.proc.returncode == -9
