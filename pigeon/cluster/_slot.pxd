# The slot of a topic (docs/cluster.md, "Design"): the one definition, for slot_of in _slot.pyx
# (the clients and the nodes route by it) and for the C walks of replication (_records.pxd).

from libc.stdint cimport uint32_t

from pigeon._crc32c cimport crc32c_run


cpdef enum:
    SLOTS = 256


cdef inline uint32_t topic_slot(const unsigned char *topic, size_t n) noexcept nogil:
    """CRC-32C of the topic's name modulo SLOTS."""
    return crc32c_run(0, topic, n) % SLOTS
