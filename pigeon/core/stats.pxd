# Stats: the counters (plain increments on the hot path) and the reports built
# from them and from the tables: server-wide figures, and paged listings of
# topics and connections whose every page is bounded in size, so no reply and
# no monitoring request holds the broker for long.

from libc.stdint cimport int32_t, uint64_t


cdef enum:
    STATS_PAGE_DEFAULT = 100    # entries per page unless asked otherwise
    STATS_PAGE_MAX = 1000
    STATS_PAGE_BYTES = 256 * 1024   # a page stops growing past about this much JSON
    STATS_SUBSCRIPTIONS_LISTED = 100  # subscriptions named per connection


cdef extern from *:
    """
    #define PIGEON_STATS_USAGE "usage: STATS [TOPICS|CONNECTIONS [<cursor> [<count>]]]"
    """
    const char *STATS_USAGE "PIGEON_STATS_USAGE"


ctypedef struct Counters:
    uint64_t connections_total
    uint64_t commands[CMD_KINDS]
    uint64_t published          # PUBLISH accepted
    uint64_t delivered          # MESSAGE lines handed to subscribers' transports
    uint64_t backlogged         # messages that went through a backlog
    uint64_t refused            # PUBLISH refused (backlog or memory full)
    uint64_t errors[ERR_KINDS]  # ERROR lines sent
    uint64_t rejected           # connections refused over max_connections
    uint64_t idle_closed        # connections closed by the idle timeout
    uint64_t write_timeouts     # connections closed for leaving their output untaken
    uint64_t requeued           # messages given back to their topic by a connection that could not take them
    uint64_t lost               # messages dropped because memory ran out while giving them back
    uint64_t read_pauses        # times the broker stopped reading a connection that did not take its output
    uint64_t bytes_in
    uint64_t bytes_out
    uint64_t slow_consumers     # connections dropped over max_pending
    uint64_t publish_holds      # PUBLISH commands that had to wait for flow control
    uint64_t acks               # deliveries settled by ACK
    uint64_t nacks              # deliveries given back by NACK
    uint64_t redelivered        # messages given back for another delivery (NACK, timeout, close, unsubscribe)
    uint64_t ack_timeouts       # deliveries given back by --ack-timeout
    uint64_t dead_lettered      # messages moved to <topic>.dead after --max-deliveries
    uint64_t dead_letters_dropped  # ... that <topic>.dead could not take (name too long, limits): dropped
    uint64_t auth_failures      # ERROR AUTH_FAILED sent (wrong user or password)
    uint64_t logins             # CONNECT that logged in as a user: with credentials, or a granted identity
    uint64_t v1_altered         # MESSAGE/DELIVER lines whose payload was altered to fit a v1 text line
    uint64_t requests           # REQ accepted
    uint64_t replies            # REPLY handed to a waiting requester (RMSG)
    uint64_t replies_dropped    # REPLY to a request not waiting: answered already, forgotten, requester gone
    uint64_t replies_malformed  # REPLY whose token is not one (ERROR BAD_REPLY_TOKEN)
    uint64_t requests_forgotten # requests forgotten unanswered past REQUEST_WINDOW waiting on a connection


cdef dict stats_dict(Broker b)
cdef dict topics_page(Broker b, size_t cursor, size_t count)
cdef dict connections_page(Broker b, size_t cursor, size_t count)
cdef void warn(Broker b, str text) noexcept
