"""Issue 10, item 4: clients that never read must not hold memory and connection slots forever.

A write deadline (``--write-timeout SECONDS``, default 10, 0 = off) closes a connection whose
output makes no progress for that long, and requeues what was routed to it but never handed to
its socket; a connection that sends but never reads is no longer read once its unsent output
passes a mark. On v1, 30 clients that send 4.5 MB of junk lines each and never read took RSS
from 24 MiB to 1.6 GiB, which stayed held after ``--idle-timeout`` fired, with every slot
taken; two subscribers that stopped reading kept 1 MiB of pending output each forever.

Flags the server does not take yet are left out of its command line and asserted last, so that
on v1 the assertion that fails is the one about the attack's effect.
"""

from __future__ import annotations

import pytest

from tests import attack_kit as kit

WRITE_TIMEOUT = 2  # seconds


@pytest.mark.slow
@pytest.mark.parametrize("loop", kit.LOOPS)
def test_clients_that_never_read_are_stopped_then_closed(loop: str) -> None:
    flags, missing = kit.split_unknown_flags(
        ["--idle-timeout", "2", "--write-timeout", str(WRITE_TIMEOUT), "--max-connections", "40"]
    )
    with kit.running(*flags, loop=loop) as proc:
        result = kit.never_read(
            proc, attackers=30, junk_bytes=4_500_000, newcomers=20, wait_closed=8.0, stop_above_kib=128 * 1024
        )
        print(
            f"each attacker sent {sorted(result.sent)} bytes; last progress at {result.last_progress:.1f} s"
        )
        assert not result.stopped_early, f"VmHWM passed 128 MiB: {result}"
        assert result.peak_kib < 128 * 1024, result
        assert result.closed_after is not None, f"{result.connections_after} attackers never closed"
        # within the write timeout plus 2 s of the last time any attacker could send anything
        assert result.closed_after - result.last_progress <= WRITE_TIMEOUT + 2.0, result
        assert result.new_clients_refused == 0, f"new client refused: {result.first_refusal!r}"
        assert result.new_clients_ok == 20
        assert proc.stop() == 0, proc.text()
    assert not missing, f"the server does not take {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("loop", kit.LOOPS)
def test_subscribers_that_stop_reading_are_closed_and_their_messages_requeued(loop: str) -> None:
    flags, missing = kit.split_unknown_flags(["--write-timeout", str(WRITE_TIMEOUT)])
    with kit.running(*flags, loop=loop) as proc:
        result = kit.dead_subscribers(proc, messages=100_000, body_bytes=200, wait_closed=10.0)
        assert result.acked == 100_000, result
        assert result.closed_after is not None, f"not closed; pending bytes {result.stuck_pending}"
        assert result.duplicates == 0 and result.in_order, result
        # what can be gone with the two dead sockets: what their transports held (up to the
        # 1 MiB high-water mark plus one batch each: 4 MiB) and what the kernel held for them
        lost_at_most = (4 * kit.MiB + result.kernel_bytes) // result.line_bytes
        assert result.received >= 100_000 - lost_at_most, result
        assert result.backlog_left == 0, result
        assert proc.stop() == 0, proc.text()
    assert not missing, f"the server does not take {missing}"
