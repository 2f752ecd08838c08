# Log: records, their order with the replies, and recovery (see log.pxd).

from libc.stdlib cimport qsort
from libc.string cimport memmove


cdef extern from *:
    """
    /* CRC-32C (Castagnoli: iSCSI, ext4, Kafka record batches) with the CPU's instruction:
       SSE4.2 on x86-64, the CRC extension on AArch64, chosen at run time. CPUs without it
       take the bitwise loop: slow, but they are rare and it is obviously right. */
    #include <stdint.h>
    #include <string.h>
    static uint32_t pigeon_crc32c_bitwise(uint32_t crc, const unsigned char *p, size_t n) {
        crc = ~crc;
        while (n--) {
            crc ^= *p++;
            for (int k = 0; k < 8; k++)
                crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
        }
        return ~crc;
    }
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <nmmintrin.h>
    __attribute__((target("sse4.2")))
    static uint32_t pigeon_crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
        uint64_t c = ~crc & 0xFFFFFFFFu;
        uint64_t v;
        uint32_t c32;
        while (n >= 8) { memcpy(&v, p, 8); c = _mm_crc32_u64(c, v); p += 8; n -= 8; }
        c32 = (uint32_t)c;
        while (n--) c32 = _mm_crc32_u8(c32, *p++);
        return ~c32;
    }
    static int pigeon_crc32c_has_hardware(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("sse4.2");
    }
    #elif defined(__aarch64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
    #include <arm_acle.h>
    #include <sys/auxv.h>
    #include <asm/hwcap.h>
    __attribute__((target("+crc")))
    static uint32_t pigeon_crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
        uint64_t v;
        crc = ~crc;
        while (n >= 8) { memcpy(&v, p, 8); crc = __crc32cd(crc, v); p += 8; n -= 8; }
        while (n--) crc = __crc32cb(crc, *p++);
        return ~crc;
    }
    static int pigeon_crc32c_has_hardware(void) { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
    #else
    static uint32_t pigeon_crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
        return pigeon_crc32c_bitwise(crc, p, n);
    }
    static int pigeon_crc32c_has_hardware(void) { return 0; }
    #endif
    static uint32_t (*pigeon_crc32c)(uint32_t, const unsigned char *, size_t) = NULL;
    static void pigeon_crc32c_choose(int hardware) {
        pigeon_crc32c = hardware && pigeon_crc32c_has_hardware() ? pigeon_crc32c_hardware
                                                                 : pigeon_crc32c_bitwise;
    }
    """
    uint32_t crc32c_run "pigeon_crc32c"(uint32_t crc, const unsigned char *p, size_t n) noexcept nogil
    uint32_t crc32c_bitwise "pigeon_crc32c_bitwise"(uint32_t crc, const unsigned char *p, size_t n) noexcept nogil
    int crc32c_has_hardware "pigeon_crc32c_has_hardware"() noexcept nogil
    void crc32c_choose "pigeon_crc32c_choose"(int hardware) noexcept nogil

crc32c_choose(1)


cdef extern from *:
    """
    static int pigeon_compare_u64(const void *a, const void *b) {
        unsigned long long x = *(const unsigned long long *)a, y = *(const unsigned long long *)b;
        return (x > y) - (x < y);
    }
    """
    int compare_u64 "pigeon_compare_u64"(const void *a, const void *b) noexcept nogil


cdef uint32_t record_crc(const char *body, size_t n) noexcept:
    """The CRC-32C of a record's body."""
    return crc32c_run(0, <const unsigned char *>body, n)


def record_checksum(data, bint hardware=True):
    """The CRC-32C a record's body carries (docs/storage.md); ``hardware=False`` computes it with
    the fallback loop (tests compare the two)."""
    cdef const unsigned char[:] view = data
    cdef size_t n = view.shape[0]
    cdef const unsigned char *p = &view[0] if n else <const unsigned char *>b""
    if hardware:
        return crc32c_run(0, p, n)
    return crc32c_bitwise(0, p, n)


def checksum_in_hardware():
    """Whether this CPU computes CRC-32C with its own instruction."""
    return bool(crc32c_has_hardware())


# Records are little-endian whatever the host: written and read byte by byte.

