# Messages: one record per published message, allocated once at publish; every
# holder (a topic's backlog, a connection's in-flight list) keeps a reference to
# it, never a copy. A backlog is a FIFO ring of such references.

from libc.stdint cimport int32_t, uint32_t, uint64_t


cdef struct Msg:
    uint32_t refs           # holders; the record is freed (and its topic released) at 0
    uint32_t attempt        # times it was delivered as a DELIVER line (a MESSAGE line settles it
                            # once handed over, and one given back unsent was not delivered)
    uint64_t seq            # publish order across the broker, from 1
    Topic *topic            # holds a reference on its topic (Topic.refs): the queue it is in, a
                            # topic or a consumer group (groups.pxd)
    uint32_t len            # payload bytes, stored just past the record (msg_data); a line holds
                            # less than max_line <= 2^32 bytes
    uint32_t copy           # MSG_COPY: a group's copy: the topic it was published to (msg_origin) is
                            # stored just past the payload, with a reference on it; MSG_REQUEST: a
                            # request, its ReplyTo stored after that; v1 records keep their size


cdef enum:
    MSG_COPY = 1            # Msg.copy flags
    MSG_REQUEST = 2
    REPLY_TOKEN_MAX = 42    # <handle>.<generation>.<request id>: 10 + 1 + 10 + 1 + 20 digits


ctypedef struct ReplyTo:
    # Where the replies to a request go (the reply token, docs/protocol.md): the requester's
    # connection by handle and generation, so that a reused handle gets no old reply, and its
    # request id. id 0: not a request.
    int32_t conn
    uint32_t gen
    uint64_t id


cdef enum:
    POOL_STEP = 32          # record sizes are rounded up to a multiple of this
    POOL_CLASSES = 17       # records up to (POOL_CLASSES - 1) * POOL_STEP bytes are pooled
    POOL_KEEP_MAX = 8 * 1024 * 1024  # free records kept for reuse, in bytes (at most 1/16 of max_memory)


ctypedef struct MsgPool:
    # Free records by size class, reused before asking the allocator: a
    # message's record costs a pop and a push in the steady state. Counted in
    # Memory.used while kept.
    void *free[POOL_CLASSES]    # singly linked through each record's first bytes
    size_t kept                 # bytes of free records held
    size_t keep                 # ... at most


ctypedef struct Queue:
    Msg **ring              # references, oldest at head
    uint32_t head
    uint32_t count
    uint32_t cap            # a power of two, 0 until first use
    size_t nbytes           # payload bytes of the messages held


cdef Msg *msg_new(Broker b, Topic *t, const char *data, size_t n) noexcept
cdef Msg *msg_copy_new(Broker b, Topic *group, Topic *origin, const char *data, size_t n) noexcept
cdef Msg *msg_request_new(Broker b, Topic *t, Topic *origin, const char *data, size_t n,
                          const ReplyTo *to) noexcept
cdef ReplyTo msg_reply_to(Msg *msg) noexcept
cdef size_t reply_token(const ReplyTo *to, char *out) noexcept
cdef Topic *msg_origin(Msg *msg) noexcept
cdef void msg_set_origin(Msg *msg, Topic *t) noexcept
cdef char *msg_data(Msg *msg) noexcept
cdef size_t msg_size(size_t n) noexcept
cdef void msg_release(Broker b, Msg *msg) noexcept
cdef void pool_clear(MsgPool *pool, Memory *m) noexcept
cdef bint line_safe(const char *data, size_t n, bint lf_free) noexcept
cdef bint put_payload(char *p, const char *data, size_t n, bint as_is) noexcept

cdef int queue_push(Memory *m, Queue *q, Msg *msg) noexcept
cdef int queue_push_front(Memory *m, Queue *q, Msg *msg) noexcept
cdef Msg *queue_pop(Queue *q) noexcept
cdef void queue_free_ring(Memory *m, Queue *q) noexcept
