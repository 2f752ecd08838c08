# Authentication and permissions (issue 14). With Broker(auth=True), a
# CONNECT with credentials asks the server (on_auth) and the connection is not
# read until it answers (auth_result); a bare CONNECT succeeds only for an
# identity granted beforehand (a client certificate). grant() gives a
# connection its user and the topics it may publish to and subscribe to, as
# patterns compiled here into one counted block per set (NATS rules: tokens
# split on '.', `*` one non-empty token, `>` as the last token the one or more
# tokens that follow, anything else literal). PUBLISH, SUBSCRIBE and STATS
# CONNECTIONS check them before changing anything; a connection remembers the
# last topic it was allowed to publish to by the topic's serial number, so
# a pipelined publisher pays one comparison per message.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t


cdef enum:
    AUTH_WAIT = 2           # a handler's answer: the line ran and the connection waits for auth_result

    PATTERN_EXACT = 0       # a name compared as is
    PATTERN_PREFIX = 1      # `a.b.>`: the name starts with `a.b.` and goes on
    PATTERN_TOKENS = 2      # has a `*` token: compared token by token (and maybe a trailing `>`)


ctypedef struct Pattern:
    uint32_t offset         # its text in the set's text (PermSet.text), without a trailing `.>`
    uint16_t len
    uint8_t kind            # PATTERN_EXACT, PATTERN_PREFIX or PATTERN_TOKENS
    uint8_t tail            # ends with `>`: one or more tokens must follow the text


cdef struct PermSet:
    # One block: this header, `count` patterns, then their texts.
    size_t size             # bytes of the block (for mem_free)
    uint32_t count
    Pattern items[1]        # `count` of them (at least room for one)


cdef bint perms_allow(const PermSet *set, const char *name, size_t n) noexcept
cdef PermSet *perms_compile(Memory *m, object patterns) except? NULL
cdef void perms_free(Memory *m, PermSet *set) noexcept
cdef void auth_forget(Broker b, Conn *c) noexcept
cdef bint auth_may_publish(Broker b, int32_t h, Topic *t, const char *name, size_t n) noexcept
cdef bint auth_may_subscribe(Broker b, int32_t h, const char *name, size_t n) noexcept
cdef bint auth_may_list_connections(Broker b, int32_t h) noexcept
cdef int auth_connect(Broker b, int32_t h, char *user, size_t ul, char *password, size_t pl) except -1
cdef int auth_answer(Broker b, int32_t h, bint ok) except -1
cdef int auth_grant(Broker b, int32_t h, str user, object publish, object subscribe, bint admin) except -1