cdef inline void _put16(char *p, uint32_t v) noexcept:
    p[0] = <char>(v & 0xff)
    p[1] = <char>((v >> 8) & 0xff)


cdef inline void _put32(char *p, uint32_t v) noexcept:
    cdef int i
    for i in range(4):
        p[i] = <char>((v >> (8 * i)) & 0xff)


cdef inline void _put64(char *p, uint64_t v) noexcept:
    cdef int i
    for i in range(8):
        p[i] = <char>((v >> (8 * i)) & 0xff)


cdef inline uint32_t _get16(const char *p) noexcept:
    return (<unsigned char>p[0]) | ((<uint32_t><unsigned char>p[1]) << 8)


cdef inline uint32_t _get32(const char *p) noexcept:
    cdef uint32_t v = 0
    cdef int i
    for i in range(4):
        v |= (<uint32_t><unsigned char>p[i]) << (8 * i)
    return v


cdef inline uint64_t _get64(const char *p) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= (<uint64_t><unsigned char>p[i]) << (8 * i)
    return v


cdef size_t publish_record_size(size_t topic_len, size_t n) noexcept:
    """Bytes of the PUBLISH record of a message: head, kind, seq, time, attempt, topic, length, payload."""
    return RECORD_HEAD + 1 + 8 + 8 + 4 + 2 + topic_len + 4 + n


cdef char *_record(Broker b, int kind, size_t body) noexcept:
    """Room for a record of ``body`` bytes at the end of the buffer, its kind written; NULL when
    out of memory. The caller fills the rest of the body, then _seal()s it."""
    cdef Log *log = &b.log
    cdef size_t need = RECORD_HEAD + body, cap
    cdef char *grown
    cdef char *p
    if log.len + need > log.cap:
        cap = log.cap * 2 if log.cap else 64 * 1024
        while cap < log.len + need:
            cap *= 2
        grown = <char *>mem_grow(&b.mem, log.buf, log.cap, cap)
        if grown == NULL:
            return NULL
        log.buf = grown
        log.cap = cap
    p = log.buf + log.len
    log.len += need
    log.appended += need
    log.records += 1
    p[RECORD_HEAD] = <char>kind
    return p


cdef inline void _seal(char *record, size_t body) noexcept:
    _put32(record, <uint32_t>body)
    _put32(record + 4, record_crc(record + RECORD_HEAD, body))


cdef int log_publish(Broker b, uint64_t seq, Topic *t, const char *data, size_t n,
                     uint32_t attempt) noexcept:
    """Record an accepted message; -1 when out of memory (the PUBLISH is refused)."""
    return _log_publish(b, seq, t, NULL, data, n, attempt)


cdef int log_publish_copy(Broker b, Msg *msg) noexcept:
    """Record a group's copy of a message: its topic field is ``<topic> <group key>``; -1 when
    out of memory."""
    return _log_publish(b, msg.seq, msg_origin(msg), msg.topic, msg_data(msg), msg.len, msg.attempt)


cdef inline size_t record_name_len(Topic *t, Topic *group) noexcept:
    """The bytes of a PUBLISH record's topic field: the topic, then a space and the group's key."""
    return t.name_len if group == NULL else t.name_len + 1 + group.name_len


cdef int _log_publish(Broker b, uint64_t seq, Topic *t, Topic *group, const char *data, size_t n,
                      uint32_t attempt) noexcept:
    cdef size_t name_len = record_name_len(t, group)
    cdef size_t size = publish_record_size(name_len, n)
    cdef size_t body = size - RECORD_HEAD
    cdef char *rec = _record(b, REC_PUBLISH, body)
    cdef char *p
    if rec == NULL:
        return -1
    p = rec + RECORD_HEAD + 1
    _put64(p, seq)
    _put64(p + 8, b.wall_ms)
    _put32(p + 16, attempt)
    _put16(p + 20, <uint16_t>name_len)
    memcpy(p + 22, topic_name(t), t.name_len)
    if group != NULL:
        p[22 + t.name_len] = b' '
        memcpy(p + 23 + t.name_len, topic_name(group), group.name_len)
    p += 22 + name_len
    _put32(p, <uint32_t>n)
    memcpy(p + 4, data, n)
    _seal(rec, body)
    if b.log.buf_first_seq == 0:
        b.log.buf_first_seq = seq
    b.log.buf_live += 1
    b.log.live += 1
    b.log.live_bytes += size
    return 0


