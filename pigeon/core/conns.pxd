# Connections: one struct per client connection, in a table indexed by handle
# (the small int the server knows it by), with a free list that reuses the last
# freed handle first. The struct holds everything about the connection, its
# Python callables included (owned references).

from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, uint32_t, uint64_t


cdef enum:
    CONN_FREE = 0
    CONN_OPEN = 1
    CONN_CLOSING = 2        # no more input; output flushes (or is dropped), then the socket closes


ctypedef struct InFlight:
    # A message written into the connection's unsent output: given back to its
    # topic if that output can never be sent, settled once it is handed over.
    # One routed straight from its publisher has no record: its line in the
    # output is its only copy, and a record is made from that line only if the
    # output can never be sent.
    Msg *msg                # its record (a reference, unless tag), or NULL
    Topic *topic            # held by one Topic.refs while in flight when it has no record or a tag
    size_t offset           # where its line starts in the output
    size_t line_len
    uint64_t tag            # a DELIVER line's delivery tag (the unacknowledged list holds the
                            # reference), 0 for a MESSAGE line
    uint64_t seq            # the message's sequence number (durable: recorded as done once handed over)


cdef struct Conn:
    int32_t state               # CONN_FREE, CONN_OPEN or CONN_CLOSING
    bint rejected               # over max_connections: gets an ERROR, then closes; not admitted
    bint paused                 # its transport is full: rotations skip it and its input waits
    bint reading_stopped        # the server was told to stop reading it (on_reading)
    bint dirty                  # output waits for flush()
    bint starved                # skipped by a rotation for a full batch: drain its topics after its flush
    bint close_queued           # to be reported through on_close at the end of flush()
    bint close_flush            # ... after handing over its output (else its output was dropped)
    bint broken                 # its output could not grow: skipped by rotations, closed by the next flush
    int32_t held                # HELD_NONE, or what its PUBLISH waits for (flow.pxd): its input waits
    Topic *held_topic           # the topic whose backlog it waits for (pinned)
    int32_t next_waiter         # the next and previous connection waiting for the same thing, -1: none
    int32_t prev_waiter
    uint64_t log_wait           # log position its output waits for (a PUBLISHED reply, durable), 0: none
    uint32_t silent_ticks       # ticks since its last input
    bint never_idle             # --idle-timeout does not close it (keep_open_when_idle)
    size_t outside_input        # its unfinished command that the cluster's router holds (hold_input)
    uint64_t paused_at          # the tick at which it last paused
    bint authenticating         # its CONNECT <user> <password> waits for auth_result: its input waits
    bint granted                # grant() gave it an identity (before CONNECT: a bare CONNECT logs in)
    bint admin                  # ... allowed everything, STATS CONNECTIONS included
    bint checked                # its PUBLISH and SUBSCRIBE are checked against the two sets below
    PermSet *may_publish        # the topics it may publish to (auth.pxd), NULL: none
    PermSet *may_subscribe      # ... and subscribe to
    uint64_t publish_allowed    # serial of the last topic it was allowed to publish to, 0: none
    PyObject *user              # its user name (str), or NULL
    uint64_t client_id          # 0 until CONNECT
    char id_text[24]            # client_id as sent on the wire
    uint32_t id_len
    PyObject *writer            # callable(bytes): hands output to the transport
    PyObject *transport_size    # callable() -> bytes its transport holds unsent, or NULL
    PyObject *peer              # the client's address (str), or NULL
    PyObject *out_bytes         # a bytes object being filled with output, handed to the writer as is
    char *out                   # its data
    size_t out_len              # output not yet handed to the writer
    size_t out_cap
    size_t out_hint             # recent hand-over size (decaying), to size the next bytes object
    InFlight *inflight          # messages in the unsent output, in output order
    uint32_t ninflight
    uint32_t inflight_cap
    char *input                 # input carried over: a partial line, or lines held while it is paused
    size_t input_len
    size_t in_transport         # what its transport held unsent when last asked
    Sub **subs                  # its subscriptions
    int32_t nsubs
    int32_t subs_cap
    UnackedList unacked         # deliveries to its acknowledged subscriptions not yet settled
    double since                # when it opened, seconds since the epoch
    uint64_t msgs_in            # PUBLISH accepted from it
    uint64_t msgs_out           # messages written to it
    uint64_t bytes_in
    uint64_t bytes_out
    char close_reason[96]       # for on_close; empty when the client asked (DISCONNECT)
    bint framed                 # sent HELLO 2: its deliveries are MSG/DMSG frames, not text lines
    uint32_t input_room         # bytes allocated at input while a large PUB frame is read straight into
                                # it (conn_keep_frame), else 0 (input_len bytes); 32 bits in what was
                                # padding: sizeof(Conn) stays as it was (conns.items[h] is on every path)
    size_t skip                 # payload bytes of a refused PUB frame still to be read and dropped
    uint32_t gen                # ConnTable.generation when it opened: reply tokens name it with the handle
    uint64_t req_last           # the last request id it was given (requests.pxd), 0: none
    uint64_t req_low            # the oldest request id that may still wait for its reply
    uint64_t *req_waiting       # a bit per request id waiting, a ring of REQUEST_WINDOW; NULL until a REQ


ctypedef struct ConnTable:
    Conn *items
    int32_t cap
    int32_t count               # connections not free
    int32_t admitted            # ... and not rejected
    int32_t *free               # free handles, the last freed on top
    int32_t nfree
    uint64_t next_client_id
    uint32_t generation         # connections opened so far (wraps): Conn.gen


cdef int32_t conns_open(Broker b, object writer, object transport_size, object peer) except -2
cdef void conn_free(Broker b, int32_t h) noexcept
cdef Conn *conn_get(Broker b, int32_t h) except NULL
cdef int conn_keep_input(Broker b, int32_t h, const char *data, size_t n) noexcept
cdef int conn_keep_frame(Broker b, int32_t h, const char *data, size_t n, size_t room) noexcept


cdef inline size_t input_size(Conn *c) noexcept:
    """Bytes allocated at c.input."""
    return c.input_room if c.input_room else c.input_len
cdef int inflight_push(Memory *m, Conn *c, Msg *msg, Topic *t, size_t offset, size_t line_len,
                       uint64_t tag, uint64_t seq) noexcept
