# cython: language_level=3
"""The successor's index of one owner's replicated messages not done yet, in C.

``ReplicaIndex`` keeps the chunks of records it was given (bytes, one Python object per chunk)
and, per message not done, a C entry in an array sorted by seq: its seq and slot, where its
``PUBLISH`` record is (chunk, offset) and where its last ``DELIVERED`` record is, if it has one. A
``DONE`` record's range is applied to that array in C. No Python object per message: the records
of a slot's messages are copied out only when the slot is taken over (``take``, once per failover,
one bytes object). pigeon/cluster/replication.py (``ReplicaStore``) keeps one per owner
(docs/cluster.md, "Replication").
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memmove

from pigeon._crc32c cimport crc32c_choose
from pigeon._little_endian cimport get32, get64
from pigeon.cluster._records cimport (
    ATTEMPT_AT, REC_DELIVERED, REC_DONE, REC_PUBLISH, RECORD_HEAD, SEQ_AT, SLOTS, publish_slot,
    record_size,
)

crc32c_choose(1)


ctypedef struct Entry:
    uint64_t seq
    uint64_t offset             # where its PUBLISH record starts in its chunk
    uint64_t chunk              # the chunk's number (chunks are numbered from 0 as they come)
    uint64_t delivered_offset   # where its last DELIVERED record starts in its chunk
    uint64_t delivered_chunk    # that record's chunk, NONE while it has none
    uint32_t attempt            # that record's attempt
    uint16_t slot
    uint8_t live                # 0: done (kept until the array is compacted)


# No chunk (_current when keep walks none; an entry's delivered_chunk when it has no DELIVERED).
cdef uint64_t NONE = <uint64_t>-1

# Done entries are squeezed out of the array once they are more than the live ones and this many.
COMPACT_AT = 4096


cdef inline size_t _size_at(const unsigned char *record) noexcept:
    """The size of the record that starts at ``record`` (a kept one: its length was checked)."""
    return RECORD_HEAD + get32(record)


cdef class ReplicaIndex:
    """One owner's replicated messages not done, by seq, each with its last ``DELIVERED`` record;
    ``len()`` is how many there are."""

    cdef Entry *_entries        # sorted by seq, live and done; _entries[_head:_count] are in use
    cdef size_t _head
    cdef size_t _count
    cdef size_t _cap
    cdef size_t _live
    cdef list _chunks           # chunk number _base + i is _chunks[i], None once nothing is in it
    cdef uint64_t _base
    cdef uint64_t *_refs        # per chunk of _chunks, the records of live entries in it
    cdef size_t _refs_cap
    cdef uint64_t _current      # the chunk keep is walking (kept whatever _refs says meanwhile)
    cdef size_t _nbytes         # the bytes of the records kept: live messages' PUBLISH and DELIVERED

    def __cinit__(self):
        self._chunks = []
        self._current = NONE

    def __dealloc__(self):
        free(self._entries)
        free(self._refs)

    def __len__(self):
        return self._live

    @property
    def nbytes(self):
        """The bytes of the records ``records()`` returns: what a file of this copy needs."""
        return self._nbytes

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

    cdef Entry *_live_entry(self, uint64_t seq) noexcept:
        """The live entry of ``seq``, or NULL."""
        cdef size_t at = self._find(seq)
        if at < self._count and self._entries[at].seq == seq and self._entries[at].live:
            return &self._entries[at]
        return NULL

    cdef int _add(self, uint64_t seq, uint16_t slot, uint64_t chunk, uint64_t offset) except -1:
        """A PUBLISH record: the message ``seq`` is not done (again, if it came before; a live one
        keeps its DELIVERED record: the same message, sent again in a snapshot)."""
        cdef size_t at = self._count
        cdef Entry *grown
        cdef Entry *e
        if self._count > self._head and self._entries[self._count - 1].seq >= seq:
            at = self._find(seq)  # not in seq order: a snapshot of slots that moved here
            if at < self._count and self._entries[at].seq == seq:
                e = &self._entries[at]
                if e.live:
                    self._nbytes -= _size_at(self._record(e.chunk, e.offset))
                    self._release(e.chunk)
                else:
                    self._live += 1
                e.offset, e.chunk, e.slot, e.live = offset, chunk, slot, 1
                self._nbytes += _size_at(self._record(chunk, offset))
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
        e.delivered_chunk, e.delivered_offset, e.attempt = NONE, 0, 0
        self._nbytes += _size_at(self._record(chunk, offset))
        return 0

    cdef void _delivered(self, Entry *e, uint32_t attempt, uint64_t chunk, uint64_t offset) noexcept:
        """A DELIVERED record of the live message ``e``: its last one (the one it replaces goes)."""
        if e.delivered_chunk != NONE:
            self._nbytes -= _size_at(self._record(e.delivered_chunk, e.delivered_offset))
            self._release(e.delivered_chunk)
        e.delivered_chunk, e.delivered_offset, e.attempt = chunk, offset, attempt
        self._nbytes += _size_at(self._record(chunk, offset))

    cdef void _drop(self, Entry *e) noexcept:
        """``e`` is done (or taken, or forgotten): its records' chunks may go."""
        e.live = 0
        self._live -= 1
        self._nbytes -= _size_at(self._record(e.chunk, e.offset))
        self._release(e.chunk)
        if e.delivered_chunk != NONE:
            self._nbytes -= _size_at(self._record(e.delivered_chunk, e.delivered_offset))
            self._release(e.delivered_chunk)
            e.delivered_chunk = NONE

    cdef void _settle(self) noexcept:
        """After entries were dropped: skip the done ones at the head, squeeze them out once many."""
        while self._head < self._count and not self._entries[self._head].live:
            self._head += 1
        if self._count - self._head - self._live > self._live + COMPACT_AT:
            self._compact()

    cdef void _done(self, uint64_t first, uint64_t last) noexcept:
        """A DONE record: the messages ``first`` to ``last`` are done."""
        cdef size_t at = self._find(first)
        while at < self._count and self._entries[at].seq <= last:
            if self._entries[at].live:
                self._drop(&self._entries[at])
            at += 1
        self._settle()

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
        """One record less kept in ``chunk``: once none is left, the chunk's bytes go."""
        cdef size_t i = chunk - self._base
        self._refs[i] -= 1
        if self._refs[i] == 0 and chunk != self._current:
            self._chunks[i] = None

    cdef int _new_chunk(self, bytes chunk) except -1:
        """Keep ``chunk`` (it holds records of messages not done), first dropping the chunks emptied
        before it."""
        cdef size_t gone = 0, held = len(self._chunks)
        cdef uint64_t *grown
        while gone < held and self._refs[gone] == 0:
            gone += 1
        if gone:
            held -= gone
            del self._chunks[:gone]
            memmove(self._refs, self._refs + gone, held * sizeof(uint64_t))
            self._base += gone
        if held == self._refs_cap:
            self._refs_cap = self._refs_cap * 2 if self._refs_cap else 64
            grown = <uint64_t *>realloc(self._refs, self._refs_cap * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self._refs = grown
        self._refs[held] = 0
        self._chunks.append(chunk)
        return 0

    cdef uint64_t _hold(self, bytes chunk) except? 0:
        """The number of ``chunk``, the one keep walks, counted once more: made one of the kept
        chunks the first time a record of it is kept. Counted before the record is indexed: the
        record it replaces may be in this chunk."""
        if self._current == NONE:
            self._new_chunk(chunk)
            self._current = self._base + len(self._chunks) - 1
        self._refs[self._current - self._base] += 1
        return self._current

    def keep(self, bytes chunk):
        """Index the records of ``chunk``: each PUBLISH adds its message, each DELIVERED becomes
        its message's last, each DONE removes its range; the chunk is kept while a record of it
        is. Returns the bytes of the whole records walked: less than ``len(chunk)`` when it ends
        with a torn one (a file cut off mid-write)."""
        cdef const unsigned char *p = <const unsigned char *>chunk
        cdef size_t n = len(chunk), pos = 0, size
        cdef size_t i
        cdef uint32_t attempt
        cdef Entry *e
        try:
            while True:
                size = record_size(p, pos, n)
                if size == 0:
                    break
                if p[pos + RECORD_HEAD] == REC_PUBLISH:
                    self._add(get64(p + pos + SEQ_AT), publish_slot(p + pos), self._hold(chunk), pos)
                elif p[pos + RECORD_HEAD] == REC_DELIVERED:
                    # every successor gets every DELIVERED (of other slots too): only those of the
                    # messages live here count, and an older one (a snapshot brings it again) does not
                    e = self._live_entry(get64(p + pos + SEQ_AT))
                    attempt = get32(p + pos + ATTEMPT_AT)
                    if e != NULL and (e.delivered_chunk == NONE or attempt >= e.attempt):
                        self._delivered(e, attempt, self._hold(chunk), pos)
                elif p[pos + RECORD_HEAD] == REC_DONE:
                    self._done(get64(p + pos + SEQ_AT), get64(p + pos + SEQ_AT + 8))
                pos += size
        finally:
            if self._current != NONE:
                i = self._current - self._base
                self._current = NONE
                if self._refs[i] == 0:
                    self._chunks[i] = None
        return pos

    def take(self, slots):
        """The messages of ``slots`` not done, removed from the index: in seq order, each one's
        PUBLISH record followed by its last DELIVERED record if it has one, as one bytes object
        (what ``Broker.take_over`` puts back)."""
        cdef bint wanted[SLOTS]
        cdef size_t i
        for i in range(<size_t>SLOTS):
            wanted[i] = i in slots
        taken = self._copy(wanted, True)
        self._settle()
        return taken

    def records(self):
        """Every message not done, as ``take`` gives them, left in the index: what a file of this
        copy holds once it is written anew."""
        cdef bint wanted[SLOTS]
        cdef size_t i
        for i in range(<size_t>SLOTS):
            wanted[i] = True
        return self._copy(wanted, False)

    cdef bytes _copy(self, const bint *wanted, bint drop):
        """The records of the live messages of the ``wanted`` slots, in seq order, each PUBLISH
        followed by its last DELIVERED; with ``drop``, those messages leave the index."""
        cdef size_t at, total = 0
        cdef Entry *e
        cdef char *out
        cdef const unsigned char *record
        for at in range(self._head, self._count):
            e = &self._entries[at]
            if e.live and wanted[e.slot]:
                total += _size_at(self._record(e.chunk, e.offset))
                if e.delivered_chunk != NONE:
                    total += _size_at(self._record(e.delivered_chunk, e.delivered_offset))
        copied = PyBytes_FromStringAndSize(NULL, total)
        out = PyBytes_AS_STRING(copied)
        for at in range(self._head, self._count):
            e = &self._entries[at]
            if not e.live or not wanted[e.slot]:
                continue
            record = self._record(e.chunk, e.offset)
            memcpy(out, record, _size_at(record))
            out += _size_at(record)
            if e.delivered_chunk != NONE:
                record = self._record(e.delivered_chunk, e.delivered_offset)
                memcpy(out, record, _size_at(record))
                out += _size_at(record)
            if drop:
                self._drop(e)
        return copied

    def forget(self, slots):
        """Drop the messages of ``slots`` not done (another node took them over); returns how many."""
        cdef bint wanted[SLOTS]
        cdef size_t i, at, forgotten = 0
        for i in range(<size_t>SLOTS):
            wanted[i] = i in slots
        for at in range(self._head, self._count):
            if self._entries[at].live and wanted[self._entries[at].slot]:
                self._drop(&self._entries[at])
                forgotten += 1
        self._settle()
        return forgotten

    cdef const unsigned char *_record(self, uint64_t chunk, uint64_t offset) noexcept:
        """Where the record at ``offset`` of kept chunk number ``chunk`` starts."""
        return <const unsigned char *>PyBytes_AS_STRING(self._chunks[chunk - self._base]) + offset
