# Acknowledgements: at-least-once delivery to acknowledged subscriptions.
# Each connection keeps its unacknowledged deliveries in tag order (tags count
# up from 1 per connection, as AMQP's per-channel delivery tags); ACK settles
# them, NACK gives them back (now or after a delay), and so do the connection's
# end, UNSUBSCRIBE and the ack timeout. A message given back once too often is
# moved to the topic <name>.dead. Delays wait in a heap ordered by due time.

from libc.stdint cimport int32_t, uint32_t, uint64_t


ctypedef struct Unacked:
    uint64_t tag            # 0 once settled or given back (a hole)
    Msg *msg                # a reference
    Sub *sub
    double deadline         # monotonic seconds after which it is given back (ack timeout); 0: never


ctypedef struct UnackedList:
    # A connection's unacknowledged deliveries, in tag order, which is also the
    # order they were delivered and of their deadlines: a ring with holes where
    # deliveries were settled out of order, compacted once holes outnumber the rest.
    Unacked *items
    uint32_t head
    uint32_t count          # entries from head, holes included
    uint32_t cap            # a power of two, 0 until first use
    uint32_t live           # entries not settled
    uint64_t next_tag       # the last tag given out on this connection
    char tag_text[24]       # ... in decimal, counted up in place (no division per delivery)
    uint32_t tag_len


ctypedef struct Delayed:
    double due              # monotonic seconds
    uint64_t order          # when it was delayed: equal dues come due in that order
    Msg *msg                # a reference


ctypedef struct DelayHeap:
    # Messages NACKed with a delay, a binary min-heap on their due time, then their order.
    Delayed *items
    size_t count
    size_t cap
    uint64_t delays         # messages delayed so far (Delayed.order)


cdef double monotonic() noexcept
cdef bint ack_deliver(Broker b, Sub *s, Msg *msg) noexcept
cdef Msg *acks_take_back(Broker b, int32_t h, uint64_t tag) noexcept
cdef size_t acks_settle(Broker b, int32_t h, uint64_t first, uint64_t last) noexcept
cdef size_t acks_nack(Broker b, int32_t h, uint64_t first, uint64_t last, double delay) noexcept
cdef void acks_give_back_all(Broker b, int32_t h) noexcept
cdef void acks_give_back_sub(Broker b, Sub *s) noexcept
cdef void acks_expire(Broker b, int32_t h, double now) noexcept
cdef void acks_free(Broker b, UnackedList *list) noexcept
cdef void redeliver(Broker b, Msg *msg) noexcept
cdef void delayed_fire(Broker b, double now) noexcept
cdef void delayed_free(Broker b) noexcept
