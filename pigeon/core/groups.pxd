# Consumer groups and wildcard subscriptions (issue 15). A message published to
# a topic goes to one subscriber of each group whose pattern matches the topic,
# round robin inside each group. A group is a Topic struct (its rotation,
# backlog, publishers waiting for it and counters serve as they do for a
# topic), in the topic table under its key: `<pattern> <name>` for a named
# group, `<pattern> ` for the default group of a wildcard pattern (a space
# never occurs in a topic, so keys and topics cannot meet). The default group
# of an exact topic is the topic itself (v1). A group's copies of messages are
# records of their own (Msg.topic the group, Msg.origin the topic published to).
#
# Registered groups are indexed by pattern in a trie with one node per pattern
# prefix (`a`, `a.*`, `a.*.>`), the nodes in a hash table of their own keyed by
# their text, as NATS's sublist: the groups of a new topic are found by walking
# its tokens, O(tokens) lookups (times the wildcard branches taken), never by
# looking at every pattern. Each topic caches the groups it resolved to with
# the index's generation, which changes whenever a group is registered or ends.

from libc.stdint cimport uint8_t, uint64_t


cdef enum:
    TOPIC_PLAIN = 0         # a topic published to (and its default group)
    GROUP_NAMED = 1         # SUBSCRIBE ... GROUP <name>: lives until --group-ttl after its last subscriber
    GROUP_WILDCARD = 2      # the default group of a wildcard pattern: ends with its last subscriber

    GROUP_NAME_MAX = 64     # bytes of a group name


ctypedef struct GroupIndex:
    TopicTable nodes        # the trie's nodes, keyed by the pattern prefix they stand for
    Topic *root             # the empty prefix
    uint64_t gen            # from 1; topics resolved at another generation resolve again
    size_t count            # registered groups
    size_t held             # groups in the topic table, registered or not (ended, still pinned)
    size_t wildcard_subs    # subscriptions whose pattern has a wildcard
    uint64_t dropped        # group copies dropped because their group ended
    uint64_t expired        # named groups ended by --group-ttl
    uint64_t destroyed      # ... by DESTROY
    Topic *first            # every registered group
    double ttl              # --group-ttl, seconds


cdef int groups_init(Broker b) noexcept
cdef void groups_free(Broker b) noexcept
cdef bint is_pattern(const char *name, size_t n) noexcept
cdef Topic *group_join(Broker b, int32_t h, const char *pattern, size_t pn, const char *name, size_t nl,
                       bint wildcard) noexcept
cdef Topic *group_find(Broker b, const char *pattern, size_t pn, const char *name, size_t nl) noexcept
cdef Topic *group_recover(Broker b, const char *key, size_t n) noexcept
cdef void group_left(Broker b, Topic *g) noexcept
cdef void group_end(Broker b, Topic *g) noexcept
cdef void groups_expire(Broker b) noexcept
cdef int32_t groups_of(Broker b, Topic *t) noexcept
cdef bint group_drops(Broker b, Msg *msg) noexcept
cdef list groups_report(Broker b, Topic *t)
cdef dict groups_page(Broker b, uint64_t cursor, size_t count)
