# Output: buffers, delivery, flushing, giving messages back (see output.pxd).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize


cdef extern from "Python.h":
    void Py_SET_SIZE(PyObject *o, Py_ssize_t size)


cdef enum:
    OUT_MIN = 256           # smallest output bytes object
    INFLIGHT_KEEP = 4096    # in-flight entries a connection keeps room for between batches


# what a bytes object costs besides its data
cdef size_t _BYTES_HEADER = bytes.__basicsize__


cdef size_t out_bytes_size(size_t cap) noexcept:
    return _BYTES_HEADER + cap


cdef int outbox_grow(Broker b, size_t new_cap) noexcept:
    """Room in both lists for a connection table of ``new_cap``; -1 when out of memory."""
    cdef Outbox *ob = &b.outbox
    cdef int32_t *grown
    grown = <int32_t *>mem_grow(&b.mem, ob.dirty, ob.dirty_cap * sizeof(int32_t),
                                2 * new_cap * sizeof(int32_t))
    if grown == NULL:
        return -1
    ob.dirty = grown
    ob.dirty_cap = 2 * new_cap
    grown = <int32_t *>mem_grow(&b.mem, ob.closing, ob.closing_cap * sizeof(int32_t),
                                new_cap * sizeof(int32_t))
    if grown == NULL:
        return -1
    ob.closing = grown
    ob.closing_cap = new_cap
    return 0


cdef void _list_remove(int32_t *items, int32_t *n, int32_t h, bint flushing) noexcept:
    cdef int32_t i
    for i in range(n[0]):
        if items[i] == h:
            if flushing:
                items[i] = -1       # flush() is walking the list: it skips the entry
            else:
                memmove(&items[i], &items[i + 1], (n[0] - i - 1) * sizeof(int32_t))
                n[0] -= 1
            return


cdef void outbox_forget(Outbox *ob, int32_t h, bint dirty, bint closing) noexcept:
    """Take a connection that is being freed off the lists it is on."""
    if dirty:
        _list_remove(ob.dirty, &ob.ndirty, h, ob.flushing)
    if closing:
        _list_remove(ob.closing, &ob.nclosing, h, ob.flushing)


cdef void mark_dirty(Broker b, int32_t h) noexcept:
    """Put h on the list of connections to flush."""
    cdef Conn *c = &b.conns.items[h]
    if not c.dirty:
        c.dirty = True
        b.outbox.dirty[b.outbox.ndirty] = h
        b.outbox.ndirty += 1
    b.outbox.flush_due = True


cdef bint out_batch_half_full(Broker b) noexcept:
    """Whether a connection waiting for the flush holds half of --out-batch or more."""
    cdef int32_t i, h
    cdef size_t half = b.limit.out_batch // 2
    for i in range(b.outbox.ndirty):
        h = b.outbox.dirty[i]
        if h >= 0 and b.conns.items[h].out_len >= half:
            return True
    return False


cdef PyObject *_new_bytes(Broker b, const char *data, size_t n) noexcept:
    """A new bytes object (a new reference) of n bytes, a copy of data unless NULL; NULL when out of memory."""
    cdef object fresh
    if mem_refuse(&b.mem):
        return NULL
    try:
        fresh = PyBytes_FromStringAndSize(data, n)
    except MemoryError:
        b.mem.failures += 1
        return NULL
    Py_INCREF(fresh)
    return <PyObject *>fresh


cdef void _drop_output(Broker b, Conn *c) noexcept:
    if c.out_bytes != NULL:
        mem_count(&b.mem, 0, out_bytes_size(c.out_cap))
        Py_XDECREF(c.out_bytes)
    c.out_bytes = NULL
    c.out = NULL
    c.out_len = 0
    c.out_cap = 0


