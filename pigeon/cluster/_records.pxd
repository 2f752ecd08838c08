# Log records as replication reads them (docs/storage.md, "The format"), for the C walks of
# _split.pyx (the owner) and _index.pyx (the successor). The records come from this node's core
# or from an owner's core: lengths are trusted, checksums not checked again, and a walk stops at
# zeros (a segment made ahead) or at a record that would run past the end.

from libc.stdint cimport uint32_t

from pigeon._little_endian cimport get16, get32
from pigeon.cluster._slot cimport SLOTS, topic_slot


cdef enum:
    RECORD_HEAD = 8         # u32 body length, u32 CRC-32C of the body
    REC_PUBLISH = 1         # u64 seq, u64 time_ms, u32 attempt, u16 topic_len, topic, u32 len, payload
    REC_DONE = 2            # u64 first, u64 last
    REC_DELIVERED = 3       # u64 seq, u32 attempt
    TOPIC_AT = RECORD_HEAD + 1 + 8 + 8 + 4   # a PUBLISH record's topic length, from its start
    SEQ_AT = RECORD_HEAD + 1                 # a PUBLISH's, DONE's (first) or DELIVERED's seq
    ATTEMPT_AT = RECORD_HEAD + 1 + 8         # a DELIVERED record's attempt


cdef inline size_t record_size(const unsigned char *data, size_t pos, size_t n) noexcept nogil:
    """The size of the record at ``pos``, or 0 at the end of the records."""
    cdef size_t body
    if n - pos <= RECORD_HEAD:
        return 0
    body = get32(data + pos)
    if body == 0 or body > n - pos - RECORD_HEAD:
        return 0
    return RECORD_HEAD + body


cdef inline uint32_t publish_slot(const unsigned char *record) noexcept nogil:
    """The slot of a PUBLISH record's topic: a group copy's topic field is ``<topic> <group key>``."""
    cdef size_t n = get16(record + TOPIC_AT), i = 0
    cdef const unsigned char *topic = record + TOPIC_AT + 2
    while i < n and topic[i] != 0x20:
        i += 1
    return topic_slot(topic, i)
