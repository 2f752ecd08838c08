# Consumer groups and wildcard subscriptions (see groups.pxd).


cdef int groups_init(Broker b) noexcept:
    """An empty index (its root node); -1 when out of memory."""
    cdef GroupIndex *gi = &b.group_index
    if topics_init(&b.mem, &gi.nodes) < 0:
        return -1
    gi.root = topics_add(&b.mem, &gi.nodes, b"", 0, topic_hash(b"", 0))
    gi.gen = 1
    gi.ttl = b.limit.group_ttl
    return 0 if gi.root != NULL else -1


cdef void groups_free(Broker b) noexcept:
    """Free the trie (the broker is going away; the groups go with the topic table)."""
    cdef TopicTable *nodes = &b.group_index.nodes
    cdef size_t i
    cdef Topic *node
    cdef Topic *nxt
    if nodes.buckets == NULL:
        return
    for i in range(nodes.nbuckets):
        node = nodes.buckets[i]
        while node != NULL:
            nxt = node.next
            topic_free(b, node)
            node = nxt
    mem_free(&b.mem, nodes.buckets, nodes.nbuckets * sizeof(Topic *))
    nodes.buckets = NULL


cdef bint is_pattern(const char *name, size_t n) noexcept:
    """Whether a name has a wildcard token (`*` or `>`)."""
    cdef size_t i = 0, e
    while i <= n:
        e = i
        while e < n and name[e] != b'.':
            e += 1
        if e - i == 1 and (name[i] == b'*' or name[i] == b'>'):
            return True
        i = e + 1
    return False


cdef inline size_t _child_key(char *key, size_t klen, const char *token, size_t tl) noexcept:
    """Append a token to a node's key in place (``key`` has room); returns the child's key length."""
    if klen:
        key[klen] = b'.'
        klen += 1
    memcpy(key + klen, token, tl)
    return klen + tl


cdef inline Topic *_node(Broker b, const char *key, size_t n) noexcept:
    return topics_find(&b.group_index.nodes, key, n, topic_hash(key, n))


cdef int _list_add(Broker b, Topic ***items, int32_t *n, int32_t *cap, Topic *g) noexcept:
    """Append g to a grown-by-doubling array of groups; -1 when out of memory."""
    cdef int32_t newcap
    cdef Topic **grown
    if n[0] == cap[0]:
        newcap = cap[0] * 2 if cap[0] else 4
        grown = <Topic **>mem_grow(&b.mem, items[0], cap[0] * sizeof(Topic *), newcap * sizeof(Topic *))
        if grown == NULL:
            return -1
        items[0] = grown
        cap[0] = newcap
    items[0][n[0]] = g
    n[0] += 1
    return 0


cdef void _prune(Broker b, char *key, size_t klen) noexcept:
    """Free the nodes of a key's path that hold nothing any more, from its end up."""
    cdef GroupIndex *gi = &b.group_index
    cdef Topic *node
    while klen:
        node = _node(b, key, klen)
        if node == NULL or node.refs:
            return
        topics_unlink(&gi.nodes, node)
        topic_free(b, node)
        while klen and key[klen - 1] != b'.':
            klen -= 1
        if klen:
            klen -= 1               # the dot before the last token
        node = _node(b, key, klen) if klen else gi.root
        node.refs -= 1              # one child less


cdef int _register(Broker b, Topic *g) noexcept:
    """Put g in the index under its pattern (creating the nodes of its path); -1 when out of memory."""
    cdef GroupIndex *gi = &b.group_index
    cdef const char *pattern = topic_name(g)
    cdef size_t pn = g.pattern_len, i = 0, e, klen = 0
    cdef char key[TOPIC_MAX + 1]
    cdef Topic *node = gi.root
    cdef Topic *child
    while i <= pn:
        e = i
        while e < pn and pattern[e] != b'.':
            e += 1
        klen = _child_key(key, klen, pattern + i, e - i)
        child = _node(b, key, klen)
        if child == NULL:
            child = topics_add(&b.mem, &gi.nodes, key, klen, topic_hash(key, klen))
            if child == NULL:
                _prune(b, key, klen - (e - i) - (1 if i else 0))
                return -1
            node.refs += 1
        node = child
        i = e + 1
    if _list_add(b, &node.groups, &node.ngroups, &node.groups_cap, g) < 0:
        _prune(b, key, klen)
        return -1
    node.refs += 1
    b.topic_table.serials += 1
    g.serial = b.topic_table.serials     # copies go to groups in the order they were registered
    g.registered = True
    g.group_prev = NULL
    g.group_next = gi.first
    if gi.first != NULL:
        gi.first.group_prev = g
    gi.first = g
    gi.count += 1
    gi.gen += 1
    return 0