cdef void out_failed(Broker b, int32_t h) noexcept:
    """h's output cannot grow. It is skipped by every rotation from now on (as if
    paused for good) and closed by the next flush, its messages given back: not at
    once, since the command being run may still hold the topics it would free."""
    cdef Conn *c = &b.conns.items[h]
    if c.broken or c.state != CONN_OPEN:
        return
    c.broken = True
    c.paused = True
    if not c.close_queued:
        c.close_queued = True
        c.close_flush = False
        strncpy(c.close_reason, "out of memory for its output", sizeof(c.close_reason) - 1)
        b.outbox.closing[b.outbox.nclosing] = h
        b.outbox.nclosing += 1
    b.outbox.flush_due = True


cdef bint _out_grow(Broker b, int32_t h, size_t need) noexcept:
    """Give h's output room for ``need`` more bytes in a larger bytes object; False (h broken,
    see out_failed) when it cannot be allocated. Kept apart from out_reserve so that the C
    compiler inlines the common case (room left) at every delivery."""
    cdef Conn *c = &b.conns.items[h]
    cdef size_t cap
    cdef PyObject *fresh
    if c.out_bytes == NULL:
        # sized from the last hand-over, so a steady stream fills one object without regrowing
        cap = c.out_hint + c.out_hint // 4
        if cap < OUT_MIN:
            cap = OUT_MIN
        while cap < need:
            cap *= 2
    else:
        cap = c.out_cap * 2
        while cap < c.out_len + need:
            cap *= 2
    fresh = _new_bytes(b, NULL, cap)
    if fresh == NULL:
        out_failed(b, h)
        return False
    if c.out_bytes != NULL:
        memcpy(PyBytes_AS_STRING(<object>fresh), c.out, c.out_len)
        mem_count(&b.mem, 0, out_bytes_size(c.out_cap))
        Py_XDECREF(c.out_bytes)
    mem_count(&b.mem, out_bytes_size(cap), 0)
    c.out_bytes = fresh
    c.out = PyBytes_AS_STRING(<object>fresh)
    c.out_cap = cap
    return True


cdef inline char *out_reserve(Broker b, int32_t h, size_t need) noexcept:
    """Room for ``need`` more output bytes of h, marked for the next flush.

    NULL when the output cannot grow: h is then broken (see out_failed).
    """
    cdef Conn *c = &b.conns.items[h]
    if c.out_len + need > c.out_cap and not _out_grow(b, h, need):
        return NULL
    mark_dirty(b, h)
    c.out_len += need
    return c.out + c.out_len - need


cdef inline void out_reply(Broker b, int32_t h, const char *word, const char *arg, size_t n) noexcept:
    """``<word>\\n``, or ``<word> <arg>\\n`` when arg is not NULL. Inline, so that the C compiler
    folds the length of a constant word (PUBLISHED goes out once per message)."""
    cdef size_t wl = strlen(word)
    cdef char *p = out_reserve(b, h, wl + (n + 1 if arg != NULL else 0) + 1)
    if p == NULL:
        return
    memcpy(p, word, wl)
    p += wl
    if arg != NULL:
        p[0] = b' '
        memcpy(p + 1, arg, n)
        p += n + 1
    p[0] = b'\n'


cdef void out_error(Broker b, int32_t h, int kind, const char *text) noexcept:
    """``ERROR <CODE> <text>\\n``, counted by kind."""
    cdef const char *code = ERROR_CODE_TEXT[kind]
    cdef size_t cl = strlen(code), tl = strlen(text)
    cdef char *p
    b.counters.errors[kind] += 1
    p = out_reserve(b, h, 6 + cl + 1 + tl + 1)
    if p == NULL:
        return
    memcpy(p, b"ERROR ", 6)
    memcpy(p + 6, code, cl)
    p[6 + cl] = b' '
    memcpy(p + 7 + cl, text, tl)
    p[7 + cl + tl] = b'\n'


cdef void out_error_quoting(Broker b, int32_t h, int kind, const char *text,
                            const char *arg, size_t n) noexcept:
    """``ERROR <CODE> <text> '<arg>'``, quoting the client's input only when it is short and printable."""
    cdef char line[256]
    if printable(arg, n):
        snprintf(line, sizeof(line), "%s '%.*s'", text, <int>n, arg)
    else:
        snprintf(line, sizeof(line), "%s (not shown)", text)
    out_error(b, h, kind, line)


