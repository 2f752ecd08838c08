# Parser: tokenizing, topic checks and dispatch (see parser.pxd).

include "invisible.pxi"

cdef uint64_t _PUBLISH_WORD
memcpy(&_PUBLISH_WORD, b"publish ", 8)

COMMAND_NAMES = ("connect", "subscribe", "unsubscribe", "publish", "ping", "disconnect", "stats",
                 "hello", "ack", "nack", "destroy", "req", "reply", "unknown")
ERROR_CODES = tuple(ERROR_CODE_TEXT[i].decode() for i in range(ERR_KINDS))
ERROR_NAMES = tuple(code.lower() for code in ERROR_CODES)
assert len(COMMAND_NAMES) == CMD_KINDS


cdef inline bint _blank(char c) noexcept:
    """Fields are separated by spaces or tabs."""
    return c == b' ' or c == b'\t'


cdef bint next_field(char **p, size_t *n, char **field, size_t *flen) noexcept:
    """Take the next field from (p, n), leaving (p, n) at its separator; False when none is left."""
    cdef char *s = p[0]
    cdef char *end = s + n[0]
    cdef char *e
    while s < end and _blank(s[0]):
        s += 1
    if s == end:
        p[0] = s
        n[0] = 0
        return False
    e = s
    while e < end and not _blank(e[0]):
        e += 1
    field[0] = s
    flen[0] = e - s
    p[0] = e
    n[0] = end - e
    return True


cdef inline bint _starts_with_publish(const char *p) noexcept:
    """``PUBLISH `` in any case, by one 8-byte comparison: the command of almost every line."""
    cdef uint64_t word
    memcpy(&word, p, 8)
    # OR-ing 0x20 maps exactly the letters to lower case; the space is checked on its own
    return (word | 0x2020202020202020ULL) == _PUBLISH_WORD and p[7] == b' '


cdef inline bint _starts_with_pub(const char *p, size_t n) noexcept:
    """``PUB`` and a separator, in any case: the header of a framed publish."""
    return (n > 4 and (<unsigned char>p[0] | 0x20) == c'p' and (<unsigned char>p[1] | 0x20) == c'u'
            and (<unsigned char>p[2] | 0x20) == c'b' and _blank(p[3]))


cdef inline int _frame_kind(const char *p, size_t n) noexcept:
    """FRAME_PUB, FRAME_REQ or FRAME_REPLY for a line that starts a frame's header (its word and
    a separator, in any case), else 0; a PUBLISH line is told apart by its fourth byte."""
    if _starts_with_pub(p, n):
        return FRAME_PUB
    if n > 4 and (<unsigned char>p[0] | 0x20) == c'r' and (<unsigned char>p[1] | 0x20) == c'e':
        if (<unsigned char>p[2] | 0x20) == c'q' and _blank(p[3]):
            return FRAME_REQ
        if (n > 6 and (<unsigned char>p[2] | 0x20) == c'p' and (<unsigned char>p[3] | 0x20) == c'l'
                and (<unsigned char>p[4] | 0x20) == c'y' and _blank(p[5])):
            return FRAME_REPLY
    return 0


cdef bint only_blanks(const char *p, size_t n) noexcept:
    cdef size_t i
    for i in range(n):
        if not _blank(p[i]):
            return False
    return True


cdef bint word_is(const char *p, size_t n, const char *lower, size_t ln) noexcept:
    """ASCII case-insensitive comparison with a lower-case word: (c | 0x20) maps exactly the letters."""
    cdef size_t i
    if n != ln:
        return False
    for i in range(n):
        if (<unsigned char>p[i] | 0x20) != <unsigned char>lower[i]:
            return False
    return True


cdef bint printable(const char *p, size_t n) noexcept:
    """Short and printable ASCII: safe to echo back in an ERROR line."""
    cdef size_t i
    if n > 64:
        return False
    for i in range(n):
        if <unsigned char>p[i] < 0x21 or <unsigned char>p[i] > 0x7e:
            return False
    return True