cdef void log_settle(Broker b, uint64_t seq) noexcept:
    """A message is done: recorded (in runs) at the end of the flush. When even that cannot be
    allocated the message is not recorded as done, and comes back after a restart."""
    cdef Log *log = &b.log
    cdef uint64_t *grown
    cdef size_t cap
    if log.nsettled == log.settled_cap:
        cap = log.settled_cap * 2 if log.settled_cap else 1024
        grown = <uint64_t *>mem_grow(&b.mem, log.settled, log.settled_cap * sizeof(uint64_t),
                                     cap * sizeof(uint64_t))
        if grown == NULL:
            return
        log.settled = grown
        log.settled_cap = cap
    log.settled[log.nsettled] = seq
    log.nsettled += 1
    log.live -= 1
    _epoch_settle(log, seq)


cdef void _epoch_settle(Log *log, uint64_t seq) noexcept:
    """One message of the epoch of ``seq`` (or of the unwritten buffer) is done."""
    cdef size_t i
    if log.buf_first_seq and seq >= log.buf_first_seq:
        log.buf_live -= 1
        return
    i = _epoch_of(log, seq)
    if i < log.nepochs:
        log.epoch_live[i] -= 1


cdef size_t _epoch_of(Log *log, uint64_t seq) noexcept:
    """The index of the last epoch whose first seq is <= seq; nepochs when there is none."""
    cdef size_t low = 0, high = log.nepochs, mid
    # most messages settle in the newest epoch: look there first
    if high and log.epoch_first[high - 1] <= seq:
        return high - 1
    while low < high:
        mid = (low + high) // 2
        if log.epoch_first[mid] <= seq:
            low = mid + 1
        else:
            high = mid
    return low - 1 if low else log.nepochs


cdef int log_epoch(Broker b, uint64_t first) noexcept:
    """A new segment starts, its first message seq ``first``; -1 when out of memory."""
    cdef Log *log = &b.log
    cdef size_t cap
    cdef uint64_t *grown
    if log.nepochs == log.epochs_cap:
        cap = log.epochs_cap * 2 if log.epochs_cap else 64
        grown = <uint64_t *>mem_grow(&b.mem, log.epoch_first, log.epochs_cap * sizeof(uint64_t),
                                     cap * sizeof(uint64_t))
        if grown == NULL:
            return -1
        log.epoch_first = grown
        grown = <uint64_t *>mem_grow(&b.mem, log.epoch_live, log.epochs_cap * sizeof(uint64_t),
                                     cap * sizeof(uint64_t))
        if grown == NULL:
            return -1
        log.epoch_live = grown
        log.epochs_cap = cap
    log.epoch_first[log.nepochs] = first
    log.epoch_live[log.nepochs] = 0
    log.nepochs += 1
    log.segment_bytes = 0
    return 0


cdef size_t log_deletable(Broker b) noexcept:
    """How many of the oldest segments hold no live message (never the one being written)."""
    cdef Log *log = &b.log
    cdef size_t n = 0
    while n + 1 < log.nepochs and log.epoch_live[n] == 0:
        n += 1
    return n


cdef void log_drop_epochs(Broker b, size_t n) noexcept:
    """The store deleted the n oldest segments."""
    cdef Log *log = &b.log
    if n > log.nepochs:
        n = log.nepochs
    memmove(log.epoch_first, log.epoch_first + n, (log.nepochs - n) * sizeof(uint64_t))
    memmove(log.epoch_live, log.epoch_live + n, (log.nepochs - n) * sizeof(uint64_t))
    log.nepochs -= n


