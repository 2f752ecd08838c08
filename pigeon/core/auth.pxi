# Authentication and permissions (see auth.pxd).

from cpython.ref cimport Py_INCREF, Py_XDECREF


cdef inline const char *_set_text(const PermSet *set) noexcept:
    """Where the patterns' texts start: just past the set's last pattern."""
    return <const char *>(<const Pattern *>set.items + set.count)


cdef bint _match_tokens(const char *p, size_t pn, bint tail, const char *t, size_t tn) noexcept:
    """A pattern with `*` tokens (its text ``p``, a trailing `>` as ``tail``) against a topic name."""
    cdef size_t i = 0, j = 0, pe, te
    while True:
        pe = i
        while pe < pn and p[pe] != b'.':
            pe += 1
        te = j
        while te < tn and t[te] != b'.':
            te += 1
        if pe - i == 1 and p[i] == b'*':
            if te == j:
                return False            # `*` is one token, and not an empty one
        elif pe - i != te - j or memcmp(p + i, t + j, pe - i) != 0:
            return False
        if pe == pn:
            break
        if te == tn:
            return False                # the pattern has more tokens than the name
        i = pe + 1
        j = te + 1
    if tail:
        return te + 1 < tn              # a dot, then one or more tokens
    return te == tn


cdef bint perms_allow(const PermSet *set, const char *name, size_t n) noexcept:
    """Whether a (valid) topic name matches one of the set's patterns; a NULL set allows nothing."""
    cdef const char *text
    cdef const Pattern *p
    cdef uint32_t i
    if set == NULL:
        return False
    text = _set_text(set)
    for i in range(set.count):
        p = &set.items[i]
        if p.kind == PATTERN_EXACT:
            if p.len == n and memcmp(text + p.offset, name, n) == 0:
                return True
        elif p.kind == PATTERN_PREFIX:
            # `>` alone allows every name; `a.b.>` a name that goes on after `a.b.`
            if p.len == 0 or (n > p.len + 1u and name[p.len] == b'.'
                              and memcmp(text + p.offset, name, p.len) == 0):
                return True
        elif _match_tokens(text + p.offset, p.len, p.tail, name, n):
            return True
    return False


cdef tuple _parse_pattern(object pattern):
    """``(text, kind, tail)`` of one pattern; ValueError when it is not one."""
    cdef bytes raw
    cdef const char *p
    if isinstance(pattern, str):
        raw = (<str>pattern).encode("utf-8", "surrogatepass")
    elif isinstance(pattern, bytes):
        raw = <bytes>pattern
    else:
        raise TypeError(f"a permission pattern is a str, not {type(pattern).__name__}")
    p = raw
    if topic_problem(p, len(raw)) != TOPIC_OK:
        raise ValueError(f"permission pattern {pattern!r} is not a valid topic pattern")
    tokens = raw.split(b".")
    last = len(tokens) - 1
    if b">" in tokens[:last]:
        raise ValueError(f"permission pattern {pattern!r}: '>' may only be the last token")
    tail = tokens[last] == b">"
    if tail:
        raw = raw[:len(raw) - 2] if last else b""   # without its `.>`
    kind = PATTERN_TOKENS if b"*" in tokens else PATTERN_PREFIX if tail else PATTERN_EXACT
    return raw, kind, tail


cdef PermSet *perms_compile(Memory *m, object patterns) except? NULL:
    """A set of patterns compiled into one counted block; NULL (no error) for an empty list.

    ValueError for a malformed pattern, MemoryError when the block cannot be allocated.
    """
    cdef list parsed
    cdef size_t size, text_len = 0, count
    cdef uint32_t i, offset = 0
    cdef PermSet *set
    cdef char *text
    cdef bytes raw
    if isinstance(patterns, (str, bytes)):
        raise TypeError("permission patterns are a sequence of patterns, not one string")
    parsed = [_parse_pattern(pattern) for pattern in patterns]
    count = len(parsed)
    if count == 0:
        return NULL
    for entry in parsed:
        text_len += len(<bytes>entry[0])
    size = sizeof(PermSet) + count * sizeof(Pattern) + text_len
    set = <PermSet *>mem_alloc(m, size)
    if set == NULL:
        raise MemoryError()
    set.size = size
    set.count = <uint32_t>count
    text = <char *>_set_text(set)
    for i in range(count):
        raw = parsed[i][0]
        set.items[i].offset = offset
        set.items[i].len = <uint16_t>len(raw)
        set.items[i].kind = parsed[i][1]
        set.items[i].tail = parsed[i][2]
        memcpy(text + offset, <const char *>raw, len(raw))
        offset += <uint32_t>len(raw)
    return set


cdef void perms_free(Memory *m, PermSet *set) noexcept:
    if set != NULL:
        mem_free(m, set, set.size)


cdef void auth_forget(Broker b, Conn *c) noexcept:
    """Free a connection's identity and permissions (it is being freed)."""
    perms_free(&b.mem, c.may_publish)
    perms_free(&b.mem, c.may_subscribe)
    c.may_publish = NULL
    c.may_subscribe = NULL
    Py_XDECREF(c.user)
    c.user = NULL


