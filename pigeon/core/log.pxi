# Log: records, their order with the replies, and recovery (see log.pxd).

from libc.stdlib cimport free, qsort, realloc
from libc.string cimport memcmp, memmove, memset

from pigeon._crc32c cimport crc32c_bitwise, crc32c_choose, crc32c_has_hardware, crc32c_run
from pigeon._little_endian cimport get16, get32, get64, put16, put32, put64

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


# Records are little-endian whatever the host: written and read with pigeon/_little_endian.pxd.


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
    put32(record, <uint32_t>body)
    put32(record + 4, record_crc(record + RECORD_HEAD, body))


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
    put64(p, seq)
    put64(p + 8, b.wall_ms)
    put32(p + 16, attempt)
    put16(p + 20, <uint16_t>name_len)
    memcpy(p + 22, topic_name(t), t.name_len)
    if group != NULL:
        p[22 + t.name_len] = b' '
        memcpy(p + 23 + t.name_len, topic_name(group), group.name_len)
    p += 22 + name_len
    put32(p, <uint32_t>n)
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
    if seq == 0:
        return      # a request: never logged (msg_request_new)
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
    if b.recovery.restoring:
        return 0        # the restore has not counted every segment's live messages yet
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
            put64(rec + RECORD_HEAD + 1, log.settled[i])
            put64(rec + RECORD_HEAD + 9, log.settled[j])
            _seal(rec, 17)
        i = j + 1
    log.nsettled = 0


cdef void log_delivered(Broker b, uint64_t seq, uint32_t attempt) noexcept:
    """A message goes out for delivery to an acknowledged subscription (its attempt counts after a
    restart). Not recorded when out of memory: the attempt is then counted one short."""
    cdef char *rec
    if seq == 0:
        return      # a request: never logged (msg_request_new)
    rec = _record(b, REC_DELIVERED, 13)
    if rec == NULL:
        return
    put64(rec + RECORD_HEAD + 1, seq)
    put32(rec + RECORD_HEAD + 9, attempt)
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
    _recovery_free(b, &b.recovery)
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
#
# Two steps (docs/storage.md, "Recovery"). The scan reads every record before
# the server serves, so that a message is never handed out before every DONE
# record of the log was seen; it keeps only the DONE runs and the DELIVERED
# attempts. It checks the length and fields of every record and the checksum of
# every DONE and DELIVERED record; the checksums of the PUBLISH records of sealed
# segments may be left to the restore (most of the bytes, and most of the scan's
# time), which checks each before it puts its message back. The restore walks
# the PUBLISH records again while the server serves, a chunk per pass of the
# event loop, so that a subscriber gets its topic's first messages at once.
# PUBLISH waits until the restore is over: a new message goes behind every
# recovered one of its topic.


cdef int _grow_pairs(Broker b, uint64_t **pairs, size_t *cap, size_t count) noexcept:
    """Room for one more (u64, u64) pair; -1 when out of memory."""
    cdef size_t grown_cap
    cdef uint64_t *grown
    if count < cap[0]:
        return 0
    grown_cap = cap[0] * 2 if cap[0] else 4096
    grown = <uint64_t *>mem_grow(&b.mem, pairs[0], cap[0] * 2 * sizeof(uint64_t),
                                 grown_cap * 2 * sizeof(uint64_t))
    if grown == NULL:
        return -1
    pairs[0] = grown
    cap[0] = grown_cap
    return 0