cdef void _record_done(Broker b) noexcept:
    """The seqs settled since the last flush, as DONE records of consecutive runs."""
    cdef Log *log = &b.log
    cdef size_t i = 0, j
    cdef char *rec
    if log.nsettled == 0:
        return
    qsort(log.settled, log.nsettled, sizeof(uint64_t), compare_u64)
    while i < log.nsettled:
        j = i
        while j + 1 < log.nsettled and log.settled[j + 1] <= log.settled[j] + 1:
            j += 1
        rec = _record(b, REC_DONE, 17)
        if rec != NULL:
            _put64(rec + RECORD_HEAD + 1, log.settled[i])
            _put64(rec + RECORD_HEAD + 9, log.settled[j])
            _seal(rec, 17)
        i = j + 1
    log.nsettled = 0


cdef void log_delivered(Broker b, uint64_t seq, uint32_t attempt) noexcept:
    """A message goes out for delivery to an acknowledged subscription (its attempt counts after a
    restart). Not recorded when out of memory: the attempt is then counted one short."""
    cdef char *rec = _record(b, REC_DELIVERED, 13)
    if rec == NULL:
        return
    _put64(rec + RECORD_HEAD + 1, seq)
    _put32(rec + RECORD_HEAD + 9, attempt)
    _seal(rec, 13)


cdef void log_wait(Broker b, int32_t h) noexcept:
    """h's output (a PUBLISHED reply) may leave only once the log holds what was appended so far."""
    b.conns.items[h].log_wait = b.log.appended


cdef bint log_ready(Broker b, Conn *c) noexcept:
    """Whether c's output may be handed over: its records are written (everysec, no) or synced (always)."""
    if c.log_wait == 0:
        return True
    return c.log_wait <= (b.log.synced if b.log.fsync == FSYNC_ALWAYS else b.log.written)


cdef int log_write(Broker b) except -1:
    """Hand the records to the store (on_log): one write per flush. A failed write (disk full)
    keeps them to try again at the next flush; until then publishers wait."""
    cdef Log *log = &b.log
    if not log.durable:
        return 0
    cdef bint rotate
    _record_done(b)
    if log.len == 0:
        return 0
    rotate = log.nepochs == 0 or log.rotate_next or (
        log.segment_bytes and log.segment_bytes + log.len > log.segment_max)
    try:
        b.on_log(PyMemoryView_FromMemory(log.buf, log.len, PyBUF_READ), rotate)
    except OSError as exc:
        if not log.failed:
            warn(b, f"cannot write the log: {exc.strerror or exc}; publishers wait until it can")
        log.failed = True
        return 0
    if rotate:
        if log_epoch(b, log.buf_first_seq if log.buf_first_seq else b.next_seq + 1) < 0:
            raise MemoryError()
        log.rotate_next = False
    log.epoch_live[log.nepochs - 1] += log.buf_live
    log.buf_live = 0
    log.buf_first_seq = 0
    log.segment_bytes += log.len
    log.written += log.len
    log.len = 0
    log.writes += 1
    if log.failed:
        log.failed = False
        warn(b, "the log is written again")
    if log.fsync == FSYNC_ALWAYS and log.sync_asked < log.written:
        log.sync_asked = log.written
        b.on_sync(log.written)
    log_release(b)
    return 0


cdef void log_release(Broker b) noexcept:
    """Connections whose output waited for the log and may go now are marked for the flush."""
    cdef Log *log = &b.log
    cdef int32_t i, kept = 0, h
    for i in range(log.nwaiting):
        h = log.waiting[i]
        if log_ready(b, &b.conns.items[h]):
            b.conns.items[h].log_wait = 0
            mark_dirty(b, h)
        else:
            log.waiting[kept] = h
            kept += 1
    log.nwaiting = kept
    if b.publishers_held and not log.failed:
        flow_storage_freed(b)


cdef void log_free(Broker b) noexcept:
    cdef Log *log = &b.log
    mem_free(&b.mem, log.buf, log.cap)
    mem_free(&b.mem, log.settled, log.settled_cap * sizeof(uint64_t))
    mem_free(&b.mem, log.waiting, log.waiting_cap * sizeof(int32_t))
    mem_free(&b.mem, log.epoch_first, log.epochs_cap * sizeof(uint64_t))
    mem_free(&b.mem, log.epoch_live, log.epochs_cap * sizeof(uint64_t))
    log.buf = NULL
    log.settled = NULL
    log.waiting = NULL
    log.epoch_first = NULL
    log.epoch_live = NULL