cdef inline size_t _message_line_len(Conn *c, Topic *t, size_t n, size_t tl) noexcept:
    """Bytes of the line that delivers n payload bytes of t to c: ``MSG <topic> <n>`` (``MSG <topic>
    <reply token> <n>``, the token tl bytes, for a request: the count stays last, as in NATS), a
    line end and the payload when c sent HELLO 2, else ``MESSAGE <topic> <payload>``; each with
    its line end."""
    if c.framed:
        return 4 + t.name_len + 1 + _digits(n) + (tl + 1 if tl else 0) + 1 + n + 1
    return 8 + t.name_len + 1 + n + 1


cdef char *_message_line(Broker b, int32_t h, Topic *t, const char *data, size_t n,
                         size_t line_len, bint as_is, const char *token, size_t tl) noexcept:
    """The line that delivers a message to h (_message_line_len) written to h's output; NULL
    when h's output cannot grow. ``as_is``: the caller knows the payload needs no change for
    a text line (line_safe), so it is copied without a scan."""
    cdef bint framed = b.conns.items[h].framed
    cdef char *p = out_reserve(b, h, line_len)
    cdef char *q = p
    cdef size_t dl
    if p == NULL:
        return NULL
    if framed:
        memcpy(q, b"MSG ", 4)
        q += 4
    else:
        memcpy(q, b"MESSAGE ", 8)
        q += 8
    memcpy(q, topic_name(t), t.name_len)
    q += t.name_len
    q[0] = b' '
    q += 1
    if framed:
        if tl:
            memcpy(q, token, tl)
            q[tl] = b' '
            q += tl + 1
        # the count's digits are what the line's length leaves for them (_message_line_len)
        dl = line_len - (4 + t.name_len + 1 + (tl + 1 if tl else 0) + 1 + n + 1)
        _put_uint(q, n, dl)
        q[dl] = b'\n'
        q += dl + 1
    if put_payload(q, data, n, framed or as_is):
        b.counters.v1_altered += 1
    q[n] = b'\n'
    return p


cdef inline bint _note_inflight(Broker b, int32_t h, Msg *msg, Topic *t, char *line, size_t line_len,
                                uint64_t tag, uint64_t seq) noexcept:
    """note_inflight, with the common case (room in the list) inline on the delivery paths."""
    cdef Conn *c = &b.conns.items[h]
    cdef InFlight *e
    if c.ninflight < c.inflight_cap:
        e = &c.inflight[c.ninflight]
        e.msg = msg
        e.topic = t
        e.offset = line - c.out
        e.line_len = line_len
        e.tag = tag
        e.seq = seq
        c.ninflight += 1
        return True
    return note_inflight(b, h, msg, t, line, line_len, tag, seq)


cdef bint note_inflight(Broker b, int32_t h, Msg *msg, Topic *t, char *line, size_t line_len,
                        uint64_t tag, uint64_t seq) noexcept:
    """Note the message whose line was just written at ``line`` in h's output. False when even
    that cannot be allocated: the line is undone and h is broken (see out_failed)."""
    cdef Conn *c = &b.conns.items[h]
    if inflight_push(&b.mem, c, msg, t, line - c.out, line_len, tag, seq) == 0:
        return True
    c.out_len -= line_len
    out_failed(b, h)
    return False


cdef bint out_deliver(Broker b, int32_t h, Msg *msg) noexcept:
    """Write a message from its record to h, taking over the caller's reference.

    False when h's output cannot grow: h is broken and the message is back at the head of its topic.
    """
    cdef Topic *t = msg.topic
    cdef Topic *origin = msg_origin(msg)
    cdef char token[REPLY_TOKEN_MAX]
    cdef size_t tl = 0
    cdef size_t line_len
    cdef char *line
    cdef ReplyTo to
    if msg.copy & MSG_REQUEST and b.conns.items[h].framed:
        to = msg_reply_to(msg)
        tl = reply_token(&to, token)
    line_len = _message_line_len(&b.conns.items[h], origin, msg.len, tl)
    line = _message_line(b, h, origin, msg_data(msg), msg.len, line_len, False, token, tl)
    if line == NULL or not _note_inflight(b, h, msg, t, line, line_len, 0, msg.seq):
        backlog_push(b, msg, True)
        return False
    return True


