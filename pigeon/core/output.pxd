# Output: what each connection is sent. Replies and MESSAGE lines are written
# straight into a bytes object per connection, which is later handed to the
# connection's writer as is (no copy), once per flush, for every connection that
# got output: the server runs flush() once per pass of its event loop, after
# every read of that pass, so a connection that closed during the pass gets
# nothing written to it; a read that leaves a connection with half a batch
# (out_batch) of output flushes at once instead, since the next read would fill
# the batch and routing would push the rest into backlogs. Messages written but not yet handed over stay
# referenced by the connection's in-flight list, so output that can never be
# sent gives its messages back to their topics, in order. Connections the core
# closes are reported through on_close at the end of a flush, after their last
# output went out.

from libc.stdint cimport int32_t, uint64_t


cdef enum:
    # What becomes of a leaving connection's unsent output (give_back_inflight)
    LEAVE_DROP = 0          # dropped, with every message in it given back (the socket is gone or aborted)
    LEAVE_CUT_ALL = 1       # message lines cut out and given back, replies still sent (its FIN arrived)
    LEAVE_CUT_ACKED = 2     # DELIVER lines cut out and given back (no ACK can come for them); MESSAGE
                            # lines and replies still sent (DISCONNECT, a close by the server that flushes)


ctypedef struct Outbox:
    int32_t *dirty          # connections whose output waits for flush(), in marking order
    int32_t ndirty
    size_t dirty_cap        # twice the connection table: a flush re-marks connections mid-pass
    int32_t *closing        # connections the core closed, to report through on_close
    int32_t nclosing
    size_t closing_cap      # the connection table's
    bint flush_due          # something waits for flush()
    bint flush_scheduled    # on_output was called and flush() has not run since
    bint flushing           # in flush(): calls from its callbacks leave the work to it


cdef int outbox_grow(Broker b, size_t new_cap) noexcept
cdef void outbox_forget(Outbox *ob, int32_t h, bint dirty, bint closing) noexcept
cdef size_t out_bytes_size(size_t cap) noexcept
cdef void mark_dirty(Broker b, int32_t h) noexcept
cdef bint out_batch_half_full(Broker b) noexcept

cdef char *out_reserve(Broker b, int32_t h, size_t need) noexcept
cdef void out_reply(Broker b, int32_t h, const char *word, const char *arg, size_t n) noexcept
cdef void out_error(Broker b, int32_t h, int kind, const char *text) noexcept
cdef void out_error_quoting(Broker b, int32_t h, int kind, const char *text,
                            const char *arg, size_t n) noexcept
cdef bint out_deliver(Broker b, int32_t h, Msg *msg) noexcept
cdef bint out_deliver_direct(Broker b, int32_t h, Topic *t, const char *data, size_t n,
                            uint64_t seq) noexcept
cdef bint deliver(Broker b, Sub *s, Msg *msg) noexcept
cdef bint note_inflight(Broker b, int32_t h, Msg *msg, Topic *t, char *line, size_t line_len,
                        uint64_t tag, uint64_t seq) noexcept
cdef void out_failed(Broker b, int32_t h) noexcept

cdef void backlog_push(Broker b, Msg *msg, bint front) noexcept
cdef void topic_drain(Broker b, Topic *t) noexcept
cdef void conn_drain_topics(Broker b, int32_t h) noexcept

cdef int flush(Broker b) except -1
cdef int hand_over(Broker b, int32_t h) except -1
cdef int note_transport(Broker b, int32_t h) except -1
cdef void give_back_inflight(Broker b, int32_t h, const char *out, int how) noexcept
cdef void touch_topic(Topic *t, Topic **touched) noexcept
cdef void drain_touched(Broker b, Topic *touched) noexcept
cdef void conn_leave(Broker b, int32_t h, const char *out, int how) noexcept
cdef void close_later(Broker b, int32_t h, const char *reason, bint flush) noexcept
cdef void drop_slow(Broker b, int32_t h, const char *reason) noexcept
