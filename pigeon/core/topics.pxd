# Topics: a chained hash table keyed by a per-process random SipHash of the
# name (so colliding names cannot be computed offline), a cache of the last
# topic used, and per topic the rotation of its subscribers and its backlog.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef struct Topic:
    Topic *next             # hash-bucket chain
    uint64_t hash
    uint64_t serial         # never reused: identifies it even after it is freed (Conn.publish_allowed)
    uint16_t name_len       # the name is stored just past the struct (topic_name)
    bint full               # backlog at its limit: warned once until it empties
    bint touched            # on a list of topics to drain (Topic.touched_next), pinned by one refs
    Topic *touched_next
    uint32_t refs           # what holds it besides its rotation: its messages (backlog, in flight,
                            # unacknowledged, delayed), subscriptions leaving, pins
    Sub **subs              # its rotation: subscriptions in subscription order
    int32_t nsubs
    int32_t subs_cap
    int32_t cursor          # index of the next turn; may equal nsubs (wraps lazily)
    Queue backlog
    int32_t waiter          # first publisher held until the backlog drains (Conn.next_waiter), -1: none
    uint32_t unacked        # its messages delivered to acknowledged subscriptions and not yet settled
    uint64_t published      # messages accepted for this topic
    uint64_t delivered      # messages handed to a subscriber's socket
    uint64_t acked          # ... and acknowledged
    uint64_t nacked         # NACKs of its messages
    uint64_t redelivered    # its messages given back for another delivery (NACK, timeout, close, unsubscribe)
    uint64_t dead_lettered  # its messages moved to <name>.dead after --max-deliveries
    # Consumer groups (groups.pxd). A topic caches the groups its messages go to besides itself;
    # a group is a Topic too (its rotation, backlog, waiters and counters), named by its key.
    Topic **groups          # a topic: the groups whose pattern matches its name (valid at groups_gen)
    int32_t ngroups
    int32_t groups_cap
    uint64_t groups_gen     # GroupIndex.gen when groups was resolved, 0: never
    uint8_t kind            # TOPIC_PLAIN, GROUP_NAMED or GROUP_WILDCARD
    bint registered         # a group in the index: messages reach it; it stays while registered
    uint16_t pattern_len    # the bytes of its name that are the pattern (a topic: all of them)
    bint wild               # a group whose pattern has a wildcard token
    double idle_since       # a named group: when its last subscriber left (monotonic), 0: it has some
    Topic *group_prev       # a registered group: the list of them all (GroupIndex.first)
    Topic *group_next


ctypedef struct TopicTable:
    Topic **buckets
    size_t nbuckets         # a power of two
    size_t count
    Topic *last             # the topic of the last PUBLISH: pipelined publishers repeat it
    uint64_t serials        # the last serial number given to a topic


cdef uint64_t topic_hash(const char *name, size_t n) noexcept
cdef char *topic_name(Topic *t) noexcept
cdef int topics_init(Memory *m, TopicTable *table) noexcept
cdef Topic *topics_find(TopicTable *table, const char *name, size_t n, uint64_t hash) noexcept
cdef Topic *topics_add(Memory *m, TopicTable *table, const char *name, size_t n, uint64_t hash) noexcept
cdef void topics_drop_if_unused(Broker b, Topic *t) noexcept
cdef void topics_unlink(TopicTable *table, Topic *t) noexcept
cdef void topic_release(Broker b, Topic *t) noexcept
cdef void topic_free(Broker b, Topic *t) noexcept
cdef uint64_t topics_next_cursor(TopicTable *table, uint64_t cursor) noexcept

cdef bint topic_has_taker(Broker b, Topic *t) noexcept
cdef Sub *topic_next_subscriber(Broker b, Topic *t) noexcept
