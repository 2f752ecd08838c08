# Messages: records and backlog rings (see messages.pxd).


cdef inline size_t _digits(uint64_t v) noexcept:
    cdef size_t n = 4
    # by comparison for the common sizes: a frame header counts every payload's digits
    if v < 10:
        return 1
    if v < 100:
        return 2
    if v < 1000:
        return 3
    while v >= 10000:
        v //= 10
        n += 1
    return n


# "00", "01", ... "99": _put_uint writes two digits per division
cdef const char *_DIGIT_PAIRS = (b"00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                                 b"40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                                 b"8081828384858687888990919293949596979899")


cdef inline void _put_uint(char *p, uint64_t v, size_t n) noexcept:
    """Write v in decimal into exactly n bytes (n == _digits(v))."""
    cdef size_t pair
    while n >= 2:
        n -= 2
        pair = <size_t>(v % 100) * 2
        v //= 100
        p[n] = _DIGIT_PAIRS[pair]
        p[n + 1] = _DIGIT_PAIRS[pair + 1]
    if n:
        p[0] = <char>(c'0' + v)


cdef bint line_safe(const char *data, size_t n, bint lf_free) noexcept:
    """Whether a payload can be the rest of a v1 text line as it is: no LF in it, and no CR at
    its end (a v1 reader strips one there). ``lf_free`` says the caller knows there is no LF
    (the payload of a text PUBLISH line), which saves the scan on the hot path."""
    return (n == 0 or data[n - 1] != b'\r') and (lf_free or memchr(data, b'\n', n) == NULL)


cdef bint put_payload(char *p, const char *data, size_t n, bint as_is) noexcept:
    """Copy a payload into an output line. ``as_is`` for a frame, or a payload known to be
    line_safe; otherwise (a text line) each LF becomes a space, and so does a CR left at its end
    (docs/protocol.md, "Binary payloads and v1 subscribers"); returns whether it had to alter
    anything."""
    cdef char *lf
    cdef char *end = p + n
    cdef bint altered = False
    memcpy(p, data, n)
    if as_is:
        return False
    lf = <char *>memchr(p, b'\n', n)
    while lf != NULL:
        lf[0] = b' '
        altered = True
        lf = <char *>memchr(lf + 1, b'\n', end - lf - 1)
    if n and (end - 1)[0] == b'\r':
        (end - 1)[0] = b' '
        altered = True
    return altered


cdef size_t msg_size(size_t n) noexcept:
    """Bytes one message of n payload bytes holds: the record and its payload, rounded to its class."""
    return (sizeof(Msg) + n + POOL_STEP - 1) & ~(<size_t>POOL_STEP - 1)


cdef char *msg_data(Msg *msg) noexcept:
    return <char *>(msg + 1)


cdef inline size_t _trailer_size(uint32_t flags) noexcept:
    """Bytes stored past the payload: a copy's origin, then a request's ReplyTo."""
    return ((sizeof(Topic *) if flags & MSG_COPY else 0)
            + (sizeof(ReplyTo) if flags & MSG_REQUEST else 0))


cdef inline size_t _record_size(Msg *msg) noexcept:
    return msg_size(msg.len + _trailer_size(msg.copy))


cdef inline Topic *msg_origin(Msg *msg) noexcept:
    """The topic a message was published to, which its delivery line names."""
    cdef Topic *t
    if not msg.copy & MSG_COPY:
        return msg.topic
    memcpy(&t, msg_data(msg) + msg.len, sizeof(Topic *))    # past the payload: maybe unaligned
    return t


cdef inline void msg_set_origin(Msg *msg, Topic *t) noexcept:
    """Change a group copy's origin (the caller moves the references)."""
    memcpy(msg_data(msg) + msg.len, &t, sizeof(Topic *))


cdef Msg *msg_copy_new(Broker b, Topic *group, Topic *origin, const char *data, size_t n) noexcept:
    """A group's copy of a message published to ``origin`` (msg_new's, with a reference on
    ``origin`` too); NULL when out of memory."""
    cdef Msg *msg = _msg_alloc(b, group, data, n, MSG_COPY)
    if msg != NULL:
        msg_set_origin(msg, origin)
        origin.refs += 1
    return msg


cdef Msg *msg_request_new(Broker b, Topic *t, Topic *origin, const char *data, size_t n,
                          const ReplyTo *to) noexcept:
    """A request's record for queue t (its topic, ``origin``, or one of its groups), carrying
    where its replies go. Its seq is 0: a request is never logged (docs/storage.md), and
    the log skips settling seq 0. NULL when out of memory."""
    cdef uint32_t flags = MSG_REQUEST | (MSG_COPY if t != origin else 0)
    cdef Msg *msg = _msg_alloc(b, t, data, n, flags)
    if msg == NULL:
        return NULL
    if t != origin:
        msg_set_origin(msg, origin)
        origin.refs += 1
    memcpy(msg_data(msg) + n + _trailer_size(flags & MSG_COPY), to, sizeof(ReplyTo))
    msg.seq = 0
    return msg