cdef str _scan_record(Broker b, Recovery *r, const char *body, size_t n):
    """Check one record and keep what it says about the messages; None, or what is wrong with it."""
    cdef int kind = <unsigned char>body[0]
    cdef uint64_t seq
    cdef uint32_t name_len, length
    cdef const char *space
    cdef size_t topic_len
    if kind == REC_PUBLISH:
        if n < 27:
            return "a PUBLISH record too short"
        seq = get64(body + 1)
        name_len = get16(body + 21)
        if n < 27 + name_len or name_len == 0 or name_len > 2 * TOPIC_MAX + 2 + GROUP_NAME_MAX:
            return "a PUBLISH record with a bad topic length"
        length = get32(body + 23 + name_len)
        if n != 27 + name_len + length:
            return "a PUBLISH record whose length does not add up"
        if seq <= r.max_seq:
            return "a PUBLISH record out of sequence"
        space = <const char *>memchr(body + 23, b' ', name_len)
        topic_len = space - (body + 23) if space != NULL else name_len
        if topic_len == 0 or topic_len > TOPIC_MAX:
            return "a PUBLISH record with a bad topic length"
        if space != NULL and not group_key_valid(space + 1, name_len - topic_len - 1):
            return "a PUBLISH record with a bad group"
        r.max_seq = seq
        r.total_bytes += RECORD_HEAD + n
        return None
    if kind == REC_DONE:
        if n != 17:
            return "a DONE record of the wrong length"
        if _grow_pairs(b, &r.done, &r.done_cap, r.ndone) < 0:
            raise MemoryError()
        r.done[2 * r.ndone] = get64(body + 1)
        r.done[2 * r.ndone + 1] = get64(body + 9)
        r.ndone += 1
        return None
    if kind == REC_DELIVERED:
        if n != 13:
            return "a DELIVERED record of the wrong length"
        if _grow_pairs(b, &r.delivered, &r.delivered_cap, r.ndelivered) < 0:
            raise MemoryError()
        r.delivered[2 * r.ndelivered] = get64(body + 1)
        r.delivered[2 * r.ndelivered + 1] = get32(body + 9)
        r.ndelivered += 1
        return None
    return f"a record of unknown kind {kind}"


cdef str CHECKSUM_MISMATCH = "a record whose checksum does not match"


cdef tuple recovery_scan(Broker b, Recovery *r, const char *data, size_t n, bint publish_checksums):
    """Check the records of ``data``: ``(offset, problem)``, the offset up to which they were
    sound, and None or what is wrong at that offset (a torn tail, a bad checksum, ...). Without
    ``publish_checksums`` the checksums of PUBLISH records are left to recovery_restore."""
    cdef size_t pos = 0, body
    cdef str problem
    while pos < n:
        if n - pos < RECORD_HEAD:
            return pos, "a record cut short (its head is incomplete)"
        body = get32(data + pos)
        if body == 0 or body > n - pos - RECORD_HEAD:
            return pos, "a record cut short" if body <= (1 << 30) else "a record of impossible length"
        if ((publish_checksums or <unsigned char>data[pos + RECORD_HEAD] != REC_PUBLISH)
                and record_crc(data + pos + RECORD_HEAD, body) != get32(data + pos + 4)):
            return pos, CHECKSUM_MISMATCH
        problem = _scan_record(b, r, data + pos + RECORD_HEAD, body)
        if problem is not None:
            return pos, problem
        r.records += 1
        pos += RECORD_HEAD + body
    return pos, None


cdef void recovery_scanned(Broker b, Recovery *r) noexcept:
    """The scan is over: the DONE runs sorted and merged, the DELIVERED pairs sorted, new
    messages numbered after the log's, and new records in a new segment (the last one may end
    torn). The restore starts: PUBLISH waits until it ends."""
    _recovery_sort(r)
    if r.max_seq > b.next_seq:
        b.next_seq = r.max_seq
    b.log.rotate_next = True
    r.restoring = True


cdef void _recovery_sort(Recovery *r) noexcept:
    """The DONE runs sorted and merged, the DELIVERED pairs sorted: what the restore looks up."""
    cdef size_t i, kept = 0
    qsort(r.done, r.ndone, 2 * sizeof(uint64_t), compare_u64)
    for i in range(r.ndone):
        if kept and r.done[2 * i] <= r.done[2 * kept - 1] + 1:
            if r.done[2 * i + 1] > r.done[2 * kept - 1]:
                r.done[2 * kept - 1] = r.done[2 * i + 1]
        else:
            r.done[2 * kept] = r.done[2 * i]
            r.done[2 * kept + 1] = r.done[2 * i + 1]
            kept += 1
    r.ndone = kept
    qsort(r.delivered, r.ndelivered, 2 * sizeof(uint64_t), compare_u64)


