# Acknowledgements (see acks.pxd).

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef double monotonic() noexcept:
    """Seconds on the monotonic clock."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline void _count_up(UnackedList *l) noexcept:
    """next_tag += 1, and its decimal text with it, as an odometer turns."""
    cdef int i = <int>l.tag_len - 1
    l.next_tag += 1
    while i >= 0:
        if l.tag_text[i] != c'9':
            l.tag_text[i] += 1
            return
        l.tag_text[i] = c'0'
        i -= 1
    memmove(l.tag_text + 1, l.tag_text, l.tag_len)
    l.tag_text[0] = c'1'
    l.tag_len += 1


cdef inline Unacked *_at(UnackedList *l, uint32_t i) noexcept:
    return &l.items[(l.head + i) & (l.cap - 1)]


cdef void _compact(UnackedList *l) noexcept:
    """Drop settled entries: those at the head at once, the rest once they outnumber the live ones."""
    cdef uint32_t i, w
    while l.count and _at(l, 0).msg == NULL:
        l.head = (l.head + 1) & (l.cap - 1)
        l.count -= 1
    if l.count < 64 or l.live * 2 >= l.count:
        return
    w = 0
    for i in range(l.count):
        if _at(l, i).msg != NULL:
            _at(l, w)[0] = _at(l, i)[0]
            w += 1
    l.count = w


cdef int _unacked_push(Memory *m, UnackedList *l, uint64_t tag, Msg *msg, Sub *s, double deadline) noexcept:
    """Append a delivery (the list takes over the reference); -1 when out of memory."""
    cdef uint32_t i, newcap
    cdef Unacked *grown
    cdef Unacked *e
    if l.count < l.cap:
        e = _at(l, l.count)
        e.tag = tag
        e.msg = msg
        e.sub = s
        e.deadline = deadline
        l.count += 1
        l.live += 1
        return 0
    if l.count == l.cap:
        _compact(l)
    if l.count == l.cap:
        newcap = l.cap * 2 if l.cap else 16
        grown = <Unacked *>mem_grow(m, l.items, l.cap * sizeof(Unacked), newcap * sizeof(Unacked))
        if grown == NULL:
            return -1
        l.items = grown
        for i in range(l.head):         # unwrap: the entries before head move past the old end
            l.items[l.cap + i] = l.items[i]
        l.cap = newcap
    e = _at(l, l.count)
    e.tag = tag
    e.msg = msg
    e.sub = s
    e.deadline = deadline
    l.count += 1
    l.live += 1
    return 0


cdef uint32_t _lower_bound(UnackedList *l, uint64_t tag) noexcept:
    """The first index whose tag is >= tag (settled entries keep their tags, so the order holds)."""
    cdef uint32_t low = 0, high = l.count, mid
    while low < high:
        mid = (low + high) // 2
        if _at(l, mid).tag < tag:
            low = mid + 1
        else:
            high = mid
    return low


cdef Msg *_unlink(Broker b, Unacked *e) noexcept:
    """Take a live entry's message (the caller now owns the reference) and leave a hole."""
    cdef Msg *msg = e.msg
    cdef Conn *c = &b.conns.items[e.sub.conn]
    e.msg = NULL
    c.unacked.live -= 1
    e.sub.unacked -= 1
    msg.topic.unacked -= 1
    b.unacked_messages -= 1
    return msg


