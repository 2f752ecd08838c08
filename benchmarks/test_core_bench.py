"""Micro benchmarks of the core without sockets (pytest-benchmark).

``pytest benchmarks --benchmark-enable`` measures; the default run (addopts has
``--benchmark-disable``) executes each once at a smaller size, as a test, so
they keep working. Every benchmark checks the core's output, so it can fail.
"""

from __future__ import annotations

import tracemalloc

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from pigeon._core import Broker

PAYLOAD = b"x" * 64
BATCH = 4000  # commands per fed buffer: about one 256 KiB socket read of PUBLISH lines


class ByteCounter:
    """A writer that only counts what the core hands it."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def __call__(self, data: bytes) -> None:
        self.bytes += len(data)
        self.calls += 1


def _client(broker: Broker, counter: ByteCounter | None = None) -> tuple[int, bytes, ByteCounter]:
    counter = counter or ByteCounter()
    h = broker.open(counter)
    broker.feed(h, b"CONNECT\n")
    cid = broker.client_id(h)
    assert cid is not None
    counter.bytes = counter.calls = 0
    return h, cid.encode(), counter


def _errors(broker: Broker) -> int:
    errors = broker.stats()["errors"]
    assert isinstance(errors, dict)
    return sum(errors.values())


def _subscribers(broker: Broker, topic: bytes, k: int) -> list[ByteCounter]:
    counters = []
    for _ in range(k):
        h, cid, counter = _client(broker)
        broker.feed(h, b"SUBSCRIBE %s %s\n" % (cid, topic))
        counter.bytes = 0
        counters.append(counter)
    return counters


@pytest.mark.parametrize("subscribers", [1, 4, 1000])
def test_publish_round_robin(benchmark: BenchmarkFixture, subscribers: int) -> None:
    """Pipelined PUBLISH parse, route and MESSAGE write: a batch per call, over K subscribers."""
    broker = Broker()
    subs = _subscribers(broker, b"bench", subscribers)
    h, cid, acks = _client(broker)
    batch = b"PUBLISH %s bench %s\n" % (cid, PAYLOAD) * BATCH
    rounds = benchmark(broker.feed, h, batch)
    assert rounds is True
    runs = acks.bytes // (len(b"PUBLISHED bench\n") * BATCH)
    assert acks.bytes == runs * len(b"PUBLISHED bench\n") * BATCH
    assert sum(s.bytes for s in subs) == runs * BATCH * len(b"MESSAGE bench %s\n" % PAYLOAD)
    assert broker.topic_info(b"bench") == (subscribers, 0)
    if benchmark.stats:
        benchmark.extra_info["msgs_per_s"] = BATCH / benchmark.stats.stats.mean


def test_subscribe_churn(benchmark: BenchmarkFixture) -> None:
    """SUBSCRIBE then UNSUBSCRIBE over 100 topics, each creating and freeing its topic."""
    broker = Broker()
    h, cid, out = _client(broker)
    pairs = b"".join(
        b"SUBSCRIBE %s churn.%d\nUNSUBSCRIBE %s churn.%d\n" % (cid, i, cid, i) for i in range(100)
    )
    benchmark(broker.feed, h, pairs * (BATCH // 200))
    assert broker.stats()["topics"] == 0
    assert _errors(broker) == 0
    assert out.bytes > 0


def test_topic_table(benchmark: BenchmarkFixture) -> None:
    """A table of 1,000,000 topics (10,000 in the fast run): memory per topic, and publishing across it."""
    ntopics = 10_000 if benchmark.disabled else 1_000_000
    # one connection holds every subscription: past the default per-connection limit
    broker = Broker(max_subscriptions=ntopics, max_topics=ntopics)
    sub, sub_id, _ = _client(broker)
    pub, pub_id, acks = _client(broker)
    subscribe = b"".join(b"SUBSCRIBE %s t.%d\n" % (sub_id, i) for i in range(ntopics))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    broker.feed(sub, subscribe)
    per_topic = (tracemalloc.get_traced_memory()[0] - before) / ntopics
    tracemalloc.stop()
    del subscribe
    assert broker.stats()["topics"] == ntopics
    step = max(1, ntopics // BATCH)  # spread over the table, defeating the last-topic cache
    batch = b"".join(b"PUBLISH %s t.%d %s\n" % (pub_id, i, PAYLOAD) for i in range(0, ntopics, step))
    benchmark(broker.feed, pub, batch)
    assert acks.bytes > 0 and _errors(broker) == 0
    benchmark.extra_info["bytes_per_topic"] = round(per_topic, 1)
    assert per_topic < 1024