cdef bint _invisible(uint32_t cp) noexcept:
    """Whether a code point is in the generated table of refused ones (a binary search)."""
    cdef size_t low = 0, high = INVISIBLE_RANGES, mid
    while low < high:
        mid = (low + high) // 2
        if cp > INVISIBLE_TABLE[2 * mid + 1]:
            low = mid + 1
        elif cp < INVISIBLE_TABLE[2 * mid]:
            high = mid
        else:
            return True
    return False


cdef int topic_problem(const char *p, size_t n) noexcept:
    """TOPIC_OK for a valid name: 1 to TOPIC_MAX bytes of UTF-8 without invisible characters."""
    cdef size_t i = 0, k, extra
    cdef unsigned char c
    cdef uint32_t cp, low
    if n == 0 or n > <size_t>TOPIC_MAX:
        return TOPIC_BAD_LENGTH
    while i < n:
        c = p[i]
        if c < 0x80:
            if c <= 0x20 or c == 0x7f:
                return TOPIC_INVISIBLE
            i += 1
            continue
        if 0xc2 <= c <= 0xdf:
            extra = 1
            cp = c & 0x1f
            low = 0x80
        elif 0xe0 <= c <= 0xef:
            extra = 2
            cp = c & 0x0f
            low = 0x800
        elif 0xf0 <= c <= 0xf4:
            extra = 3
            cp = c & 0x07
            low = 0x10000
        else:
            return TOPIC_BAD_UTF8
        if i + extra >= n:
            return TOPIC_BAD_UTF8
        for k in range(1, extra + 1):
            c = p[i + k]
            if (c & 0xc0) != 0x80:
                return TOPIC_BAD_UTF8
            cp = (cp << 6) | (c & 0x3f)
        if cp < low or cp > 0x10ffff or 0xd800 <= cp <= 0xdfff:
            return TOPIC_BAD_UTF8
        if _invisible(cp):
            return TOPIC_INVISIBLE
        i += extra + 1
    return TOPIC_OK


cdef char *read_buffer_load(Broker b, int32_t h) except NULL:
    """Put h's carried-over input at the front of the read buffer, with READ_ROOM free after it;
    or, while h reads a large frame into its own buffer, leave the input there. Returns where the
    input now is (b.rbuf.target, b.rbuf.target_cap bytes)."""
    cdef Conn *c = &b.conns.items[h]
    cdef size_t need = c.input_len + READ_ROOM
    cdef char *grown
    b.rbuf.owner = h
    if c.input_room > c.input_len:
        b.rbuf.target = c.input
        b.rbuf.target_cap = c.input_room
        return c.input
    if b.rbuf.cap < need:
        grown = <char *>mem_grow(&b.mem, b.rbuf.data, b.rbuf.cap, need)
        if grown == NULL:
            raise MemoryError()
        b.rbuf.data = grown
        b.rbuf.cap = need
    if c.input_len:
        memcpy(b.rbuf.data, c.input, c.input_len)
    b.rbuf.target = b.rbuf.data
    b.rbuf.target_cap = b.rbuf.cap
    return b.rbuf.data


cdef int stop_reading(Broker b, int32_t h) except -1:
    """Have the server stop reading h (until conn_continue)."""
    cdef Conn *c = &b.conns.items[h]
    if c.reading_stopped:
        return 0
    c.reading_stopped = True
    b.counters.read_pauses += 1
    if b.on_reading is not None:
        b.on_reading(h, False)
    return 0


cdef inline bint input_fits(Broker b, size_t held, size_t wanted) noexcept:
    """Whether a connection's unfinished input may grow from ``held`` to ``wanted`` bytes (held here,
    or by the cluster's router: Broker.hold_input): up to INPUT_SLACK always, past it only under
    --max-memory."""
    return wanted <= INPUT_SLACK or mem_total(&b.mem) - held + wanted <= b.limit.max_memory


