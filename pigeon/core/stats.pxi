# Stats: reports and warnings (see stats.pxd).


cdef void warn(Broker b, str text) noexcept:
    """Tell the operator about a rare event (through on_warning). A callback that raises does
    not stop the broker: its exception is reported as unraisable."""
    if b.on_warning is not None:
        b.on_warning(text)


cdef dict stats_dict(Broker b):
    cdef int i
    return {
        "uptime_seconds": time.time() - b.started,
        "connections": b.conns.count,
        "connections_total": b.counters.connections_total,
        "topics": b.topic_table.count - b.group_index.held,
        "groups": b.group_index.count,
        "wildcard_subscriptions": b.group_index.wildcard_subs,
        "groups_expired": b.group_index.expired,
        "groups_destroyed": b.group_index.destroyed,
        "group_copies_dropped": b.group_index.dropped,
        "backlog_messages": b.backlog_messages,
        "backlog_bytes": b.backlog_bytes,
        "memory_bytes": mem_total(&b.mem),
        "memory_in_transports_bytes": b.mem.in_transports,
        "memory_limit_bytes": b.limit.max_memory,
        "commands": {COMMAND_NAMES[i]: b.counters.commands[i] for i in range(CMD_KINDS)},
        "published": b.counters.published,
        "delivered": b.counters.delivered,
        "backlogged": b.counters.backlogged,
        "refused": b.counters.refused,
        "errors": {ERROR_NAMES[i]: b.counters.errors[i] for i in range(ERR_KINDS)},
        "connections_rejected": b.counters.rejected,
        "idle_closed": b.counters.idle_closed,
        "write_timeouts": b.counters.write_timeouts,
        "requeued": b.counters.requeued,
        "lost": b.counters.lost,
        "read_pauses": b.counters.read_pauses,
        "reading_paused": sum(1 for h in range(b.conns.cap) if b.conns.items[h].reading_stopped),
        "bytes_in": b.counters.bytes_in,
        "bytes_out": b.counters.bytes_out,
        "slow_consumers": b.counters.slow_consumers,
        "unacked": b.unacked_messages,
        "delayed": b.delayed_messages,
        "acks": b.counters.acks,
        "nacks": b.counters.nacks,
        "redelivered": b.counters.redelivered,
        "ack_timeouts": b.counters.ack_timeouts,
        "dead_lettered": b.counters.dead_lettered,
        "dead_letters_dropped": b.counters.dead_letters_dropped,
        "auth_failures": b.counters.auth_failures,
        "logins": b.counters.logins,
        "v1_altered": b.counters.v1_altered,
        "requests": b.counters.requests,
        "replies": b.counters.replies,
        "replies_dropped": b.counters.replies_dropped,
        "replies_malformed": b.counters.replies_malformed,
        "requests_forgotten": b.counters.requests_forgotten,
        "publishers_held": b.publishers_held,
        "publish_holds": b.counters.publish_holds,
        "durable": bool(b.log.durable),
        "log_disk_bytes": b.log.disk,
        "log_records": b.log.records,
        "log_writes": b.log.writes,
        "log_syncs": b.log.syncs,
        "log_unsynced_bytes": b.log.written - b.log.synced if b.log.fsync else 0,
        "log_live_messages": b.log.live,
        "log_write_failed": bool(b.log.failed),
        "log_recovering": bool(b.recovery.restoring),
        "log_recovered_messages": b.recovery.messages,
        "log_recovery_done_bytes": b.recovery.done_bytes,
        "log_recovery_total_bytes": b.recovery.total_bytes,
        "log_compacting": bool(b.compaction.running),
        "log_compactions": b.compaction.runs,
        "log_compaction_failures": b.compaction.failures,
        "log_compacted_segments": b.compaction.rewritten,
        "log_compaction_removed_segments": b.compaction.removed,
        "log_compaction_reclaimed_bytes": b.compaction.reclaimed,
        "log_compaction_last_seconds": b.compaction.last_seconds,
        "log_compaction_last_at": b.compaction.last_at,
        "disk_limit_bytes": b.limit.max_disk,
    }


