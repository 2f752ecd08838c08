# Limits: every bound the broker enforces, in one struct that is also the single
# source of their defaults (limits_default); the server and the CLI read them
# through pigeon._core.LIMIT_DEFAULTS.

from libc.stdint cimport int32_t, uint32_t, uint64_t


cdef extern from *:
    """
    #ifndef PIGEON_TOPIC_MAX
    #error "PIGEON_TOPIC_MAX is set by setup.py from pigeon/protocol.py"
    #endif
    """
    # longest topic name in bytes; defined once, in pigeon/protocol.py
    enum: TOPIC_MAX "PIGEON_TOPIC_MAX"


cdef enum:
    PREFETCH_MAX = 1_000_000    # the largest PREFETCH, in SUBSCRIBE and --default-prefetch


ctypedef struct Limits:
    size_t max_line             # longest command line, in bytes; a longer one closes its connection
    uint32_t max_backlog        # messages one topic keeps while no subscriber can take them
    int32_t max_connections     # open connections; one more is refused
    size_t max_memory           # bytes the broker holds in all: messages, topics, buffers (memory.pxd)
    int32_t max_subscriptions   # topics one connection subscribes to
    size_t max_topics           # topics the broker holds
    size_t max_pending          # unsent output of one connection before it is dropped as a slow consumer
    double idle_timeout         # seconds without input before a connection closes; 0 = never
    double write_timeout        # seconds a connection may leave its output untaken; 0 = never
    size_t out_batch            # output one connection takes before rotations skip it until flushed
    uint32_t default_prefetch   # unacknowledged messages an acknowledged subscription holds unless it says
    double ack_timeout          # seconds a delivery may stay unacknowledged before it is given back; 0 = never
    uint32_t max_deliveries     # deliveries of one message before it goes to <topic>.dead; 0 = no limit
    uint64_t max_disk           # bytes of log on disk before publishers wait (durable); 0 = no limit
    size_t max_payload          # largest payload of a framed PUB; a larger one is refused and skipped
    size_t max_backlog_bytes    # payload bytes one topic keeps (past them, like max_backlog, publishers wait)
    double group_ttl            # seconds a named consumer group lives on without a subscriber


cdef Limits limits_default() noexcept
cdef int limits_set(Limits *limits, str name, object value) except -1
cdef dict limits_dict(const Limits *limits)