cdef int process_input(Broker b, int32_t h, char *buf, size_t n) except -1:
    """Run the complete lines of ``buf`` while h can go on; keep the rest as its input.

    h cannot go on while its transport is full (paused), while a PUBLISH of
    its waits for flow control (held, flow.pxd) or while its CONNECT waits for
    the server to check its password (authenticating, auth.pxd): then the rest
    waits, and the server is told to stop reading h until it can
    (conn_continue). Output of h's own passing a batch is handed over at once,
    so the transport can say it is full.
    """
    cdef size_t pos = 0, line_len, left, used
    cdef char *nl
    cdef bint too_long = False
    cdef bint partial_frame = False
    cdef size_t frame_size = 0
    cdef Conn *c = &b.conns.items[h]
    cdef char reason[96]
    cdef bint waits
    cdef int stop, kind
    while pos < n and c.state == CONN_OPEN and not c.paused and not c.held:
        if c.skip:
            # the payload of a refused frame: dropped unread (its line end is then a blank line)
            used = c.skip if c.skip < n - pos else n - pos
            c.skip -= used
            pos += used
            continue
        nl = <char *>memchr(buf + pos, b'\n', n - pos)
        if nl == NULL:
            too_long = n - pos > b.limit.max_line
            break
        line_len = nl - (buf + pos)
        if line_len > b.limit.max_line:
            too_long = True
            break
        kind = _frame_kind(buf + pos, line_len)
        if kind:
            stop = run_frame(b, h, buf + pos, line_len, n - pos, &used, kind)
            if stop == FRAME_PARTIAL:
                partial_frame = True    # its size was checked against the memory limit
                frame_size = used
                break
        else:
            stop = dispatch(b, h, buf + pos, line_len)
            used = line_len + 1
        if stop:
            if stop == AUTH_WAIT:
                pos += used             # the CONNECT ran; the rest waits for its answer
            c = &b.conns.items[h]
            break                       # a PUBLISH that waits (HOLD) waits with the rest
        pos += used
        c = &b.conns.items[h]
        if c.out_len >= b.limit.out_batch and c.state == CONN_OPEN:
            hand_over(b, h)
            c = &b.conns.items[h]
    if too_long and c.state == CONN_OPEN:
        snprintf(reason, sizeof(reason), "line too long (limit %zu bytes)", b.limit.max_line)
        out_error(b, h, ERR_LINE_TOO_LONG, reason)
        close_later(b, h, "line too long", True)
    if c.state != CONN_OPEN:
        conn_keep_input(b, h, NULL, 0)
        return 0
    left = n - pos
    # input held because the connection waits (paused, or held by flow control) is at most one
    # read: only an unfinished line can grow without bound, so only that is refused when memory is full
    waits = c.paused or c.held or c.authenticating
    if not waits and not partial_frame and not input_fits(b, 0, left):
        snprintf(reason, sizeof(reason), "memory limit reached: cannot hold %zu bytes of input", left)
        out_error(b, h, ERR_MEMORY_FULL, reason)
        close_later(b, h, "memory full", True)
        conn_keep_input(b, h, NULL, 0)
        return 0
    if partial_frame and FRAME_IN_PLACE <= frame_size < (<size_t>1 << 32):    # Conn.input_room
        if conn_keep_frame(b, h, buf + pos, left, frame_size) < 0:
            close_later(b, h, "out of memory for its input", False)
            return 0
    elif conn_keep_input(b, h, buf + pos, left) < 0:
        close_later(b, h, "out of memory for its input", False)
        return 0
    if waits:
        stop_reading(b, h)
    return 0


