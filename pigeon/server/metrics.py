"""Prometheus metrics: a collector that reads the broker's counters at scrape time.

Nothing is counted here: every figure comes from one ``Broker.stats()`` and one
``Broker.topics()`` call per scrape, so the hot path pays nothing for Prometheus.
Per-connection figures stay out of Prometheus (one series per client would not
scale); ``/connections`` serves them as JSON.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pigeon._core import Broker

# (stats key, metric name, help) of the server-wide counters
_COUNTERS = (
    ("connections_total", "pigeon_connections_opened", "Connections accepted since start."),
    ("published", "pigeon_messages_published", "PUBLISH commands accepted."),
    ("delivered", "pigeon_messages_delivered", "MESSAGE lines written to subscribers."),
    ("backlogged", "pigeon_messages_backlogged", "Messages that waited in a topic backlog."),
    ("refused", "pigeon_messages_refused", "PUBLISH commands refused because the backlog was full."),
    ("bytes_in", "pigeon_received_bytes", "Bytes read from clients."),
    ("bytes_out", "pigeon_sent_bytes", "Bytes handed to client sockets."),
    ("slow_consumers", "pigeon_slow_consumers", "Connections closed for not reading their output."),
)

# (stats key, metric name, help) of the server-wide gauges
_GAUGES = (
    ("uptime_seconds", "pigeon_uptime_seconds", "Seconds since the broker started."),
    ("connections", "pigeon_connections", "Open connections."),
    ("topics", "pigeon_topics", "Topics held (with a subscriber or a backlog)."),
    ("backlog_messages", "pigeon_backlog_messages", "Messages waiting in all backlogs."),
    ("backlog_bytes", "pigeon_backlog_bytes", "Payload bytes waiting in all backlogs."),
)


class BrokerCollector(Collector):
    """Turns the broker's counters into Prometheus metric families at each scrape."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

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
            "pigeon_topic_messages_delivered", "Messages of a topic written to a subscriber.", labels=label
        )
        for topic in self._broker.topics():
            name = [topic["name"]]
            subscribers.add_metric(name, topic["subscribers"])
            backlog.add_metric(name, topic["backlog_messages"])
            published.add_metric(name, topic["published"])
            delivered.add_metric(name, topic["delivered"])
        yield from (subscribers, backlog, published, delivered)


def registry_for(broker: Broker) -> CollectorRegistry:
    """A registry of this broker's figures and its process's CPU, memory and file descriptors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))
    ProcessCollector(registry=registry)
    return registry
