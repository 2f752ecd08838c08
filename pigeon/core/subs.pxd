# Subscriptions: the link between a connection and a topic. Each topic's
# rotation is an array of them, and so is each connection's list. A plain
# subscription gets MESSAGE lines, settled once handed to its socket; an
# acknowledged one gets DELIVER lines with a delivery tag and holds at most
# `prefetch` of them until they are acknowledged (acks.pxd).

from libc.stdint cimport int32_t, uint32_t


cdef struct Sub:
    Topic *topic
    int32_t conn                # the subscribing connection's handle
    bint ack                    # acknowledged: DELIVER lines, settled by ACK
    uint32_t prefetch           # unacknowledged messages it may hold (a plain one: UINT32_MAX)
    uint32_t unacked            # unacknowledged messages it holds now
    bint in_rotation            # in its topic's rotation; out of it (while ending), it pins its topic


cdef Sub *sub_find(Conn *c, Topic *t) noexcept
cdef Sub *sub_add(Broker b, int32_t h, Topic *t) noexcept
cdef void sub_leave_rotation(Sub *s) noexcept
cdef void sub_free(Broker b, Sub *s) noexcept
cdef bint sub_can_take(Sub *s) noexcept
