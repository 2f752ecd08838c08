# cython: language_level=3
"""The cluster router's scan of a client's input, in C, read as the core reads it.

The router (pigeon/cluster/router.py) looks at every command a client sends to decide where it
goes. Most need no decision: a command whose first word is none of the verbs the router routes or
watches goes to this node's own core as it is. ``VerbScanner.plain_run_end`` finds a run of such
lines in one pass over the bytes, so that they reach the core as one slice, with no Python object
per line: a client sending junk or ``PING``s costs a node what it costs one server, not a parse of
each line in Python. ``command_fields`` splits a line the router does look at into its fields.

Both read a line as the core's parser does (``pigeon/core/parser.pxi``): one ``\r`` before its
``\n`` is dropped, and fields are separated by spaces and tabs only, so that the router never
reads a command other than the one the core would run.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp, memset

cdef enum:
    VERB_MAX = 16  # the longest verb a scanner holds ("UNSUBSCRIBE" has 11 letters)
    VERBS_MAX = 32


cdef inline bint _blank(unsigned char c) noexcept nogil:
    """Fields are separated by spaces or tabs (the core's ``_blank``)."""
    return c == 32 or c == 9


cdef inline unsigned char _upper(unsigned char c) noexcept nogil:
    return c - 32 if 97 <= c <= 122 else c


cdef class VerbScanner:
    """Finds runs of whole lines whose first word (in any case, after any leading blanks) is none of
    the verbs ``routed`` (upper-case ASCII words)."""

    cdef unsigned char _verbs[VERBS_MAX][VERB_MAX]
    cdef size_t _lengths[VERBS_MAX]
    cdef size_t _count
    cdef bint _first[256]  # whether a verb starts with this byte (either case)

    def __cinit__(self, routed):
        memset(self._first, 0, sizeof(self._first))
        verbs = sorted(set(routed))
        if len(verbs) > VERBS_MAX:
            raise ValueError(f"at most {VERBS_MAX} verbs, not {len(verbs)}")
        self._count = 0
        for verb in verbs:
            if not isinstance(verb, bytes) or not 0 < len(verb) <= VERB_MAX or verb != verb.upper():
                raise ValueError(f"a verb is 1 to {VERB_MAX} upper-case bytes, not {verb!r}")
            for i in range(len(verb)):
                self._verbs[self._count][i] = verb[i]
            self._lengths[self._count] = len(verb)
            self._first[verb[0]] = True
            self._first[verb.lower()[0]] = True
            self._count += 1

    cdef bint _routed(self, const unsigned char *word, size_t length) noexcept nogil:
        cdef unsigned char upper[VERB_MAX]
        cdef size_t i
        if length == 0 or length > VERB_MAX or not self._first[word[0]]:
            return False
        for i in range(length):
            upper[i] = _upper(word[i])
        for i in range(self._count):
            if self._lengths[i] == length and memcmp(self._verbs[i], upper, length) == 0:
                return True
        return False

    def plain_run_end(self, bytes data not None, Py_ssize_t pos):
        """Where the run of whole lines of ``data`` that starts at ``pos`` and holds none of the verbs
        ends: just past its last ``\\n``; ``pos`` when the line there has one, or is not whole."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), end = pos, word, stop, line_end
        cdef const unsigned char *nl
        if pos < 0 or pos > n:
            raise IndexError(f"position {pos} outside 0..{n}")
        with nogil:
            while pos < n:
                nl = <const unsigned char *>memchr(p + pos, 10, n - pos)
                if nl == NULL:
                    break
                line_end = nl - p
                if line_end > pos and p[line_end - 1] == 13:
                    line_end -= 1
                word = pos
                while word < line_end and _blank(p[word]):
                    word += 1
                stop = word
                while stop < line_end and not _blank(p[stop]):
                    stop += 1
                if self._routed(p + word, stop - word):
                    break
                pos = nl - p + 1
                end = pos
        return end


def command_fields(bytes line not None, Py_ssize_t maxsplit=-1):
    """The fields of a command line (without its ``\n``) as the core reads them: like
    ``line.split(None, maxsplit)``, but only spaces and tabs separate fields and one final ``\r``
    ends the line; with ``maxsplit``, the last field is the rest of the line as it is (a frame's
    payload, its own final ``\r`` included), from its first byte that is no blank."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line), pos = 0, stop
    cdef Py_ssize_t end = n - 1 if n and p[n - 1] == 13 else n
    cdef list found = []
    while True:
        while pos < end and _blank(p[pos]):
            pos += 1
        if pos == end:
            return found
        if maxsplit >= 0 and len(found) == maxsplit:
            found.append(PyBytes_FromStringAndSize(<const char *>p + pos, n - pos))
            return found
        stop = pos
        while stop < end and not _blank(p[stop]):
            stop += 1
        found.append(PyBytes_FromStringAndSize(<const char *>p + pos, stop - pos))
        pos = stop
