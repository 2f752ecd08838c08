# cython: language_level=3
"""The successor's index of one owner's replicated messages not done yet, in C.

``ReplicaIndex`` keeps the chunks of records it was given (bytes, one Python object per chunk)
and, per message not done, a C entry (seq, slot, chunk, offset) in an array sorted by seq; a
``DONE`` record's range is applied to that array in C. No Python object per message: they are
made only when a slot is taken over (``take``, once per failover). pigeon/cluster/replication.py
(``ReplicaStore``) keeps one per owner (docs/cluster.md, "Replication").
"""

from libc.stdint cimport uint8_t, uint16_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memmove

from pigeon.cluster._records cimport (
    REC_DONE, REC_PUBLISH, RECORD_HEAD, SLOTS, TOPIC_AT, get16, get32, get64, crc32_init, publish_slot, record_size,
)

crc32_init()


ctypedef struct Entry:
    uint64_t seq
    uint64_t offset     # where its PUBLISH record starts in its chunk
    uint64_t chunk      # the chunk's number (chunks are numbered from 0 as they come)
    uint16_t slot
    uint8_t live        # 0: done (kept until the array is compacted)


# No chunk (_current when keep walks none).
cdef uint64_t NONE = <uint64_t>-1

# Done entries are squeezed out of the array once they are more than the live ones and this many.
COMPACT_AT = 4096


