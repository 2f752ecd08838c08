# Publisher flow control (see flow.pxd).


cdef void _unlink_waiter(Broker b, int32_t h, int32_t *head) noexcept:
    cdef Conn *c = &b.conns.items[h]
    if c.prev_waiter >= 0:
        b.conns.items[c.prev_waiter].next_waiter = c.next_waiter
    else:
        head[0] = c.next_waiter
    if c.next_waiter >= 0:
        b.conns.items[c.next_waiter].prev_waiter = c.prev_waiter
    c.next_waiter = -1
    c.prev_waiter = -1


cdef inline int32_t *_waiters(Broker b, Conn *c) noexcept:
    """The waiting list of what c waits for."""
    if c.held == HELD_TOPIC:
        return &c.held_topic.waiter
    if c.held == HELD_MEMORY:
        return &b.memory_waiter
    return &b.storage_waiter


cdef void flow_hold(Broker b, int32_t h, Topic *t, int why) noexcept:
    """h's PUBLISH waits (``why``: HELD_TOPIC for t's backlog to drain, HELD_MEMORY, HELD_STORAGE)."""
    cdef Conn *c = &b.conns.items[h]
    cdef int32_t *head
    c.held = why
    if why == HELD_TOPIC:
        c.held_topic = t
        t.refs += 1
    head = _waiters(b, c)
    c.prev_waiter = -1
    c.next_waiter = head[0]
    if head[0] >= 0:
        b.conns.items[head[0]].prev_waiter = h
    head[0] = h
    b.publishers_held += 1
    b.counters.publish_holds += 1


cdef void flow_release(Broker b, int32_t h) noexcept:
    """h no longer waits (it is woken, or going away)."""
    cdef Conn *c = &b.conns.items[h]
    cdef Topic *t = c.held_topic
    if c.held == HELD_NONE:
        return
    _unlink_waiter(b, h, _waiters(b, c))
    if c.held == HELD_TOPIC:
        c.held_topic = NULL
        t.refs -= 1
        topics_drop_if_unused(b, t)
    c.held = HELD_NONE
    b.publishers_held -= 1


cdef void flow_forget(Broker b, int32_t h) noexcept:
    """h is going away: off its waiting list, and off the woken ones."""
    cdef int32_t *link = &b.woken
    flow_release(b, h)
    while link[0] >= 0:
        if link[0] == h:
            link[0] = b.conns.items[h].next_waiter
            b.conns.items[h].next_waiter = -1
            return
        link = &b.conns.items[link[0]].next_waiter


cdef void _wake_list(Broker b, int32_t *head) noexcept:
    """Every connection on a waiting list goes on at the next flush."""
    cdef int32_t h
    while head[0] >= 0:
        h = head[0]
        flow_release(b, h)
        b.conns.items[h].next_waiter = b.woken
        b.woken = h
    b.outbox.flush_due = True


cdef void flow_topic_drained(Broker b, Topic *t) noexcept:
    if (t.waiter >= 0 and t.backlog.count <= b.limit.max_backlog // 2
            and t.backlog.nbytes <= b.limit.max_backlog_bytes // 2):
        _wake_list(b, &t.waiter)


cdef void flow_memory_freed(Broker b) noexcept:
    if b.memory_waiter >= 0 and mem_total(&b.mem) <= b.limit.max_memory // 4 * 3:
        _wake_list(b, &b.memory_waiter)


cdef void flow_storage_freed(Broker b) noexcept:
    if b.storage_waiter >= 0 and not b.log.failed and (
            b.limit.max_disk == 0 or b.log.disk + b.log.len <= b.limit.max_disk // 4 * 3):
        _wake_list(b, &b.storage_waiter)


cdef int flow_run_woken(Broker b) except -1:
    """Run the held input of the connections woken since the last flush."""
    cdef int32_t h
    while b.woken >= 0:
        h = b.woken
        b.woken = b.conns.items[h].next_waiter
        b.conns.items[h].next_waiter = -1
        conn_continue(b, h)
    return 0
