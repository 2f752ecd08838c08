"""Prometheus metrics: a collector that reads the broker's counters at scrape time.

Nothing is counted here: every figure comes from one ``Broker.stats()`` call
per scrape, so the hot path pays nothing for Prometheus. Clients choose how
many topics there are, so per-topic series are opt-in: only for the busiest
topics the scrape was given (``--metrics-topics N``). Per-connection figures
stay out of Prometheus (one series per client would not scale);
``/connections`` serves them as JSON.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pigeon._core import Broker

# (stats key, metric name, help) of the server-wide counters
_COUNTERS = (
    ("connections_total", "pigeon_connections_opened", "Connections accepted since start."),
    (
        "connections_rejected",
        "pigeon_connections_rejected",
        "Connections refused because --max-connections were open.",
    ),
    ("idle_closed", "pigeon_idle_closed", "Connections closed by --idle-timeout."),
    (
        "write_timeouts",
        "pigeon_write_timeouts",
        "Connections closed because their output was not taken for --write-timeout seconds.",
    ),
    (
        "slow_consumers",
        "pigeon_slow_consumers",
        "Connections dropped with more than --max-pending bytes unsent.",
    ),
    (
        "read_pauses",
        "pigeon_read_pauses",
        "Times a connection stopped being read because it did not take its output.",
    ),
    ("published", "pigeon_messages_published", "PUBLISH commands accepted."),
    ("delivered", "pigeon_messages_delivered", "MESSAGE lines handed to subscribers' sockets."),
    ("backlogged", "pigeon_messages_backlogged", "Messages that waited in a topic backlog."),
    (
        "refused",
        "pigeon_messages_refused",
        "PUBLISH commands refused because the backlog or the memory was full.",
    ),
    (
        "requeued",
        "pigeon_messages_requeued",
        "Messages given back to their topic because their subscriber's connection went before taking them.",
    ),
    (
        "lost",
        "pigeon_messages_lost",
        "Acknowledged messages lost because no memory could be had to give them back to their topic.",
    ),
    ("bytes_in", "pigeon_received_bytes", "Bytes read from clients."),
    ("bytes_out", "pigeon_sent_bytes", "Bytes handed to client sockets."),
)

# (stats key, metric name, help) of the server-wide gauges
_GAUGES = (
    ("uptime_seconds", "pigeon_uptime_seconds", "Seconds since the broker started."),
    ("connections", "pigeon_connections", "Open connections."),
    (
        "reading_paused",
        "pigeon_connections_reading_paused",
        "Connections not being read because they do not take their output.",
    ),
    ("topics", "pigeon_topics", "Topics held (with a subscriber or a message)."),
    ("backlog_messages", "pigeon_backlog_messages", "Messages waiting in all backlogs."),
    ("backlog_bytes", "pigeon_backlog_bytes", "Payload bytes waiting in all backlogs."),
    (
        "memory_bytes",
        "pigeon_memory_bytes",
        "Bytes the broker holds, counted against --max-memory (with what socket transports hold unsent).",
    ),
    (
        "memory_in_transports_bytes",
        "pigeon_memory_in_transports_bytes",
        "Output bytes socket transports hold unsent (part of pigeon_memory_bytes).",
    ),
    ("memory_limit_bytes", "pigeon_memory_limit_bytes", "The --max-memory limit."),
)


class BrokerCollector(Collector):
    """Turns the broker's counters, and the given topics' figures, into Prometheus metric families."""

    def __init__(self, broker: Broker, topics: Sequence[dict[str, Any]] = ()) -> None:
        self._broker = broker
        self._topics = topics

    def collect(self) -> Iterator[Metric]:
        """Read the core once and yield every metric family."""
        stats = self._broker.stats()
        for key, name, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats[key])
        for key, name, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats[key])
        commands = CounterMetricFamily(
            "pigeon_commands", "Commands received, by command.", labels=["command"]
        )
        for command, count in stats["commands"].items():
            commands.add_metric([command], count)
        yield commands
        errors = CounterMetricFamily("pigeon_errors", "ERROR replies sent, by kind.", labels=["kind"])
        for kind, count in stats["errors"].items():
            errors.add_metric([kind], count)
        yield errors
        if self._topics:
            yield from self._topic_families()

    def _topic_families(self) -> Iterator[Metric]:
        label = ["topic"]
        subscribers = GaugeMetricFamily("pigeon_topic_subscribers", "Subscribers of a topic.", labels=label)
        backlog = GaugeMetricFamily(
            "pigeon_topic_backlog_messages", "Messages in a topic's backlog.", labels=label
        )
        published = CounterMetricFamily(
            "pigeon_topic_messages_published", "Messages accepted for a topic.", labels=label
        )
        delivered = CounterMetricFamily(
            "pigeon_topic_messages_delivered", "Messages of a topic handed to a subscriber.", labels=label
        )
        for topic in self._topics:
            name = [topic["name"]]
            subscribers.add_metric(name, topic["subscribers"])
            backlog.add_metric(name, topic["backlog_messages"])
            published.add_metric(name, topic["published"])
            delivered.add_metric(name, topic["delivered"])
        yield from (subscribers, backlog, published, delivered)


def registry_for(broker: Broker, topics: Sequence[dict[str, Any]] = ()) -> CollectorRegistry:
    """A registry of this broker's figures, the given topics', and its process's CPU, memory and files."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker, topics))
    ProcessCollector(registry=registry)
    return registry
