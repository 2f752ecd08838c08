# Commands: one handler per protocol command, each given the arguments after
# the command word as a pointer into the read buffer. A handler checks its
# arguments, changes the state through the other parts and writes the reply;
# every refusal is an ERROR line that leaves the state as it was.

from libc.stdint cimport int32_t


cdef enum:
    NACK_DELAY_MAX = 86_400_000     # a day, in milliseconds


cdef extern from *:
    """
    #define PIGEON_CONNECT_USAGE "usage: CONNECT [<user> <password>]"
    #define PIGEON_SUBSCRIBE_USAGE "usage: SUBSCRIBE <client_id> <topic> [ACK [PREFETCH <n>]]"
    #define PIGEON_ACK_USAGE "usage: ACK <client_id> <tag>|<first>-<last>"
    #define PIGEON_NACK_USAGE "usage: NACK <client_id> <tag>|<first>-<last> [<delay_ms>]"
    #define PIGEON_PUB_USAGE "usage: PUB <client_id> <topic> <nbytes>, a line end, the payload, a line end"
    #define PIGEON_DESTROY_USAGE "usage: DESTROY <client_id> <topic_or_pattern> GROUP <name>"
    #define PIGEON_GROUP_NAME_RULE \
        "group name must be 1 to 64 bytes without whitespace, control, format or separator characters"
    """
    const char *CONNECT_USAGE "PIGEON_CONNECT_USAGE"
    const char *SUBSCRIBE_USAGE "PIGEON_SUBSCRIBE_USAGE"
    const char *ACK_USAGE "PIGEON_ACK_USAGE"
    const char *NACK_USAGE "PIGEON_NACK_USAGE"
    const char *PUB_USAGE "PIGEON_PUB_USAGE"
    const char *DESTROY_USAGE "PIGEON_DESTROY_USAGE"
    const char *GROUP_NAME_RULE "PIGEON_GROUP_NAME_RULE"


cdef void connect_client(Broker b, int32_t h, bint login) noexcept
cdef int on_connect(Broker b, int32_t h, char *args, size_t n) except -1
cdef Topic *subscription_topic(Broker b, char *name, size_t n, char *group, size_t gl) noexcept
cdef int on_subscribe(Broker b, int32_t h, char *args, size_t n) except -1
cdef int on_unsubscribe(Broker b, int32_t h, char *args, size_t n) except -1
cdef int on_publish(Broker b, int32_t h, char *args, size_t n) except -1
cdef Topic *pub_fast(Broker b, int32_t h, char **args, size_t *n) noexcept
cdef int pub_to_topic(Broker b, int32_t h, Topic *t, const char *data, size_t n) noexcept
cdef int on_pub(Broker b, int32_t h, Topic *t, char *id, size_t id_len, char *name, size_t name_len,
                const char *data, size_t n) except -1
cdef int on_ping(Broker b, int32_t h, char *args, size_t n) except -1
cdef int on_disconnect(Broker b, int32_t h, char *args, size_t n) except -1
cdef int on_stats(Broker b, int32_t h, char *args, size_t n) except -1
cdef int on_hello(Broker b, int32_t h, char *args, size_t n) except -1
cdef int on_ack(Broker b, int32_t h, char *args, size_t n) except -1
cdef int on_nack(Broker b, int32_t h, char *args, size_t n) except -1
cdef int on_destroy(Broker b, int32_t h, char *args, size_t n) except -1