cdef void log_wait_for(Broker b, int32_t h) noexcept:
    """Keep h (its output waiting for the log) on the list log_release looks at."""
    cdef Log *log = &b.log
    cdef int32_t i
    cdef int32_t *grown
    cdef size_t cap
    for i in range(log.nwaiting):
        if log.waiting[i] == h:
            return
    if <size_t>log.nwaiting == log.waiting_cap:
        cap = log.waiting_cap * 2 if log.waiting_cap else 64
        grown = <int32_t *>mem_grow(&b.mem, log.waiting, log.waiting_cap * sizeof(int32_t),
                                    cap * sizeof(int32_t))
        if grown == NULL:
            return      # the next flush marks it again
        log.waiting = grown
        log.waiting_cap = cap
    log.waiting[log.nwaiting] = h
    log.nwaiting += 1


cdef void log_forget(Broker b, int32_t h) noexcept:
    """h is going away: off the waiting list."""
    cdef Log *log = &b.log
    cdef int32_t i
    for i in range(log.nwaiting):
        if log.waiting[i] == h:
            log.nwaiting -= 1
            log.waiting[i] = log.waiting[log.nwaiting]
            return


# ---------------------------------------------------------------- recovery


cdef int _recovered(Broker b, Recovery *r, uint64_t seq, Msg *msg) noexcept:
    """Add a published message to the table (seqs arrive in increasing order); -1 when out of memory."""
    cdef size_t cap
    cdef uint64_t *seqs
    cdef Msg **msgs
    if r.count == r.cap:
        cap = r.cap * 2 if r.cap else 4096
        seqs = <uint64_t *>mem_grow(&b.mem, r.seqs, r.cap * sizeof(uint64_t), cap * sizeof(uint64_t))
        if seqs == NULL:
            return -1
        r.seqs = seqs
        msgs = <Msg **>mem_grow(&b.mem, r.msgs, r.cap * sizeof(Msg *), cap * sizeof(Msg *))
        if msgs == NULL:
            return -1
        r.msgs = msgs
        r.cap = cap
    r.seqs[r.count] = seq
    r.msgs[r.count] = msg
    r.count += 1
    return 0


cdef size_t _lower(Recovery *r, uint64_t seq) noexcept:
    """The first index whose seq is >= seq."""
    cdef size_t low = 0, high = r.count, mid
    while low < high:
        mid = (low + high) // 2
        if r.seqs[mid] < seq:
            low = mid + 1
        else:
            high = mid
    return low


cdef str _apply(Broker b, Recovery *r, const char *body, size_t n):
    """Replay one record; None, or what is wrong with it."""
    cdef int kind = <unsigned char>body[0]
    cdef uint64_t seq, last
    cdef uint32_t attempt, name_len, length
    cdef size_t i
    cdef Topic *t
    cdef Topic *group
    cdef Msg *msg
    cdef uint64_t hv
    cdef const char *space
    cdef size_t topic_len
    if kind == REC_PUBLISH:
        if n < 27:
            return "a PUBLISH record too short"
        seq = _get64(body + 1)
        attempt = _get32(body + 17)
        name_len = _get16(body + 21)
        if n < 27 + name_len or name_len == 0 or name_len > 2 * TOPIC_MAX + 2 + GROUP_NAME_MAX:
            return "a PUBLISH record with a bad topic length"
        length = _get32(body + 23 + name_len)
        if n != 27 + name_len + length:
            return "a PUBLISH record whose length does not add up"
        if seq <= r.max_seq:
            return "a PUBLISH record out of sequence"
        space = <const char *>memchr(body + 23, b' ', name_len)
        topic_len = space - (body + 23) if space != NULL else name_len
        if topic_len == 0 or topic_len > TOPIC_MAX:
            return "a PUBLISH record with a bad topic length"
        hv = topic_hash(body + 23, topic_len)
        t = topics_find(&b.topic_table, body + 23, topic_len, hv)
        if t == NULL:
            t = topics_add(&b.mem, &b.topic_table, body + 23, topic_len, hv)
            if t == NULL:
                raise MemoryError()
        group = NULL
        if space != NULL:
            # a group's copy: it goes back to its group, which lives again (groups.pxd)
            group = group_recover(b, space + 1, name_len - topic_len - 1)
            if group == NULL:
                topics_drop_if_unused(b, t)
                return "a PUBLISH record with a bad group"
        if group != NULL:
            msg = msg_copy_new(b, group, t, body + 27 + name_len, length)
        else:
            msg = msg_new(b, t, body + 27 + name_len, length)
        if msg == NULL:
            raise MemoryError()
        msg.seq = seq
        msg.attempt = attempt
        if _recovered(b, r, seq, msg) < 0:
            msg_release(b, msg)
            raise MemoryError()
        r.max_seq = seq
        return None
    if kind == REC_DONE:
        if n != 17:
            return "a DONE record of the wrong length"
        seq = _get64(body + 1)
        last = _get64(body + 9)
        i = _lower(r, seq)
        while i < r.count and r.seqs[i] <= last:
            if r.msgs[i] != NULL:
                msg_release(b, r.msgs[i])
                r.msgs[i] = NULL
            i += 1
        return None
    if kind == REC_DELIVERED:
        if n != 13:
            return "a DELIVERED record of the wrong length"
        seq = _get64(body + 1)
        attempt = _get32(body + 9)
        i = _lower(r, seq)
        if i < r.count and r.seqs[i] == seq and r.msgs[i] != NULL and r.msgs[i].attempt < attempt:
            r.msgs[i].attempt = attempt
        return None
    return f"a record of unknown kind {kind}"


