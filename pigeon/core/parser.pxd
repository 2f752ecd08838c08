# Parser: the protocol's vocabulary (commands and error kinds with their wire
# codes), the tokenizer over the shared read buffer (fields are pointers into
# it, never copies), topic-name checks, and the loop that splits a
# connection's input into lines and dispatches each to its command handler.
# A frame (``PUB <client_id> <topic> <nbytes>``, ``REQ`` alike, ``REPLY <token>
# <nbytes>``) is found by its header line and one length: its payload is handed
# on without being looked at.

from libc.stdint cimport int32_t


cdef enum:
    # command kinds: indexes into Counters.commands, named by COMMAND_NAMES
    CMD_CONNECT = 0
    CMD_SUBSCRIBE
    CMD_UNSUBSCRIBE
    CMD_PUBLISH
    CMD_PING
    CMD_DISCONNECT
    CMD_STATS
    CMD_HELLO
    CMD_ACK
    CMD_NACK
    CMD_DESTROY
    CMD_REQ
    CMD_REPLY
    CMD_UNKNOWN
    CMD_KINDS

    # error kinds: indexes into Counters.errors and ERROR_CODE_TEXT (the code on the wire)
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
    ERR_MEMORY_FULL
    ERR_IDLE_TIMEOUT
    ERR_UNKNOWN_DELIVERY_TAG
    ERR_STORAGE_FULL
    ERR_AUTH_REQUIRED       # a bare CONNECT while auth is on and no identity was granted
    ERR_AUTH_FAILED         # wrong user or password: the connection closes
    ERR_PERMISSION_DENIED   # a topic outside the user's patterns, or STATS CONNECTIONS for a non-admin
    ERR_PAYLOAD_TOO_LARGE   # a PUB frame over max_payload: refused, its payload skipped
    ERR_BAD_FRAME           # a PUB header without a byte count, or a payload not followed by a line
                            # end: where the next command starts is unknown, so the connection closes
    ERR_NO_SUCH_GROUP       # DESTROY of a group the broker does not hold
    ERR_GROUP_IN_USE        # DESTROY of a group that has subscribers
    ERR_BAD_REPLY_TOKEN     # a REPLY whose token is not <handle>.<generation>.<id> (payload skipped)
    ERR_NOT_ENOUGH_REPLICAS # a durable PUBLISH while fewer successors are live than --min-replicas
    ERR_KINDS

    # what topic_problem finds wrong with a name
    TOPIC_OK = 0
    TOPIC_BAD_LENGTH
    TOPIC_INVISIBLE         # whitespace, control, format or separator characters
    TOPIC_BAD_UTF8

    HOLD = 1                # a handler's answer: this line waits (flow control); stop here
    FRAME_PARTIAL = 3       # run_frame's answer: the frame's payload has not all arrived yet
    FRAME_IN_PLACE = 256 * 1024  # a partial frame this large (header, payload, line end) is read
                                 # straight into its own buffer (conn_keep_frame)

    # the frames: a header line with a byte count, then that many bytes and a line end
    FRAME_PUB = 1
    FRAME_REQ = 2           # requests.pxd
    FRAME_REPLY = 3

    READ_ROOM = 256 * 1024  # free space offered to each socket read
    INPUT_SLACK = 4096      # unfinished input kept even when memory is full


cdef extern from *:
    """
    static const char *const pigeon_error_codes[] = {
        "USAGE", "UNKNOWN_COMMAND", "NOT_CONNECTED", "ALREADY_CONNECTED", "WRONG_CLIENT_ID",
        "BAD_TOPIC", "NOT_SUBSCRIBED", "BACKLOG_FULL", "LINE_TOO_LONG", "TOO_MANY_CONNECTIONS",
        "TOO_MANY_SUBSCRIPTIONS", "TOO_MANY_TOPICS", "MEMORY_FULL", "IDLE_TIMEOUT", "UNKNOWN_DELIVERY_TAG",
        "STORAGE_FULL", "AUTH_REQUIRED", "AUTH_FAILED", "PERMISSION_DENIED", "PAYLOAD_TOO_LARGE",
        "BAD_FRAME", "NO_SUCH_GROUP", "GROUP_IN_USE", "BAD_REPLY_TOKEN", "NOT_ENOUGH_REPLICAS",
    };
    """
    # the stable upper-case code of each error kind, sent as ERROR <CODE> <text>
    const char *const *ERROR_CODE_TEXT "pigeon_error_codes"


ctypedef struct ReadBuffer:
    # One buffer for every connection's reads: a connection's carried-over
    # input is copied to its front, and the socket reads just after it. A
    # large PUB frame's remainder is read into the connection's own input
    # buffer instead (conn_keep_frame), so it is not copied at every read.
    char *data
    size_t cap
    int32_t owner           # handle whose input sits at the front of target, -1 when none
    char *target            # where the owner's input is and its next read goes: data, or its input
    size_t target_cap       # bytes at target
    char *spare             # the last large frame's buffer, kept for the next one (conn_keep_frame):
    size_t spare_cap        # a fresh one would page-fault all its pages at every frame


cdef bint next_field(char **p, size_t *n, char **field, size_t *flen) noexcept
cdef bint only_blanks(const char *p, size_t n) noexcept
cdef bint word_is(const char *p, size_t n, const char *lower, size_t ln) noexcept
cdef bint printable(const char *p, size_t n) noexcept
cdef int topic_problem(const char *p, size_t n) noexcept


cdef inline bint parse_count(const char *p, size_t n, size_t *value) noexcept:
    """A decimal number of at most 18 digits; False for anything else. Inline: every PUB frame's
    byte count goes through it."""
    cdef size_t i, v = 0
    cdef unsigned char d
    if n == 0 or n > 18:
        return False
    for i in range(n):
        d = <unsigned char>p[i] - c'0'
        if d > 9:
            return False
        v = v * 10 + d
    value[0] = v
    return True



cdef char *read_buffer_load(Broker b, int32_t h) except NULL
cdef int process_input(Broker b, int32_t h, char *buf, size_t n) except -1
cdef int conn_continue(Broker b, int32_t h) except -1
cdef int stop_reading(Broker b, int32_t h) except -1
cdef int dispatch(Broker b, int32_t h, char *line, size_t n) except -1
cdef int run_frame(Broker b, int32_t h, char *p, size_t line_len, size_t avail, size_t *used,
                   int kind) except -1
