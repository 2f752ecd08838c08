# Topics: the hash table and round robin (see topics.pxd).


cdef extern from *:
    """
    #if PY_VERSION_HEX >= 0x030E0000
    #define pigeon_hash_bytes(p, n) Py_HashBuffer((p), (n))
    #else
    #define pigeon_hash_bytes(p, n) _Py_HashBytes((p), (n))
    #endif
    """
    # CPython's SipHash-1-3 of the bytes, keyed by the interpreter's random
    # per-process secret (PYTHONHASHSEED fixes it; see docs/operations.md).
    Py_hash_t pigeon_hash_bytes(const void *p, Py_ssize_t n) nogil


cdef uint64_t topic_hash(const char *name, size_t n) noexcept:
    return <uint64_t>pigeon_hash_bytes(name, n)


cdef char *topic_name(Topic *t) noexcept:
    return <char *>(t + 1)


cdef int topics_init(Memory *m, TopicTable *table) noexcept:
    table.nbuckets = 64
    table.buckets = <Topic **>mem_alloc(m, table.nbuckets * sizeof(Topic *))
    if table.buckets == NULL:
        return -1
    memset(table.buckets, 0, table.nbuckets * sizeof(Topic *))
    return 0


cdef Topic *topics_find(TopicTable *table, const char *name, size_t n, uint64_t hash) noexcept:
    cdef Topic *t = table.buckets[hash & (table.nbuckets - 1)]
    while t != NULL:
        if t.hash == hash and t.name_len == n and memcmp(topic_name(t), name, n) == 0:
            return t
        t = t.next
    return NULL


cdef void _topics_grow(Memory *m, TopicTable *table) noexcept:
    """Double the buckets; when that cannot be allocated the chains just get longer."""
    cdef size_t i, newn = table.nbuckets * 2
    cdef Topic **grown = <Topic **>mem_alloc(m, newn * sizeof(Topic *))
    cdef Topic *t
    cdef Topic *nxt
    if grown == NULL:
        return
    memset(grown, 0, newn * sizeof(Topic *))
    for i in range(table.nbuckets):
        t = table.buckets[i]
        while t != NULL:
            nxt = t.next
            t.next = grown[t.hash & (newn - 1)]
            grown[t.hash & (newn - 1)] = t
            t = nxt
    mem_free(m, table.buckets, table.nbuckets * sizeof(Topic *))
    table.buckets = grown
    table.nbuckets = newn


cdef Topic *topics_add(Memory *m, TopicTable *table, const char *name, size_t n, uint64_t hash) noexcept:
    """A new, empty topic in the table; NULL when out of memory."""
    cdef Topic *t
    if table.count >= table.nbuckets:
        _topics_grow(m, table)
    t = <Topic *>mem_alloc(m, sizeof(Topic) + n)
    if t == NULL:
        return NULL
    memset(t, 0, sizeof(Topic))
    t.waiter = -1
    memcpy(topic_name(t), name, n)
    t.name_len = <uint16_t>n
    t.pattern_len = <uint16_t>n
    t.hash = hash
    table.serials += 1
    t.serial = table.serials
    t.next = table.buckets[hash & (table.nbuckets - 1)]
    table.buckets[hash & (table.nbuckets - 1)] = t
    table.count += 1
    return t


cdef void topics_drop_if_unused(Broker b, Topic *t) noexcept:
    """Free a topic once nothing holds it: no subscriber, no message (backlog or in flight)."""
    if t.nsubs or t.refs or t.registered or b.tearing_down:
        return
    if t.kind != TOPIC_PLAIN:
        b.group_index.held -= 1
    topics_unlink(&b.topic_table, t)
    topic_free(b, t)


cdef void topics_unlink(TopicTable *table, Topic *t) noexcept:
    """Take t out of its table (it is not freed)."""
    cdef Topic **link = &table.buckets[t.hash & (table.nbuckets - 1)]
    while link[0] != t:
        link = &link[0].next
    link[0] = t.next
    if table.last == t:
        table.last = NULL
    table.count -= 1


cdef void topic_free(Broker b, Topic *t) noexcept:
    """Free a topic's memory (out of its table, its backlog empty)."""
    queue_free_ring(&b.mem, &t.backlog)
    mem_free(&b.mem, t.subs, t.subs_cap * sizeof(Sub *))
    mem_free(&b.mem, t.groups, t.groups_cap * sizeof(Topic *))
    mem_free(&b.mem, t, sizeof(Topic) + t.name_len)


cdef inline void topic_release(Broker b, Topic *t) noexcept:
    """Drop one of t's references; it goes if nothing else holds it."""
    t.refs -= 1
    if t.refs == 0 and t.nsubs == 0:
        topics_drop_if_unused(b, t)


cdef inline uint64_t _reverse_bits(uint64_t v) noexcept:
    cdef uint64_t r = 0
    cdef int i
    for i in range(64):
        r = (r << 1) | (v & 1)
        v >>= 1
    return r


cdef uint64_t topics_next_cursor(TopicTable *table, uint64_t cursor) noexcept:
    """The bucket after ``cursor`` in Redis's SCAN order (0 once every bucket was visited).

    The cursor counts in reversed bit order, so a table that doubles between
    two steps still has every topic it held throughout visited, none twice
    unless it grew.
    """
    cursor |= ~(<uint64_t>(table.nbuckets - 1))
    return _reverse_bits(_reverse_bits(cursor) + 1)


cdef bint topic_has_taker(Broker b, Topic *t) noexcept:
    """Whether some subscriber could take a message now: topic_next_subscriber's test, the turn
    unchanged; one skipped for its full batch is marked starved all the same, so that its
    topics are drained again once that batch is handed over."""
    cdef int32_t i
    cdef Conn *c
    cdef bint found = False
    for i in range(t.nsubs):
        c = &b.conns.items[t.subs[i].conn]
        if not c.paused and sub_can_take(t.subs[i]):
            if c.out_len < b.limit.out_batch:
                found = True
            else:
                c.starved = True
    return found


cdef Sub *topic_next_subscriber(Broker b, Topic *t) noexcept:
    """Whose turn it is: the next subscription that can take a message now, or NULL.

    Skipped: subscriptions whose prefetch window is full, connections whose
    transport is full (paused), and those already holding a full batch of
    output (marked starved, so their topics are drained again once that batch
    is handed over).
    """
    cdef int32_t k, i
    cdef Sub *s
    cdef Conn *c
    # the wrap is not kept when nobody can take the message: a subscriber joining the end meanwhile
    # still gets the next turn
    i = t.cursor if t.cursor < t.nsubs else 0
    for k in range(t.nsubs):
        s = t.subs[i]
        c = &b.conns.items[s.conn]
        if not c.paused and sub_can_take(s):
            if c.out_len < b.limit.out_batch:
                t.cursor = i + 1    # wraps lazily, so a new subscriber gets the next turn
                return s
            c.starved = True
        i += 1
        if i == t.nsubs:
            i = 0
    return NULL
