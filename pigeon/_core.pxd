# The broker core's C-level state. Every struct here is owned by one Broker
# and freed by it; Python code only sees connection handles (ints).

from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t


cdef extern from *:
    """
    #define PIGEON_TOPIC_MAX 255
    """
    int TOPIC_MAX "PIGEON_TOPIC_MAX"


cdef enum:
    # command kinds: indexes into Counters.commands, named by COMMAND_NAMES in _core.pyx
    CMD_CONNECT = 0
    CMD_SUBSCRIBE
    CMD_UNSUBSCRIBE
    CMD_PUBLISH
    CMD_PING
    CMD_DISCONNECT
    CMD_STATS
    CMD_UNKNOWN
    CMD_KINDS

    # error kinds: indexes into Counters.errors, named by ERROR_NAMES in _core.pyx
    ERR_USAGE = 0           # wrong arguments for a known command
    ERR_UNKNOWN_COMMAND
    ERR_NOT_CONNECTED
    ERR_ALREADY_CONNECTED
    ERR_WRONG_CLIENT_ID
    ERR_BAD_TOPIC
    ERR_NOT_SUBSCRIBED
    ERR_BACKLOG_FULL
    ERR_LINE_TOO_LONG
    ERR_TOO_MANY_CONNECTIONS
    ERR_TOO_MANY_SUBSCRIPTIONS
    ERR_TOO_MANY_TOPICS
    ERR_MEMORY_FULL         # a PUBLISH over max_memory
    ERR_IDLE_TIMEOUT
    ERR_KINDS


ctypedef struct BacklogEntry:
    char *data              # the message bytes, PyMem_Malloc'd, owned by the backlog
    size_t len


ctypedef struct Backlog:
    # A FIFO ring of messages waiting for a subscriber. Kept behind
    # backlog_push/backlog_pop so it can later be backed by a log on disk.
    BacklogEntry *ring
    uint32_t head           # index of the oldest entry
    uint32_t count
    uint32_t cap            # ring size, a power of two (0 until first use)
    size_t nbytes           # payload bytes held


ctypedef struct Topic:
    Topic *next             # hash-bucket chain
    uint64_t hash
    char *name              # points just past the struct, same allocation
    uint16_t name_len
    int32_t *subs           # connection handles, in subscription order
    int32_t nsubs
    int32_t subs_cap
    int32_t cursor          # index of the next turn; may equal nsubs (wraps lazily)
    Backlog backlog
    uint64_t published      # messages accepted for this topic
    uint64_t delivered      # messages written to a subscriber
    bint full               # backlog at its limit; warned once until it drains


ctypedef struct Conn:
    int32_t state           # CONN_FREE, CONN_OPEN or CONN_CLOSING
    bint paused             # transport over its high-water mark: skipped by rotations
    bint dirty              # has output not yet handed to its writer
    bint starved            # skipped by a rotation for holding a full batch: drain again after its flush
    bint rejected           # over max_connections: gets an ERROR, then closes; not counted as admitted
    uint32_t silent_ticks   # ticks since its last input
    uint64_t client_id      # 0 until CONNECT
    char id_text[24]        # client_id as sent on the wire
    uint32_t id_len
    PyObject *out_bytes     # a bytes object being filled with output, handed to the writer as is
    char *out               # its data: output not yet handed to the writer
    size_t out_len
    size_t out_cap
    size_t out_hint         # recent flush size (decaying), to size the next bytes object in one go
    char *pending           # an incomplete line carried over to the next read
    size_t pending_len
    Topic **subs            # topics this connection subscribes to
    int32_t nsubs
    int32_t subs_cap
    double since            # when open() was called, seconds since the epoch
    uint64_t msgs_in        # PUBLISH accepted from this connection
    uint64_t msgs_out       # MESSAGE lines written to it
    uint64_t bytes_in
    uint64_t bytes_out


ctypedef struct Counters:
    # Plain increments on the hot path; read all at once by Broker.stats().
    uint64_t connections_total
    uint64_t commands[CMD_KINDS]
    uint64_t published      # PUBLISH accepted
    uint64_t delivered      # MESSAGE lines written
    uint64_t backlogged     # messages that went through a backlog
    uint64_t refused        # PUBLISH refused (backlog full)
    uint64_t errors[ERR_KINDS]  # ERROR lines sent
    uint64_t rejected       # connections refused over max_connections
    uint64_t idle_closed    # connections closed by the idle timeout
    uint64_t requeued       # messages given back to their topic by a dropped connection
    uint64_t bytes_in
    uint64_t bytes_out
    uint64_t slow_consumers # connections dropped over max_pending


