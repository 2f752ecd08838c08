# cython: language_level=3
"""The owner's split of its log records among the nodes that replicate them, in C.

``SlotSplitter`` holds, per slot, the nodes its ``PUBLISH`` records go to, and the nodes every
other record (``DONE``, ``DELIVERED``: they name seqs, not slots) goes to; ``split`` walks one
pass's records without Python's lock and gives each node its records as runs (slices of the
records, neighbouring records in one run): a Python object per run, none per record.
pigeon/cluster/replication.py uses it (docs/cluster.md, "Replication").
"""

from libc.stdint cimport uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memset

from pigeon._crc32c cimport crc32c_choose
from pigeon.cluster._records cimport (
    REC_PUBLISH, RECORD_HEAD, SLOTS, publish_slot, record_size,
)

crc32c_choose(1)


ctypedef struct Runs:
    # one node's (start, end) offsets, start, end, start, end ...
    size_t *items
    size_t count
    size_t cap


cdef int _extend(Runs *runs, size_t start, size_t end) noexcept nogil:
    """Add the record [start, end) to a node's runs, joined to the last when it follows it;
    -1 when out of memory."""
    cdef size_t cap
    cdef size_t *grown
    if runs.count and runs.items[2 * runs.count - 1] == start:
        runs.items[2 * runs.count - 1] = end
        return 0
    if runs.count == runs.cap:
        cap = runs.cap * 2 if runs.cap else 8
        grown = <size_t *>realloc(runs.items, cap * 2 * sizeof(size_t))
        if grown == NULL:
            return -1
        runs.items = grown
        runs.cap = cap
    runs.items[2 * runs.count] = start
    runs.items[2 * runs.count + 1] = end
    runs.count += 1
    return 0


cdef class SlotSplitter:
    """Which nodes get which records: ``targets[slot]`` (one entry per slot) names the nodes that
    get the ``PUBLISH`` records of ``slot``, ``done_to`` those that get every other record
    (``DONE`` and ``DELIVERED``)."""

    cdef readonly tuple nodes       # every node named, by its number here
    cdef uint32_t *_targets         # the numbers of each slot's nodes, slot after slot
    cdef uint32_t _starts[SLOTS + 1]  # slot s's nodes are _targets[_starts[s]:_starts[s + 1]]
    cdef uint32_t *_done_to
    cdef uint32_t _ndone

    def __cinit__(self, targets, done_to):
        numbers = {}
        flat = []
        cdef int slot
        if len(targets) != SLOTS:
            raise ValueError(f"one entry per slot ({SLOTS}), not {len(targets)}")
        for slot in range(SLOTS):
            self._starts[slot] = len(flat)
            if isinstance(targets[slot], str):
                raise TypeError(f"slot {slot}: a tuple of nodes, not the name {targets[slot]!r}")
            for node in dict.fromkeys(targets[slot]):
                flat.append(numbers.setdefault(node, len(numbers)))
        self._starts[SLOTS] = len(flat)
        done = [numbers.setdefault(node, len(numbers)) for node in dict.fromkeys(done_to)]
        self.nodes = tuple(numbers)
        self._targets = <uint32_t *>malloc(max(len(flat), 1) * sizeof(uint32_t))
        self._done_to = <uint32_t *>malloc(max(len(done), 1) * sizeof(uint32_t))
        if self._targets == NULL or self._done_to == NULL:
            raise MemoryError()
        for slot, number in enumerate(flat):
            self._targets[slot] = number
        for slot, number in enumerate(done):
            self._done_to[slot] = number
        self._ndone = len(done)

    def __dealloc__(self):
        free(self._targets)
        free(self._done_to)

    cdef int _walk(self, const unsigned char *p, size_t n, Runs *runs) noexcept nogil:
        """split's walk; -1 when out of memory."""
        cdef size_t pos = 0, size
        cdef uint32_t i, first, last, slot
        cdef const uint32_t *chosen
        while True:
            size = record_size(p, pos, n)
            if size == 0:
                return 0
            if p[pos + RECORD_HEAD] == REC_PUBLISH:
                slot = publish_slot(p + pos)
                chosen = self._targets + self._starts[slot]
                last = self._starts[slot + 1] - self._starts[slot]
            else:
                chosen = self._done_to
                last = self._ndone
            for i in range(last):
                if _extend(&runs[chosen[i]], pos, pos + size) < 0:
                    return -1
            pos += size

    def split(self, data):
        """The records of ``data`` (a pass's records, or a segment's after its header) each node
        gets, as ``{node: [slices of data]}``; a node that gets nothing is not in it."""
        cdef const unsigned char[:] bytes_of = data
        cdef size_t n = bytes_of.shape[0], count = len(self.nodes), node, i
        cdef const unsigned char *p = &bytes_of[0] if n else <const unsigned char *>b""
        cdef Runs *runs = <Runs *>malloc(max(count, <size_t>1) * sizeof(Runs))
        cdef int failed
        if runs == NULL:
            raise MemoryError()
        memset(runs, 0, max(count, <size_t>1) * sizeof(Runs))
        with nogil:
            failed = self._walk(p, n, runs)
        view = memoryview(data)
        chosen = {}
        for node in range(count):
            if runs[node].count and not failed:
                chosen[self.nodes[node]] = [
                    view[runs[node].items[2 * i]:runs[node].items[2 * i + 1]] for i in range(runs[node].count)
                ]
            free(runs[node].items)
        free(runs)
        if failed:
            raise MemoryError()
        return chosen
