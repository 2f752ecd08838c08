# Memory: every byte the core allocates goes through these functions, which
# count it, so --max-memory bounds what the broker really holds (messages with
# their headers, topics, subscription arrays, rings, connection state, input and
# output buffers), as Redis counts used_memory in zmalloc. Allocation failure is
# a return value (NULL or -1 without a Python exception), never a dangling
# pointer: callers undo what they started and report MEMORY_FULL.

from libc.stdint cimport int64_t

# keep_heap()'s defaults: blocks under 4 MiB (output batches, read buffers) stay on
# the heap, and up to 16 MiB of free heap is kept for the next batches.
cdef enum:
    KEEP_HEAP_MMAP = 4 * 1024 * 1024
    KEEP_HEAP_TRIM = 16 * 1024 * 1024


ctypedef struct Memory:
    size_t used             # bytes the core holds now
    size_t in_transports    # bytes handed to transports and not yet sent, as last reported
    size_t outside_input    # unfinished commands the cluster's router holds (Broker.hold_input)
    int64_t fail_in         # tests: the fail_in-th allocation from now fails (0 = never)
    size_t failures         # allocations that failed, injected or real


cdef void *mem_alloc(Memory *m, size_t size) noexcept
cdef void *mem_grow(Memory *m, void *p, size_t old_size, size_t new_size) noexcept
cdef void mem_free(Memory *m, void *p, size_t size) noexcept
cdef bint mem_refuse(Memory *m) noexcept
cdef void mem_count(Memory *m, size_t added, size_t removed) noexcept
cdef size_t mem_total(const Memory *m) noexcept