cdef ReplyTo msg_reply_to(Msg *msg) noexcept:
    """Where a message's replies go; id 0 when it is no request."""
    cdef ReplyTo to
    if not msg.copy & MSG_REQUEST:
        to.conn = -1
        to.gen = 0
        to.id = 0
    else:
        memcpy(&to, msg_data(msg) + msg.len + _trailer_size(msg.copy & MSG_COPY), sizeof(ReplyTo))
    return to


cdef size_t reply_token(const ReplyTo *to, char *out) noexcept:
    """Write the reply token ``<handle>.<generation>.<request id>`` (at most REPLY_TOKEN_MAX bytes,
    no terminator); returns its length."""
    cdef size_t a = _digits(<uint32_t>to.conn), g = _digits(to.gen), i = _digits(to.id)
    _put_uint(out, <uint32_t>to.conn, a)
    out[a] = b'.'
    _put_uint(out + a + 1, to.gen, g)
    out[a + 1 + g] = b'.'
    _put_uint(out + a + 2 + g, to.id, i)
    return a + g + i + 2


cdef Msg *msg_new(Broker b, Topic *t, const char *data, size_t n) noexcept:
    """A record holding a copy of the payload, numbered, with one reference for the caller;
    NULL when out of memory."""
    return _msg_alloc(b, t, data, n, 0)


cdef Msg *_msg_alloc(Broker b, Topic *t, const char *data, size_t n, uint32_t flags) noexcept:
    cdef size_t size = msg_size(n + _trailer_size(flags)), cls = size // POOL_STEP
    cdef Msg *msg
    if cls < POOL_CLASSES and b.pool.free[cls] != NULL:
        msg = <Msg *>b.pool.free[cls]
        b.pool.free[cls] = (<void **>msg)[0]
        b.pool.kept -= size
    else:
        msg = <Msg *>mem_alloc(&b.mem, size)
        if msg == NULL:
            return NULL
    b.next_seq += 1
    msg.refs = 1
    msg.attempt = 0
    msg.seq = b.next_seq
    msg.topic = t
    msg.len = <uint32_t>n
    msg.copy = flags
    memcpy(msg_data(msg), data, n)
    t.refs += 1
    return msg


cdef void msg_release(Broker b, Msg *msg) noexcept:
    """Drop one reference; the last one frees the record and lets its topic go if nothing else holds it."""
    cdef Topic *t
    cdef size_t size, cls
    msg.refs -= 1
    if msg.refs:
        return
    if msg.copy & MSG_COPY and msg_origin(msg) != msg.topic:
        topic_release(b, msg_origin(msg))
    t = msg.topic
    size = _record_size(msg)
    cls = size // POOL_STEP
    if cls < POOL_CLASSES and b.pool.kept + size <= b.pool.keep:
        (<void **>msg)[0] = b.pool.free[cls]
        b.pool.free[cls] = msg
        b.pool.kept += size
    else:
        mem_free(&b.mem, msg, size)
    topic_release(b, t)


cdef void pool_clear(MsgPool *pool, Memory *m) noexcept:
    """Free every kept record."""
    cdef size_t cls
    cdef void *p
    for cls in range(<size_t>POOL_CLASSES):
        while pool.free[cls] != NULL:
            p = pool.free[cls]
            pool.free[cls] = (<void **>p)[0]
            mem_free(m, p, cls * POOL_STEP)
    pool.kept = 0


cdef int _queue_reserve(Memory *m, Queue *q) noexcept:
    """Room for one more entry, keeping the oldest at head; -1 when out of memory."""
    cdef uint32_t i, newcap
    cdef Msg **grown
    if q.count < q.cap:
        return 0
    newcap = q.cap * 2 if q.cap else 8
    grown = <Msg **>mem_grow(m, q.ring, q.cap * sizeof(Msg *), newcap * sizeof(Msg *))
    if grown == NULL:
        return -1
    q.ring = grown
    # unwrap: the entries before head move to just past the old end
    for i in range(q.head):
        q.ring[q.cap + i] = q.ring[i]
    q.cap = newcap
    return 0


cdef int queue_push(Memory *m, Queue *q, Msg *msg) noexcept:
    """Append a reference at the tail (the queue takes it over); -1 when out of memory."""
    if _queue_reserve(m, q) < 0:
        return -1
    q.ring[(q.head + q.count) & (q.cap - 1)] = msg
    q.count += 1
    q.nbytes += msg.len
    return 0


cdef int queue_push_front(Memory *m, Queue *q, Msg *msg) noexcept:
    """Insert a reference before the oldest one (the queue takes it over); -1 when out of memory."""
    if _queue_reserve(m, q) < 0:
        return -1
    q.head = (q.head - 1) & (q.cap - 1)
    q.ring[q.head] = msg
    q.count += 1
    q.nbytes += msg.len
    return 0


cdef Msg *queue_pop(Queue *q) noexcept:
    """Take the oldest reference (the caller now owns it); the queue must not be empty."""
    cdef Msg *msg = q.ring[q.head]
    q.head = (q.head + 1) & (q.cap - 1)
    q.count -= 1
    q.nbytes -= msg.len
    return msg


cdef void queue_free_ring(Memory *m, Queue *q) noexcept:
    """Free the ring of an empty queue."""
    mem_free(m, q.ring, q.cap * sizeof(Msg *))
    q.ring = NULL
    q.cap = 0
    q.head = 0