cdef int conn_continue(Broker b, int32_t h) except -1:
    """h can go on again (its transport drained, its PUBLISH may proceed, or its CONNECT was
    answered): run the input it holds, then have the server read it again, unless it has to
    wait once more."""
    cdef Conn *c = &b.conns.items[h]
    cdef char *data
    if c.state != CONN_OPEN or c.paused or c.held or c.authenticating:
        return 0
    if c.input_len:
        data = read_buffer_load(b, h)
        b.rbuf.owner = -1
        process_input(b, h, data, c.input_len)
        c = &b.conns.items[h]
    if c.state == CONN_OPEN and c.reading_stopped and not c.paused and not c.held and not c.authenticating:
        c.reading_stopped = False
        if b.on_reading is not None:
            b.on_reading(h, True)
    return 0


cdef int run_frame(Broker b, int32_t h, char *p, size_t line_len, size_t avail, size_t *used,
                   int kind) except -1:
    """A framed ``PUB <client_id> <topic> <nbytes>`` (or ``REQ``, the same fields, or ``REPLY
    <token> <nbytes>``: ``kind``) whose header line (p, line_len) is followed by
    ``avail - line_len - 1`` bytes of input: run it once its payload and the line end after it
    are there (used: the bytes it took), else FRAME_PARTIAL (used: the bytes the whole frame can
    take, with a CRLF line end).

    A payload over max_payload, or one that the memory limit cannot hold, is
    refused and skipped (Conn.skip): the connection goes on. A header without a
    byte count, or a payload not followed by a line end, leaves no way to know
    where the next command starts: ERROR BAD_FRAME, and the connection closes.
    """
    cdef Conn *c = &b.conns.items[h]
    cdef int cmd = CMD_PUBLISH if kind == FRAME_PUB else (CMD_REQ if kind == FRAME_REQ else CMD_REPLY)
    cdef char *args = p + (5 if kind == FRAME_REPLY else 3)
    cdef size_t an = line_len - (5 if kind == FRAME_REPLY else 3)
    cdef char *id = NULL
    cdef char *name = NULL
    cdef char *field
    cdef size_t id_len = 0, name_len = 0, fl, count = 0, end
    cdef size_t start = line_len + 1
    cdef char reason[128]
    cdef int held
    cdef char *fast_args
    cdef size_t fast_n
    cdef Topic *t = NULL
    if args[an - 1] == b'\r':
        an -= 1
    used[0] = start
    # the pipelined case (own id, last topic, single spaces) by comparison alone, as for PUBLISH
    fast_args = args
    fast_n = an
    if kind != FRAME_REPLY:
        t = pub_fast(b, h, &fast_args, &fast_n)
    if t != NULL and parse_count(fast_args, fast_n, &count):
        pass
    elif (not next_field(&args, &an, &id, &id_len)
            or (kind != FRAME_REPLY and not next_field(&args, &an, &name, &name_len))
            or not next_field(&args, &an, &field, &fl) or not only_blanks(args, an)
            or not parse_count(field, fl, &count)):
        b.counters.commands[cmd] += 1
        out_error(b, h, ERR_BAD_FRAME,
                  PUB_USAGE if kind == FRAME_PUB else (REQ_USAGE if kind == FRAME_REQ else REPLY_USAGE))
        close_later(b, h, "bad frame", True)
        return 0
    else:
        t = NULL
    if count > b.limit.max_payload:
        b.counters.commands[cmd] += 1
        b.counters.refused += 1
        snprintf(reason, sizeof(reason), "payload of %zu bytes is over the limit of %zu bytes",
                 count, b.limit.max_payload)
        out_error(b, h, ERR_PAYLOAD_TOO_LARGE, reason)
        c.skip = count
        return 0
    end = start + count
    if end >= avail or (p[end] == b'\r' and end + 1 >= avail):
        # the input held for it replaces what is held now: refused when the whole frame cannot be
        if end + 2 > INPUT_SLACK and mem_total(&b.mem) - input_size(c) + end + 2 > b.limit.max_memory:
            b.counters.commands[cmd] += 1
            b.counters.refused += 1
            snprintf(reason, sizeof(reason), "memory limit reached: cannot hold a payload of %zu bytes",
                     count)
            out_error(b, h, ERR_MEMORY_FULL, reason)
            used[0] = end if end < avail else avail
            c.skip = end - used[0]
            return 0
        used[0] = end + 2
        return FRAME_PARTIAL
    if p[end] == b'\n':
        used[0] = end + 1
    elif p[end] == b'\r' and p[end + 1] == b'\n':
        used[0] = end + 2
    else:
        b.counters.commands[cmd] += 1
        snprintf(reason, sizeof(reason), "payload of %zu bytes is not followed by a line end", count)
        out_error(b, h, ERR_BAD_FRAME, reason)
        close_later(b, h, "bad frame", True)
        return 0
    if kind == FRAME_PUB:
        if t != NULL:
            held = pub_to_topic(b, h, t, p + start, count)
        else:
            held = on_pub(b, h, NULL, id, id_len, name, name_len, p + start, count)
    elif kind == FRAME_REQ:
        held = on_req(b, h, t, id, id_len, name, name_len, p + start, count)
    else:
        held = on_reply(b, h, id, id_len, p + start, count)
    if held != HOLD:
        b.counters.commands[cmd] += 1
    return held