cdef bint deliver(Broker b, Sub *s, Msg *msg) noexcept:
    """Write a message from its record to a subscription, as its mode says, taking over the reference."""
    if s.ack:
        return ack_deliver(b, s, msg)
    return out_deliver(b, s.conn, msg)


cdef bint out_deliver_direct(Broker b, int32_t h, Topic *t, const char *data, size_t n,
                            uint64_t seq) noexcept:
    """Write a message that has no record yet (straight from its publisher) to h, whose line
    will hold the payload as it is (h is framed, or the payload is line_safe): a record can
    be made from it again (give_back_inflight).

    False when h's output cannot grow: h is broken, and the caller keeps the message.
    """
    cdef size_t line_len = _message_line_len(&b.conns.items[h], t, n, 0)
    cdef char *line = _message_line(b, h, t, data, n, line_len, True, NULL, 0)
    if line == NULL or not _note_inflight(b, h, NULL, t, line, line_len, 0, seq):
        return False
    t.refs += 1
    return True


cdef void backlog_push(Broker b, Msg *msg, bint front) noexcept:
    """Put a message (the caller's reference) in its topic's backlog; when even that
    cannot be allocated the message is lost, counted, and warned about."""
    cdef Queue *q = &msg.topic.backlog
    cdef int r
    if group_drops(b, msg):
        return
    r = queue_push_front(&b.mem, q, msg) if front else queue_push(&b.mem, q, msg)
    if r < 0:
        b.counters.lost += 1
        msg_release(b, msg)
        return
    b.backlog_messages += 1
    b.backlog_bytes += msg.len


cdef inline void _pin(Topic *t) noexcept:
    """Keep t alive across calls that may release its last message."""
    t.refs += 1


cdef inline void _unpin(Broker b, Topic *t) noexcept:
    t.refs -= 1
    topics_drop_if_unused(b, t)


cdef void topic_drain(Broker b, Topic *t) noexcept:
    """Deliver a topic's backlog in order while some subscriber can take it."""
    cdef Sub *s
    cdef Msg *msg
    if t.backlog.count == 0:
        # with --max-backlog 0 a publisher waits on an empty backlog for a subscriber that can take
        if t.waiter >= 0 and topic_has_taker(b, t):
            flow_topic_drained(b, t)
        return
    _pin(t)
    while t.backlog.count:
        s = topic_next_subscriber(b, t)
        if s == NULL:
            break
        msg = queue_pop(&t.backlog)
        b.backlog_messages -= 1
        b.backlog_bytes -= msg.len
        if t.backlog.count == 0:
            t.full = False      # warn again only after the backlog emptied, not at every refill
        deliver(b, s, msg)
    flow_topic_drained(b, t)
    _unpin(b, t)


cdef void conn_drain_topics(Broker b, int32_t h) noexcept:
    """Deliver the backlogs of h's topics while some subscriber can take them."""
    cdef int32_t i = 0
    cdef Conn *c = &b.conns.items[h]
    while i < c.nsubs:
        topic_drain(b, c.subs[i].topic)
        i += 1


