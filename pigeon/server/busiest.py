"""The busiest topics: a walk over every topic, one page of the core at a time.

A listing of every topic can be long (clients choose how many topics there
are), so it is never built in one go: the walk asks the core for a page of
WALK_PAGE topics at a time (well under a millisecond each, with the ranking)
and yields to the event loop between pages, so that clients are served while
a scrape or the dashboard walks 100,000 topics.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

from pigeon._core import Broker

# the most topics or connections one page of the core holds (as STATS TOPICS takes)
PAGE_MAX = 1000

# topics per page of the walk: smaller pages cost a little more in all, but
# hold the loop for less time each (scripts/bystander_latency.py measures it)
WALK_PAGE = 250


async def busiest_topics(broker: Broker, n: int) -> list[dict[str, Any]]:
    """The ``n`` topics with the most messages published, most first (then by name).

    Each entry is a topic of ``Broker.topics()``. Of topics equally busy at the
    cut, which ones make it is not specified. The walk follows the hash
    table (SCAN semantics): a topic made or dropped during the walk may be
    missed, and one seen twice (the table grew) counts once.
    """
    if n <= 0:
        return []
    heap: list[tuple[int, str, dict[str, Any]]] = []
    kept: set[str] = set()
    cursor = 0
    while True:
        page = broker.topics(cursor, WALK_PAGE)
        for topic in page["topics"]:
            name = topic["name"]
            if name in kept:
                continue
            entry = (topic["published"], name, topic)
            if len(heap) < n:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                kept.discard(heapq.heapreplace(heap, entry)[1])
            else:
                continue
            kept.add(name)
        cursor = page["next"]
        if cursor == 0:
            break
        await asyncio.sleep(0)
    return [topic for _, _, topic in sorted(heap, key=lambda e: (-e[0], e[1]))]
