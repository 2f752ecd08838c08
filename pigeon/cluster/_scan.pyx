# cython: language_level=3
"""The cluster router's scan of a client's input, in C, read as the core reads it.

The router (pigeon/cluster/router.py) looks at every command a client sends to decide where it
goes. Most need no decision: a command whose first word is none of the verbs the router routes or
watches goes to this node's own core as it is. ``InputScanner.split_lines`` cuts whole lines in
one pass over the bytes: a run of such lines is one ``PlainLines`` item, fed to the core as one
slice, with no Python object per line, and each line with a routed verb is an item of its own; it
stops where a frame begins, whose payload the router reads itself. A client sending junk or
``PING``s costs a node what it costs one server, not a parse of each line in Python.
``command_fields`` splits a line the router does look at into its fields, and ``publish_slots``
finds the slots of a batch of a client's ``PUBLISH`` lines, so that a batch to several topics of one
owner goes on whole.

Both read a line as the core's parser does (``pigeon/core/parser.pxi``): one ``\\r`` before its
``\\n`` is dropped, fields are separated by spaces and tabs only, and a frame's verb begins its line,
followed by a blank, so that the router never reads a command other than the one the core would run.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memset

from pigeon._crc32c cimport crc32c_choose
from pigeon.cluster._slot cimport SLOTS, topic_slot

crc32c_choose(1)

cdef enum:
    VERB_MAX = 16  # the longest verb a scanner holds ("UNSUBSCRIBE" has 11 letters)
    VERBS_MAX = 32


class PlainLines(bytes):
    """Whole lines of a client (joined by ``\\n``, the last without it) whose verbs the router does
    not route: they go to this node's core as they are, one item of ``InputScanner.split_lines``."""


cdef inline bint _blank(unsigned char c) noexcept nogil:
    """Fields are separated by spaces or tabs (the core's ``_blank``)."""
    return c == 32 or c == 9


