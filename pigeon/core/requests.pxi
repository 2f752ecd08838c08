# Requests: minting request ids, matching replies (see requests.pxd).


cdef inline bint _waiting(Conn *c, uint64_t id) noexcept:
    return (c.req_waiting[(id & (REQUEST_WINDOW - 1)) >> 6] >> (id & 63)) & 1


cdef inline void _set_waiting(Conn *c, uint64_t id, bint on) noexcept:
    cdef uint64_t bit = (<uint64_t>1) << (id & 63)
    cdef size_t word = (id & (REQUEST_WINDOW - 1)) >> 6
    if on:
        c.req_waiting[word] |= bit
    else:
        c.req_waiting[word] &= ~bit


cdef inline void _advance_low(Conn *c) noexcept:
    """req_low moves past the ids no longer waiting (amortized O(1): each id is passed once)."""
    while c.req_low <= c.req_last and not _waiting(c, c.req_low):
        c.req_low += 1


cdef int on_req(Broker b, int32_t h, Topic *t, char *id, size_t id_len, char *name, size_t name_len,
                const char *data, size_t n) except -1:
    """A framed REQ, parsed as on_pub's PUB: published like it, its records carrying the reply
    token of the id it will get (minted by request_accepted once the publish is accepted)."""
    cdef Conn *c = &b.conns.items[h]
    cdef int held
    if t == NULL:
        if not _own_id(b, h, id, id_len):
            return 0
        t = _publish_topic(b, h, name, name_len)
        if t == NULL:
            return 0
    c = &b.conns.items[h]
    if c.req_waiting == NULL:
        c.req_waiting = <uint64_t *>mem_alloc(&b.mem, REQUEST_WINDOW // 8)
        if c.req_waiting == NULL:
            _memory_full(b, h)
            return 0
        memset(c.req_waiting, 0, REQUEST_WINDOW // 8)
        c.req_low = 1
    b.request.conn = h
    b.request.gen = c.gen
    b.request.id = c.req_last + 1
    held = _publish_pinned(b, h, t, data, n, False)
    b.request.id = 0
    return held


cdef void request_accepted(Broker b, int32_t h) noexcept:
    """The request being routed (Broker.request) was accepted: its id waits for a reply, and
    ``REQUESTED <id>`` tells the requester which it is (before any reply can reach it)."""
    cdef Conn *c = &b.conns.items[h]
    cdef char text[24]
    cdef size_t tl
    cdef uint64_t id = b.request.id
    while id - c.req_low >= <uint64_t>REQUEST_WINDOW:
        # the oldest waiting request is forgotten: its reply will be dropped
        if _waiting(c, c.req_low):
            _set_waiting(c, c.req_low, False)
            b.counters.requests_forgotten += 1
        c.req_low += 1
    c.req_last = id
    _set_waiting(c, id, True)
    _advance_low(c)
    b.counters.requests += 1
    tl = _digits(id)
    _put_uint(text, id, tl)
    out_reply(b, h, "REQUESTED", text, tl)


cdef bint _parse_token(const char *p, size_t n, ReplyTo *to) noexcept:
    """``<handle>.<generation>.<id>``, three decimal numbers in range; False for anything else."""
    cdef const char *end = p + n
    cdef const char *dot1 = <const char *>memchr(p, b'.', n)
    cdef const char *dot2
    cdef size_t a = 0, g = 0, i = 0
    if dot1 == NULL:
        return False
    dot2 = <const char *>memchr(dot1 + 1, b'.', end - dot1 - 1)
    if (dot2 == NULL or not parse_count(p, dot1 - p, &a) or not parse_count(dot1 + 1, dot2 - dot1 - 1, &g)
            or not parse_count(dot2 + 1, end - dot2 - 1, &i)):
        return False
    if a > 0x7fffffff or g > 0xffffffff or i == 0:
        return False
    to.conn = <int32_t>a
    to.gen = <uint32_t>g
    to.id = i
    return True


cdef bint _take_waiting(Broker b, const ReplyTo *to) noexcept:
    """Whether ``to`` names a request still waiting on an open connection; it waits no more."""
    cdef Conn *c
    if to.conn >= b.conns.cap:
        return False
    c = &b.conns.items[to.conn]
    if (c.state != CONN_OPEN or c.gen != to.gen or c.req_waiting == NULL
            or to.id < c.req_low or to.id > c.req_last or not _waiting(c, to.id)):
        return False
    _set_waiting(c, to.id, False)
    _advance_low(c)
    return True


cdef int on_reply(Broker b, int32_t h, char *token, size_t tl, const char *data, size_t n) except -1:
    """A framed REPLY: to the requester as ``RMSG <id> <nbytes>``, a line end, the payload, a line
    end, when its request waits; else dropped and counted. No answer on success (as NATS)."""
    cdef ReplyTo to
    cdef size_t il, dl
    cdef char *p
    if not _connected(b, h):
        return 0
    if not _parse_token(token, tl, &to):
        b.counters.replies_malformed += 1
        out_error_quoting(b, h, ERR_BAD_REPLY_TOKEN, "not a reply token:", token, tl)
        return 0
    if not _take_waiting(b, &to):
        b.counters.replies_dropped += 1
        return 0
    il = _digits(to.id)
    dl = _digits(n)
    p = out_reserve(b, to.conn, 5 + il + 1 + dl + 1 + n + 1)
    if p == NULL:
        b.counters.replies_dropped += 1     # the requester's output cannot grow: it is closing
        return 0
    memcpy(p, b"RMSG ", 5)
    _put_uint(p + 5, to.id, il)
    p += 5 + il
    p[0] = b' '
    _put_uint(p + 1, n, dl)
    p += 1 + dl
    p[0] = b'\n'
    memcpy(p + 1, data, n)
    p[1 + n] = b'\n'
    b.counters.replies += 1
    return 0


cdef void requests_free(Broker b, Conn *c) noexcept:
    """Forget a closing connection's waiting requests."""
    mem_free(&b.mem, c.req_waiting, REQUEST_WINDOW // 8)
    c.req_waiting = NULL
