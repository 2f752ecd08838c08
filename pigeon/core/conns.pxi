# Connections: the table, and each connection's own arrays (see conns.pxd).

from cpython.ref cimport Py_INCREF, Py_XDECREF


cdef int _conns_grow(Broker b) except -1:
    """Double the table (and the lists sized by it); MemoryError when it cannot."""
    cdef ConnTable *table = &b.conns
    cdef int32_t h, newcap = table.cap * 2 if table.cap else 16
    cdef size_t old = table.cap, new = newcap
    cdef Conn *items
    cdef int32_t *free
    if outbox_grow(b, new) < 0:
        raise MemoryError()
    items = <Conn *>mem_grow(&b.mem, table.items, old * sizeof(Conn), new * sizeof(Conn))
    if items == NULL:
        raise MemoryError()
    table.items = items
    free = <int32_t *>mem_grow(&b.mem, table.free, old * sizeof(int32_t), new * sizeof(int32_t))
    if free == NULL:
        raise MemoryError()
    table.free = free
    memset(&table.items[old], 0, (new - old) * sizeof(Conn))
    for h in range(newcap - 1, table.cap - 1, -1):
        table.free[table.nfree] = h
        table.nfree += 1
    table.cap = newcap
    return 0


cdef int32_t conns_open(Broker b, object writer, object transport_size, object peer) except -2:
    """A fresh connection's handle; MemoryError when the table cannot grow."""
    cdef ConnTable *table = &b.conns
    cdef int32_t h
    cdef Conn *c
    if table.nfree == 0:
        _conns_grow(b)
    table.nfree -= 1
    h = table.free[table.nfree]
    c = &table.items[h]
    memset(c, 0, sizeof(Conn))
    c.state = CONN_OPEN
    table.generation += 1
    c.gen = table.generation
    c.since = time.time()
    c.paused_at = b.ticks
    c.next_waiter = -1
    c.prev_waiter = -1
    c.unacked.tag_text[0] = c'0'
    c.unacked.tag_len = 1
    c.writer = <PyObject *>writer
    Py_INCREF(writer)
    if transport_size is not None:
        c.transport_size = <PyObject *>transport_size
        Py_INCREF(transport_size)
    if peer is not None:
        peer = str(peer)
        c.peer = <PyObject *>peer
        Py_INCREF(peer)
    table.count += 1
    return h


cdef void conn_free(Broker b, int32_t h) noexcept:
    """Free what the connection owns (it must hold no message and no subscription) and its handle."""
    cdef Conn *c = &b.conns.items[h]
    Py_XDECREF(c.writer)
    Py_XDECREF(c.transport_size)
    Py_XDECREF(c.peer)
    if c.out_bytes != NULL:
        mem_count(&b.mem, 0, out_bytes_size(c.out_cap))
        Py_XDECREF(c.out_bytes)
    b.mem.in_transports -= c.in_transport
    b.mem.outside_input -= c.outside_input
    mem_free(&b.mem, c.inflight, c.inflight_cap * sizeof(InFlight))
    mem_free(&b.mem, c.input, input_size(c))
    log_forget(b, h)
    mem_free(&b.mem, c.subs, c.subs_cap * sizeof(Sub *))
    acks_free(b, &c.unacked)
    requests_free(b, c)
    auth_forget(b, c)
    if not c.rejected:
        b.conns.admitted -= 1
    memset(c, 0, sizeof(Conn))
    b.conns.count -= 1
    b.conns.free[b.conns.nfree] = h
    b.conns.nfree += 1


cdef Conn *conn_get(Broker b, int32_t h) except NULL:
    """The connection behind a handle from Python; ValueError for one that is not open."""
    if h < 0 or h >= b.conns.cap or b.conns.items[h].state == CONN_FREE:
        raise ValueError(f"no open connection with handle {h}")
    return &b.conns.items[h]


cdef int conn_keep_input(Broker b, int32_t h, const char *data, size_t n) noexcept:
    """Carry ``data`` over as the connection's input (replacing what it held); -1 when out of memory."""
    cdef Conn *c = &b.conns.items[h]
    cdef char *kept = NULL
    if n:
        kept = <char *>mem_alloc(&b.mem, n)
        if kept == NULL:
            return -1
        memcpy(kept, data, n)
    _input_release(b, c)
    c.input = kept
    c.input_len = n
    c.input_room = 0
    return 0


cdef void _input_release(Broker b, Conn *c) noexcept:
    """Free c's input buffer; a large frame's becomes the spare (ReadBuffer.spare) unless the
    spare is as large."""
    if c.input_room > b.rbuf.spare_cap:
        mem_free(&b.mem, b.rbuf.spare, b.rbuf.spare_cap)
        b.rbuf.spare = c.input
        b.rbuf.spare_cap = c.input_room
    else:
        mem_free(&b.mem, c.input, input_size(c))


cdef int conn_keep_frame(Broker b, int32_t h, const char *data, size_t n, size_t room) noexcept:
    """Carry over ``data``, the start of a large PUB frame, in a buffer of ``room`` bytes (the
    whole frame), into which the socket then reads the rest (read_buffer_load): each byte of
    the frame is copied once, not again at every read. ``data`` already at the front of such
    a buffer stays where it is. ``room`` is under 2^32 (Conn.input_room). -1 when out of memory."""
    cdef Conn *c = &b.conns.items[h]
    cdef char *kept
    if data == c.input and room <= c.input_room:
        c.input_len = n
        return 0
    if b.rbuf.spare_cap >= room:
        kept = b.rbuf.spare
        room = b.rbuf.spare_cap
        b.rbuf.spare = NULL
        b.rbuf.spare_cap = 0
    else:
        kept = <char *>mem_alloc(&b.mem, room)
        if kept == NULL:
            return -1
    memcpy(kept, data, n)
    _input_release(b, c)
    c.input = kept
    c.input_len = n
    c.input_room = <uint32_t>room
    return 0


cdef int inflight_push(Memory *m, Conn *c, Msg *msg, Topic *t, size_t offset, size_t line_len,
                       uint64_t tag, uint64_t seq) noexcept:
    """Note a message written at ``offset`` (the list takes over the reference); -1 when out of memory."""
    cdef uint32_t newcap
    cdef InFlight *grown
    cdef InFlight *e
    if c.ninflight == c.inflight_cap:
        newcap = c.inflight_cap * 2 if c.inflight_cap else 64
        grown = <InFlight *>mem_grow(m, c.inflight, c.inflight_cap * sizeof(InFlight),
                                     newcap * sizeof(InFlight))
        if grown == NULL:
            return -1
        c.inflight = grown
        c.inflight_cap = newcap
    e = &c.inflight[c.ninflight]
    e.msg = msg
    e.topic = t
    e.offset = offset
    e.line_len = line_len
    e.tag = tag
    e.seq = seq
    c.ninflight += 1
    return 0