cdef void _unregister(Broker b, Topic *g) noexcept:
    """Take g out of the index: no new message reaches it."""
    cdef GroupIndex *gi = &b.group_index
    cdef char key[TOPIC_MAX + 1]
    cdef Topic *node
    cdef int32_t i
    memcpy(key, topic_name(g), g.pattern_len)
    node = _node(b, key, g.pattern_len)
    for i in range(node.ngroups):
        if node.groups[i] == g:
            node.ngroups -= 1
            node.groups[i] = node.groups[node.ngroups]
            break
    node.refs -= 1
    _prune(b, key, g.pattern_len)
    if g.group_prev != NULL:
        g.group_prev.group_next = g.group_next
    else:
        gi.first = g.group_next
    if g.group_next != NULL:
        g.group_next.group_prev = g.group_prev
    g.registered = False
    gi.count -= 1
    gi.gen += 1


cdef size_t _group_key(char *key, const char *pattern, size_t pn, const char *name, size_t nl) noexcept:
    """``<pattern> <name>`` into key (room for TOPIC_MAX + 1 + GROUP_NAME_MAX bytes)."""
    memcpy(key, pattern, pn)
    key[pn] = b' '
    memcpy(key + pn + 1, name, nl)
    return pn + 1 + nl


cdef Topic *group_find(Broker b, const char *pattern, size_t pn, const char *name, size_t nl) noexcept:
    """The group (pattern, name) if the broker holds it, registered or not; NULL otherwise."""
    cdef char key[TOPIC_MAX + 1 + GROUP_NAME_MAX]
    cdef size_t kl = _group_key(key, pattern, pn, name, nl)
    return topics_find(&b.topic_table, key, kl, topic_hash(key, kl))


cdef Topic *_group_add(Broker b, int32_t h, const char *key, size_t kl, size_t pn) noexcept:
    """The group of a key, registered (made when new); NULL after the ERROR that says why not
    (none is sent when h < 0)."""
    cdef uint64_t hv = topic_hash(key, kl)
    cdef Topic *g = topics_find(&b.topic_table, key, kl, hv)
    if g == NULL:
        if h >= 0:
            g = _new_topic(b, h, key, kl, hv)
        else:
            g = topics_add(&b.mem, &b.topic_table, key, kl, hv)
        if g == NULL:
            return NULL
        g.pattern_len = <uint16_t>pn
        g.kind = GROUP_NAMED if kl > pn + 1 else GROUP_WILDCARD
        g.wild = is_pattern(key, pn)
        b.group_index.held += 1
    if not g.registered and _register(b, g) < 0:
        if h >= 0:
            _memory_full(b, h)
        topics_drop_if_unused(b, g)
        return NULL
    return g


cdef Topic *group_join(Broker b, int32_t h, const char *pattern, size_t pn, const char *name, size_t nl,
                       bint wildcard) noexcept:
    """The group a SUBSCRIBE of h joins (made and registered when new): (pattern, name), or with no
    name the default group of a wildcard pattern; NULL after sending the ERROR that says why not."""
    cdef char key[TOPIC_MAX + 1 + GROUP_NAME_MAX]
    cdef Topic *g = _group_add(b, h, key, _group_key(key, pattern, pn, name, nl), pn)
    if g != NULL:
        g.idle_since = 0
    return g


cdef Topic *group_recover(Broker b, const char *key, size_t n) noexcept:
    """A group named in the log (its key), registered, idle since now (its --group-ttl runs
    from the restart); NULL when out of memory or the key is not one."""
    cdef const char *space = <const char *>memchr(key, b' ', n)
    cdef Topic *g
    if space == NULL or space == key or n - (space - key) - 1 > <size_t>GROUP_NAME_MAX:
        return NULL
    g = _group_add(b, -1, key, n, space - key)
    if g != NULL and g.kind == GROUP_NAMED and g.nsubs == 0 and g.idle_since == 0:
        g.idle_since = monotonic()
    return g


cdef void group_end(Broker b, Topic *g) noexcept:
    """The group ends: out of the index, its backlog dropped (counted), its waiting publishers
    woken; it is freed once nothing holds it (copies still out with subscribers, when they
    come back, are dropped too: group_drops)."""
    cdef Msg *msg
    if g.registered:
        _unregister(b, g)
    _pin(g)
    while g.backlog.count:
        msg = queue_pop(&g.backlog)
        b.backlog_messages -= 1
        b.backlog_bytes -= msg.len
        b.group_index.dropped += 1
        if b.log.durable:
            log_settle(b, msg.seq)
        msg_release(b, msg)
    flow_topic_drained(b, g)
    _unpin(b, g)


cdef void group_left(Broker b, Topic *g) noexcept:
    """g's last subscriber left: a named group's --group-ttl starts, a wildcard default group ends;
    g is freed when nothing holds it (the caller must not use it after this)."""
    if b.tearing_down or not g.registered:
        topics_drop_if_unused(b, g)
        return
    if g.kind == GROUP_WILDCARD:
        group_end(b, g)
    else:
        g.idle_since = monotonic()


