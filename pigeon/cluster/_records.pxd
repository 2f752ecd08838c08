# Log records as replication reads them (docs/storage.md, "The format"), for the C walks of
# _split.pyx (the owner) and _index.pyx (the successor). The records come from this node's core
# or from an owner's core: lengths are trusted, checksums not checked again, and a walk stops at
# zeros (a segment made ahead) or at a record that would run past the end.

from libc.stdint cimport uint32_t

from pigeon._little_endian cimport get16, get32


cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    /* CRC-32 as zlib computes it (the slot of a topic, pigeon/cluster/slots.py), by table. The
       table is built once, when a module that includes this is imported (crc32_init): the walks
       run on several threads without the GIL, and a table built on first use could be seen by
       one thread half-filled while another builds it. */
    static uint32_t pigeon_crc32_table[256];
    static void pigeon_crc32_init(void) {
        uint32_t c, k;
        size_t i;
        for (i = 0; i < 256; i++) {
            c = (uint32_t)i;
            for (k = 0; k < 8; k++)
                c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            pigeon_crc32_table[i] = c;
        }
    }
    static uint32_t pigeon_crc32(const unsigned char *p, size_t n) {
        uint32_t crc = 0xFFFFFFFFu;
        size_t i;
        for (i = 0; i < n; i++)
            crc = pigeon_crc32_table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
        return crc ^ 0xFFFFFFFFu;
    }
    """
    # every module that cimports this calls crc32_init() once, at its import, before any walk
    void crc32_init "pigeon_crc32_init"() noexcept nogil
    uint32_t crc32 "pigeon_crc32"(const unsigned char *p, size_t n) noexcept nogil


cdef enum:
    SLOTS = 256             # pigeon/cluster/slots.py
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
    return crc32(topic, i) % SLOTS