cdef void _release_inflight(Broker b, Conn *c) noexcept:
    """The output was handed over: its messages are delivered, and settled."""
    cdef uint32_t i
    cdef Msg *msg
    b.counters.delivered += c.ninflight
    c.msgs_out += c.ninflight
    cdef Topic *t
    for i in range(c.ninflight):
        msg = c.inflight[i].msg
        t = c.inflight[i].topic
        t.delivered += 1
        if b.log.durable and not c.inflight[i].tag:
            log_settle(b, c.inflight[i].seq)
        # a line routed straight from its publisher, or a DELIVER line (whose message stays with the
        # unacknowledged list, and may be settled before its line leaves), pinned its topic
        if msg == NULL or c.inflight[i].tag:
            t.refs -= 1
            if t.refs == 0 and t.nsubs == 0:
                topics_drop_if_unused(b, t)
        else:
            msg_release(b, msg)
    # a connection that keeps getting big batches keeps its room (regrowing it by doubling at every
    # batch copied about 70 instructions' worth per message in queue4); one whose batches shrank
    # to a quarter gives it back
    if c.inflight_cap > INFLIGHT_KEEP and c.ninflight < c.inflight_cap // 4:
        mem_free(&b.mem, c.inflight, c.inflight_cap * sizeof(InFlight))
        c.inflight = NULL
        c.inflight_cap = 0
    c.ninflight = 0


cdef void touch_topic(Topic *t, Topic **touched) noexcept:
    """Put t (pinned) on a list of topics to drain once the caller is done."""
    if not t.touched:
        t.touched = True
        t.refs += 1
        t.touched_next = touched[0]
        touched[0] = t


cdef void drain_touched(Broker b, Topic *touched) noexcept:
    """Drain (and unpin) every topic of a list made by touch_topic."""
    cdef Topic *t
    while touched != NULL:
        t = touched
        touched = t.touched_next
        t.touched = False
        t.touched_next = NULL
        topic_drain(b, t)
        t.refs -= 1
        topics_drop_if_unused(b, t)


cdef void give_back_inflight(Broker b, int32_t h, const char *out, int how) noexcept:
    """Messages in h's unsent output (``out``) go back to the head of their topics, in order.

    ``how`` (output.pxd) says which, and what becomes of the output: all of
    them with the output dropped (LEAVE_DROP), all of them with their lines
    cut out and the rest kept to be sent (LEAVE_CUT_ALL), or only DELIVER
    lines, cut out (LEAVE_CUT_ACKED). One without a record gets one made from
    its line. h must already be out of every rotation, so that the topics,
    drained afterwards, cannot hand the messages straight back to it.
    """
    cdef Conn *c = &b.conns.items[h]
    cdef uint32_t k, kept, n = c.ninflight
    cdef size_t w, r, skip
    cdef InFlight *e
    cdef Msg *msg
    cdef Topic *t
    cdef Topic *touched = NULL
    # newest first, each to the head: the oldest ends up first
    while n:
        n -= 1
        e = &c.inflight[n]
        if how == LEAVE_CUT_ACKED and not e.tag:
            continue
        t = e.topic
        e.topic = NULL                  # given back: its line goes
        touch_topic(t, &touched)
        msg = e.msg
        if e.tag:
            t.refs -= 1                         # the line's pin (touch_topic holds it now)
            msg = acks_take_back(b, h, e.tag)   # its attempt is not counted: the line never left
            if msg == NULL:
                continue
        elif msg == NULL:
            # the payload follows the header's line end in a MSG line, the topic in a MESSAGE line
            if out[e.offset + 1] == b'S':
                skip = <size_t>(<const char *>memchr(out + e.offset, b'\n', e.line_len) - out - e.offset) + 1
            else:
                skip = 8 + t.name_len + 1
            msg = msg_new(b, t, out + e.offset + skip, e.line_len - skip - 1)
            t.refs -= 1                # the record holds the topic now
            if msg == NULL:
                b.counters.lost += 1
                continue
            msg.seq = e.seq
        backlog_push(b, msg, True)
        b.counters.requeued += 1
        b.counters.backlogged += 1
    if how == LEAVE_DROP:
        c.ninflight = 0
        _drop_output(b, c)
    elif c.out != NULL:
        # cut the given-back lines out, keeping everything else in order
        w = r = 0
        kept = 0
        for k in range(c.ninflight):
            e = &c.inflight[k]
            memmove(c.out + w, c.out + r, e.offset - r)
            w += e.offset - r
            r = e.offset + e.line_len
            if e.topic != NULL:
                memmove(c.out + w, c.out + e.offset, e.line_len)
                e.offset = w
                w += e.line_len
                c.inflight[kept] = e[0]
                kept += 1
        memmove(c.out + w, c.out + r, c.out_len - r)
        c.out_len = w + c.out_len - r
        c.ninflight = kept
    drain_touched(b, touched)