cdef bint _is_done(Recovery *r, uint64_t seq) noexcept:
    """Whether a DONE record covers seq (asked for increasing seqs)."""
    while r.done_at < r.ndone and r.done[2 * r.done_at + 1] < seq:
        r.done_at += 1
    return r.done_at < r.ndone and r.done[2 * r.done_at] <= seq


cdef uint32_t _attempt(Recovery *r, uint64_t seq, uint32_t attempt) noexcept:
    """The highest attempt the log records for seq (asked for increasing seqs)."""
    while r.delivered_at < r.ndelivered and r.delivered[2 * r.delivered_at] < seq:
        r.delivered_at += 1
    while r.delivered_at < r.ndelivered and r.delivered[2 * r.delivered_at] == seq:
        if r.delivered[2 * r.delivered_at + 1] > attempt:
            attempt = <uint32_t>r.delivered[2 * r.delivered_at + 1]
        r.delivered_at += 1
    return attempt


cdef int _count_topic(Broker b, Recovery *r, uint64_t serial) noexcept:
    """Add a topic's serial to the set of the topics restored into; -1 when out of memory."""
    cdef size_t i, cap
    cdef uint64_t *grown
    cdef uint64_t *old = r.topics
    cdef size_t old_cap = r.topics_cap
    if 2 * (r.ntopics + 1) > r.topics_cap:
        cap = r.topics_cap * 2 if r.topics_cap else 64
        grown = <uint64_t *>mem_alloc(&b.mem, cap * sizeof(uint64_t))
        if grown == NULL:
            return -1
        memset(grown, 0, cap * sizeof(uint64_t))
        r.topics = grown
        r.topics_cap = cap
        r.ntopics = 0
        for i in range(old_cap):
            if old[i]:
                _count_topic(b, r, old[i])
        mem_free(&b.mem, old, old_cap * sizeof(uint64_t))
    i = <size_t>serial & (r.topics_cap - 1)     # serials are consecutive: they spread well as they are
    while r.topics[i] and r.topics[i] != serial:
        i = (i + 1) & (r.topics_cap - 1)
    if not r.topics[i]:
        r.topics[i] = serial
        r.ntopics += 1
    return 0


cdef Topic *_restore_topic(Broker b, const char *name, size_t n) noexcept:
    """The topic a recovered message goes to, made if need be; NULL when out of memory."""
    cdef uint64_t hv = topic_hash(name, n)
    cdef Topic *t = topics_find(&b.topic_table, name, n, hv)
    if t == NULL:
        t = topics_add(&b.mem, &b.topic_table, name, n, hv)
    return t