cdef inline Py_ssize_t _content_end(const unsigned char *p, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """Where the line ``p[start:end]`` (without its ``\\n``) ends for the core: before one final
    ``\\r``."""
    return end - 1 if end > start and p[end - 1] == 13 else end


cdef inline Py_ssize_t _field_end(const unsigned char *p, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """The end of the field that begins at ``pos``: its first blank, or ``end``."""
    while pos < end and not _blank(p[pos]):
        pos += 1
    return pos


cdef inline unsigned char _upper(unsigned char c) noexcept nogil:
    return c - 32 if 97 <= c <= 122 else c


cdef class InputScanner:
    """Cuts a client's input into the items the router routes: the verbs ``routed`` (upper-case ASCII
    words) are those it looks at, of which ``framed`` begin a frame."""

    cdef unsigned char _verbs[VERBS_MAX][VERB_MAX]
    cdef size_t _lengths[VERBS_MAX]
    cdef bint _framed[VERBS_MAX]
    cdef size_t _count
    cdef bint _first[256]  # whether a verb starts with this byte (either case)

    def __cinit__(self, routed, framed):
        memset(self._first, 0, sizeof(self._first))
        framed = set(framed)
        verbs = sorted(set(routed) | framed)
        if len(verbs) > VERBS_MAX:
            raise ValueError(f"at most {VERBS_MAX} verbs, not {len(verbs)}")
        self._count = 0
        for verb in verbs:
            if not isinstance(verb, bytes) or not 0 < len(verb) <= VERB_MAX or verb != verb.upper():
                raise ValueError(f"a verb is 1 to {VERB_MAX} upper-case bytes, not {verb!r}")
            for i in range(len(verb)):
                self._verbs[self._count][i] = verb[i]
            self._lengths[self._count] = len(verb)
            self._framed[self._count] = verb in framed
            self._first[verb[0]] = True
            self._first[verb.lower()[0]] = True
            self._count += 1

    cdef int _verb(self, const unsigned char *word, size_t length) noexcept nogil:
        """The number of the verb ``word`` is (in any case), or -1."""
        cdef unsigned char upper[VERB_MAX]
        cdef size_t i
        if length == 0 or length > VERB_MAX or not self._first[word[0]]:
            return -1
        for i in range(length):
            upper[i] = _upper(word[i])
        for i in range(self._count):
            if self._lengths[i] == length and memcmp(self._verbs[i], upper, length) == 0:
                return <int>i
        return -1

    def split_lines(self, bytes data not None, Py_ssize_t pos, list items not None):
        """Append the whole lines of ``data`` from ``pos`` on to ``items`` (without their ``\\n``):
        each run of lines without a verb as one ``PlainLines``, each line with one as ``bytes``.
        Stops before a line that begins a frame (its verb one of ``framed``, first on the line,
        followed by a blank) and before an unfinished line: returns where."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), run = pos, word, stop, line_end
        cdef const unsigned char *nl
        cdef int verb
        if pos < 0 or pos > n:
            raise IndexError(f"position {pos} outside 0..{n}")
        while pos < n:
            nl = <const unsigned char *>memchr(p + pos, 10, n - pos)
            if nl == NULL:
                break
            line_end = _content_end(p, pos, nl - p)
            word = pos
            while word < line_end and _blank(p[word]):
                word += 1
            stop = _field_end(p, word, line_end)
            verb = self._verb(p + word, stop - word)
            if verb < 0:
                pos = nl - p + 1
                continue
            if run < pos:
                items.append(PlainLines(PyBytes_FromStringAndSize(<const char *>p + run, pos - 1 - run)))
            if self._framed[verb] and word == pos and stop < line_end:
                return pos
            items.append(PyBytes_FromStringAndSize(<const char *>p + pos, nl - p - pos))
            pos = nl - p + 1
            run = pos
        if run < pos:
            items.append(PlainLines(PyBytes_FromStringAndSize(<const char *>p + run, pos - 1 - run)))
        return pos


def command_fields(bytes line not None, Py_ssize_t maxsplit=-1):
    """The fields of a command line (without its ``\\n``) as the core reads them: like
    ``line.split(None, maxsplit)``, but only spaces and tabs separate fields and one final ``\\r``
    ends the line; with ``maxsplit``, the last field is the rest of the line as it is (a frame's
    payload, its own final ``\\r`` included), from its first byte that is no blank."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line), pos = 0, stop
    cdef Py_ssize_t end = _content_end(p, 0, n)
    cdef list found = []
    while True:
        while pos < end and _blank(p[pos]):
            pos += 1
        if pos == end:
            return found
        if maxsplit >= 0 and len(found) == maxsplit:
            found.append(PyBytes_FromStringAndSize(<const char *>p + pos, n - pos))
            return found
        stop = _field_end(p, pos, end)
        found.append(PyBytes_FromStringAndSize(<const char *>p + pos, stop - pos))
        pos = stop


def publish_slots(bytes lines not None, Py_ssize_t prefix):
    """The slots of the topics of ``lines``, whole lines (each ending with ``\\n``) that each begin
    with the same ``PUBLISH <id> `` of ``prefix`` bytes, without repeats: the topic is the field after
    that prefix, as ``command_fields`` reads it. None when a line has no topic right after the prefix
    (a blank there, or the end of the line), so that the router reads such lines one by one."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(lines)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(lines), pos = 0, topic, line_end
    cdef const unsigned char *nl
    cdef uint64_t seen[(SLOTS + 63) >> 6]
    cdef unsigned int slot
    if prefix <= 0:
        raise ValueError(f"a prefix of {prefix} bytes")
    memset(seen, 0, sizeof(seen))
    while pos < n:
        nl = <const unsigned char *>memchr(p + pos, 10, n - pos)
        if nl == NULL:
            raise ValueError("the last line has no \\n")
        line_end = _content_end(p, pos, nl - p)
        topic = pos + prefix
        if topic >= line_end or _blank(p[topic]):
            return None
        pos = _field_end(p, topic, line_end)
        slot = topic_slot(p + topic, pos - topic)
        seen[slot // 64] |= (<uint64_t>1) << (slot % 64)
        pos = nl - p + 1
    return [slot for slot in range(SLOTS) if seen[slot // 64] >> (slot % 64) & 1]