cdef str _text(const char *p, size_t n):
    return p[:n].decode("utf-8", "replace")


cdef dict topics_page(Broker b, size_t cursor, size_t count):
    """Up to ``count`` topics from ``cursor`` (SCAN order), about STATS_PAGE_BYTES of JSON at most:
    ``{"topics": [...], "next": cursor}``, next 0 once the listing is complete.

    A bucket is never split between pages (a cursor names a bucket), so a page
    ends before a bucket that would not fit; only a page's first bucket may
    overshoot ``count``, when it alone holds more topics than that.
    """
    cdef list entries = []
    cdef size_t size = 0, chain
    cdef uint64_t v = cursor & (b.topic_table.nbuckets - 1)
    cdef Topic *t
    while True:
        chain = 0
        t = b.topic_table.buckets[v]
        while t != NULL:
            chain += 1
            t = t.next
        if entries and <size_t>len(entries) + chain > count:
            break
        t = b.topic_table.buckets[v]
        while t != NULL:
            if t.kind != TOPIC_PLAIN:
                t = t.next          # a group: listed with the topics it takes messages of
                continue
            entries.append({
                "name": _text(topic_name(t), t.name_len),
                "subscribers": t.nsubs,
                "backlog_messages": t.backlog.count,
                "backlog_bytes": t.backlog.nbytes,
                "published": t.published,
                "delivered": t.delivered,
                "unacked": t.unacked,
                "acked": t.acked,
                "nacked": t.nacked,
                "redelivered": t.redelivered,
                "dead_lettered": t.dead_lettered,
            })
            groups = groups_report(b, t)
            if groups:
                entries[len(entries) - 1]["groups"] = groups
            size += 6 * t.name_len + 160   # the worst JSON escaping of the name, and the figures
            t = t.next
        v = topics_next_cursor(&b.topic_table, v)
        if v == 0 or <size_t>len(entries) >= count or size >= STATS_PAGE_BYTES:
            break
    return {"topics": entries, "next": v}


cdef dict connections_page(Broker b, size_t cursor, size_t count):
    """Up to ``count`` connections from handle ``cursor``, about STATS_PAGE_BYTES of JSON at most:
    ``{"connections": [...], "next": cursor}``, next 0 once the listing is complete."""
    cdef list entries = []
    cdef size_t size = 0, h = cursor
    cdef int32_t i
    cdef Conn *c
    cdef double now = time.time()
    while h < <size_t>b.conns.cap and <size_t>len(entries) < count and size < STATS_PAGE_BYTES:
        c = &b.conns.items[h]
        h += 1
        if c.state == CONN_FREE:
            continue
        names = sorted(_text(topic_name(c.subs[i].topic), c.subs[i].topic.name_len) for i in range(c.nsubs))
        del names[STATS_SUBSCRIPTIONS_LISTED:]
        entries.append({
            "handle": h - 1,
            "client_id": _text(c.id_text, c.id_len) if c.client_id else None,
            "user": <object>c.user if c.user != NULL else None,
            "address": <object>c.peer if c.peer != NULL else None,
            "protocol": 2 if c.framed else 1,
            "subscriptions": names,
            "subscriptions_total": c.nsubs,
            "pending_bytes": c.out_len + c.in_transport,
            "messages_in": c.msgs_in,
            "messages_out": c.msgs_out,
            "bytes_in": c.bytes_in,
            "bytes_out": c.bytes_out,
            "connected_since": c.since,
            "connected_seconds": now - c.since,
            "closing": c.state == CONN_CLOSING,
            "paused": bool(c.paused),
            "held": bool(c.held),
            "unacked": c.unacked.live,
        })
        size += 400 + sum(6 * len(name) + 3 for name in names)
    while h < <size_t>b.conns.cap and b.conns.items[h].state == CONN_FREE:
        h += 1
    return {"connections": entries, "next": h if h < <size_t>b.conns.cap else 0}