cdef bint ack_deliver(Broker b, Sub *s, Msg *msg) noexcept:
    """Write ``DELIVER <topic> <tag> <attempt> <payload>`` (or, to a connection that sent HELLO 2,
    ``DMSG <topic> <tag> <attempt> <nbytes>``, a line end and the payload; a request's with its reply
    token before <nbytes>) to s's connection,
    taking over the reference.

    False when that connection's output cannot grow: it is broken, and the
    message is back at the head of its topic.
    """
    cdef int32_t h = s.conn
    cdef Conn *c = &b.conns.items[h]
    cdef UnackedList *l = &c.unacked
    cdef Topic *t = msg.topic
    cdef uint32_t attempt = msg.attempt + 1
    cdef size_t al = 1 if attempt < 10 else _digits(attempt)
    cdef size_t tl
    cdef size_t line_len
    cdef bint framed = c.framed
    cdef size_t dl = _digits(msg.len) if framed else 0
    cdef char *line
    cdef char *p
    cdef double deadline = b.now + b.limit.ack_timeout if b.limit.ack_timeout > 0 else 0
    cdef char token[REPLY_TOKEN_MAX]
    cdef size_t kl = 0
    cdef ReplyTo to
    if msg.copy & MSG_REQUEST and framed:
        to = msg_reply_to(msg)
        kl = reply_token(&to, token) + 1     # with the space before it
    _count_up(l)
    tl = l.tag_len
    line_len = (5 + dl + 1 + kl if framed else 8) + msg_origin(msg).name_len + 1 + tl + 1 + al + 1 + msg.len + 1
    line = out_reserve(b, h, line_len)
    if line == NULL or _unacked_push(&b.mem, &b.conns.items[h].unacked, l.next_tag, msg, s, deadline) < 0:
        if line != NULL:
            b.conns.items[h].out_len -= line_len
            out_failed(b, h)
        backlog_push(b, msg, True)
        return False
    c = &b.conns.items[h]
    l = &c.unacked
    if not _note_inflight(b, h, msg, t, line, line_len, l.next_tag, msg.seq):
        l.count -= 1
        l.live -= 1
        backlog_push(b, msg, True)
        return False
    t.refs += 1     # the line pins its topic until it is handed over: its message may be settled first
    p = line
    if framed:
        memcpy(p, b"DMSG ", 5)
        p += 5
    else:
        memcpy(p, b"DELIVER ", 8)
        p += 8
    memcpy(p, topic_name(msg_origin(msg)), msg_origin(msg).name_len)
    p += msg_origin(msg).name_len
    p[0] = b' '
    memcpy(p + 1, l.tag_text, tl)
    p += 1 + tl
    p[0] = b' '
    if al == 1:
        p[1] = <char>(c'0' + attempt)
    else:
        _put_uint(p + 1, attempt, al)
    p += 1 + al
    if framed:
        if kl:
            p[0] = b' '
            memcpy(p + 1, token, kl - 1)
            p += kl
        p[0] = b' '
        _put_uint(p + 1, msg.len, dl)
        p += 1 + dl
        p[0] = b'\n'
    else:
        p[0] = b' '
    if put_payload(p + 1, msg_data(msg), msg.len, framed):
        b.counters.v1_altered += 1
    p[1 + msg.len] = b'\n'
    msg.attempt = attempt
    s.unacked += 1
    t.unacked += 1
    b.unacked_messages += 1
    if b.log.durable:
        log_delivered(b, msg.seq, attempt)
    return True


cdef Msg *acks_take_back(Broker b, int32_t h, uint64_t tag) noexcept:
    """The message of an outstanding tag whose line never left (the caller owns the reference
    now; its attempt is not counted), or NULL when the tag is not outstanding."""
    cdef UnackedList *l = &b.conns.items[h].unacked
    cdef uint32_t i = _lower_bound(l, tag)
    cdef Msg *msg
    if i >= l.count or _at(l, i).tag != tag or _at(l, i).msg == NULL:
        return NULL
    msg = _unlink(b, _at(l, i))
    msg.attempt -= 1
    _compact(l)
    return msg


cdef size_t acks_settle(Broker b, int32_t h, uint64_t first, uint64_t last) noexcept:
    """ACK: settle h's outstanding tags from first to last; returns how many."""
    cdef UnackedList *l = &b.conns.items[h].unacked
    cdef uint32_t i = _lower_bound(l, first)
    cdef size_t n = 0
    cdef Unacked *e
    cdef Sub *s
    cdef Msg *msg
    cdef Topic *touched = NULL
    while i < l.count:
        e = _at(l, i)
        if e.tag > last:
            break
        if e.msg != NULL:
            s = e.sub
            if s.unacked == s.prefetch and s.in_rotation:
                touch_topic(s.topic, &touched)   # its window opens: the backlog may flow to it
            msg = _unlink(b, e)
            msg.topic.acked += 1
            if b.log.durable:
                log_settle(b, msg.seq)
            msg_release(b, msg)
            n += 1
        i += 1
    _compact(l)
    b.counters.acks += n
    drain_touched(b, touched)
    return n


