# The integers of log records are little-endian whatever the host (docs/storage.md, "The format").
# The core (pigeon/core/log.pxi) and replication's walks (pigeon/cluster/_records.pxd) read them
# with these. Each is one expression over the bytes, which the compiler turns into a single load
# on a little-endian CPU (a loop over the bytes was not: the recovery scan ran twice the
# instructions with one).

from libc.stdint cimport uint32_t, uint64_t


cdef inline uint32_t get16(const void *p) noexcept nogil:
    cdef const unsigned char *b = <const unsigned char *>p
    return b[0] | (<uint32_t>b[1] << 8)


cdef inline uint32_t get32(const void *p) noexcept nogil:
    cdef const unsigned char *b = <const unsigned char *>p
    return b[0] | (<uint32_t>b[1] << 8) | (<uint32_t>b[2] << 16) | (<uint32_t>b[3] << 24)


cdef inline uint64_t get64(const void *p) noexcept nogil:
    cdef const unsigned char *b = <const unsigned char *>p
    return get32(b) | (<uint64_t>get32(b + 4) << 32)


cdef inline void put16(void *p, uint32_t v) noexcept nogil:
    cdef unsigned char *b = <unsigned char *>p
    b[0] = <unsigned char>v
    b[1] = <unsigned char>(v >> 8)


cdef inline void put32(void *p, uint32_t v) noexcept nogil:
    cdef unsigned char *b = <unsigned char *>p
    b[0] = <unsigned char>v
    b[1] = <unsigned char>(v >> 8)
    b[2] = <unsigned char>(v >> 16)
    b[3] = <unsigned char>(v >> 24)


cdef inline void put64(void *p, uint64_t v) noexcept nogil:
    put32(p, <uint32_t>v)
    put32(<unsigned char *>p + 4, <uint32_t>(v >> 32))