cdef inline int _publish_counted(Broker b, int32_t h, char *args, size_t n) except -1:
    """PUBLISH, counted once it ran: one that waits (HOLD) runs again when its connection goes on."""
    cdef int held = on_publish(b, h, args, n)
    if held != HOLD:
        b.counters.commands[CMD_PUBLISH] += 1
    return held


cdef int dispatch(Broker b, int32_t h, char *line, size_t n) except -1:
    cdef char *word
    cdef size_t wl
    cdef char *args
    cdef size_t an
    if n and line[n - 1] == b'\r':
        n -= 1
    if n > 8 and _starts_with_publish(line):
        return _publish_counted(b, h, line + 7, n - 7)
    args = line
    an = n
    if not next_field(&args, &an, &word, &wl):
        return 0            # blank lines are ignored, as in a telnet session
    if word_is(word, wl, "publish", 7):
        return _publish_counted(b, h, args, an)
    if word_is(word, wl, "subscribe", 9):
        b.counters.commands[CMD_SUBSCRIBE] += 1
        return on_subscribe(b, h, args, an)
    if word_is(word, wl, "unsubscribe", 11):
        b.counters.commands[CMD_UNSUBSCRIBE] += 1
        return on_unsubscribe(b, h, args, an)
    if word_is(word, wl, "connect", 7):
        b.counters.commands[CMD_CONNECT] += 1
        return on_connect(b, h, args, an)
    if word_is(word, wl, "ping", 4):
        b.counters.commands[CMD_PING] += 1
        return on_ping(b, h, args, an)
    if word_is(word, wl, "disconnect", 10):
        b.counters.commands[CMD_DISCONNECT] += 1
        return on_disconnect(b, h, args, an)
    if word_is(word, wl, "stats", 5):
        b.counters.commands[CMD_STATS] += 1
        return on_stats(b, h, args, an)
    if word_is(word, wl, "ack", 3):
        b.counters.commands[CMD_ACK] += 1
        return on_ack(b, h, args, an)
    if word_is(word, wl, "nack", 4):
        b.counters.commands[CMD_NACK] += 1
        return on_nack(b, h, args, an)
    if word_is(word, wl, "hello", 5):
        b.counters.commands[CMD_HELLO] += 1
        return on_hello(b, h, args, an)
    if word_is(word, wl, "destroy", 7):
        b.counters.commands[CMD_DESTROY] += 1
        return on_destroy(b, h, args, an)
    b.counters.commands[CMD_UNKNOWN] += 1
    out_error_quoting(b, h, ERR_UNKNOWN_COMMAND, "unknown command", word, wl)
    return 0
