"""Issue 10, item 1: STATS replies nobody reads must neither crash nor bloat the broker, and large
STATS sections come in bounded pages (``STATS CONNECTIONS|TOPICS [<cursor> [<count>]]``).

On v1 one ``STATS CONNECTIONS`` reply for a client holding 10,000 subscriptions of 255 bytes is
2.5 MB; 3,000 such lines (54 KB, never read) build GiBs of output in one read, and under an
address-space limit the broker dies with MemoryError, then SIGSEGV (exit -11).
"""

from __future__ import annotations

import pytest

from tests import attack_kit as kit

# The address-space limit the flood runs under: it reproduces v1's crash (MemoryError at
# _PyBytes_Resize, then SIGSEGV), and keeps a broker that still builds GiBs of replies from
# eating the machine (without a limit v1 would take about 8 GiB for the 3,000 lines).
ADDRESS_SPACE = 1 << 30

# The most one STATS reply line may take after the fix.
REPLY_MAX = 256 * kit.KiB + 4 * kit.KiB


@pytest.mark.slow
@pytest.mark.parametrize("loop", kit.LOOPS)
def test_unread_stats_replies_neither_crash_nor_bloat_the_broker(loop: str) -> None:
    with kit.running(loop=loop, address_space=ADDRESS_SPACE) as proc:
        result = kit.stats_flood(proc, lines=3000, subscriptions=10_000)
        assert result.alive, f"the broker died (exit {result.exit_code}): {result.crash_log}"
        assert result.ping_failures == 0 and result.ping_ms, f"the bystander's PING went unanswered: {result}"
        assert result.peak_kib < 256 * 1024, f"VmHWM {result.peak_kib} KiB"
        bystander = kit.connected(proc)
        assert bystander.ask("PING") == b"PONG"
        bystander.close()
        assert proc.stop() == 0, proc.text()


@pytest.mark.parametrize("loop", kit.LOOPS)
def test_stats_connections_is_paged_and_each_reply_bounded(loop: str) -> None:
    with kit.running(loop=loop) as proc:
        holder = kit.connected(proc)
        names = set(kit.subscribe_many(holder, 10_000))
        idle = [kit.connected(proc) for _ in range(300)]
        asker = kit.connected(proc)
        everyone = {holder.client_id, asker.client_id, *(c.client_id for c in idle)}

        reply = asker.ask("STATS CONNECTIONS")
        assert len(reply) + 1 <= REPLY_MAX, f"{len(reply) + 1} bytes"
        assert reply.startswith(b"STATS {"), reply[:100]

        for count in (None, 50):
            entries, sizes = kit.page_through(asker, "CONNECTIONS", count)
            assert max(sizes) <= REPLY_MAX, sizes
            ids = [entry["client_id"] for entry in entries]
            assert sorted(ids) == sorted(everyone), "every connection exactly once"
            held = next(entry for entry in entries if entry["client_id"] == holder.client_id)
            assert len(held["subscriptions"]) == 100
            assert held["subscriptions_total"] == 10_000
            assert set(held["subscriptions"]) <= names
        for client in (holder, asker, *idle):
            client.close()
        assert proc.stop() == 0, proc.text()


@pytest.mark.parametrize("loop", kit.LOOPS)
def test_stats_topics_pages_through_every_topic_exactly_once(loop: str) -> None:
    with kit.running(loop=loop) as proc:
        # 255-byte names: the whole listing is about 1 MB, so even the default page must stop short
        names = [f"page{i:05d}".ljust(255, "z") for i in range(3000)]
        assert kit.publish_to_topics(proc, names) == len(names)
        asker = kit.connected(proc)

        reply = asker.ask("STATS TOPICS")
        assert len(reply) + 1 <= REPLY_MAX, f"{len(reply) + 1} bytes"
        assert reply.startswith(b"STATS {"), reply[:100]

        for count in (None, 100, 7):
            entries, sizes = kit.page_through(asker, "TOPICS", count)
            assert max(sizes) <= REPLY_MAX, sizes
            seen = [entry["name"] for entry in entries]
            assert sorted(seen) == sorted(names), "every topic exactly once"
            assert all(entry["backlog_messages"] == 1 for entry in entries)
        asker.close()
        assert proc.stop() == 0, proc.text()