cdef void conn_leave(Broker b, int32_t h, const char *out, int how) noexcept:
    """h takes no more messages and is read no more.

    It leaves every rotation; messages in its unsent output (``out``) go back
    to their topics as ``how`` says (give_back_inflight); then the deliveries
    it did not acknowledge go back too; its subscriptions end and it waits for
    flow control no more. On a connection already leaving, it only drops the
    output (LEAVE_DROP).
    """
    cdef Conn *c = &b.conns.items[h]
    cdef int32_t i
    if c.state != CONN_OPEN:
        if how == LEAVE_DROP:
            give_back_inflight(b, h, out, LEAVE_DROP)
        return
    c.state = CONN_CLOSING
    flow_forget(b, h)
    for i in range(c.nsubs):
        sub_leave_rotation(c.subs[i])
    give_back_inflight(b, h, out, how)
    acks_give_back_all(b, h)
    while c.nsubs:
        sub_free(b, c.subs[c.nsubs - 1])
    conn_keep_input(b, h, NULL, 0)


cdef void close_later(Broker b, int32_t h, const char *reason, bint flush) noexcept:
    """The core ends h: it leaves every rotation and reads nothing more; at the end of the
    next flush, after its output (when ``flush``; else its messages go back at once and its
    output is dropped), on_close(h, reason, flush) tells the server to close the socket."""
    cdef Conn *c = &b.conns.items[h]
    conn_leave(b, h, c.out, LEAVE_CUT_ACKED if flush else LEAVE_DROP)
    if not flush:
        c.close_flush = False
    elif not c.close_queued:
        c.close_flush = True
    if not c.close_queued:
        c.close_queued = True
        strncpy(c.close_reason, reason, sizeof(c.close_reason) - 1)
        c.close_reason[sizeof(c.close_reason) - 1] = 0
        b.outbox.closing[b.outbox.nclosing] = h
        b.outbox.nclosing += 1
    b.outbox.flush_due = True


cdef void drop_slow(Broker b, int32_t h, const char *reason) noexcept:
    """Drop a connection that does not take its output: its messages go back, its socket is aborted."""
    b.counters.slow_consumers += 1
    close_later(b, h, reason, False)


cdef int note_transport(Broker b, int32_t h) except -1:
    """Ask h's transport how much it holds unsent: counted as memory, and as h's unsent output."""
    cdef Conn *c = &b.conns.items[h]
    cdef size_t size
    if c.transport_size == NULL:
        return 0
    size = (<object>c.transport_size)()
    c = &b.conns.items[h]
    b.mem.in_transports = b.mem.in_transports - c.in_transport + size
    c.in_transport = size
    mem_count(&b.mem, 0, 0)
    return 0


cdef int hand_over(Broker b, int32_t h) except -1:
    """One writer call with all of h's output. A writer that raises (its transport is gone
    or closing) sent nothing: the messages go back to their topics."""
    cdef Conn *c = &b.conns.items[h]
    cdef size_t n = c.out_len
    cdef PyObject *exact = NULL
    cdef object data
    cdef object writer
    cdef bint was_flushing
    if n == 0:
        return 0
    # The writer gets the object the output was written into, only trimmed in
    # length: no copy. One less than half full is copied to its exact size
    # instead, since the transport may keep it while the socket is busy.
    if n < c.out_cap // 2:
        exact = _new_bytes(b, c.out, n)
    if exact != NULL:
        data = <object>exact
        Py_XDECREF(exact)
    else:
        Py_SET_SIZE(c.out_bytes, n)
        c.out[n] = 0
        data = <object>c.out_bytes
    _drop_output(b, c)
    # decays slowly, so one short hand-over between long ones does not shrink the next object
    c.out_hint = n if n > c.out_hint else c.out_hint - c.out_hint // 8
    writer = <object>c.writer
    # No flush from the writer's callbacks (its transport pausing the connection): the output is out
    # of the connection but its messages are not settled yet, so a slow-consumer drop would give
    # them back. The caller's flush, or the end of its call, does the work.
    was_flushing = b.outbox.flushing
    b.outbox.flushing = True
    try:
        try:
            writer(data)
        finally:
            b.outbox.flushing = was_flushing
    except Exception:
        # the server closes it: its connection_lost is on the way
        conn_leave(b, h, PyBytes_AS_STRING(data), LEAVE_DROP)
        return 0
    c = &b.conns.items[h]
    _release_inflight(b, c)
    b.counters.bytes_out += n
    c.bytes_out += n
    return note_transport(b, h)