cdef Py_ssize_t recovery_restore(Broker b, Recovery *r, const char *data, size_t n, size_t limit,
                                 bint checksums, bint *damaged, bint renumber=False) except -1:
    """Walk the records of ``data`` (scanned before) and put each message not done at the tail of
    its topic, with its attempt; stop at a record boundary after ``limit`` records. With
    ``checksums`` (the scan left them) each PUBLISH record's checksum is checked first: at one
    that does not match the walk stops before it and sets ``damaged``. Returns the bytes
    walked. The topics that got messages are drained at the end (their subscribers get them at
    the next flush). With ``renumber`` the records are another node's (recovery_take_over):
    each message is a new one of this log, numbered and recorded with its attempt."""
    cdef size_t pos = 0, walked = 0, body, start
    cdef const char *rec
    cdef uint64_t seq
    cdef uint32_t name_len, length
    cdef Topic *t = NULL
    cdef Topic *group
    cdef Topic *touched = NULL
    cdef Msg *msg
    cdef size_t j, topic_len
    cdef const char *space
    cdef bint out_of_memory = False
    while pos < n and walked < limit:
        start = pos
        body = get32(data + pos)
        rec = data + pos + RECORD_HEAD
        pos += RECORD_HEAD + body
        walked += 1
        if <unsigned char>rec[0] != REC_PUBLISH:
            continue
        if checksums and record_crc(rec, body) != get32(data + start + 4):
            damaged[0] = True
            pos = start
            break
        r.done_bytes += RECORD_HEAD + body
        seq = get64(rec + 1)
        if _is_done(r, seq):
            continue
        name_len = get16(rec + 21)
        length = get32(rec + 23 + name_len)
        # a group's copy names "<topic> <group key>": it goes back to its group (groups.pxd)
        space = <const char *>memchr(rec + 23, b' ', name_len)
        topic_len = space - (rec + 23) if space != NULL else name_len
        # pipelined publishers repeat a topic: keep the last one while it is pinned (touched)
        if t == NULL or t.name_len != topic_len or memcmp(topic_name(t), rec + 23, topic_len) != 0:
            t = _restore_topic(b, rec + 23, topic_len)
            if t == NULL:
                out_of_memory = True
                break
        if space != NULL:
            group = group_recover(b, space + 1, name_len - topic_len - 1)   # the scan checked the key
            msg = msg_copy_new(b, group, t, rec + 27 + name_len, length) if group != NULL else NULL
        else:
            msg = msg_new(b, t, rec + 27 + name_len, length)
        if msg == NULL:
            topics_drop_if_unused(b, t)
            out_of_memory = True
            break
        msg.attempt = _attempt(r, seq, get32(rec + 17))
        if renumber:
            # a new message of this log (msg_new numbered it), recorded with its attempt
            if b.log.durable and (log_publish_copy(b, msg) if space != NULL
                                  else log_publish(b, msg.seq, t, msg_data(msg), length, msg.attempt)) < 0:
                msg_release(b, msg)
                out_of_memory = True
                break
        else:
            b.next_seq -= 1     # msg_new numbered it: it keeps the seq of its record
            msg.seq = seq
        if queue_push(&b.mem, &msg.topic.backlog, msg) < 0 or _count_topic(b, r, msg.topic.serial) < 0:
            msg_release(b, msg)
            out_of_memory = True
            break
        touch_topic(t, &touched)
        touch_topic(msg.topic, &touched)
        b.backlog_messages += 1
        b.backlog_bytes += length
        if not renumber:
            # its record is in the log already (log_publish counts a new one)
            b.log.live += 1
            b.log.live_bytes += RECORD_HEAD + body
            j = _epoch_of(&b.log, seq)
            if j < b.log.nepochs:
                b.log.epoch_live[j] += 1
        if r.oldest == 0:
            r.oldest = seq
        r.messages += 1
    drain_touched(b, touched)
    if out_of_memory:
        raise MemoryError()
    return pos


cdef void _recovery_free(Broker b, Recovery *r) noexcept:
    mem_free(&b.mem, r.done, r.done_cap * 2 * sizeof(uint64_t))
    mem_free(&b.mem, r.delivered, r.delivered_cap * 2 * sizeof(uint64_t))
    mem_free(&b.mem, r.topics, r.topics_cap * sizeof(uint64_t))
    memset(r, 0, sizeof(Recovery))


cdef tuple recovery_finish(Broker b, Recovery *r):
    """The restore is over: returns ``(messages, topics, records scanned, seq of the oldest
    message restored, 0 if none)``; the publishers that waited for it go on."""
    cdef tuple result
    if not r.restoring:
        recovery_scanned(b, r)
    cdef uint64_t messages = r.messages, total = r.total_bytes
    result = (messages, r.ntopics, r.records, r.oldest)
    _recovery_free(b, r)
    groups_recovered(b)
    r.messages = messages       # STATS keeps what the recovery did
    r.total_bytes = total
    r.done_bytes = total
    flow_storage_freed(b)
    return result