cdef class ReplicaIndex:
    """One owner's replicated messages not done, by seq; ``len()`` is how many there are."""

    cdef Entry *_entries        # sorted by seq, live and done; _entries[_head:_count] are in use
    cdef size_t _head
    cdef size_t _count
    cdef size_t _cap
    cdef size_t _live
    cdef list _chunks           # chunk number _base + i is _chunks[i], None once nothing is in it
    cdef uint64_t _base
    cdef uint64_t *_refs        # per chunk of _chunks, its live entries
    cdef size_t _refs_cap
    cdef uint64_t _current      # the chunk keep is walking (kept whatever _refs says meanwhile)

    def __cinit__(self):
        self._chunks = []
        self._current = NONE

    def __dealloc__(self):
        free(self._entries)
        free(self._refs)

    def __len__(self):
        return self._live

    cdef size_t _find(self, uint64_t seq) noexcept:
        """The index of the first entry in use with a seq not below ``seq``."""
        cdef size_t low = self._head, high = self._count, mid
        while low < high:
            mid = (low + high) // 2
            if self._entries[mid].seq < seq:
                low = mid + 1
            else:
                high = mid
        return low

    cdef int _add(self, uint64_t seq, uint16_t slot, uint64_t chunk, uint64_t offset) except -1:
        """A PUBLISH record: the message ``seq`` is not done (again, if it came before)."""
        cdef size_t at = self._count
        cdef Entry *grown
        cdef Entry *e
        if self._count > self._head and self._entries[self._count - 1].seq >= seq:
            at = self._find(seq)  # not in seq order: a snapshot of slots that moved here
            if at < self._count and self._entries[at].seq == seq:
                e = &self._entries[at]
                if e.live:
                    self._release(e.chunk)
                else:
                    self._live += 1
                e.offset, e.chunk, e.slot, e.live = offset, chunk, slot, 1
                return 0
        if self._count == self._cap:
            if self._head:
                self._compact()
            if self._count == self._cap:
                self._cap = self._cap * 2 if self._cap else 1024
                grown = <Entry *>realloc(self._entries, self._cap * sizeof(Entry))
                if grown == NULL:
                    raise MemoryError()
                self._entries = grown
            at = self._find(seq)
        if at < self._count:
            memmove(&self._entries[at + 1], &self._entries[at], (self._count - at) * sizeof(Entry))
        self._count += 1
        self._live += 1
        e = &self._entries[at]
        e.seq, e.offset, e.chunk, e.slot, e.live = seq, offset, chunk, slot, 1
        return 0

    cdef void _done(self, uint64_t first, uint64_t last) noexcept:
        """A DONE record: the messages ``first`` to ``last`` are done."""
        cdef size_t at = self._find(first)
        cdef Entry *e
        while at < self._count and self._entries[at].seq <= last:
            e = &self._entries[at]
            if e.live:
                e.live = 0
                self._live -= 1
                self._release(e.chunk)
            at += 1
        while self._head < self._count and not self._entries[self._head].live:
            self._head += 1
        if self._count - self._head - self._live > self._live + COMPACT_AT:
            self._compact()

    cdef void _compact(self) noexcept:
        """Squeeze the done entries out of the array."""
        cdef size_t i, kept = 0
        for i in range(self._head, self._count):
            if self._entries[i].live:
                self._entries[kept] = self._entries[i]
                kept += 1
        self._head = 0
        self._count = kept

    cdef void _release(self, uint64_t chunk) noexcept:
        """One entry less in ``chunk``: once none is left, the chunk's bytes go."""
        cdef size_t i = chunk - self._base
        self._refs[i] -= 1
        if self._refs[i] == 0 and chunk != self._current:
            self._chunks[i] = None

    cdef int _new_chunk(self, bytes chunk) except -1:
        """Keep ``chunk`` (it holds messages not done), first dropping the chunks emptied before it."""
        cdef size_t gone = 0, kept
        cdef uint64_t *grown
        while gone < len(self._chunks) and self._refs[gone] == 0:
            gone += 1
        if gone:
            kept = len(self._chunks) - gone
            del self._chunks[:gone]
            memmove(self._refs, self._refs + gone, kept * sizeof(uint64_t))
            self._base += gone
        if len(self._chunks) == self._refs_cap:
            self._refs_cap = self._refs_cap * 2 if self._refs_cap else 64
            grown = <uint64_t *>realloc(self._refs, self._refs_cap * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self._refs = grown
        self._refs[len(self._chunks)] = 0
        self._chunks.append(chunk)
        return 0

    def keep(self, bytes chunk):
        """Index the records of ``chunk``: each PUBLISH adds its message, each DONE removes its
        range; the chunk is kept while a message of it is not done."""
        cdef const unsigned char *p = <const unsigned char *>chunk
        cdef size_t n = len(chunk), pos = 0, size
        cdef size_t i
        try:
            while True:
                size = record_size(p, pos, n)
                if size == 0:
                    break
                if p[pos + RECORD_HEAD] == REC_PUBLISH:
                    if self._current == NONE:
                        self._new_chunk(chunk)
                        self._current = self._base + len(self._chunks) - 1
                    # counted first: the entry it replaces may be in this chunk
                    self._refs[self._current - self._base] += 1
                    self._add(get64(p + pos + RECORD_HEAD + 1), publish_slot(p + pos), self._current, pos)
                elif p[pos + RECORD_HEAD] == REC_DONE:
                    self._done(get64(p + pos + RECORD_HEAD + 1), get64(p + pos + RECORD_HEAD + 9))
                pos += size
        finally:
            if self._current != NONE:
                i = self._current - self._base
                self._current = NONE
                if self._refs[i] == 0:
                    self._chunks[i] = None

    def take(self, slots):
        """The messages of ``slots`` not done, in seq order, removed from the index: a list of
        (topic field, message)."""
        cdef bint wanted[SLOTS]
        cdef size_t i, at
        cdef Entry *e
        cdef const unsigned char *record
        cdef size_t topic_len, size
        for i in range(SLOTS):
            wanted[i] = i in slots
        taken = []
        for at in range(self._head, self._count):
            e = &self._entries[at]
            if not e.live or not wanted[e.slot]:
                continue
            chunk = self._chunks[e.chunk - self._base]
            record = <const unsigned char *>(<bytes>chunk) + e.offset
            topic_len = get16(record + TOPIC_AT)
            size = get32(record + TOPIC_AT + 2 + topic_len)
            taken.append((
                record[TOPIC_AT + 2:TOPIC_AT + 2 + topic_len],
                record[TOPIC_AT + 6 + topic_len:TOPIC_AT + 6 + topic_len + size],
            ))
            e.live = 0
            self._live -= 1
            self._release(e.chunk)
        while self._head < self._count and not self._entries[self._head].live:
            self._head += 1
        return taken