cdef class Broker:
    # limits
    cdef size_t max_line
    cdef uint32_t max_backlog
    cdef int32_t max_connections
    cdef size_t max_memory          # bytes in all backlogs together
    cdef int32_t max_subscriptions  # per connection
    cdef size_t max_topics
    cdef size_t max_pending         # unsent output of one connection
    cdef uint32_t idle_ticks        # ticks without input before a connection closes; 0 = never
    cdef size_t out_batch           # output a connection takes before a rotation skips it until flushed

    # connections
    cdef Conn *conns
    cdef int32_t conns_cap
    cdef int32_t nconns
    cdef int32_t *free_handles
    cdef int32_t nfree
    cdef list writers           # writers[handle]: callable taking bytes
    cdef list peers             # peers[handle]: the client's address, as text
    cdef list pendings          # pendings[handle]: None or a callable, bytes buffered past the core
    cdef list closers           # closers[handle]: callable(reason, flush) or None
    cdef int32_t nadmitted      # open connections not rejected
    cdef uint64_t next_client_id

    # connections with output to hand over, in the order they got it
    cdef int32_t *dirty         # room for 2 * conns_cap: _flush re-marks connections mid-pass
    cdef int32_t ndirty

    # topics: a chained hash table, plus the last topic found
    cdef Topic **buckets
    cdef size_t nbuckets
    cdef size_t ntopics
    cdef Topic *last_topic
    cdef size_t backlog_bytes
    cdef size_t backlog_messages

    # the read buffer shared by all connections
    cdef char *rbuf
    cdef size_t rbuf_cap
    cdef int32_t rbuf_owner     # handle whose pending line sits at rbuf[0]

    cdef Counters counters
    cdef double started         # when the broker was created, seconds since the epoch
    cdef public object on_warning   # None or callable(text): rare events worth an operator's eye

    cdef Conn *_conn(self, int32_t h) except NULL
    cdef int _process(self, int32_t h, char *buf, size_t n) except -1
    cdef int _dispatch(self, int32_t h, char *line, size_t n) except -1
    cdef int _on_connect(self, int32_t h, char *args, size_t n) except -1
    cdef int _on_subscribe(self, int32_t h, char *args, size_t n) except -1
    cdef int _on_unsubscribe(self, int32_t h, char *args, size_t n) except -1
    cdef int _on_publish(self, int32_t h, char *args, size_t n) except -1
    cdef Topic *_publish_fast(self, int32_t h, char **args, size_t *n) noexcept
    cdef int _check_id(self, int32_t h, char *id, size_t id_len) except -1
    cdef int _check_topic(self, int32_t h, char *name, size_t n) except -1
    cdef int _on_stats(self, int32_t h, char *args, size_t n) except -1
    cdef int _error(self, int32_t h, int kind, const char *reason) except -1
    cdef int _error2(self, int32_t h, int kind, const char *reason, char *arg, size_t arg_len) except -1
    cdef int _warn(self, str text) except -1
    cdef char *_out(self, int32_t h, size_t need) except NULL
    cdef int _reply(self, int32_t h, const char *word, char *arg, size_t arg_len) except -1
    cdef int _deliver(self, int32_t h, Topic *t, char *msg, size_t msg_len) except -1
    cdef int _drain(self, Topic *t) except -1
    cdef int32_t _next_subscriber(self, Topic *t)
    cdef Topic *_find_topic(self, char *name, size_t n, uint64_t hash)
    cdef Topic *_add_topic(self, char *name, size_t n, uint64_t hash) except NULL
    cdef void _drop_topic_if_unused(self, Topic *t)
    cdef int _unsubscribe(self, int32_t h, Topic *t) except -1
    cdef int _leave_all(self, int32_t h) except -1
    cdef int _flush(self) except -1
    cdef int _hand_over(self, int32_t h) except -1
    cdef int _requeue(self, char *out, size_t out_len, list touched) except -1
    cdef int _drop_slow(self, int32_t h) except -1
    cdef int _drain_subscriptions(self, int32_t h) except -1
    cdef int _check_topic_room(self, int32_t h) except -1
    cdef void _mark(self, int32_t h) noexcept
    cdef size_t _unsent(self, int32_t h) except? 0
    cdef int _close_by_core(self, int32_t h, str reason, bint flush) except -1