cdef uint64_t recovery_take_over(Broker b, const char *data, size_t n, Py_ssize_t *damaged_at) except? 0:
    """Put back another node's messages: ``data`` holds its PUBLISH records of messages not done
    and their DELIVERED records, in its log order. They are checked and replayed as a recovery
    does (each to the tail of its topic, a group's copy to its group made again, with the highest
    attempt its records say), but each is a new message of this log. As a start scans a sealed
    segment, the scan leaves the PUBLISH records' checksums to the restore, which checks each
    before its message comes back: at one that does not match ``damaged_at`` says where it is
    (else -1), and the messages before it are back, none after it. Returns how many came back;
    ValueError when the scan finds a record not sound (nothing was put back)."""
    cdef Recovery r
    cdef uint64_t messages
    cdef Py_ssize_t walked
    cdef bint damaged = False
    memset(&r, 0, sizeof(Recovery))
    damaged_at[0] = -1
    try:
        offset, problem = recovery_scan(b, &r, data, n, False)
        if problem is not None:
            raise ValueError(f"{problem} at offset {offset}")
        _recovery_sort(&r)
        walked = recovery_restore(b, &r, data, n, <size_t>-1, True, &damaged, True)
        if damaged:
            damaged_at[0] = walked
        messages = r.messages
    finally:
        _recovery_free(b, &r)
    groups_recovered(b)
    return messages


cdef bint log_restoring_hold(Broker b, int32_t h) noexcept:
    """While the restore runs, a PUBLISH waits for its end (its topic may have recovered
    messages still to come, which go first)."""
    if not b.recovery.restoring:
        return False
    flow_hold(b, h, NULL, HELD_STORAGE)
    return True


# ---------------------------------------------------------------- compaction
#
# The store rewrites sealed segments with only the records a recovery still needs
# (pigeon/server/compaction.py, docs/storage.md "Compaction"). These two walk a
# segment's records at C speed for it; they change nothing. The segments they are
# given were checked at start or written by this process: lengths are trusted,
# checksums not checked again, and the walk stops at zeros (a segment made ahead).


cdef inline size_t _next_record(const char *data, size_t pos, size_t n) noexcept nogil:
    """The size of the record at ``pos``, or 0 at the end of the records."""
    cdef size_t body
    if n - pos < RECORD_HEAD + 1:
        return 0
    body = get32(data + pos)
    if body == 0 or body > n - pos - RECORD_HEAD:
        return 0
    return RECORD_HEAD + body


ctypedef struct Pairs:
    # (u64, u64) pairs a walk collects without Python's lock (plain malloc: it lives for one call)
    uint64_t *items
    size_t count
    size_t cap


cdef int _pairs_add(Pairs *pairs, uint64_t first, uint64_t second) noexcept nogil:
    """Append a pair; -1 when out of memory."""
    cdef size_t cap
    cdef uint64_t *grown
    if pairs.count == pairs.cap:
        cap = pairs.cap * 2 if pairs.cap else 256
        grown = <uint64_t *>realloc(pairs.items, cap * 2 * sizeof(uint64_t))
        if grown == NULL:
            return -1
        pairs.items = grown
        pairs.cap = cap
    pairs.items[2 * pairs.count] = first
    pairs.items[2 * pairs.count + 1] = second
    pairs.count += 1
    return 0


cdef list _pairs_list(Pairs *pairs):
    """The pairs as a list of tuples; frees them."""
    cdef size_t i
    found = [(pairs.items[2 * i], pairs.items[2 * i + 1]) for i in range(pairs.count)]
    free(pairs.items)
    pairs.items = NULL
    return found


