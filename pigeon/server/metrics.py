"""Prometheus metrics: a collector that reads the broker's counters at scrape time.

Nothing is counted here: every figure comes from one ``Broker.stats()`` call
per scrape (and the few the server keeps itself, such as throttled logins),
so the hot path pays nothing for Prometheus. Clients choose how
many topics there are, so per-topic series are opt-in: only for the busiest
topics the scrape was given (``--metrics-topics N``). Per-connection figures
stay out of Prometheus (one series per client would not scale);
``/connections`` serves them as JSON.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pigeon._core import Broker

# (stats key, metric name, help) of the server-wide counters
_COUNTERS = (
    ("connections_total", "pigeon_connections_opened", "Connections accepted since start."),
    ("log_writes", "pigeon_log_writes", "Writes of records to the log (--data-dir), one per flush at most."),
    ("log_syncs", "pigeon_log_syncs", "fdatasync calls of the log completed (--fsync everysec or always)."),
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
        "Times a connection stopped being read: it did not take its output, or a PUBLISH of its waits "
        "for flow control.",
    ),
    ("published", "pigeon_messages_published", "PUBLISH commands accepted."),
    ("groups_expired", "pigeon_groups_expired", "Consumer groups ended by --group-ttl."),
    ("groups_destroyed", "pigeon_groups_destroyed", "Consumer groups ended by DESTROY."),
    (
        "group_copies_dropped",
        "pigeon_group_copies_dropped",
        "Copies of messages dropped because their consumer group ended.",
    ),
    ("delivered", "pigeon_messages_delivered", "MESSAGE lines handed to subscribers' sockets."),
    ("backlogged", "pigeon_messages_backlogged", "Messages that waited in a topic backlog."),
    (
        "refused",
        "pigeon_messages_refused",
        "PUBLISH commands refused for a full backlog or memory where waiting cannot help "
        "(the publisher consumes the topic, or the message is over a quarter of --max-memory).",
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
    ("acks", "pigeon_messages_acked", "Deliveries to acknowledged subscriptions settled by ACK."),
    ("nacks", "pigeon_messages_nacked", "Deliveries given back by NACK."),
    (
        "redelivered",
        "pigeon_messages_redelivered",
        "Messages given back for another delivery (NACK, ack timeout, a subscriber that left).",
    ),
    ("ack_timeouts", "pigeon_ack_timeouts", "Deliveries given back because --ack-timeout passed."),
    (
        "dead_lettered",
        "pigeon_messages_dead_lettered",
        "Messages moved to <topic>.dead after --max-deliveries.",
    ),
    (
        "dead_letters_dropped",
        "pigeon_dead_letters_dropped",
        "Dead letters dropped because <topic>.dead could not take them.",
    ),
    ("publish_holds", "pigeon_publish_holds", "Times a PUBLISH had to wait for flow control."),
    (
        "logins",
        "pigeon_logins",
        "CONNECTs that logged in as a user (a password, or a mapped client certificate).",
    ),
    ("auth_failures", "pigeon_auth_failures", "CONNECTs refused for a wrong user or password."),
    (
        "v1_altered",
        "pigeon_v1_altered",
        "MESSAGE/DELIVER lines whose binary payload was altered to fit a v1 text line.",
    ),
    ("requests", "pigeon_requests", "Requests (REQ) accepted."),
    ("replies", "pigeon_replies", "Replies (REPLY) handed to a waiting requester."),
    (
        "replies_dropped",
        "pigeon_replies_dropped",
        "Replies to a request no longer waiting (answered already, forgotten, or its requester gone).",
    ),
    ("replies_malformed", "pigeon_replies_malformed", "Replies whose token is not a reply token."),
    (
        "requests_forgotten",
        "pigeon_requests_forgotten",
        "Requests forgotten unanswered: over 4096 waiting on one connection.",
    ),
    ("log_compactions", "pigeon_compactions", "Compaction passes over the sealed segments of the log."),
    (
        "log_compaction_failures",
        "pigeon_compaction_failures",
        "Compaction passes stopped by an error (a full disk): the log stays sound, a later pass tries again.",
    ),
    (
        "log_compacted_segments",
        "pigeon_compaction_segments_rewritten",
        "Segments compaction rewrote with only what a recovery needs (or deleted).",
    ),
    (
        "log_compaction_removed_segments",
        "pigeon_compaction_segments_removed",
        "Segments compaction deleted: merged into a newer one, or left with no record.",
    ),
    (
        "log_compaction_reclaimed_bytes",
        "pigeon_compaction_reclaimed_bytes",
        "Bytes of disk compaction freed.",
    ),
)

# (stats key, metric name, help) of the server-wide gauges
_GAUGES = (
    ("uptime_seconds", "pigeon_uptime_seconds", "Seconds since the broker started."),
    ("connections", "pigeon_connections", "Open connections."),
    (
        "reading_paused",
        "pigeon_connections_reading_paused",
        "Connections not being read: they do not take their output, or a PUBLISH of theirs waits "
        "for flow control.",
    ),
    ("topics", "pigeon_topics", "Topics held (with a subscriber or a message)."),
    ("groups", "pigeon_groups", "Consumer groups that exist (named, and default groups of patterns)."),
    ("wildcard_subscriptions", "pigeon_wildcard_subscriptions", "Subscriptions to patterns (* or >)."),
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
    (
        "unacked",
        "pigeon_messages_unacked",
        "Messages delivered to acknowledged subscriptions and not yet settled.",
    ),
    ("delayed", "pigeon_messages_delayed", "Messages NACKed with a delay, waiting for it."),
    (
        "publishers_held",
        "pigeon_publishers_held",
        "Connections whose PUBLISH waits for flow control (not being read).",
    ),
    ("log_disk_bytes", "pigeon_log_disk_bytes", "Bytes of the log's segments on disk (--data-dir)."),
    ("log_live_messages", "pigeon_log_live_messages", "Messages in the log not done yet (--data-dir)."),
    (
        "log_unsynced_bytes",
        "pigeon_log_unsynced_bytes",
        "Log bytes written and not yet synced to stable storage (--fsync everysec or always).",
    ),
    ("log_write_failed", "pigeon_log_write_failed", "1 while the last write of the log failed (disk full)."),
    (
        "log_recovering",
        "pigeon_log_recovering",
        "1 while the messages of the log are being put back after a start (PUBLISH waits meanwhile).",
    ),
    ("log_compacting", "pigeon_compaction_running", "1 while a compaction pass runs."),
    (
        "log_compaction_last_seconds",
        "pigeon_compaction_last_duration_seconds",
        "How long the last compaction pass took.",
    ),
    (
        "log_compaction_last_at",
        "pigeon_compaction_last_run_timestamp_seconds",
        "When the last compaction pass ended (seconds since the epoch), 0: none yet.",
    ),
)

# (Server.server_stats key, metric name, help) of the counters the server keeps outside the core
_SERVER_COUNTERS = (
    (
        "logins_throttled",
        "pigeon_logins_throttled",
        "Logins whose answer was delayed because their address failed 5 times within 60 s.",
    ),
)

# (topics entry key, metric family, metric name, help) of the per-topic series
_TOPIC_FAMILIES = (
    ("subscribers", GaugeMetricFamily, "pigeon_topic_subscribers", "Subscribers of a topic."),
    (
        "backlog_messages",
        GaugeMetricFamily,
        "pigeon_topic_backlog_messages",
        "Messages in a topic's backlog.",
    ),
    (
        "unacked",
        GaugeMetricFamily,
        "pigeon_topic_messages_unacked",
        "Messages of a topic delivered to acknowledged subscriptions and not yet settled.",
    ),
    ("published", CounterMetricFamily, "pigeon_topic_messages_published", "Messages accepted for a topic."),
    (
        "delivered",
        CounterMetricFamily,
        "pigeon_topic_messages_delivered",
        "Messages of a topic handed to a subscriber.",
    ),
    ("acked", CounterMetricFamily, "pigeon_topic_messages_acked", "Deliveries of a topic settled by ACK."),
    (
        "nacked",
        CounterMetricFamily,
        "pigeon_topic_messages_nacked",
        "Deliveries of a topic given back by NACK.",
    ),
    (
        "redelivered",
        CounterMetricFamily,
        "pigeon_topic_messages_redelivered",
        "Messages of a topic given back for another delivery.",
    ),
    (
        "dead_lettered",
        CounterMetricFamily,
        "pigeon_topic_messages_dead_lettered",
        "Messages moved from a topic to <topic>.dead after --max-deliveries.",
    ),
)


def _counts_by(name: str, doc: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter family with one series per key of ``counts``, labelled ``label``."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, count in counts.items():
        family.add_metric([key], count)
    return family


class BrokerCollector(Collector):
    """Turns the broker's counters, and the given topics' figures, into Prometheus metric families."""

    def __init__(
        self,
        broker: Broker,
        topics: Sequence[dict[str, Any]] = (),
        server_stats: Mapping[str, int] | None = None,
    ) -> None:
        self._broker = broker
        self._topics = topics
        self._server_stats = server_stats or {}

    def collect(self) -> Iterator[Metric]:
        """Read the core once and yield every metric family."""
        stats = self._broker.stats()
        for key, name, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats[key])
        for key, name, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats[key])
        for key, name, doc in _SERVER_COUNTERS:
            yield CounterMetricFamily(name, doc, value=self._server_stats.get(key, 0))
        yield _counts_by("pigeon_commands", "Commands received, by command.", "command", stats["commands"])
        yield _counts_by("pigeon_errors", "ERROR replies sent, by kind.", "kind", stats["errors"])
        if self._topics:
            yield from self._topic_families()

    def _topic_families(self) -> Iterator[Metric]:
        for key, family, name, doc in _TOPIC_FAMILIES:
            metric = family(name, doc, labels=["topic"])
            for topic in self._topics:
                metric.add_metric([topic["name"]], topic[key])
            yield metric


def registry_for(
    broker: Broker, topics: Sequence[dict[str, Any]] = (), server_stats: Mapping[str, int] | None = None
) -> CollectorRegistry:
    """A registry of this broker's figures, the given topics', the server's own counters
    (``Server.server_stats``), and its process's CPU, memory and files."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker, topics, server_stats))
    ProcessCollector(registry=registry)
    return registry