cdef void groups_expire(Broker b) noexcept:
    """End the named groups left without a subscriber for --group-ttl (the server's tick)."""
    cdef Topic *g = b.group_index.first
    cdef Topic *nxt
    cdef double now = monotonic()
    while g != NULL:
        nxt = g.group_next
        if g.kind == GROUP_NAMED and g.nsubs == 0 and g.idle_since and now - g.idle_since >= b.group_index.ttl:
            b.group_index.expired += 1
            group_end(b, g)
        g = nxt


cdef bint group_drops(Broker b, Msg *msg) noexcept:
    """A copy coming back to a group that ended is dropped (True: the reference is released)."""
    cdef Topic *g = msg.topic
    if g.kind == TOPIC_PLAIN or g.registered:
        return False
    b.group_index.dropped += 1
    if b.log.durable:
        log_settle(b, msg.seq)
    msg_release(b, msg)
    return True


cdef int _add_groups(Broker b, Topic *t, Topic *node) noexcept:
    cdef int32_t i
    for i in range(node.ngroups):
        if _list_add(b, &t.groups, &t.ngroups, &t.groups_cap, node.groups[i]) < 0:
            return -1
    return 0


cdef int _walk(Broker b, Topic *t, Topic *node, char *key, size_t klen, const char *name, size_t n,
               size_t pos) noexcept:
    """Add the groups of every node below ``node`` matching the name from ``pos`` (n + 1: the
    name is all matched) to t's list: NATS rules, `*` one non-empty token, `>` the one or more
    tokens left (the rest of the name is not empty)."""
    cdef size_t e, cl
    cdef Topic *child
    if pos > n:
        return _add_groups(b, t, node)
    if pos < n:
        child = _node(b, key, _child_key(key, klen, b">", 1))
        if child != NULL and _add_groups(b, t, child) < 0:
            return -1
    e = pos
    while e < n and name[e] != b'.':
        e += 1
    if e > pos:
        cl = _child_key(key, klen, b"*", 1)
        child = _node(b, key, cl)
        if child != NULL and _walk(b, t, child, key, cl, name, n, e + 1) < 0:
            return -1
    # a `*` or `>` token of a name is matched above: not again as itself
    if not (e - pos == 1 and (name[pos] == b'*' or name[pos] == b'>')):
        cl = _child_key(key, klen, name + pos, e - pos)
        child = _node(b, key, cl)
        if child != NULL and _walk(b, t, child, key, cl, name, n, e + 1) < 0:
            return -1
    return 0


cdef int32_t groups_of(Broker b, Topic *t) noexcept:
    """How many groups a topic's messages go to besides its own subscribers (t.groups), resolved
    again only when the index changed since; -1 when out of memory."""
    cdef char key[TOPIC_MAX + 4]
    if t.groups_gen == b.group_index.gen:
        return t.ngroups
    cdef int32_t i, j
    cdef Topic *g
    t.ngroups = 0
    if _walk(b, t, b.group_index.root, key, 0, topic_name(t), t.name_len, 0) < 0:
        t.groups_gen = 0
        return -1
    # in the order they were registered (an insertion sort: the list is short, and made rarely)
    for i in range(1, t.ngroups):
        g = t.groups[i]
        j = i
        while j and t.groups[j - 1].serial > g.serial:
            t.groups[j] = t.groups[j - 1]
            j -= 1
        t.groups[j] = g
    t.groups_gen = b.group_index.gen
    return t.ngroups


cdef dict _group_entry(Topic *g):
    return {
        "pattern": _text(topic_name(g), g.pattern_len),
        "group": _text(topic_name(g) + g.pattern_len + 1, g.name_len - g.pattern_len - 1)
        if g.kind == GROUP_NAMED else None,
        "subscribers": g.nsubs,
        "backlog_messages": g.backlog.count,
        "backlog_bytes": g.backlog.nbytes,
        "delivered": g.delivered,
        "unacked": g.unacked,
        "acked": g.acked,
        "redelivered": g.redelivered,
    }


cdef list groups_report(Broker b, Topic *t):
    """STATS TOPICS: the groups a topic's messages go to, with their figures."""
    cdef int32_t i
    if b.group_index.count == 0 or groups_of(b, t) <= 0:
        return []
    return [_group_entry(t.groups[i]) for i in range(t.ngroups)]


cdef dict groups_page(Broker b, uint64_t cursor, size_t count):
    """STATS GROUPS: up to ``count`` registered groups, newest first, from those registered before
    ``cursor`` (0: from the newest): ``{"groups": [...], "next": cursor}``, next 0 at the end. The
    list is in registration order (a group registered again moves to its front), so the cursor is
    the registration serial of the last group listed."""
    cdef Topic *g = b.group_index.first
    cdef list entries = []
    cdef size_t size = 0
    while g != NULL and cursor and g.serial >= cursor:
        g = g.group_next
    while g != NULL and <size_t>len(entries) < count and size < STATS_PAGE_BYTES:
        entries.append(_group_entry(g))
        size += 6 * g.name_len + 200
        cursor = g.serial
        g = g.group_next
    return {"groups": entries, "next": cursor if g != NULL else 0}