cdef int _summary_walk(const char *p, size_t n, Pairs *published, Pairs *done,
                       Py_ssize_t *publishes, Py_ssize_t *others) noexcept nogil:
    """segment_summary's walk; -1 when out of memory."""
    cdef size_t pos = 0, size
    cdef int kind
    cdef uint64_t seq
    while pos < n:
        size = _next_record(p, pos, n)
        if size == 0:
            break
        kind = <unsigned char>p[pos + RECORD_HEAD]
        if kind == REC_PUBLISH:
            seq = get64(p + pos + RECORD_HEAD + 1)
            if published.count and seq == published.items[2 * published.count - 1] + 1:
                published.items[2 * published.count - 1] = seq
            elif _pairs_add(published, seq, seq) < 0:
                return -1
            publishes[0] += 1
        else:
            if kind == REC_DONE and _pairs_add(done, get64(p + pos + RECORD_HEAD + 1),
                                               get64(p + pos + RECORD_HEAD + 9)) < 0:
                return -1
            others[0] += 1
        pos += size
    return 0


def segment_summary(data):
    """What compaction needs of a segment's records (its bytes after the header): ``(published,
    publishes, done, others)``, the seqs of its PUBLISH records as (first, last) runs, how many
    there are, the runs its DONE records name (as written), and how many DONE and DELIVERED
    records it has. The walk runs without Python's lock (the event loop goes on meanwhile)."""
    cdef const unsigned char[:] view = data
    cdef size_t n = view.shape[0]
    cdef const char *p = <const char *>&view[0] if n else <const char *>b""
    cdef Pairs published, done
    cdef Py_ssize_t publishes = 0, others = 0
    cdef int failed
    memset(&published, 0, sizeof(Pairs))
    memset(&done, 0, sizeof(Pairs))
    with nogil:
        failed = _summary_walk(p, n, &published, &done, &publishes, &others)
    found = _pairs_list(&published), publishes, _pairs_list(&done), others
    if failed:
        raise MemoryError()
    return found


cdef bint _in_runs(const uint64_t *runs, size_t nruns, uint64_t seq) noexcept nogil:
    """Whether sorted, disjoint (first, last) pairs hold seq."""
    cdef size_t low = 0, high = nruns, mid
    while low < high:
        mid = (low + high) // 2
        if runs[2 * mid + 1] < seq:
            low = mid + 1
        else:
            high = mid
    return low < nruns and runs[2 * low] <= seq


cdef int _kept_walk(const char *p, size_t n, const uint64_t *runs, size_t nruns,
                    Pairs *kept) noexcept nogil:
    """segment_kept's walk; -1 when out of memory."""
    cdef size_t pos = 0, size
    cdef int kind
    while pos < n:
        size = _next_record(p, pos, n)
        if size == 0:
            break
        kind = <unsigned char>p[pos + RECORD_HEAD]
        if (kind == REC_PUBLISH or kind == REC_DELIVERED) and not _in_runs(
                runs, nruns, get64(p + pos + RECORD_HEAD + 1)):
            if kept.count and kept.items[2 * kept.count - 1] == pos:
                kept.items[2 * kept.count - 1] = pos + size
            elif _pairs_add(kept, pos, pos + size) < 0:
                return -1
        pos += size
    return 0


def segment_kept(data, done):
    """The parts of a segment's records (its bytes after the header) that a compaction keeps: the
    PUBLISH and DELIVERED records of the messages not in ``done`` (sorted, disjoint (first, last)
    runs of seqs, the bytes of an ``array('Q')`` of first, last, first, last ...), as (start,
    end) offsets, adjacent ones joined. The walk runs without Python's lock."""
    cdef const unsigned char[:] view = data
    cdef const unsigned char[:] runs_view = done
    cdef size_t n = view.shape[0]
    cdef size_t nruns = runs_view.shape[0] // 16
    cdef const char *p = <const char *>&view[0] if n else <const char *>b""
    cdef const uint64_t *runs = <const uint64_t *>&runs_view[0] if nruns else NULL
    cdef Pairs kept
    cdef int failed
    memset(&kept, 0, sizeof(Pairs))
    with nogil:
        failed = _kept_walk(p, n, runs, nruns, &kept)
    found = _pairs_list(&kept)
    if failed:
        raise MemoryError()
    return found
