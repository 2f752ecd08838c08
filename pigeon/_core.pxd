# The broker core: one extension module made of the parts in pigeon/core/,
# each with its interface (.pxd) and its code (.pxi). The Broker below owns all
# of their state; Python code reaches it only through Broker's methods.
#
#   core/limits      every bound, and their defaults
#   core/memory      counted allocation, for --max-memory
#   core/messages    message records and backlog rings
#   core/topics      the topic table and round robin
#   core/subs        subscriptions: plain or acknowledged, with a prefetch window
#   core/groups      consumer groups and wildcard patterns: the pattern trie, per-topic resolution
#   core/acks        acknowledged delivery: unacknowledged lists, ACK/NACK, redelivery,
#                    dead letters, delays
#   core/conns       connection state
#   core/output      output buffers, delivery, flushing, giving messages back
#   core/parser      the protocol's vocabulary, tokenizer, topic checks, dispatch
#   core/commands    one handler per command
#   core/requests    request/reply: reply tokens, request ids waiting, REQ and REPLY
#   core/flow        publisher flow control
#   core/auth        authentication, and permissions compiled per connection
#   core/log         durability: what is recorded, its order with the replies, recovery
#   core/stats       counters and reports

cimport cython
from libc.stdint cimport int32_t, uint64_t

cdef class Broker
cdef struct Msg
cdef struct Topic
cdef struct Conn
cdef struct Sub
cdef struct PermSet

include "core/limits.pxd"
include "core/memory.pxd"
include "core/messages.pxd"
include "core/topics.pxd"
include "core/subs.pxd"
include "core/groups.pxd"
include "core/acks.pxd"
include "core/conns.pxd"
include "core/output.pxd"
include "core/parser.pxd"
include "core/commands.pxd"
include "core/requests.pxd"
include "core/flow.pxd"
include "core/auth.pxd"
include "core/log.pxd"
include "core/stats.pxd"


@cython.final
cdef class Broker:
    cdef Limits limit
    cdef Memory mem
    cdef MsgPool pool
    cdef TopicTable topic_table
    cdef GroupIndex group_index     # consumer groups and wildcard patterns
    cdef ConnTable conns
    cdef Outbox outbox
    cdef ReadBuffer rbuf
    cdef Counters counters
    cdef size_t backlog_messages    # messages in all backlogs
    cdef size_t backlog_bytes       # their payload bytes
    cdef size_t unacked_messages    # deliveries not yet acknowledged
    cdef DelayHeap delayed          # messages NACKed with a delay
    cdef size_t delayed_messages
    cdef double timer_due           # the delay on_timer was last armed for, 0: none
    cdef double now                 # the monotonic clock, read once per call from Python
    cdef ReplyTo request            # the request being routed now (on_req), id 0: a plain publish
    cdef int32_t publishers_held    # connections whose PUBLISH waits for flow control
    cdef int32_t memory_waiter      # first connection waiting for memory (Conn.next_waiter), -1: none
    cdef int32_t woken              # first connection to go on at the next flush, -1: none
    cdef int32_t storage_waiter     # first connection waiting for the disk, -1: none
    cdef Log log
    cdef Recovery recovery          # while a log is replayed (recover, recover_finish)
    cdef Compaction compaction      # what the store's compaction passes did
    cdef uint64_t wall_ms           # the wall clock in milliseconds, read once per call from Python
    cdef uint64_t next_seq          # the last message's sequence number
    cdef uint64_t ticks             # tick() calls so far
    cdef uint64_t idle_ticks        # ticks without input before a connection closes; 0 = never
    cdef uint64_t write_ticks       # ticks a connection may stay paused; 0 = never
    cdef double tick_seconds        # seconds between tick() calls, as the server runs them
    cdef uint64_t lost_warned       # counters.lost when last warned about
    cdef bint tearing_down          # in __dealloc__: topics are freed all at once
    cdef double started             # when the broker was created, seconds since the epoch
    cdef bytes hello                # the HELLO reply's JSON (protocol 1)
    cdef bytes hello2               # ... after HELLO 2
    cdef bint auth                  # CONNECT needs credentials or a granted identity (Broker(auth=True))
    cdef int32_t auth_asking        # the connection whose on_auth call runs now, -1: none
    cdef public object on_output    # callable(): flush() is due; the server runs it once per loop pass
    cdef public object on_close     # callable(handle, reason, flush): close the socket the core ended
    cdef public object on_reading   # callable(handle, reading): stop or restart reading a connection
    cdef public object on_timer     # callable(seconds): run_timers() is due in that long
    cdef public object on_log       # callable(memoryview): write these records to the log (durable)
    cdef public object on_sync      # callable(position): sync the log up to there, then call log_synced
    cdef public object on_warning   # callable(text): a rare event worth an operator's eye
    cdef public object on_auth      # callable(handle, user, password): check them, then auth_result

    cdef int _settle(self) except -1