cdef tuple recovery_feed(Broker b, Recovery *r, const char *data, size_t n):
    """Replay the records of ``data``: ``(offset, problem)``, the offset up to which they were
    sound, and None or what is wrong at that offset (a torn tail, a bad checksum, ...)."""
    cdef size_t pos = 0, body
    cdef str problem
    while pos < n:
        if n - pos < RECORD_HEAD:
            return pos, "a record cut short (its head is incomplete)"
        body = _get32(data + pos)
        if body == 0 or body > n - pos - RECORD_HEAD:
            return pos, "a record cut short" if body <= (1 << 30) else "a record of impossible length"
        if record_crc(data + pos + RECORD_HEAD, body) != _get32(data + pos + 4):
            return pos, "a record whose checksum does not match"
        problem = _apply(b, r, data + pos + RECORD_HEAD, body)
        if problem is not None:
            return pos, problem
        r.records += 1
        pos += RECORD_HEAD + body
    return pos, None


cdef tuple recovery_finish(Broker b, Recovery *r):
    """Every message published and not done goes to the tail of its topic's backlog, in sequence
    order (its original order); returns ``(messages, topics, records replayed, seq of the oldest
    message, 0 if none)``."""
    cdef size_t i, j, messages = 0
    cdef uint64_t records = r.records, oldest = 0
    cdef Msg *msg
    cdef Topic *t
    cdef Topic *touched = NULL
    for i in range(r.count):
        msg = r.msgs[i]
        if msg == NULL:
            continue
        t = msg.topic
        if queue_push(&b.mem, &t.backlog, msg) < 0:
            msg_release(b, msg)
            b.counters.lost += 1
            continue
        if not t.touched:
            touch_topic(t, &touched)
        b.backlog_messages += 1
        b.backlog_bytes += msg.len
        b.log.live += 1
        b.log.live_bytes += publish_record_size(
            record_name_len(msg_origin(msg), t if msg_origin(msg) != t else NULL), msg.len)
        j = _epoch_of(&b.log, msg.seq)
        if j < b.log.nepochs:
            b.log.epoch_live[j] += 1
        if oldest == 0:
            oldest = msg.seq
        messages += 1
    mem_free(&b.mem, r.seqs, r.cap * sizeof(uint64_t))
    mem_free(&b.mem, r.msgs, r.cap * sizeof(Msg *))
    if r.max_seq > b.next_seq:
        b.next_seq = r.max_seq
    b.log.rotate_next = True    # new records go to a new segment: the last one may end torn
    groups_recovered(b)
    topics = 0
    t = touched
    while t != NULL:
        topics += 1
        t = t.touched_next
    drain_touched(b, touched)
    memset(r, 0, sizeof(Recovery))
    return messages, topics, records, oldest
