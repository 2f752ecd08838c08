# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The broker core: parses commands, routes messages, produces output bytes.

The core does no I/O. A connection is a small integer handle; bytes read from
its socket go in through ``get_buffer``/``buffer_updated`` (or ``feed``), and
its output leaves through the writer callable registered with ``open``, at most
once per call into the core. Parsing, topic lookup, round-robin selection and
writing the ``MESSAGE`` line are C; no Python object is created per message.
"""

import json
import time

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, _PyBytes_Resize
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcmp, memcpy, memmove, memset, strlen


cdef extern from "Python.h":
    void Py_SET_SIZE(PyObject *o, Py_ssize_t size)
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_WRITE


cdef enum:
    CONN_FREE = 0
    CONN_OPEN = 1
    CONN_CLOSING = 2        # DISCONNECT or a fatal error: output flushes, then the socket closes

    READ_ROOM = 256 * 1024  # free space offered to each socket read
    OUT_MIN = 256           # smallest output bytes object
    SHOW_MAX = 64           # longest client input echoed back in an ERROR line
    MESSAGE_WORD_LEN = 8    # len(b"MESSAGE ")


# Names of the CMD_* and ERR_* kinds (see _core.pxd), in index order, as reported by stats().
COMMAND_NAMES = ("connect", "subscribe", "unsubscribe", "publish", "ping", "disconnect", "stats", "unknown")
ERROR_NAMES = ("usage", "unknown_command", "not_connected", "already_connected", "wrong_client_id",
               "bad_topic", "not_subscribed", "backlog_full", "line_too_long", "too_many_connections",
               "too_many_subscriptions", "too_many_topics", "memory_full", "idle_timeout")
assert len(COMMAND_NAMES) == CMD_KINDS and len(ERROR_NAMES) == ERR_KINDS


# ---------------------------------------------------------------- helpers

cdef inline void *_realloc(void *p, size_t size) except NULL:
    cdef void *q = PyMem_Realloc(p, size)
    if q == NULL:
        raise MemoryError()
    return q


cdef inline uint64_t _hash(const char *p, size_t n) noexcept nogil:
    # FNV-1a: topics are short, and the last-topic cache skips most lookups.
    cdef uint64_t h = 14695981039346656037ULL
    cdef size_t i
    for i in range(n):
        h = (h ^ <unsigned char>p[i]) * 1099511628211ULL
    return h


cdef inline bint _word_is(const char *p, size_t n, const char *lower, size_t ln) noexcept nogil:
    # ASCII case-insensitive: (c | 0x20) maps exactly the letters onto a-z.
    cdef size_t i
    if n != ln:
        return False
    for i in range(n):
        if (<unsigned char>p[i] | 0x20) != <unsigned char>lower[i]:
            return False
    return True


cdef inline bint _printable(const char *p, size_t n) noexcept nogil:
    cdef size_t i
    if n > SHOW_MAX:
        return False
    for i in range(n):
        if <unsigned char>p[i] < 0x21 or <unsigned char>p[i] > 0x7e:
            return False
    return True


cdef inline bint _next_field(char **p, size_t *n, char **field, size_t *flen) noexcept nogil:
    """Take the next space-separated field from (p, n); False when none is left."""
    cdef char *s = p[0]
    cdef char *end = s + n[0]
    cdef char *e
    while s < end and s[0] == b' ':
        s += 1
    if s == end:
        p[0] = s
        n[0] = 0
        return False
    e = <char *>memchr(s, b' ', end - s)
    if e == NULL:
        e = end
    field[0] = s
    flen[0] = e - s
    p[0] = e
    n[0] = end - e
    return True


cdef inline bint _only_spaces(const char *p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if p[i] != b' ':
            return False
    return True


cdef int _topic_problem(const char *p, size_t n) noexcept nogil:
    """0 for a valid topic name, else 1 (length), 2 (whitespace/control), 3 (UTF-8)."""
    cdef size_t i = 0, k, extra
    cdef unsigned char c
    cdef uint32_t cp, low
    if n == 0 or n > TOPIC_MAX:
        return 1
    while i < n:
        c = p[i]
        if c < 0x80:
            if c <= 0x20 or c == 0x7f:
                return 2
            i += 1
            continue
        if c >= 0xc2 and c <= 0xdf:
            extra = 1
            cp = c & 0x1f
            low = 0x80
        elif c >= 0xe0 and c <= 0xef:
            extra = 2
            cp = c & 0x0f
            low = 0x800
        elif c >= 0xf0 and c <= 0xf4:
            extra = 3
            cp = c & 0x07
            low = 0x10000
        else:
            return 3
        if i + extra >= n:
            return 3
        for k in range(1, extra + 1):
            c = p[i + k]
            if (c & 0xc0) != 0x80:
                return 3
            cp = (cp << 6) | (c & 0x3f)
        if cp < low or cp > 0x10ffff or (cp >= 0xd800 and cp <= 0xdfff):
            return 3
        if cp <= 0x9f or cp == 0x85 or cp == 0xa0 or cp == 0x2028 or cp == 0x2029:
            return 2            # C1 controls and the common Unicode blanks
        i += extra + 1
    return 0


# ---------------------------------------------------------------- backlog

cdef int _backlog_reserve(Backlog *b) except -1:
    """Make room for one more entry, keeping the oldest at head."""
    cdef uint32_t i, newcap
    if b.count == b.cap:
        newcap = b.cap * 2 if b.cap else 8
        b.ring = <BacklogEntry *>_realloc(b.ring, newcap * sizeof(BacklogEntry))
        # unwrap: move the entries before head to just past the old end
        for i in range(b.head):
            b.ring[b.cap + i] = b.ring[i]
        b.cap = newcap
    return 0


cdef inline BacklogEntry _backlog_copy(const char *data, size_t n) except *:
    cdef BacklogEntry e
    e.data = <char *>PyMem_Malloc(n if n else 1)
    if e.data == NULL:
        raise MemoryError()
    memcpy(e.data, data, n)
    e.len = n
    return e


cdef int backlog_push(Backlog *b, const char *data, size_t n) except -1:
    """Append a copy of a message at the tail."""
    _backlog_reserve(b)
    b.ring[(b.head + b.count) & (b.cap - 1)] = _backlog_copy(data, n)
    b.count += 1
    b.nbytes += n
    return 0


cdef int backlog_push_front(Backlog *b, const char *data, size_t n) except -1:
    """Insert a copy of a message at the head, before the oldest one."""
    cdef BacklogEntry e
    _backlog_reserve(b)
    e = _backlog_copy(data, n)
    b.head = (b.head - 1) & (b.cap - 1)
    b.ring[b.head] = e
    b.count += 1
    b.nbytes += n
    return 0


cdef inline BacklogEntry backlog_pop(Backlog *b) noexcept:
    """Remove and return the oldest message; the caller frees its data."""
    cdef BacklogEntry e = b.ring[b.head]
    b.head = (b.head + 1) & (b.cap - 1)
    b.count -= 1
    b.nbytes -= e.len
    return e


cdef void backlog_free(Backlog *b) noexcept:
    cdef uint32_t i
    for i in range(b.count):
        PyMem_Free(b.ring[(b.head + i) & (b.cap - 1)].data)
    PyMem_Free(b.ring)
    memset(b, 0, sizeof(Backlog))


# ---------------------------------------------------------------- broker

cdef class Broker:
    """All broker state: connections, topics, subscriptions and backlogs.

    ``max_line`` is the longest accepted command line in bytes; a longer one
    gets an ERROR and closes its connection. ``max_backlog`` is how many
    messages a topic keeps while no subscriber can take them, ``max_memory``
    how many message bytes all backlogs keep together. ``max_connections``,
    ``max_subscriptions`` (per connection) and ``max_topics`` bound the rest
    of the state. A connection whose unsent output passes ``max_pending``
    bytes is dropped as a slow consumer; one that sends nothing for more than
    ``idle_ticks`` calls of ``tick()`` is closed (0: never). ``out_batch`` is
    how much output a connection takes before rotations skip it until that
    output is handed to its writer, so a long backlog is not all queued on
    one socket at once.
    """

    def __cinit__(
        self,
        *,
        size_t max_line=1024 * 1024,
        uint32_t max_backlog=100_000,
        int32_t max_connections=10_000,
        size_t max_memory=1024 * 1024 * 1024,
        int32_t max_subscriptions=10_000,
        size_t max_topics=1_000_000,
        size_t max_pending=64 * 1024 * 1024,
        uint32_t idle_ticks=0,
        size_t out_batch=1024 * 1024,
    ):
        if max_line < 64:
            raise ValueError("max_line must be at least 64 bytes")
        if max_connections < 1 or max_subscriptions < 1 or max_topics < 1:
            raise ValueError("max_connections, max_subscriptions and max_topics must be at least 1")
        if max_pending < 1 or out_batch < 1:
            raise ValueError("max_pending and out_batch must be at least 1 byte")
        self.max_line = max_line
        self.max_backlog = max_backlog
        self.max_connections = max_connections
        self.max_memory = max_memory
        self.max_subscriptions = max_subscriptions
        self.max_topics = max_topics
        self.max_pending = max_pending
        self.idle_ticks = idle_ticks
        self.out_batch = out_batch
        self.writers = []
        self.peers = []
        self.pendings = []
        self.started = time.time()
        self.closers = []
        self.next_client_id = 1
        self.nbuckets = 64
        self.buckets = <Topic **>PyMem_Malloc(self.nbuckets * sizeof(Topic *))
        if self.buckets == NULL:
            raise MemoryError()
        memset(self.buckets, 0, self.nbuckets * sizeof(Topic *))
        self.rbuf_owner = -1

    def __dealloc__(self):
        cdef int32_t h
        cdef size_t i
        cdef Topic *t
        cdef Topic *nxt
        for h in range(self.conns_cap):
            if self.conns[h].state != CONN_FREE:
                Py_XDECREF(self.conns[h].out_bytes)
                PyMem_Free(self.conns[h].pending)
                PyMem_Free(self.conns[h].subs)
        if self.buckets != NULL:
            for i in range(self.nbuckets):
                t = self.buckets[i]
                while t != NULL:
                    nxt = t.next
                    backlog_free(&t.backlog)
                    PyMem_Free(t.subs)
                    PyMem_Free(t)
                    t = nxt
        PyMem_Free(self.buckets)
        PyMem_Free(self.conns)
        PyMem_Free(self.free_handles)
        PyMem_Free(self.dirty)
        PyMem_Free(self.rbuf)

    # ------------------------------------------------------------ Python API

    def open(self, writer, peer=None, pending=None, closer=None):
        """Register a new connection; ``writer(bytes)`` receives its output. Returns its handle.

        ``peer`` is the client's address, as shown by ``connections()``;
        ``pending()``, when given, tells how many output bytes are buffered
        past the core (in the transport), for the same report and for the
        max_pending check. ``closer(reason, flush)`` is called when the core
        itself ends the connection (over max_connections, slow consumer,
        idle): close the socket, after flushing what was written when
        ``flush`` is true.
        """
        cdef int32_t h, newcap
        cdef char reason[64]
        if self.nfree == 0:
            newcap = self.conns_cap * 2 if self.conns_cap else 16
            self.conns = <Conn *>_realloc(self.conns, newcap * sizeof(Conn))
            self.free_handles = <int32_t *>_realloc(self.free_handles, newcap * sizeof(int32_t))
            self.dirty = <int32_t *>_realloc(self.dirty, 2 * newcap * sizeof(int32_t))
            memset(&self.conns[self.conns_cap], 0, (newcap - self.conns_cap) * sizeof(Conn))
            for h in range(newcap - 1, self.conns_cap - 1, -1):
                self.free_handles[self.nfree] = h
                self.nfree += 1
            self.writers.extend([None] * (newcap - self.conns_cap))
            self.peers.extend([None] * (newcap - self.conns_cap))
            self.pendings.extend([None] * (newcap - self.conns_cap))
            self.closers.extend([None] * (newcap - self.conns_cap))
            self.conns_cap = newcap
        self.nfree -= 1
        h = self.free_handles[self.nfree]
        memset(&self.conns[h], 0, sizeof(Conn))
        self.conns[h].state = CONN_OPEN
        self.conns[h].since = time.time()
        self.writers[h] = writer
        self.peers[h] = None if peer is None else str(peer)
        self.pendings[h] = pending
        self.closers[h] = closer
        self.nconns += 1
        self.counters.connections_total += 1
        if self.nadmitted >= self.max_connections:
            self.conns[h].rejected = True
            self.counters.rejected += 1
            snprintf(reason, sizeof(reason), "too many connections (limit %d)", self.max_connections)
            self._error(h, ERR_TOO_MANY_CONNECTIONS, reason)
            self.conns[h].state = CONN_CLOSING
            self._flush()
            self._close_by_core(h, "too many connections", True)
        else:
            self.nadmitted += 1
        return h

    def get_buffer(self, int32_t handle):
        """A writable view to read the connection's next bytes into.

        Valid until the matching ``buffer_updated``; any carried-over partial
        line sits just before it, so a command split across reads is joined
        without copying the new bytes.
        """
        cdef Conn *c = self._conn(handle)
        cdef size_t need = c.pending_len + READ_ROOM
        if self.rbuf_cap < need:
            self.rbuf = <char *>_realloc(self.rbuf, need)
            self.rbuf_cap = need
        if c.pending_len:
            memcpy(self.rbuf, c.pending, c.pending_len)
        self.rbuf_owner = handle
        return PyMemoryView_FromMemory(self.rbuf + c.pending_len,
                                       self.rbuf_cap - c.pending_len, PyBUF_WRITE)

    def buffer_updated(self, int32_t handle, Py_ssize_t nbytes):
        """Process ``nbytes`` just read into the view from ``get_buffer``.

        Hands every affected connection its output, then returns False when
        this connection must be closed (DISCONNECT or a fatal error).
        """
        cdef Conn *c = self._conn(handle)
        if self.rbuf_owner != handle:
            raise RuntimeError("buffer_updated without get_buffer for this connection")
        if nbytes < 0 or <size_t>nbytes > self.rbuf_cap - c.pending_len:
            raise ValueError("nbytes is outside the buffer")
        self.rbuf_owner = -1
        self.counters.bytes_in += nbytes
        c.bytes_in += nbytes
        c.silent_ticks = 0
        self._process(handle, self.rbuf, c.pending_len + nbytes)
        self._flush()
        return self.conns[handle].state == CONN_OPEN

    def feed(self, int32_t handle, data):
        """Process bytes read from the connection (a copying ``buffer_updated``)."""
        cdef const unsigned char[:] src = data
        cdef size_t done = 0, total = src.shape[0], room, chunk
        cdef Conn *c
        while True:
            c = self._conn(handle)
            if c.state != CONN_OPEN:
                return False
            view = self.get_buffer(handle)
            room = len(view)
            chunk = total - done if total - done < room else room
            if chunk:
                memcpy(self.rbuf + c.pending_len, &src[done], chunk)
            done += chunk
            if not self.buffer_updated(handle, chunk):
                return False
            if done == total:
                return True

    def pause(self, int32_t handle):
        """The connection's transport is full: skip it in every rotation.

        Until ``resume``, the core keeps the connection's output itself, and
        drops the connection once that plus what its transport holds passes
        max_pending.
        """
        self._conn(handle).paused = True

    def resume(self, int32_t handle):
        """The connection can take output again: hand it what was kept, deliver backlogs it can serve."""
        cdef Conn *c = self._conn(handle)
        c.paused = False
        if c.out_len:
            self._mark(handle)
        self._drain_subscriptions(handle)
        self._flush()

    def close(self, int32_t handle):
        """The connection is gone: give back messages it was never handed, leave every rotation, free it."""
        cdef Conn *c = self._conn(handle)
        cdef list touched = []
        if c.out_len and c.state == CONN_OPEN:
            self._requeue(c.out, c.out_len, touched)
        self._leave_all(handle)
        c = &self.conns[handle]
        if not c.rejected:
            self.nadmitted -= 1
        Py_XDECREF(c.out_bytes)
        PyMem_Free(c.pending)
        PyMem_Free(c.subs)
        memset(c, 0, sizeof(Conn))
        self.writers[handle] = None
        self.peers[handle] = None
        self.pendings[handle] = None
        self.free_handles[self.nfree] = handle
        self.nfree += 1
        self.closers[handle] = None
        self.nconns -= 1
        if self.rbuf_owner == handle:
            self.rbuf_owner = -1
        for t in touched:
            self._drain(<Topic *><size_t>t)
        self._flush()

    def tick(self):
        """Advance the idle clock: close connections that sent nothing for more than idle_ticks ticks."""
        cdef int32_t h
        cdef Conn *c
        cdef list closing = []
        if self.idle_ticks == 0:
            return
        for h in range(self.conns_cap):
            c = &self.conns[h]
            if c.state != CONN_OPEN:
                continue
            c.silent_ticks += 1
            if c.silent_ticks > self.idle_ticks:
                self._error(h, ERR_IDLE_TIMEOUT, "idle timeout")
                self._leave_all(h)
                self.conns[h].state = CONN_CLOSING
                self.counters.idle_closed += 1
                closing.append(h)
        self._flush()
        for h in closing:
            self._close_by_core(h, "idle timeout", True)

    def client_id(self, int32_t handle):
        """The id CONNECT gave this connection, or None before CONNECT."""
        cdef Conn *c = self._conn(handle)
        if c.client_id == 0:
            return None
        return c.id_text[:c.id_len].decode("ascii")

    def topic_info(self, topic):
        """``(subscribers, backlog_messages)`` for a topic, or None if the broker holds no such topic."""
        cdef const unsigned char[:] name = topic
        cdef size_t n = name.shape[0]
        cdef Topic *t
        if n == 0 or n > TOPIC_MAX:
            return None
        t = self._find_topic(<char *>&name[0], n, _hash(<char *>&name[0], n))
        if t == NULL:
            return None
        return (t.nsubs, t.backlog.count)

    def stats(self):
        """Server-wide counters and gauges: ints, dicts of ints by kind, and the uptime in seconds."""
        cdef int i
        return {
            "uptime_seconds": time.time() - self.started,
            "connections": self.nconns,
            "connections_total": self.counters.connections_total,
            "topics": self.ntopics,
            "backlog_messages": self.backlog_messages,
            "backlog_bytes": self.backlog_bytes,
            "commands": {COMMAND_NAMES[i]: self.counters.commands[i] for i in range(CMD_KINDS)},
            "published": self.counters.published,
            "delivered": self.counters.delivered,
            "backlogged": self.counters.backlogged,
            "refused": self.counters.refused,
            "errors": {ERROR_NAMES[i]: self.counters.errors[i] for i in range(ERR_KINDS)},
            "connections_rejected": self.counters.rejected,
            "idle_closed": self.counters.idle_closed,
            "requeued": self.counters.requeued,
            "bytes_in": self.counters.bytes_in,
            "bytes_out": self.counters.bytes_out,
            "slow_consumers": self.counters.slow_consumers,
        }

    def topics(self):
        """Every topic the broker holds, as dicts: name, subscribers, backlog depth, published, delivered."""
        cdef size_t i
        cdef Topic *t
        result = []
        for i in range(self.nbuckets):
            t = self.buckets[i]
            while t != NULL:
                result.append({
                    "name": t.name[:t.name_len].decode("utf-8", "replace"),
                    "subscribers": t.nsubs,
                    "backlog_messages": t.backlog.count,
                    "backlog_bytes": t.backlog.nbytes,
                    "published": t.published,
                    "delivered": t.delivered,
                })
                t = t.next
        result.sort(key=lambda topic: topic["name"])
        return result

    def connections(self):
        """Every open connection, as dicts: handle, client id, address, subscriptions, traffic, age."""
        cdef int32_t h, i
        cdef Conn *c
        cdef double now = time.time()
        result = []
        for h in range(self.conns_cap):
            c = &self.conns[h]
            if c.state == CONN_FREE:
                continue
            pending = self.pendings[h]
            result.append({
                "handle": h,
                "client_id": c.id_text[:c.id_len].decode("ascii") if c.client_id else None,
                "address": self.peers[h],
                "subscriptions": sorted(c.subs[i].name[:c.subs[i].name_len].decode("utf-8", "replace")
                                        for i in range(c.nsubs)),
                "pending_bytes": c.out_len + (pending() if pending is not None else 0),
                "messages_in": c.msgs_in,
                "messages_out": c.msgs_out,
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
                "connected_since": c.since,
                "connected_seconds": now - c.since,
                "closing": c.state == CONN_CLOSING,
            })
        return result

    @property
    def max_line_length(self):
        """The longest accepted command line, in bytes."""
        return self.max_line

    @property
    def max_backlog_messages(self):
        """How many messages one topic's backlog holds at most."""
        return self.max_backlog

    # ------------------------------------------------------------ parsing

    cdef Conn *_conn(self, int32_t h) except NULL:
        if h < 0 or h >= self.conns_cap or self.conns[h].state == CONN_FREE:
            raise ValueError(f"no open connection with handle {h}")
        return &self.conns[h]

    cdef int _process(self, int32_t h, char *buf, size_t n) except -1:
        cdef size_t pos = 0, line_len, left
        cdef char *nl
        cdef bint too_long = False
        cdef char reason[64]
        cdef Conn *c
        while pos < n and self.conns[h].state == CONN_OPEN:
            nl = <char *>memchr(buf + pos, b'\n', n - pos)
            if nl == NULL:
                too_long = n - pos > self.max_line
                break
            line_len = nl - (buf + pos)
            if line_len > self.max_line:
                too_long = True
                break
            self._dispatch(h, buf + pos, line_len)
            pos += line_len + 1
        c = &self.conns[h]
        if too_long and c.state == CONN_OPEN:
            snprintf(reason, sizeof(reason), "line too long (limit %zu bytes)", self.max_line)
            self._error(h, ERR_LINE_TOO_LONG, reason)
            self._leave_all(h)
            c.state = CONN_CLOSING
        left = n - pos if c.state == CONN_OPEN else 0
        if left:
            c.pending = <char *>_realloc(c.pending, left)
            memcpy(c.pending, buf + pos, left)
        else:
            PyMem_Free(c.pending)
            c.pending = NULL
        c.pending_len = left
        return 0

    cdef int _dispatch(self, int32_t h, char *line, size_t n) except -1:
        cdef char *word
        cdef size_t wl
        cdef char *args
        cdef size_t an
        if n and line[n - 1] == b'\r':
            n -= 1
        args = line
        an = n
        if not _next_field(&args, &an, &word, &wl):
            return 0            # blank lines are ignored, as in a telnet session
        if _word_is(word, wl, "publish", 7):
            self.counters.commands[CMD_PUBLISH] += 1
            return self._on_publish(h, args, an)
        if _word_is(word, wl, "subscribe", 9):
            self.counters.commands[CMD_SUBSCRIBE] += 1
            return self._on_subscribe(h, args, an)
        if _word_is(word, wl, "unsubscribe", 11):
            self.counters.commands[CMD_UNSUBSCRIBE] += 1
            return self._on_unsubscribe(h, args, an)
        if _word_is(word, wl, "connect", 7):
            self.counters.commands[CMD_CONNECT] += 1
            return self._on_connect(h, args, an)
        if _word_is(word, wl, "ping", 4):
            self.counters.commands[CMD_PING] += 1
            if not _only_spaces(args, an):
                return self._error(h, ERR_USAGE, "usage: PING")
            return self._reply(h, "PONG", NULL, 0)
        if _word_is(word, wl, "disconnect", 10):
            self.counters.commands[CMD_DISCONNECT] += 1
            if not _only_spaces(args, an):
                return self._error(h, ERR_USAGE, "usage: DISCONNECT")
            self._reply(h, "DISCONNECTED", NULL, 0)
            self._leave_all(h)
            self.conns[h].state = CONN_CLOSING
            return 0
        if _word_is(word, wl, "stats", 5):
            self.counters.commands[CMD_STATS] += 1
            return self._on_stats(h, args, an)
        self.counters.commands[CMD_UNKNOWN] += 1
        return self._error2(h, ERR_UNKNOWN_COMMAND, "unknown command", word, wl)

    cdef int _on_connect(self, int32_t h, char *args, size_t n) except -1:
        cdef Conn *c = &self.conns[h]
        if not _only_spaces(args, n):
            return self._error(h, ERR_USAGE, "usage: CONNECT")
        if c.client_id:
            return self._error2(h, ERR_ALREADY_CONNECTED, "already connected as", c.id_text, c.id_len)
        c.client_id = self.next_client_id
        self.next_client_id += 1
        c.id_len = snprintf(c.id_text, sizeof(c.id_text), "c%llu", <unsigned long long>c.client_id)
        return self._reply(h, "CONNECTED", c.id_text, c.id_len)

    cdef int _check_id(self, int32_t h, char *id, size_t id_len) except -1:
        """0 when the id is this connection's own, else 1 after sending ERROR."""
        cdef Conn *c = &self.conns[h]
        if c.client_id == 0:
            self._error(h, ERR_NOT_CONNECTED, "not connected: send CONNECT first")
            return 1
        if id_len != c.id_len or memcmp(id, c.id_text, id_len) != 0:
            self._error2(h, ERR_WRONG_CLIENT_ID, "client id does not belong to this connection:", id, id_len)
            return 1
        return 0

    cdef int _check_topic(self, int32_t h, char *name, size_t n) except -1:
        """0 for a valid topic name, else 1 after sending ERROR."""
        cdef int problem = _topic_problem(name, n)
        if problem == 0:
            return 0
        if problem == 1:
            self._error(h, ERR_BAD_TOPIC, "topic must be 1 to 255 bytes")
        elif problem == 2:
            self._error(h, ERR_BAD_TOPIC, "topic must not contain whitespace or control characters")
        else:
            self._error(h, ERR_BAD_TOPIC, "topic is not valid UTF-8")
        return 1

    cdef int _check_topic_room(self, int32_t h) except -1:
        """0 when one more topic fits under max_topics, else 1 after sending ERROR."""
        cdef char reason[64]
        if self.ntopics < self.max_topics:
            return 0
        snprintf(reason, sizeof(reason), "too many topics (limit %zu)", self.max_topics)
        self._error(h, ERR_TOO_MANY_TOPICS, reason)
        return 1

    cdef int _on_subscribe(self, int32_t h, char *args, size_t n) except -1:
        cdef char *id
        cdef char *name
        cdef size_t id_len, name_len
        cdef uint64_t hv
        cdef Topic *t
        cdef Conn *c
        cdef int32_t i
        cdef char reason[80]
        if (not _next_field(&args, &n, &id, &id_len) or not _next_field(&args, &n, &name, &name_len)
                or not _only_spaces(args, n)):
            return self._error(h, ERR_USAGE, "usage: SUBSCRIBE <client_id> <topic>")
        if self._check_id(h, id, id_len) or self._check_topic(h, name, name_len):
            return 0
        hv = _hash(name, name_len)
        t = self._find_topic(name, name_len, hv)
        if t != NULL:
            for i in range(t.nsubs):
                if t.subs[i] == h:
                    return self._reply(h, "SUBSCRIBED", t.name, t.name_len)
        c = &self.conns[h]
        if c.nsubs >= self.max_subscriptions:
            snprintf(reason, sizeof(reason), "too many subscriptions on this connection (limit %d)",
                     self.max_subscriptions)
            return self._error(h, ERR_TOO_MANY_SUBSCRIPTIONS, reason)
        if t == NULL:
            if self._check_topic_room(h):
                return 0
            t = self._add_topic(name, name_len, hv)
        if c.nsubs == c.subs_cap:
            c.subs_cap = c.subs_cap * 2 if c.subs_cap else 4
            c.subs = <Topic **>_realloc(c.subs, c.subs_cap * sizeof(Topic *))
        if t.nsubs == t.subs_cap:
            t.subs_cap = t.subs_cap * 2 if t.subs_cap else 4
            t.subs = <int32_t *>_realloc(t.subs, t.subs_cap * sizeof(int32_t))
        c.subs[c.nsubs] = t
        c.nsubs += 1
        t.subs[t.nsubs] = h
        t.nsubs += 1
        self._reply(h, "SUBSCRIBED", t.name, t.name_len)
        if t.backlog.count:
            self._drain(t)
        return 0

    cdef int _on_unsubscribe(self, int32_t h, char *args, size_t n) except -1:
        cdef char *id
        cdef char *name
        cdef size_t id_len, name_len
        cdef Topic *t
        cdef Conn *c
        cdef int32_t i
        if (not _next_field(&args, &n, &id, &id_len) or not _next_field(&args, &n, &name, &name_len)
                or not _only_spaces(args, n)):
            return self._error(h, ERR_USAGE, "usage: UNSUBSCRIBE <client_id> <topic>")
        if self._check_id(h, id, id_len) or self._check_topic(h, name, name_len):
            return 0
        t = self._find_topic(name, name_len, _hash(name, name_len))
        c = &self.conns[h]
        if t != NULL:
            for i in range(c.nsubs):
                if c.subs[i] == t:
                    self._unsubscribe(h, t)
                    self._reply(h, "UNSUBSCRIBED", name, name_len)
                    self._drop_topic_if_unused(t)
                    return 0
        return self._error2(h, ERR_NOT_SUBSCRIBED, "not subscribed to", name, name_len)

    cdef inline Topic *_publish_fast(self, int32_t h, char **args, size_t *n) noexcept:
        """The pipelined case, ``' <own id> <last topic> <message>'`` with single spaces,
        matched by comparison alone; on a match ``args``/``n`` become the message.
        NULL sends the line through the general parser, which gives the same result."""
        cdef Conn *c = &self.conns[h]
        cdef Topic *t = self.last_topic
        cdef char *p = args[0]
        cdef size_t left = n[0]
        if t == NULL or c.id_len == 0 or left < c.id_len + t.name_len + 3:
            return NULL
        if p[0] != b' ' or p[1 + c.id_len] != b' ' or memcmp(p + 1, c.id_text, c.id_len) != 0:
            return NULL
        p += c.id_len + 2
        left -= c.id_len + 2
        if p[t.name_len] != b' ' or memcmp(p, t.name, t.name_len) != 0:
            return NULL
        args[0] = p + t.name_len + 1
        n[0] = left - t.name_len - 1
        return t

    cdef int _on_publish(self, int32_t h, char *args, size_t n) except -1:
        cdef char *id
        cdef char *name
        cdef size_t id_len, name_len
        cdef uint64_t hv
        cdef Topic *t
        cdef int32_t to
        cdef char reason[96]
        t = self._publish_fast(h, &args, &n)
        if t == NULL:
            if (not _next_field(&args, &n, &id, &id_len) or not _next_field(&args, &n, &name, &name_len)
                    or n == 0):
                return self._error(h, ERR_USAGE, "usage: PUBLISH <client_id> <topic> <message>")
            if self._check_id(h, id, id_len):
                return 0
            # the message is everything after the one space that ends the topic
            args += 1
            n -= 1
            t = self.last_topic
            if t == NULL or t.name_len != name_len or memcmp(t.name, name, name_len) != 0:
                hv = _hash(name, name_len)
                t = self._find_topic(name, name_len, hv)
                if t == NULL:
                    if self._check_topic(h, name, name_len) or self._check_topic_room(h):
                        return 0
                    t = self._add_topic(name, name_len, hv)
                self.last_topic = t
        if t.backlog.count == 0:
            to = self._next_subscriber(t)
            if to >= 0:
                t.published += 1
                self.counters.published += 1
                self.conns[h].msgs_in += 1
                self._reply(h, "PUBLISHED", t.name, t.name_len)
                return self._deliver(to, t, args, n)
        if t.backlog.count >= self.max_backlog:
            self.counters.refused += 1
            snprintf(reason, sizeof(reason), "backlog full (%u messages) for topic", self.max_backlog)
            self._error2(h, ERR_BACKLOG_FULL, reason, t.name, t.name_len)
            if not t.full:
                t.full = True
                self._warn(f"topic {t.name[:t.name_len].decode('utf-8', 'replace')!r}: backlog full "
                           f"({self.max_backlog} messages), refusing publishes until a subscriber drains it")
            self._drop_topic_if_unused(t)
            return 0
        if self.backlog_bytes + n > self.max_memory:
            self.counters.refused += 1
            snprintf(reason, sizeof(reason), "memory limit reached (%zu bytes in backlogs) for topic",
                     self.backlog_bytes)
            self._error2(h, ERR_MEMORY_FULL, reason, t.name, t.name_len)
            self._drop_topic_if_unused(t)
            return 0
        backlog_push(&t.backlog, args, n)
        self.backlog_bytes += n
        self.backlog_messages += 1
        t.published += 1
        self.counters.published += 1
        self.conns[h].msgs_in += 1
        self.counters.backlogged += 1
        self._reply(h, "PUBLISHED", t.name, t.name_len)
        if t.nsubs:
            self._drain(t)
        return 0

    # ------------------------------------------------------------ output

    cdef char *_out(self, int32_t h, size_t need) except NULL:
        """Room for ``need`` more output bytes on connection h; marks it for the next flush."""
        cdef Conn *c = &self.conns[h]
        cdef size_t cap
        cdef object fresh
        if c.out_len + need > c.out_cap:
            if c.out_bytes == NULL:
                # sized from the last flush, so a steady stream fills one object without regrowing
                cap = c.out_hint + c.out_hint // 4
                if cap < OUT_MIN:
                    cap = OUT_MIN
                while cap < need:
                    cap *= 2
                fresh = PyBytes_FromStringAndSize(NULL, cap)
                c.out_bytes = <PyObject *>fresh
                Py_INCREF(fresh)
            else:
                cap = c.out_cap * 2
                while cap < c.out_len + need:
                    cap *= 2
                _PyBytes_Resize(&c.out_bytes, cap)
            c.out = PyBytes_AS_STRING(<object>c.out_bytes)
            c.out_cap = cap
        self._mark(h)
        c.out_len += need
        return c.out + c.out_len - need

    cdef inline void _mark(self, int32_t h) noexcept:
        """Put h on the list of connections to flush."""
        if not self.conns[h].dirty:
            self.conns[h].dirty = True
            self.dirty[self.ndirty] = h
            self.ndirty += 1

    cdef int _reply(self, int32_t h, const char *word, char *arg, size_t arg_len) except -1:
        cdef size_t wl = strlen(word)
        cdef char *p = self._out(h, wl + (arg_len + 1 if arg != NULL else 0) + 1)
        memcpy(p, word, wl)
        p += wl
        if arg != NULL:
            p[0] = b' '
            memcpy(p + 1, arg, arg_len)
            p += arg_len + 1
        p[0] = b'\n'
        return 0

    cdef int _on_stats(self, int32_t h, char *args, size_t n) except -1:
        cdef char *section
        cdef size_t sl
        cdef bytes text
        if not _next_field(&args, &n, &section, &sl):
            figures = self.stats()
        elif not _only_spaces(args, n):
            return self._error(h, ERR_USAGE, "usage: STATS [TOPICS|CONNECTIONS]")
        elif _word_is(section, sl, "topics", 6):
            figures = self.topics()
        elif _word_is(section, sl, "connections", 11):
            figures = self.connections()
        else:
            return self._error(h, ERR_USAGE, "usage: STATS [TOPICS|CONNECTIONS]")
        text = json.dumps(figures, separators=(",", ":")).encode()
        return self._reply(h, "STATS", text, len(text))

    cdef int _error(self, int32_t h, int kind, const char *reason) except -1:
        self.counters.errors[kind] += 1
        return self._reply(h, "ERROR", <char *>reason, strlen(reason))

    cdef int _warn(self, str text) except -1:
        if self.on_warning is not None:
            self.on_warning(text)
        return 0

    cdef int _error2(self, int32_t h, int kind, const char *reason, char *arg, size_t arg_len) except -1:
        """ERROR <reason> '<arg>', quoting the client's input only when it is short and printable."""
        cdef char line[256]
        if _printable(arg, arg_len):
            snprintf(line, sizeof(line), "%s '%.*s'", reason, <int>arg_len, arg)
        else:
            snprintf(line, sizeof(line), "%s (not shown)", reason)
        return self._error(h, kind, line)

    cdef int _deliver(self, int32_t h, Topic *t, char *msg, size_t msg_len) except -1:
        cdef char *p = self._out(h, 8 + t.name_len + 1 + msg_len + 1)
        memcpy(p, b"MESSAGE ", 8)
        p += 8
        memcpy(p, t.name, t.name_len)
        p += t.name_len
        p[0] = b' '
        memcpy(p + 1, msg, msg_len)
        p[1 + msg_len] = b'\n'
        t.delivered += 1
        self.counters.delivered += 1
        self.conns[h].msgs_out += 1
        return 0

    cdef int _flush(self) except -1:
        """Hand each connection that got output its bytes, one writer call each.

        A paused connection keeps its output here (dropped once it passes
        max_pending); one that a rotation skipped for a full batch is drained
        again after its flush, which may mark more connections: the pass
        repeats until none is left.
        """
        cdef int32_t i, n, h
        cdef Conn *c
        while self.ndirty:
            n = self.ndirty
            for i in range(n):
                h = self.dirty[i]
                c = &self.conns[h]
                c.dirty = False
                if c.state == CONN_FREE or c.out_len == 0:
                    continue
                if c.paused and c.state == CONN_OPEN:
                    if self._unsent(h) > self.max_pending:
                        self._drop_slow(h)
                    continue
                self._hand_over(h)
                c = &self.conns[h]
                if c.state != CONN_OPEN:
                    continue
                if c.paused:
                    if self._unsent(h) > self.max_pending:
                        self._drop_slow(h)
                elif c.starved:
                    c.starved = False
                    self._drain_subscriptions(h)
            memmove(self.dirty, self.dirty + n, (self.ndirty - n) * sizeof(int32_t))
            self.ndirty -= n
        return 0

    cdef int _hand_over(self, int32_t h) except -1:
        """One writer call with all of h's output; a writer that fails gives its messages back."""
        cdef Conn *c = &self.conns[h]
        cdef size_t n = c.out_len
        cdef object data
        cdef list touched
        # The writer gets the very object the output was written into: no copy.
        # A mostly full object is only trimmed in length, since reallocating it
        # (and so changing its size class) makes malloc map fresh pages each time.
        if c.out_len >= c.out_cap // 2:
            Py_SET_SIZE(c.out_bytes, c.out_len)
            c.out[c.out_len] = 0
        else:
            _PyBytes_Resize(&c.out_bytes, c.out_len)
        data = <object>c.out_bytes
        Py_XDECREF(c.out_bytes)
        c.out_bytes = NULL
        c.out = NULL
        # decays slowly, so one short read between long ones does not shrink the next object
        c.out_hint = c.out_len if c.out_len > c.out_hint else c.out_hint - c.out_hint // 8
        c.out_len = 0
        c.out_cap = 0
        try:
            self.writers[h](data)
        except Exception:
            # its transport is already gone: the bytes went nowhere
            touched = []
            if self.conns[h].state == CONN_OPEN:
                self._requeue(PyBytes_AS_STRING(data), n, touched)
            self._leave_all(h)
            self.conns[h].state = CONN_CLOSING
            for t in touched:
                self._drain(<Topic *><size_t>t)
            return 0
        self.counters.bytes_out += n
        self.conns[h].bytes_out += n
        return 0

    cdef int _drain_subscriptions(self, int32_t h) except -1:
        """Deliver the backlogs of h's topics while some subscriber can take them."""
        cdef Conn *c = &self.conns[h]
        cdef int32_t i = 0
        while i < c.nsubs:
            if c.subs[i].backlog.count:
                self._drain(c.subs[i])
            i += 1
        return 0

    cdef int _drop_slow(self, int32_t h) except -1:
        """Drop a slow consumer: its kept messages go back to their topics, then its socket is aborted."""
        cdef Conn *c = &self.conns[h]
        cdef list touched = []
        reason = f"slow consumer: {self._unsent(h)} bytes unsent (limit {self.max_pending})"
        self._requeue(c.out, c.out_len, touched)
        c.out_len = 0
        self._leave_all(h)
        self.conns[h].state = CONN_CLOSING
        self.counters.slow_consumers += 1
        for t in touched:
            self._drain(<Topic *><size_t>t)
        return self._close_by_core(h, reason, False)

    cdef size_t _unsent(self, int32_t h) except? 0:
        """Output of h not yet sent: what the core keeps plus what its transport holds."""
        pending = self.pendings[h]
        return self.conns[h].out_len + (pending() if pending is not None else 0)

    cdef int _close_by_core(self, int32_t h, str reason, bint flush) except -1:
        closer = self.closers[h]
        if closer is not None:
            closer(reason, flush)
        return 0

    cdef int _requeue(self, char *out, size_t out_len, list touched) except -1:
        """Put the MESSAGE lines of output that was never sent back at the head of their topics, in order.

        Each topic given a message is appended to ``touched`` (as an address)
        for the caller to drain once h has left every rotation. Other reply
        lines are discarded: only their connection wanted them.
        """
        cdef size_t *starts = NULL
        cdef size_t *lens = NULL
        cdef size_t nlines = 0, pos = 0, line_len, k
        cdef char *line
        cdef char *nl
        cdef char *sp
        cdef size_t name_len
        cdef uint64_t hv
        cdef Topic *t
        cdef size_t cap = 0
        try:
            while pos < out_len:
                nl = <char *>memchr(out + pos, b'\n', out_len - pos)
                line_len = nl - (out + pos)
                if line_len > MESSAGE_WORD_LEN and memcmp(out + pos, b"MESSAGE ", MESSAGE_WORD_LEN) == 0:
                    if nlines == cap:
                        cap = cap * 2 if cap else 64
                        starts = <size_t *>_realloc(starts, cap * sizeof(size_t))
                        lens = <size_t *>_realloc(lens, cap * sizeof(size_t))
                    starts[nlines] = pos + MESSAGE_WORD_LEN
                    lens[nlines] = line_len - MESSAGE_WORD_LEN
                    nlines += 1
                pos += line_len + 1
            # newest first, each to the head: the oldest ends up first
            for k in range(nlines - 1, -1, -1):
                line = out + starts[k]
                sp = <char *>memchr(line, b' ', lens[k])
                name_len = sp - line
                hv = _hash(line, name_len)
                t = self._find_topic(line, name_len, hv)
                if t == NULL:
                    t = self._add_topic(line, name_len, hv)
                backlog_push_front(&t.backlog, sp + 1, lens[k] - name_len - 1)
                self.backlog_bytes += lens[k] - name_len - 1
                self.backlog_messages += 1
                self.counters.backlogged += 1
                self.counters.requeued += 1
                if <size_t>t not in touched:
                    touched.append(<size_t>t)
        finally:
            PyMem_Free(starts)
            PyMem_Free(lens)
        return 0

    # ------------------------------------------------------------ routing

    cdef int32_t _next_subscriber(self, Topic *t):
        """Whose turn it is, skipping paused connections; -1 when nobody can take a message."""
        cdef int32_t k, i, h
        cdef Conn *c
        if t.cursor >= t.nsubs:
            t.cursor = 0
        i = t.cursor
        for k in range(t.nsubs):
            h = t.subs[i]
            c = &self.conns[h]
            if not c.paused:
                if c.out_len < self.out_batch:
                    t.cursor = i + 1    # wraps lazily, so a new subscriber gets the next turn
                    return h
                c.starved = True
            i += 1
            if i == t.nsubs:
                i = 0
        return -1

    cdef int _drain(self, Topic *t) except -1:
        """Deliver a topic's backlog in order while some subscriber can take it."""
        cdef int32_t to
        cdef BacklogEntry e
        while t.backlog.count:
            to = self._next_subscriber(t)
            if to < 0:
                return 0
            e = backlog_pop(&t.backlog)
            self.backlog_bytes -= e.len
            self.backlog_messages -= 1
            if t.backlog.count == 0:
                t.full = False      # warn again only after the backlog emptied, not at every refill
            try:
                self._deliver(to, t, e.data, e.len)
            finally:
                PyMem_Free(e.data)
        return 0

    cdef int _unsubscribe(self, int32_t h, Topic *t) except -1:
        """Take h out of t's rotation and t out of h's list, so nobody skips or repeats a turn."""
        cdef Conn *c = &self.conns[h]
        cdef int32_t i
        for i in range(t.nsubs):
            if t.subs[i] == h:
                memmove(&t.subs[i], &t.subs[i + 1], (t.nsubs - i - 1) * sizeof(int32_t))
                t.nsubs -= 1
                if i < t.cursor:
                    t.cursor -= 1
                break
        for i in range(c.nsubs):
            if c.subs[i] == t:
                c.nsubs -= 1
                c.subs[i] = c.subs[c.nsubs]
                break
        return 0

    cdef int _leave_all(self, int32_t h) except -1:
        cdef Conn *c = &self.conns[h]
        cdef Topic *t
        while c.nsubs:
            t = c.subs[c.nsubs - 1]
            self._unsubscribe(h, t)
            self._drop_topic_if_unused(t)
        return 0

    # ------------------------------------------------------------ topic table

    cdef Topic *_find_topic(self, char *name, size_t n, uint64_t hv):
        cdef Topic *t = self.buckets[hv & (self.nbuckets - 1)]
        while t != NULL:
            if t.hash == hv and t.name_len == n and memcmp(t.name, name, n) == 0:
                return t
            t = t.next
        return NULL

    cdef Topic *_add_topic(self, char *name, size_t n, uint64_t hv) except NULL:
        cdef Topic *t
        cdef Topic *nxt
        cdef Topic **grown
        cdef size_t i, newn
        if self.ntopics >= self.nbuckets:
            newn = self.nbuckets * 2
            grown = <Topic **>PyMem_Malloc(newn * sizeof(Topic *))
            if grown == NULL:
                raise MemoryError()
            memset(grown, 0, newn * sizeof(Topic *))
            for i in range(self.nbuckets):
                t = self.buckets[i]
                while t != NULL:
                    nxt = t.next
                    t.next = grown[t.hash & (newn - 1)]
                    grown[t.hash & (newn - 1)] = t
                    t = nxt
            PyMem_Free(self.buckets)
            self.buckets = grown
            self.nbuckets = newn
        t = <Topic *>PyMem_Malloc(sizeof(Topic) + n)
        if t == NULL:
            raise MemoryError()
        memset(t, 0, sizeof(Topic))
        t.name = <char *>(t + 1)
        memcpy(t.name, name, n)
        t.name_len = <uint16_t>n
        t.hash = hv
        t.next = self.buckets[hv & (self.nbuckets - 1)]
        self.buckets[hv & (self.nbuckets - 1)] = t
        self.ntopics += 1
        return t

    cdef void _drop_topic_if_unused(self, Topic *t):
        """Free a topic once it has neither subscribers nor backlog."""
        cdef Topic **link
        if t.nsubs or t.backlog.count:
            return
        link = &self.buckets[t.hash & (self.nbuckets - 1)]
        while link[0] != t:
            link = &link[0].next
        link[0] = t.next
        if self.last_topic == t:
            self.last_topic = NULL
        backlog_free(&t.backlog)
        PyMem_Free(t.subs)
        PyMem_Free(t)
        self.ntopics -= 1
