# Subscriptions (see subs.pxd).

from libc.stdint cimport UINT32_MAX


cdef Sub *sub_find(Conn *c, Topic *t) noexcept:
    """c's subscription to t, or NULL."""
    cdef int32_t i
    for i in range(c.nsubs):
        if c.subs[i].topic == t:
            return c.subs[i]
    return NULL


cdef int _sub_list_add(Memory *m, Sub ***items, int32_t *n, int32_t *cap, Sub *s) noexcept:
    cdef int32_t newcap
    cdef Sub **grown
    if n[0] == cap[0]:
        newcap = cap[0] * 2 if cap[0] else 4
        grown = <Sub **>mem_grow(m, items[0], cap[0] * sizeof(Sub *), newcap * sizeof(Sub *))
        if grown == NULL:
            return -1
        items[0] = grown
        cap[0] = newcap
    items[0][n[0]] = s
    n[0] += 1
    return 0


cdef Sub *sub_add(Broker b, int32_t h, Topic *t) noexcept:
    """A new plain subscription of h to t, last in t's rotation; NULL when out of memory."""
    cdef Conn *c = &b.conns.items[h]
    cdef Sub *s = <Sub *>mem_alloc(&b.mem, sizeof(Sub))
    if s == NULL:
        return NULL
    memset(s, 0, sizeof(Sub))
    s.topic = t
    s.conn = h
    s.prefetch = UINT32_MAX
    if _sub_list_add(&b.mem, &t.subs, &t.nsubs, &t.subs_cap, s) < 0:
        mem_free(&b.mem, s, sizeof(Sub))
        return NULL
    if _sub_list_add(&b.mem, &c.subs, &c.nsubs, &c.subs_cap, s) < 0:
        t.nsubs -= 1
        mem_free(&b.mem, s, sizeof(Sub))
        return NULL
    s.in_rotation = True
    if t.wild:
        b.group_index.wildcard_subs += 1
    return s


cdef void sub_leave_rotation(Sub *s) noexcept:
    """Take s out of its topic's rotation so that nobody skips or repeats a turn; the topic stays
    pinned until s is freed."""
    cdef Topic *t = s.topic
    cdef int32_t i
    if not s.in_rotation:
        return
    s.in_rotation = False
    t.refs += 1
    for i in range(t.nsubs):
        if t.subs[i] == s:
            memmove(&t.subs[i], &t.subs[i + 1], (t.nsubs - i - 1) * sizeof(Sub *))
            t.nsubs -= 1
            if i < t.cursor:
                t.cursor -= 1
            return


cdef void sub_free(Broker b, Sub *s) noexcept:
    """Forget a subscription that holds no unacknowledged message; its topic goes if nothing else holds it."""
    cdef Conn *c = &b.conns.items[s.conn]
    cdef Topic *t = s.topic
    cdef int32_t i
    sub_leave_rotation(s)
    t.refs -= 1
    for i in range(c.nsubs):
        if c.subs[i] == s:
            c.nsubs -= 1
            c.subs[i] = c.subs[c.nsubs]
            break
    mem_free(&b.mem, s, sizeof(Sub))
    if t.kind != TOPIC_PLAIN:
        if t.wild:
            b.group_index.wildcard_subs -= 1
        if t.nsubs == 0:
            group_left(b, t)        # which frees it when nothing holds it
            return
    topics_drop_if_unused(b, t)


cdef inline bint sub_can_take(Sub *s) noexcept:
    """Whether its prefetch window has room (always, for a plain subscription)."""
    return s.unacked < s.prefetch
