# Memory: counted allocation (see memory.pxd).

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc

cdef extern from *:
    """
    #if defined(__GLIBC__)
    #include <malloc.h>
    static int pigeon_keep_heap(int mmap_threshold, int trim_threshold) {
        return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
            && mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1;
    }
    #else
    static int pigeon_keep_heap(int mmap_threshold, int trim_threshold) {
        (void)mmap_threshold; (void)trim_threshold;
        return 0;
    }
    #endif
    """
    int pigeon_keep_heap(int mmap_threshold, int trim_threshold) noexcept nogil


def keep_heap(int mmap_threshold=KEEP_HEAP_MMAP, int trim_threshold=KEEP_HEAP_TRIM):
    """Have glibc's malloc serve and keep blocks below ``mmap_threshold`` on its heap, and
    return free heap to the OS only past ``trim_threshold``; False where that is not glibc.

    Every flush hands each busy connection one output object of up to --out-batch bytes and
    the next is allocated at once. With glibc's defaults such blocks come from fresh pages
    (mmap, or a heap top it just trimmed), so each batch page-faults: about 5 faults per
    1,000 messages piped, a third more system time than with the pages kept.
    """
    return pigeon_keep_heap(mmap_threshold, trim_threshold) == 1


cdef bint mem_refuse(Memory *m) noexcept:
    """True when the test hook says this allocation fails (counted as a failure)."""
    if m.fail_in > 0:
        m.fail_in -= 1
        if m.fail_in == 0:
            m.failures += 1
            return True
    return False


cdef void mem_count(Memory *m, size_t added, size_t removed) noexcept:
    """Count memory allocated elsewhere (output bytes objects) as held or released."""
    m.used = m.used + added - removed


cdef void *mem_alloc(Memory *m, size_t size) noexcept:
    cdef void *p
    if mem_refuse(m):
        return NULL
    p = PyMem_Malloc(size if size else 1)
    if p == NULL:
        m.failures += 1
        return NULL
    mem_count(m, size, 0)
    return p


cdef void *mem_grow(Memory *m, void *p, size_t old_size, size_t new_size) noexcept:
    """Resize a block; on failure the old block is untouched and still owned by the caller."""
    cdef void *q
    if mem_refuse(m):
        return NULL
    q = PyMem_Realloc(p, new_size if new_size else 1)
    if q == NULL:
        m.failures += 1
        return NULL
    mem_count(m, new_size, old_size)
    return q


cdef void mem_free(Memory *m, void *p, size_t size) noexcept:
    if p != NULL:
        PyMem_Free(p)
        m.used -= size


cdef size_t mem_total(const Memory *m) noexcept:
    return m.used + m.in_transports + m.outside_input
