# Requests: request/reply (docs/protocol.md, "Request/reply"). A REQ frame is
# published like a PUB, its records carrying a reply token (messages.pxd,
# ReplyTo) that names the requester's connection by handle and generation and a
# request id the core minted for it. A REPLY frame, from any connection, goes
# straight to that connection as an RMSG frame, without a topic: the first
# reply to a waiting request wins, later ones, ones to a closed requester and
# ones to a request forgotten are dropped and counted. Each connection keeps
# the ids of its requests still waiting in a ring of REQUEST_WINDOW bits, so
# matching a reply is O(1); past that many waiting the oldest is forgotten.
# Timeouts are the client's.

from libc.stdint cimport int32_t, uint64_t


cdef enum:
    REQUEST_WINDOW = 4096   # requests of one connection waiting for a reply; a power of two


cdef extern from *:
    """
    #define PIGEON_REQ_USAGE "usage: REQ <client_id> <topic> <nbytes>, a line end, the payload, a line end"
    #define PIGEON_REPLY_USAGE "usage: REPLY <token> <nbytes>, a line end, the payload, a line end"
    """
    const char *REQ_USAGE "PIGEON_REQ_USAGE"
    const char *REPLY_USAGE "PIGEON_REPLY_USAGE"


cdef int on_req(Broker b, int32_t h, Topic *t, char *id, size_t id_len, char *name, size_t name_len,
                const char *data, size_t n) except -1
cdef int on_reply(Broker b, int32_t h, char *token, size_t tl, const char *data, size_t n) except -1
cdef void request_accepted(Broker b, int32_t h) noexcept
cdef void requests_free(Broker b, Conn *c) noexcept