cdef inline void _denied(Broker b, int32_t h, const char *name, size_t n) noexcept:
    out_error_quoting(b, h, ERR_PERMISSION_DENIED, "permission denied for", name, n)


cdef bint auth_may_publish(Broker b, int32_t h, Topic *t, const char *name, size_t n) noexcept:
    """Whether h may publish to the topic ``name`` (t, or NULL while it does not exist); else sends the
    ERROR. Allowed for an existing topic, the topic is remembered, so its next PUBLISH is not checked."""
    cdef Conn *c = &b.conns.items[h]
    if not perms_allow(c.may_publish, name, n):
        _denied(b, h, name, n)
        return False
    if t != NULL:
        c.publish_allowed = t.serial
    return True


cdef bint auth_may_subscribe(Broker b, int32_t h, const char *name, size_t n) noexcept:
    """Whether h may subscribe to ``name``; else sends the ERROR."""
    cdef Conn *c = &b.conns.items[h]
    if c.checked and not perms_allow(c.may_subscribe, name, n):
        _denied(b, h, name, n)
        return False
    return True


cdef bint auth_may_list_connections(Broker b, int32_t h) noexcept:
    """With auth on, only an admin may list the connections (their addresses); else sends the ERROR."""
    if b.auth and not b.conns.items[h].admin:
        out_error(b, h, ERR_PERMISSION_DENIED, "permission denied")
        return False
    return True


cdef int auth_connect(Broker b, int32_t h, char *user, size_t ul, char *password, size_t pl) except -1:
    """``CONNECT <user> <password>`` with auth on: ask the server (on_auth) and read h no more until
    it answers (auth_result). AUTH_WAIT: the line ran, and the rest of h's input waits."""
    cdef Conn *c = &b.conns.items[h]
    c.authenticating = True
    if b.on_auth is None:
        auth_answer(b, h, False)       # nothing can check the password
        return 0
    b.auth_asking = h
    try:
        b.on_auth(h, user[:ul], password[:pl])
    finally:
        b.auth_asking = -1
    return AUTH_WAIT


cdef int auth_answer(Broker b, int32_t h, bint ok) except -1:
    """The server's answer to h's CONNECT with credentials: CONNECTED and h is read again, or ERROR
    AUTH_FAILED and h closes. A connection that asked nothing (closed meanwhile) is left alone."""
    cdef Conn *c
    if h < 0 or h >= b.conns.cap:
        return 0
    c = &b.conns.items[h]
    if b.auth_asking == h:
        raise RuntimeError("auth_result inside on_auth: answer once on_auth has returned")
    if c.state == CONN_FREE or not c.authenticating:
        return 0
    c.authenticating = False
    if c.state != CONN_OPEN:
        return 0
    if ok:
        connect_client(b, h, True)
        conn_continue(b, h)
        return 0
    b.counters.auth_failures += 1
    out_error(b, h, ERR_AUTH_FAILED, "authentication failed")
    close_later(b, h, "authentication failed", True)
    return 0


cdef int _end_subscriptions_denied(Broker b, int32_t h) except -1:
    """After a new grant: h's subscriptions no longer allowed end as with UNSUBSCRIBE (what they did
    not acknowledge goes to others), each told to the operator."""
    cdef Conn *c = &b.conns.items[h]
    cdef int32_t i = 0
    cdef Sub *s
    cdef Topic *t
    while i < c.nsubs:
        s = c.subs[i]
        t = s.topic
        # a group's subscription is to its topic or pattern
        if perms_allow(c.may_subscribe, topic_name(t), t.pattern_len):
            i += 1
            continue
        warn(b, f"user {<object>c.user!r} ({c.id_text[:c.id_len].decode()}): subscription to "
                f"{topic_name(t)[:t.pattern_len].decode('utf-8', 'replace')!r} ended: no longer allowed")
        c = &b.conns.items[h]
        sub_leave_rotation(s)
        acks_give_back_sub(b, s)
        sub_free(b, s)          # h's last subscription takes its place in the list
        c = &b.conns.items[h]
    return 0


cdef int auth_grant(Broker b, int32_t h, str user, object publish, object subscribe, bint admin) except -1:
    """Set h's identity and permissions (see Broker.grant)."""
    cdef Conn *c = conn_get(b, h)
    cdef PermSet *may_publish = perms_compile(&b.mem, publish)
    cdef PermSet *may_subscribe
    try:
        may_subscribe = perms_compile(&b.mem, subscribe)
    except BaseException:
        perms_free(&b.mem, may_publish)
        raise
    c = &b.conns.items[h]
    auth_forget(b, c)
    c.may_publish = may_publish
    c.may_subscribe = may_subscribe
    c.user = <PyObject *>user
    Py_INCREF(user)
    c.granted = True
    c.admin = admin
    c.checked = not admin
    c.publish_allowed = 0
    if c.client_id and c.checked and c.state == CONN_OPEN:
        _end_subscriptions_denied(b, h)
    return 0
