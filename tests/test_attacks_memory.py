"""Issue 10, item 3: ``--max-memory`` must bound what the broker really holds, not only payload bytes.

On v1 it counts message bytes in backlogs and nothing else: empty messages cost nothing against
it (RSS went to GiBs under a 1 MiB limit), 1-byte messages took RSS to about 1 GiB under 32 MiB,
and unfinished input lines are not counted at all. After the fix a PUBLISH past the limit waits
(publisher flow control, issue 12: the publisher is not read until memory is freed), a
connection whose unfinished line cannot be held gets ``ERROR MEMORY_FULL`` and is closed, and
the server's peak RSS (VmHWM) stays under the limit plus a
constant: 48 MiB for messages, 96 MiB for 1,000 unfinished lines (an idle server holds about
23-25 MiB). Each flood stops early once VmHWM passes that bound: the test has failed by then.
"""

from __future__ import annotations

import pytest

from tests import attack_kit as kit

MiB = kit.MiB

# how long each publish flood runs (v1 reaches GiBs within that)
FLOOD_SECONDS = 10.0


def _flood_stays_under_max_memory(limit: int, message: bytes) -> None:
    """Flood a server under ``--max-memory limit`` with ``message``: its VmHWM stays under the limit
    plus 48 MiB, and past the limit the publisher waits (no refusal, no other reply, the server
    says it held it)."""
    bound_kib = (limit + 48 * MiB) // 1024
    with kit.running("--max-memory", str(limit)) as proc:
        flood = kit.publish_flood(proc, limit, message, seconds=FLOOD_SECONDS, stop_above_kib=bound_kib)
        assert flood.alive, proc.text()
        assert not flood.stopped_early, f"VmHWM passed {bound_kib} KiB: {flood}"
        assert flood.peak_kib < bound_kib, flood
        assert flood.errors == 0 and flood.other_replies == 0, f"reply: {flood.first_other!r}"
        assert flood.publish_holds > 0, flood
        assert 0 < flood.accepted < flood.sent, flood
        assert proc.stop() == 0, proc.text()


@pytest.mark.slow
def test_empty_messages_count_against_max_memory() -> None:
    _flood_stays_under_max_memory(1 * MiB, b"")


@pytest.mark.slow
def test_one_byte_messages_count_their_overhead_against_max_memory() -> None:
    _flood_stays_under_max_memory(32 * MiB, b"x")


@pytest.mark.slow
def test_unfinished_lines_count_against_max_memory() -> None:
    connections = 1000
    if not kit.room_for_sockets(connections + 100):
        pytest.skip("the open-files hard limit is too low for 1,000 connections")
    limit = 64 * MiB
    with kit.running("--max-memory", str(limit)) as proc:
        result = kit.unfinished_lines(proc, limit, connections=connections, line_bytes=MiB)
        assert proc.alive(), proc.text()
        assert result.peak_kib < (limit + 96 * MiB) // 1024, result
        assert result.memory_full > 0, f"no connection got ERROR MEMORY_FULL: {result}"
        assert result.other_replies == 0, f"other reply: {result.first_other!r}"
        assert result.refused_not_closed == 0, f"refused but left open: {result}"
        assert result.closed_without_error == 0, f"closed without ERROR MEMORY_FULL: {result}"
        assert result.bystander_ok, "a bystander's PING went unanswered"
        assert proc.stop() == 0, proc.text()