cdef int _check_unsent(Broker b, int32_t h) except -1:
    """Drop h as a slow consumer once its unsent output passes max_pending."""
    cdef Conn *c = &b.conns.items[h]
    cdef char reason[96]
    if c.out_len + c.in_transport > b.limit.max_pending:
        snprintf(reason, sizeof(reason), "slow consumer: %zu bytes unsent (limit %zu)",
                 c.out_len + c.in_transport, b.limit.max_pending)
        drop_slow(b, h, reason)
    return 0


cdef int flush(Broker b) except -1:
    """Hand each connection that got output its bytes, one writer call each, then report
    the connections the core closed.

    A paused connection keeps its output here; one that a rotation skipped for
    a full batch is drained again after its hand-over, which may mark more
    connections: the pass repeats until none is left.
    """
    cdef Outbox *ob = &b.outbox
    if ob.flushing:
        return 0
    ob.flushing = True
    try:
        _flush_pass(b)
    finally:
        ob.flushing = False
    return 0


cdef int _flush_pass(Broker b) except -1:
    cdef Outbox *ob = &b.outbox
    cdef int32_t i, n, h
    cdef Conn *c
    ob.flush_scheduled = False
    flow_memory_freed(b)
    # the records of this pass (and the DONE runs of the last) before the replies that need them
    log_write(b)
    while ob.ndirty or ob.nclosing or b.woken >= 0:
        flow_run_woken(b)
        if b.log.len:
            log_write(b)                # the woken publishers' records
        while ob.ndirty:
            n = ob.ndirty
            for i in range(n):
                h = ob.dirty[i]
                if h < 0:
                    continue
                c = &b.conns.items[h]
                if not c.dirty:
                    continue
                c.dirty = False
                if c.close_queued and not c.close_flush:
                    continue
                if c.out_len:
                    if c.state == CONN_OPEN and c.paused:
                        _check_unsent(b, h)
                        continue
                    if c.log_wait and not log_ready(b, c):
                        log_wait_for(b, h)      # a PUBLISHED reply whose record is not yet there
                        continue
                    hand_over(b, h)
                    c = &b.conns.items[h]
                # what follows holds too for output handed over mid-read (process_input): nothing is
                # left, but the connection may be paused over max_pending, or starved by its full batch
                if c.state != CONN_OPEN:
                    continue
                if c.paused:
                    _check_unsent(b, h)
                elif c.starved:
                    c.starved = False
                    conn_drain_topics(b, h)
            memmove(ob.dirty, ob.dirty + n, (ob.ndirty - n) * sizeof(int32_t))
            ob.ndirty -= n
        # what was handed over freed memory: a publisher held for it may go on now, not at the next input
        flow_memory_freed(b)
        if ob.nclosing:
            h = ob.closing[0]
            memmove(ob.closing, ob.closing + 1, (ob.nclosing - 1) * sizeof(int32_t))
            ob.nclosing -= 1
            if h < 0:
                continue
            c = &b.conns.items[h]
            if c.broken:
                conn_leave(b, h, c.out, LEAVE_DROP)
            c.close_queued = False
            if b.on_close is not None:
                b.on_close(h, c.close_reason[:strlen(c.close_reason)].decode("utf-8", "replace"), c.close_flush)
    ob.flush_due = False
    return 0