cdef size_t acks_nack(Broker b, int32_t h, uint64_t first, uint64_t last, double delay) noexcept:
    """NACK: give h's outstanding tags from first to last back, in order, at once or after
    ``delay`` seconds; returns how many."""
    cdef UnackedList *l = &b.conns.items[h].unacked
    cdef uint32_t start = _lower_bound(l, first), i = start, end
    cdef size_t n = 0
    cdef Unacked *e
    cdef Msg *msg
    cdef Topic *touched = NULL
    cdef double due = monotonic() + delay
    while i < l.count and _at(l, i).tag <= last:
        i += 1
    end = i
    # newest first, each to the head of its topic: the oldest ends up first
    while i > start:
        i -= 1
        e = _at(l, i)
        if e.msg == NULL:
            continue
        if e.sub.in_rotation:
            touch_topic(e.sub.topic, &touched)
        msg = _unlink(b, e)
        msg.topic.nacked += 1
        n += 1
        if delay > 0:
            _delay(b, due, msg)
        else:
            touch_topic(msg.topic, &touched)
            redeliver(b, msg)
    _compact(l)
    b.counters.nacks += n
    drain_touched(b, touched)
    return n


cdef void _give_back_range(Broker b, int32_t h, Sub *only) noexcept:
    """Every outstanding delivery of h (of ``only``, when not NULL) goes back, in order."""
    cdef UnackedList *l = &b.conns.items[h].unacked
    cdef uint32_t i = l.count
    cdef Unacked *e
    cdef Msg *msg
    cdef Topic *touched = NULL
    while i:
        i -= 1
        e = _at(l, i)
        if e.msg == NULL or (only != NULL and e.sub != only):
            continue
        msg = _unlink(b, e)
        touch_topic(msg.topic, &touched)
        redeliver(b, msg)
    _compact(l)
    drain_touched(b, touched)


cdef void acks_give_back_all(Broker b, int32_t h) noexcept:
    """h is leaving: every delivery it did not acknowledge goes back to its topic, in order,
    with its attempt counted (h must be out of every rotation already)."""
    _give_back_range(b, h, NULL)


cdef void acks_give_back_sub(Broker b, Sub *s) noexcept:
    """s ends (UNSUBSCRIBE): its unacknowledged deliveries go back (s must be out of the rotation)."""
    _give_back_range(b, s.conn, s)


cdef void acks_expire(Broker b, int32_t h, double now) noexcept:
    """Give back h's deliveries left unacknowledged past their deadline (the oldest come first)."""
    cdef UnackedList *l = &b.conns.items[h].unacked
    cdef uint32_t k = 0, i
    cdef Unacked *e
    cdef Msg *msg
    cdef Topic *touched = NULL
    while k < l.count:
        e = _at(l, k)
        if e.msg != NULL and (e.deadline == 0 or e.deadline > now):
            break
        k += 1
    i = k
    while i:
        i -= 1
        e = _at(l, i)
        if e.msg == NULL:
            continue
        if e.sub.in_rotation:
            touch_topic(e.sub.topic, &touched)
        msg = _unlink(b, e)
        b.counters.ack_timeouts += 1
        touch_topic(msg.topic, &touched)
        redeliver(b, msg)
    _compact(l)
    drain_touched(b, touched)


cdef void acks_free(Broker b, UnackedList *l) noexcept:
    """Free the ring of a list whose deliveries were all given back or settled."""
    mem_free(&b.mem, l.items, l.cap * sizeof(Unacked))
    memset(l, 0, sizeof(UnackedList))


cdef void _dead_letter(Broker b, Msg *msg) noexcept:
    """Move a message delivered --max-deliveries times to the tail of <topic>.dead, as a new message;
    when that topic cannot take it (name too long, limits), it is dropped and counted."""
    cdef Topic *t = msg.topic
    cdef Topic *origin = msg_origin(msg)    # a group's copy goes to the dead letters of its topic
    cdef char name[TOPIC_MAX + 1]
    cdef size_t n = origin.name_len + 5
    cdef uint64_t hv
    cdef Topic *dead = NULL
    if n <= <size_t>TOPIC_MAX:
        memcpy(name, topic_name(origin), origin.name_len)
        memcpy(name + origin.name_len, b".dead", 5)
        hv = topic_hash(name, n)
        dead = topics_find(&b.topic_table, name, n, hv)
        if dead == NULL and b.topic_table.count < b.limit.max_topics:
            dead = topics_add(&b.mem, &b.topic_table, name, n, hv)
    if dead == NULL or dead.backlog.count >= b.limit.max_backlog or queue_push(&b.mem, &dead.backlog, msg) < 0:
        b.counters.dead_letters_dropped += 1
        msg_release(b, msg)
        if dead != NULL:
            topics_drop_if_unused(b, dead)
        return
    t.dead_lettered += 1
    b.counters.dead_lettered += 1
    dead.refs += 1
    msg.topic = dead
    if msg.copy & MSG_COPY:
        msg_set_origin(msg, dead)   # its topic now, held once (the copy keeps its record's size)
    msg.attempt = 0
    b.next_seq += 1
    if b.log.durable:
        log_settle(b, msg.seq)
        log_publish(b, b.next_seq, dead, msg_data(msg), msg.len, 0)
    msg.seq = b.next_seq
    dead.published += 1
    b.backlog_messages += 1
    b.backlog_bytes += msg.len
    b.counters.backlogged += 1
    if origin != t:
        topic_release(b, origin)
    t.refs -= 1
    topics_drop_if_unused(b, t)
    topic_drain(b, dead)


