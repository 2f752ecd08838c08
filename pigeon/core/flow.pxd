# Publisher flow control. A PUBLISH that finds its topic's backlog full
# (--max-backlog) or the broker's memory full waits, with everything its
# connection sent after it, and that connection is not read meanwhile: its TCP
# window fills and its sends block, like RabbitMQ's credit flow. It goes on
# once the backlog is back under half of --max-backlog, or the memory under
# three quarters of --max-memory (the disk: the log written again, and under
# three quarters of --max-disk). A connection never waits for a topic it
# subscribes to itself (it could be the one that has to drain it): it gets
# ERROR BACKLOG_FULL or MEMORY_FULL instead, as does a message too large to
# ever fit.

from libc.stdint cimport int32_t


cdef enum:
    HELD_NONE = 0
    HELD_TOPIC = 1          # waits for Conn.held_topic's backlog to drain
    HELD_MEMORY = 2         # waits for memory
    HELD_STORAGE = 3        # waits for the disk (a log write failed, or --max-disk)


cdef void flow_hold(Broker b, int32_t h, Topic *t, int why) noexcept
cdef void flow_release(Broker b, int32_t h) noexcept
cdef void flow_forget(Broker b, int32_t h) noexcept
cdef void flow_topic_drained(Broker b, Topic *t) noexcept
cdef void flow_memory_freed(Broker b) noexcept
cdef void flow_storage_freed(Broker b) noexcept
cdef int flow_run_woken(Broker b) except -1