cdef void redeliver(Broker b, Msg *msg) noexcept:
    """A message goes back to the head of its topic for its next delivery, or, once it was
    delivered --max-deliveries times, to <topic>.dead. The caller drains the topic."""
    cdef Topic *t = msg.topic
    if b.limit.max_deliveries and msg.attempt >= b.limit.max_deliveries:
        _dead_letter(b, msg)
        return
    t.redelivered += 1
    b.counters.redelivered += 1
    b.counters.backlogged += 1
    backlog_push(b, msg, True)


cdef inline bint _due_before(Delayed *x, Delayed *y) noexcept:
    """Whether x comes due before y: a NACK of a range delays its messages newest first, each
    going back to the head of its topic when due, so that equal dues keep the original order."""
    return x.due < y.due or (x.due == y.due and x.order < y.order)


cdef void _sift_up(Delayed *h, size_t i) noexcept:
    cdef Delayed item = h[i]
    cdef size_t parent
    while i:
        parent = (i - 1) // 2
        if not _due_before(&item, &h[parent]):
            break
        h[i] = h[parent]
        i = parent
    h[i] = item


cdef void _sift_down(Delayed *h, size_t n, size_t i) noexcept:
    cdef Delayed item = h[i]
    cdef size_t child
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _due_before(&h[child + 1], &h[child]):
            child += 1
        if not _due_before(&h[child], &item):
            break
        h[i] = h[child]
        i = child
    h[i] = item


cdef void _delay(Broker b, double due, Msg *msg) noexcept:
    """Keep a NACKed message out of its topic until ``due``; when even that cannot be
    allocated it is given back at once."""
    cdef DelayHeap *heap = &b.delayed
    cdef size_t newcap
    cdef Delayed *grown
    if heap.count == heap.cap:
        newcap = heap.cap * 2 if heap.cap else 16
        grown = <Delayed *>mem_grow(&b.mem, heap.items, heap.cap * sizeof(Delayed), newcap * sizeof(Delayed))
        if grown == NULL:
            redeliver(b, msg)
            return
        heap.items = grown
        heap.cap = newcap
    heap.delays += 1
    heap.items[heap.count].due = due
    heap.items[heap.count].order = heap.delays
    heap.items[heap.count].msg = msg
    heap.count += 1
    _sift_up(heap.items, heap.count - 1)
    b.delayed_messages += 1


cdef void delayed_fire(Broker b, double now) noexcept:
    """Give back every delayed message that is due."""
    cdef DelayHeap *heap = &b.delayed
    cdef Msg *msg
    cdef Topic *touched = NULL
    while heap.count and heap.items[0].due <= now:
        msg = heap.items[0].msg
        heap.count -= 1
        if heap.count:
            heap.items[0] = heap.items[heap.count]
            _sift_down(heap.items, heap.count, 0)
        b.delayed_messages -= 1
        touch_topic(msg.topic, &touched)
        redeliver(b, msg)
    drain_touched(b, touched)


cdef void delayed_free(Broker b) noexcept:
    """Release every delayed message and the heap (the broker is going away)."""
    cdef size_t i
    for i in range(b.delayed.count):
        msg_release(b, b.delayed.items[i].msg)
    mem_free(&b.mem, b.delayed.items, b.delayed.cap * sizeof(Delayed))
    memset(&b.delayed, 0, sizeof(DelayHeap))
