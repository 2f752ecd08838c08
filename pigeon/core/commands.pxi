# Commands: the handlers (see commands.pxd).

from libc.stdint cimport UINT32_MAX


cdef bint _connected(Broker b, int32_t h) noexcept:
    """True after CONNECT; else sends the ERROR."""
    if b.conns.items[h].client_id:
        return True
    out_error(b, h, ERR_NOT_CONNECTED, "not connected: send CONNECT first")
    return False


cdef bint _own_id(Broker b, int32_t h, const char *id, size_t id_len) noexcept:
    """True when ``id`` is this connection's own client id; else sends the ERROR."""
    cdef Conn *c = &b.conns.items[h]
    if not _connected(b, h):
        return False
    if id_len != c.id_len or memcmp(id, c.id_text, id_len) != 0:
        out_error_quoting(b, h, ERR_WRONG_CLIENT_ID, "client id does not belong to this connection:",
                          id, id_len)
        return False
    return True


cdef bint _valid_topic(Broker b, int32_t h, const char *name, size_t n) noexcept:
    """True for a valid topic name; else sends the ERROR."""
    cdef int problem = topic_problem(name, n)
    cdef char reason[48]
    if problem == TOPIC_OK:
        return True
    if problem == TOPIC_BAD_LENGTH:
        snprintf(reason, sizeof(reason), "topic must be 1 to %d bytes", TOPIC_MAX)
        out_error(b, h, ERR_BAD_TOPIC, reason)
    elif problem == TOPIC_INVISIBLE:
        out_error(b, h, ERR_BAD_TOPIC,
                  "topic must not contain whitespace, control, format or separator characters")
    else:
        out_error(b, h, ERR_BAD_TOPIC, "topic is not valid UTF-8")
    return False


cdef void _memory_full(Broker b, int32_t h) noexcept:
    cdef char reason[96]
    snprintf(reason, sizeof(reason), "memory limit reached (%zu of %zu bytes held)",
             mem_total(&b.mem), b.limit.max_memory)
    out_error(b, h, ERR_MEMORY_FULL, reason)


cdef bint _has_room(Broker b, size_t more) noexcept:
    """Whether ``more`` bytes fit under max_memory."""
    return mem_total(&b.mem) + more <= b.limit.max_memory


cdef Topic *_new_topic(Broker b, int32_t h, const char *name, size_t n, uint64_t hv) noexcept:
    """A new topic for a valid name, or NULL after sending the ERROR that says why not."""
    cdef char reason[64]
    cdef Topic *t
    if b.topic_table.count >= b.limit.max_topics:
        snprintf(reason, sizeof(reason), "too many topics (limit %zu)", b.limit.max_topics)
        out_error(b, h, ERR_TOO_MANY_TOPICS, reason)
        return NULL
    if not _has_room(b, sizeof(Topic) + n):
        _memory_full(b, h)
        return NULL
    t = topics_add(&b.mem, &b.topic_table, name, n, hv)
    if t == NULL:
        _memory_full(b, h)
    return t


cdef void connect_client(Broker b, int32_t h, bint login) noexcept:
    """h is connected: its client id, and CONNECTED; ``login``: it logged in as a user (auth on)."""
    cdef Conn *c = &b.conns.items[h]
    c.client_id = b.conns.next_client_id
    b.conns.next_client_id += 1
    c.id_len = snprintf(c.id_text, sizeof(c.id_text), "c%llu", <unsigned long long>c.client_id)
    if login:
        b.counters.logins += 1
        c.checked = not c.admin     # logged in without a grant: nothing is allowed
    out_reply(b, h, "CONNECTED", c.id_text, c.id_len)


cdef int on_connect(Broker b, int32_t h, char *args, size_t n) except -1:
    """``CONNECT`` or ``CONNECT <user> <password>``; with auth off the credentials are ignored."""
    cdef Conn *c = &b.conns.items[h]
    cdef char *user
    cdef char *password
    cdef size_t ul, pl
    cdef bint credentials = next_field(&args, &n, &user, &ul)
    if credentials and (not next_field(&args, &n, &password, &pl) or not only_blanks(args, n)):
        out_error(b, h, ERR_USAGE, CONNECT_USAGE)
    elif c.client_id:
        out_error_quoting(b, h, ERR_ALREADY_CONNECTED, "already connected as", c.id_text, c.id_len)
    elif not b.auth:
        connect_client(b, h, False)
    elif credentials:
        return auth_connect(b, h, user, ul, password, pl)
    elif c.granted:
        connect_client(b, h, True)  # an identity the server vouched for (a client certificate)
    else:
        out_error(b, h, ERR_AUTH_REQUIRED, "authentication required")
    return 0


cdef bint _group_option(Broker b, int32_t h, char **args, size_t *n, char **group, size_t *gl) noexcept:
    """An optional ``GROUP <name>`` next in (args, n), taken when there (else group stays NULL); False
    after sending the ERROR for a bad name or a GROUP without one."""
    cdef char *p = args[0]
    cdef size_t left = n[0]
    cdef char *word
    cdef size_t wl
    group[0] = NULL
    gl[0] = 0
    if not next_field(&p, &left, &word, &wl) or not word_is(word, wl, "group", 5):
        return True
    if not next_field(&p, &left, group, gl):
        return False        # the caller sends its usage
    if gl[0] > <size_t>GROUP_NAME_MAX or topic_problem(group[0], gl[0]) != TOPIC_OK:
        out_error(b, h, ERR_BAD_TOPIC, GROUP_NAME_RULE)
        group[0] = NULL
        gl[0] = 1           # told already
        return False
    args[0] = p
    n[0] = left
    return True


cdef bint _subscribe_options(Broker b, int32_t h, char *args, size_t n, bint *ack, uint32_t *prefetch,
                             char **group, size_t *gl) noexcept:
    """The options after the topic: ``[GROUP <name>]``, then nothing, ``ACK``, or ``ACK PREFETCH <n>``;
    else sends the ERROR."""
    cdef char *word
    cdef size_t wl, value
    ack[0] = False
    prefetch[0] = b.limit.default_prefetch
    if not _group_option(b, h, &args, &n, group, gl):
        if gl[0] == 0:
            out_error(b, h, ERR_USAGE, SUBSCRIBE_USAGE)
        return False
    if not next_field(&args, &n, &word, &wl):
        return True
    if word_is(word, wl, "ack", 3):
        ack[0] = True
        if not next_field(&args, &n, &word, &wl):
            return True
        if word_is(word, wl, "prefetch", 8) and next_field(&args, &n, &word, &wl) and only_blanks(args, n):
            if parse_count(word, wl, &value) and 1 <= value <= PREFETCH_MAX:
                prefetch[0] = <uint32_t>value
                return True
            out_error(b, h, ERR_USAGE, "prefetch must be 1 to 1000000")
            return False
    out_error(b, h, ERR_USAGE, SUBSCRIBE_USAGE)
    return False


cdef bint _valid_pattern(Broker b, int32_t h, char *name, size_t n):
    """A name with wildcard tokens follows the NATS rules of the permission patterns (auth.pxi):
    `>` only as the last token; else sends the ERROR."""
    try:
        _parse_pattern(name[:n])
    except ValueError:
        out_error(b, h, ERR_BAD_TOPIC, "'>' may only be the last token of a pattern")
        return False
    return True


cdef Topic *_subscription_target(Broker b, int32_t h, char *name, size_t n, char *group, size_t gl,
                                 bint wildcard, Topic *found) noexcept:
    """What a SUBSCRIBE of h joins: the topic (its default group) or a consumer group, ``found``
    when it exists, made (a group: registered again) when needed; NULL after the ERROR."""
    if group != NULL or wildcard:
        return group_join(b, h, name, n, group, gl, wildcard)
    return found if found != NULL else _new_topic(b, h, name, n, topic_hash(name, n))


cdef Topic *subscription_topic(Broker b, char *name, size_t n, char *group, size_t gl) noexcept:
    """Where a subscription to ``name`` (in consumer group ``group`` when not NULL) is held: the topic,
    or the group (a pattern's default one without ``group``); NULL when there is none."""
    if group != NULL or is_pattern(name, n):
        return group_find(b, name, n, group, gl)
    return topics_find(&b.topic_table, name, n, topic_hash(name, n))


cdef bint _subscriptions_left(Broker b, int32_t h) noexcept:
    """Whether h may subscribe to one more topic or group; else sends the ERROR."""
    cdef char reason[80]
    if b.conns.items[h].nsubs < b.limit.max_subscriptions:
        return True
    snprintf(reason, sizeof(reason), "too many subscriptions on this connection (limit %d)",
             b.limit.max_subscriptions)
    out_error(b, h, ERR_TOO_MANY_SUBSCRIPTIONS, reason)
    return False


cdef int on_subscribe(Broker b, int32_t h, char *args, size_t n) except -1:
    cdef char *id
    cdef char *name
    cdef char *group
    cdef size_t id_len, name_len, gl
    cdef Topic *t
    cdef Topic *found
    cdef Sub *s = NULL
    cdef bint ack, wildcard
    cdef uint32_t prefetch
    if not next_field(&args, &n, &id, &id_len) or not next_field(&args, &n, &name, &name_len):
        out_error(b, h, ERR_USAGE, SUBSCRIBE_USAGE)
        return 0
    if not _subscribe_options(b, h, args, n, &ack, &prefetch, &group, &gl):
        return 0
    if (not _own_id(b, h, id, id_len) or not _valid_topic(b, h, name, name_len)
            or not auth_may_subscribe(b, h, name, name_len)):
        return 0
    wildcard = is_pattern(name, name_len)
    if wildcard and not _valid_pattern(b, h, name, name_len):
        return 0
    found = subscription_topic(b, name, name_len, group, gl)
    if found != NULL:
        s = sub_find(&b.conns.items[h], found)
    if s == NULL:
        if not _subscriptions_left(b, h):
            return 0
        t = _subscription_target(b, h, name, name_len, group, gl, wildcard, found)
        if t == NULL:
            return 0
        s = sub_add(b, h, t)
        if s == NULL:
            if t.kind != TOPIC_PLAIN and t.nsubs == 0:
                group_left(b, t)    # which frees it when nothing holds it
            else:
                topics_drop_if_unused(b, t)
            _memory_full(b, h)
            return 0
    # subscribing again keeps the turn and changes the mode and the prefetch window
    s.ack = ack
    s.prefetch = prefetch if ack else UINT32_MAX
    out_reply(b, h, "SUBSCRIBED", name, name_len)
    topic_drain(b, s.topic)
    return 0


cdef int on_unsubscribe(Broker b, int32_t h, char *args, size_t n) except -1:
    cdef char *id
    cdef char *name
    cdef size_t id_len, name_len
    cdef char *group = NULL
    cdef size_t gl = 0
    cdef Topic *t
    cdef Sub *s = NULL
    if (not next_field(&args, &n, &id, &id_len) or not next_field(&args, &n, &name, &name_len)
            or not _group_option(b, h, &args, &n, &group, &gl) or not only_blanks(args, n)):
        if group != NULL or gl == 0:     # else _group_option told what is wrong
            out_error(b, h, ERR_USAGE, "usage: UNSUBSCRIBE <client_id> <topic>")
        return 0
    if not _own_id(b, h, id, id_len) or not _valid_topic(b, h, name, name_len):
        return 0
    t = subscription_topic(b, name, name_len, group, gl)
    if t != NULL:
        s = sub_find(&b.conns.items[h], t)
    if s == NULL:
        out_error_quoting(b, h, ERR_NOT_SUBSCRIBED, "not subscribed to", name, name_len)
        return 0
    out_reply(b, h, "UNSUBSCRIBED", name, name_len)
    # out of the rotation first, so that what it did not acknowledge goes to someone else
    sub_leave_rotation(s)
    acks_give_back_sub(b, s)
    sub_free(b, s)
    return 0


cdef inline Topic *_publish_fast(Broker b, int32_t h, char **args, size_t *n) noexcept:
    """The pipelined case, ``' <own id> <last topic> <message>'`` with single spaces, matched
    by comparison alone (and, with permissions, the topic last allowed); on a match
    ``args``/``n`` become the message. NULL sends the line through the general parser,
    which gives the same result."""
    cdef Conn *c = &b.conns.items[h]
    cdef Topic *t = b.topic_table.last
    cdef char *p = args[0]
    cdef size_t left = n[0]
    if t == NULL or c.id_len == 0 or left < c.id_len + t.name_len + 3:
        return NULL
    if p[0] != b' ' or p[1 + c.id_len] != b' ' or memcmp(p + 1, c.id_text, c.id_len) != 0:
        return NULL
    p += c.id_len + 2
    left -= c.id_len + 2
    if p[t.name_len] != b' ' or memcmp(p, topic_name(t), t.name_len) != 0:
        return NULL
    # a connection with permissions takes it only to the last topic it was allowed to publish to (a
    # topic's serial is never reused, so a freed one cannot pass for it); the general path checks it
    if c.checked and c.publish_allowed != t.serial:
        return NULL
    args[0] = p + t.name_len + 1
    n[0] = left - t.name_len - 1
    return t


cdef void _accepted(Broker b, int32_t h, Topic *t) noexcept:
    t.published += 1
    b.counters.published += 1
    b.conns.items[h].msgs_in += 1
    if b.request.id:
        request_accepted(b, h)      # REQUESTED <id>; a request is not logged
        return
    out_reply(b, h, "PUBLISHED", topic_name(t), t.name_len)
    if b.log.durable:
        log_wait(b, h)      # the reply leaves once the message's record is in the log


cdef inline bint _backlog_at_limit(Broker b, Topic *t) noexcept:
    """Whether a message for t's backlog has to wait: it holds max_backlog messages, or some
    holding max_backlog_bytes payload bytes (an empty one takes a message of any size)."""
    return t.backlog.count >= b.limit.max_backlog or (
        t.backlog.count != 0 and t.backlog.nbytes >= b.limit.max_backlog_bytes)


cdef void _backlog_full_text(Broker b, Topic *t, char *text, size_t size) noexcept:
    """``backlog full (<n> messages)``, or ``(<n> bytes)`` when the byte bound is the one reached."""
    if t.backlog.count >= b.limit.max_backlog:
        snprintf(text, size, "backlog full (%u messages)", b.limit.max_backlog)
    else:
        snprintf(text, size, "backlog full (%zu bytes)", b.limit.max_backlog_bytes)


cdef void _backlog_full(Broker b, Topic *t) noexcept:
    """Tell the operator once, until the backlog empties again."""
    cdef char text[64]
    if not t.full:
        t.full = True
        _backlog_full_text(b, t, text, sizeof(text))
        warn(b, f"topic {topic_name(t)[:t.name_len].decode('utf-8', 'replace')!r}: "
                f"{text[:strlen(text)].decode()}: publishers wait until a subscriber drains it")


cdef int _refuse(Broker b, int32_t h, Topic *t, int kind) noexcept:
    """The PUBLISH cannot wait (see flow.pxd): BACKLOG_FULL, MEMORY_FULL, STORAGE_FULL or
    NOT_ENOUGH_REPLICAS."""
    cdef char reason[96]
    b.counters.refused += 1
    if kind == ERR_MEMORY_FULL:
        _memory_full(b, h)
        return 0
    if kind == ERR_STORAGE_FULL:
        snprintf(reason, sizeof(reason), "storage full (%llu of %zu bytes on disk)",
                 <unsigned long long>b.log.disk, b.limit.max_disk)
        out_error(b, h, ERR_STORAGE_FULL, reason)
        return 0
    if kind == ERR_NOT_ENOUGH_REPLICAS:
        snprintf(reason, sizeof(reason), "only %u successors live, --min-replicas is %u",
                 b.log.replicas_live, b.log.replicas_needed)
        out_error(b, h, ERR_NOT_ENOUGH_REPLICAS, reason)
        return 0
    _backlog_full_text(b, t, reason, sizeof(reason) - 12)
    strcat(reason, " for topic")
    out_error_quoting(b, h, ERR_BACKLOG_FULL, reason, topic_name(t), t.name_len)
    _backlog_full(b, t)
    return 0


cdef size_t _records_bytes(Broker b, int32_t h, Topic *t, size_t n, bint *own) noexcept:
    """The bytes of the PUBLISH records a message of n bytes to t makes: one per copy when it goes
    to groups (docs/storage.md, "Consumer groups"); ``own``: whether h subscribes to one of the
    queues it goes to. Groups that cannot be resolved (out of memory) count as none: the PUBLISH
    is then refused by _publish_groups."""
    cdef int32_t k = groups_of(b, t) if b.group_index.count else 0
    cdef int32_t i
    cdef Topic *q
    cdef Conn *c = &b.conns.items[h]
    cdef size_t size = 0
    if k <= 0:
        own[0] = sub_find(c, t) != NULL
        return publish_record_size(t.name_len, n)
    own[0] = False
    for i in range(k + (1 if t.nsubs else 0)):
        q = _target(t, i, k)
        own[0] = own[0] or sub_find(c, q) != NULL
        size += publish_record_size(record_name_len(t, q if q != t else NULL), n)
    return size


cdef int _storage_full(Broker b, int32_t h, Topic *t, size_t n) noexcept:
    """0 when the log can take a message of n bytes (every copy's record); else HOLD (the
    publisher waits for the disk), or -1 with an ERROR STORAGE_FULL sent when waiting cannot help
    (see flow.pxd), or ERROR NOT_ENOUGH_REPLICAS while too few successors are live to copy it
    (--min-replicas: as Kafka's min.insync.replicas, a refusal the publisher retries, not a wait
    that could last until a node is back)."""
    cdef bint own
    cdef size_t size
    cdef Log *log = &b.log
    if log_restoring_hold(b, h):
        return HOLD
    if log.replicas_live < log.replicas_needed:
        _refuse(b, h, t, ERR_NOT_ENOUGH_REPLICAS)
        return -1
    size = _records_bytes(b, h, t, n, &own)
    if not log.failed and (b.limit.max_disk == 0 or log.disk + log.len + size <= b.limit.max_disk):
        return 0
    if size > b.limit.max_disk // 4 and b.limit.max_disk or own:
        _refuse(b, h, t, ERR_STORAGE_FULL)    # too large to wait for, or waiting for itself
        return -1
    flow_hold(b, h, NULL, HELD_STORAGE)
    return HOLD


cdef Msg *_record_for(Broker b, Topic *t, const char *data, size_t n) noexcept:
    """A record of a new message, logged when durable (unless a request); NULL when out of memory."""
    cdef Msg *msg
    if b.request.id:
        return msg_request_new(b, t, t, data, n, &b.request)
    msg = msg_new(b, t, data, n)
    if msg != NULL and b.log.durable and log_publish(b, msg.seq, t, data, n, 0) < 0:
        msg_release(b, msg)
        return NULL
    return msg


cdef int _publish_to(Broker b, int32_t h, Topic *t, const char *data, size_t n, bint lf_free) noexcept:
    """Route one message: straight to the next subscriber when nothing waits before it, else
    to the tail of the backlog. HOLD when the backlog, the memory or the disk is full and
    the publisher has to wait (flow.pxd). ``lf_free``: the payload has no LF (line_safe)."""
    cdef Sub *s
    cdef Msg *msg
    cdef size_t size
    cdef uint64_t seq
    cdef int32_t k
    if b.log.durable and (b.log.failed or b.limit.max_disk or b.recovery.restoring
                          or b.log.replicas_live < b.log.replicas_needed) and not b.request.id:
        held = _storage_full(b, h, t, n)
        if held:
            return HOLD if held == HOLD else 0
    if b.group_index.count:
        # the groups are resolved once per topic and index generation (groups.pxd)
        k = groups_of(b, t)
        if k:
            return _publish_groups(b, h, t, data, n, k)
    if t.backlog.count == 0:
        s = topic_next_subscriber(b, t)
        if s != NULL:
            # an acknowledged delivery keeps its record; so does a payload that a v1 line alters,
            # since a record made again from that line (give_back_inflight) would hold the
            # alteration, and a request, whose line may lack its reply token
            if s.ack or b.request.id or not (b.conns.items[s.conn].framed or line_safe(data, n, lf_free)):
                msg = _record_for(b, t, data, n)
                if msg == NULL:
                    return _refuse(b, h, t, ERR_MEMORY_FULL)
                _accepted(b, h, t)
                deliver(b, s, msg)
                return 0
            b.next_seq += 1
            seq = b.next_seq
            if b.log.durable and log_publish(b, seq, t, data, n, 0) < 0:
                return _refuse(b, h, t, ERR_MEMORY_FULL)
            _accepted(b, h, t)
            if not out_deliver_direct(b, s.conn, t, data, n, seq):
                # the subscriber's output could not grow: the message waits in the backlog
                msg = msg_new(b, t, data, n)
                if msg == NULL:
                    b.counters.lost += 1
                else:
                    msg.seq = seq
                    backlog_push(b, msg, True)
                    b.counters.backlogged += 1
                    topic_drain(b, t)
            return 0
    if _backlog_at_limit(b, t):
        if sub_find(&b.conns.items[h], t) != NULL:
            return _refuse(b, h, t, ERR_BACKLOG_FULL)   # waiting for itself could deadlock it
        flow_hold(b, h, t, HELD_TOPIC)
        _backlog_full(b, t)
        return HOLD
    size = msg_size(n) + sizeof(Msg *)
    if not _has_room(b, size):
        if size > b.limit.max_memory // 4 or sub_find(&b.conns.items[h], t) != NULL:
            return _refuse(b, h, t, ERR_MEMORY_FULL)    # too large to wait for, or waiting for itself
        flow_hold(b, h, NULL, HELD_MEMORY)
        return HOLD
    msg = _record_for(b, t, data, n)
    if msg != NULL and queue_push(&b.mem, &t.backlog, msg) < 0:
        msg_release(b, msg)
        msg = NULL
    if msg == NULL:
        return _refuse(b, h, t, ERR_MEMORY_FULL)
    b.backlog_messages += 1
    b.backlog_bytes += n
    b.counters.backlogged += 1
    _accepted(b, h, t)
    topic_drain(b, t)
    return 0


cdef Topic *_publish_topic(Broker b, int32_t h, char *name, size_t name_len) noexcept:
    """The topic a PUBLISH or PUB names (made when new), or NULL after sending the ERROR that
    says why it cannot be published to."""
    cdef uint64_t hv
    cdef Topic *t = b.topic_table.last
    if t == NULL or t.name_len != name_len or memcmp(topic_name(t), name, name_len) != 0:
        hv = topic_hash(name, name_len)
        t = topics_find(&b.topic_table, name, name_len, hv)
        if t == NULL:
            if not _valid_topic(b, h, name, name_len):
                return NULL
            if b.conns.items[h].checked and not auth_may_publish(b, h, NULL, name, name_len):
                return NULL
            t = _new_topic(b, h, name, name_len, hv)
            if t == NULL:
                return NULL
            b.conns.items[h].publish_allowed = t.serial
        b.topic_table.last = t
    if (b.conns.items[h].checked and b.conns.items[h].publish_allowed != t.serial
            and not auth_may_publish(b, h, t, name, name_len)):
        return NULL
    return t


cdef int _publish_pinned(Broker b, int32_t h, Topic *t, const char *data, size_t n, bint lf_free) noexcept:
    """_publish_to with t pinned, so that it outlives a message refused or lost on the way; a
    topic made for a refused message goes again when unpinned."""
    cdef int held
    _pin(t)
    held = _publish_to(b, h, t, data, n, lf_free)
    _unpin(b, t)
    return held

cdef inline Topic *_target(Topic *t, int32_t i, int32_t k) noexcept:
    """The i-th queue a message of t goes to: its k groups, then t itself (its default group)."""
    return t.groups[i] if i < k else t


cdef int _publish_groups(Broker b, int32_t h, Topic *t, const char *data, size_t n, int32_t k) noexcept:
    """Route one message to each of t's k groups and, when it has subscribers, to t's own default
    group: a copy each, to its next subscriber or the tail of its backlog. Every backlog and the
    memory are checked first, so that a PUBLISH that waits (HOLD) has changed nothing."""
    cdef Conn *c = &b.conns.items[h]
    cdef int32_t i, targets
    cdef Topic *q
    cdef Sub *s
    cdef Msg *msg
    cdef size_t size
    cdef bint own = False
    if k < 0:
        return _refuse(b, h, t, ERR_MEMORY_FULL)
    # t's own subscribers take a copy; with none, the groups took it and t keeps no backlog of it
    targets = k + (1 if t.nsubs else 0)
    for i in range(targets):
        q = _target(t, i, k)
        if sub_find(c, q) != NULL:
            own = True
        if _backlog_at_limit(b, q):
            if sub_find(c, q) != NULL:
                return _refuse(b, h, q, ERR_BACKLOG_FULL)   # waiting for itself could deadlock it
            flow_hold(b, h, q, HELD_TOPIC)
            _backlog_full(b, q)
            return HOLD
    size = (msg_size(n) + sizeof(Msg *)) * targets
    if not _has_room(b, size):
        if size > b.limit.max_memory // 4 or own:
            return _refuse(b, h, t, ERR_MEMORY_FULL)
        flow_hold(b, h, NULL, HELD_MEMORY)
        return HOLD
    _accepted(b, h, t)
    for i in range(targets):
        q = _target(t, i, k)
        if b.request.id:
            msg = msg_request_new(b, q, t, data, n, &b.request)
        else:
            msg = msg_copy_new(b, q, t, data, n) if q != t else msg_new(b, t, data, n)
        if msg == NULL:
            b.counters.lost += 1
            continue
        if b.log.durable and not b.request.id and (log_publish_copy(b, msg) if q != t else log_publish(b, msg.seq, t, data, n, 0)) < 0:
            msg_release(b, msg)
            b.counters.lost += 1
            continue
        if q != t:
            q.published += 1
        if q.backlog.count == 0:
            s = topic_next_subscriber(b, q)
            if s != NULL:
                deliver(b, s, msg)
                continue
        backlog_push(b, msg, False)
        b.counters.backlogged += 1
        topic_drain(b, q)
    if b.log.durable and not b.request.id:
        log_wait(b, h)      # the reply waits for every copy's record
    return 0


cdef int on_publish(Broker b, int32_t h, char *args, size_t n) except -1:
    cdef char *id
    cdef char *name
    cdef size_t id_len, name_len
    cdef Topic *t = _publish_fast(b, h, &args, &n)
    if t == NULL:
        if (not next_field(&args, &n, &id, &id_len) or not next_field(&args, &n, &name, &name_len)
                or n == 0):
            out_error(b, h, ERR_USAGE, "usage: PUBLISH <client_id> <topic> <message>")
            return 0
        if not _own_id(b, h, id, id_len):
            return 0
        # the message is everything after the one separator that ends the topic
        args += 1
        n -= 1
        t = _publish_topic(b, h, name, name_len)
        if t == NULL:
            return 0
    return _publish_pinned(b, h, t, args, n, True)    # a text line holds no LF


cdef Topic *pub_fast(Broker b, int32_t h, char **args, size_t *n) noexcept:
    """_publish_fast for a PUB header: on a match ``args``/``n`` become the byte count."""
    return _publish_fast(b, h, args, n)


cdef int pub_to_topic(Broker b, int32_t h, Topic *t, const char *data, size_t n) noexcept:
    """A framed PUB whose header pub_fast matched (``t``: its topic): on_pub's work without the
    checks it needs for other headers, in a call of fewer arguments (every pipelined frame)."""
    return _publish_pinned(b, h, t, data, n, False)


cdef int on_pub(Broker b, int32_t h, Topic *t, char *id, size_t id_len, char *name, size_t name_len,
                const char *data, size_t n) except -1:
    """A framed PUB whose header and payload the parser found (parser.pxd, run_frame); ``t`` is
    its topic when pub_fast matched the header, else NULL and ``id`` and ``name`` are checked."""
    if t == NULL:
        if not _own_id(b, h, id, id_len):
            return 0
        t = _publish_topic(b, h, name, name_len)
        if t == NULL:
            return 0
    return _publish_pinned(b, h, t, data, n, False)


cdef int on_ping(Broker b, int32_t h, char *args, size_t n) except -1:
    if not only_blanks(args, n):
        out_error(b, h, ERR_USAGE, "usage: PING")
    else:
        out_reply(b, h, "PONG", NULL, 0)
    return 0


cdef int on_disconnect(Broker b, int32_t h, char *args, size_t n) except -1:
    if not only_blanks(args, n):
        out_error(b, h, ERR_USAGE, "usage: DISCONNECT")
    else:
        out_reply(b, h, "DISCONNECTED", NULL, 0)
        close_later(b, h, "", True)
    return 0


cdef int on_hello(Broker b, int32_t h, char *args, size_t n) except -1:
    """``HELLO`` answers for the connection's protocol; ``HELLO 1`` and ``HELLO 2`` choose it
    first: with 2, its deliveries are MSG and DMSG frames."""
    cdef char *field
    cdef size_t fl
    cdef Conn *c = &b.conns.items[h]
    if next_field(&args, &n, &field, &fl):
        if fl != 1 or (field[0] != b'1' and field[0] != b'2') or not only_blanks(args, n):
            out_error(b, h, ERR_USAGE, "usage: HELLO [1|2]")
            return 0
        c.framed = field[0] == b'2'
    if c.framed:
        out_reply(b, h, "HELLO", b.hello2, len(b.hello2))
    else:
        out_reply(b, h, "HELLO", b.hello, len(b.hello))
    return 0


cdef int on_stats(Broker b, int32_t h, char *args, size_t n) except -1:
    cdef char *section
    cdef char *field
    cdef size_t sl, fl, cursor = 0, count = STATS_PAGE_DEFAULT
    cdef bytes text
    cdef bint topics, groups
    if not _connected(b, h):
        return 0
    if not next_field(&args, &n, &section, &sl):
        figures = stats_dict(b)
    else:
        topics = word_is(section, sl, "topics", 6)
        groups = word_is(section, sl, "groups", 6)
        if not topics and not groups and not word_is(section, sl, "connections", 11):
            out_error(b, h, ERR_USAGE, STATS_USAGE)
            return 0
        if next_field(&args, &n, &field, &fl):
            if not parse_count(field, fl, &cursor):
                out_error(b, h, ERR_USAGE, STATS_USAGE)
                return 0
            if next_field(&args, &n, &field, &fl):
                if not parse_count(field, fl, &count) or count < 1 or count > STATS_PAGE_MAX:
                    out_error(b, h, ERR_USAGE, STATS_USAGE)
                    return 0
        if not only_blanks(args, n):
            out_error(b, h, ERR_USAGE, STATS_USAGE)
            return 0
        if not topics and not groups and not auth_may_list_connections(b, h):
            return 0
        if groups:
            figures = groups_page(b, cursor, count)
        else:
            figures = topics_page(b, cursor, count) if topics else connections_page(b, cursor, count)
    try:
        text = json.dumps(figures, separators=(",", ":")).encode()
    except MemoryError:
        _memory_full(b, h)
        return 0
    out_reply(b, h, "STATS", text, len(text))
    return 0


cdef bint _tag_range(Broker b, int32_t h, char **args, size_t *n, const char *usage,
                     uint64_t *first, uint64_t *last) noexcept:
    """``<client_id> <tag>`` or ``<client_id> <first>-<last>`` (a connection's own id); else sends the ERROR."""
    cdef char *id
    cdef char *spec
    cdef char *dash
    cdef size_t id_len, sl, a, z
    if not next_field(args, n, &id, &id_len) or not next_field(args, n, &spec, &sl):
        out_error(b, h, ERR_USAGE, usage)
        return False
    dash = <char *>memchr(spec, b'-', sl)
    if dash == NULL:
        if not parse_count(spec, sl, &a) or a == 0:
            out_error(b, h, ERR_USAGE, usage)
            return False
        z = a
    elif (not parse_count(spec, dash - spec, &a) or not parse_count(dash + 1, sl - (dash - spec) - 1, &z)
            or a == 0 or z < a):
        out_error(b, h, ERR_USAGE, usage)
        return False
    if not _own_id(b, h, id, id_len):
        return False
    first[0] = a
    last[0] = z
    return True


cdef void _unknown_tags(Broker b, int32_t h, uint64_t first, uint64_t last) noexcept:
    cdef char reason[80]
    if first == last:
        snprintf(reason, sizeof(reason), "unknown delivery tag %llu", <unsigned long long>first)
    else:
        snprintf(reason, sizeof(reason), "unknown delivery tag %llu-%llu",
                 <unsigned long long>first, <unsigned long long>last)
    out_error(b, h, ERR_UNKNOWN_DELIVERY_TAG, reason)


cdef int on_ack(Broker b, int32_t h, char *args, size_t n) except -1:
    """ACK: settle the outstanding tags; no reply on success, so a consumer acks at full speed."""
    cdef uint64_t first, last
    if not _tag_range(b, h, &args, &n, ACK_USAGE, &first, &last):
        return 0
    if not only_blanks(args, n):
        out_error(b, h, ERR_USAGE, ACK_USAGE)
    elif acks_settle(b, h, first, last) == 0:
        _unknown_tags(b, h, first, last)
    return 0


cdef int on_nack(Broker b, int32_t h, char *args, size_t n) except -1:
    """NACK: give the outstanding tags back for redelivery, at once or after <delay_ms>."""
    cdef uint64_t first, last
    cdef char *field
    cdef size_t fl, delay_ms = 0
    if not _tag_range(b, h, &args, &n, NACK_USAGE, &first, &last):
        return 0
    if next_field(&args, &n, &field, &fl) and (not parse_count(field, fl, &delay_ms) or delay_ms > NACK_DELAY_MAX
                                               or not only_blanks(args, n)):
        out_error(b, h, ERR_USAGE, NACK_USAGE)
    elif acks_nack(b, h, first, last, delay_ms / 1000.0) == 0:
        _unknown_tags(b, h, first, last)
    return 0


cdef int on_destroy(Broker b, int32_t h, char *args, size_t n) except -1:
    """DESTROY: end a named group that has no subscriber now, its backlog dropped (Redis's XGROUP
    DESTROY, RabbitMQ's queue.delete with if-unused)."""
    cdef char *id
    cdef char *name
    cdef char *group = NULL
    cdef size_t id_len, name_len, gl = 0
    cdef Topic *g
    cdef char reason[96]
    if (not next_field(&args, &n, &id, &id_len) or not next_field(&args, &n, &name, &name_len)
            or not _group_option(b, h, &args, &n, &group, &gl) or group == NULL or not only_blanks(args, n)):
        if gl == 0 or group != NULL:
            out_error(b, h, ERR_USAGE, DESTROY_USAGE)
        return 0
    if (not _own_id(b, h, id, id_len) or not _valid_topic(b, h, name, name_len)
            or not auth_may_subscribe(b, h, name, name_len)):
        return 0
    g = group_find(b, name, name_len, group, gl)
    if g == NULL or not g.registered:
        out_error_quoting(b, h, ERR_NO_SUCH_GROUP, "no such group on", name, name_len)
        return 0
    if g.nsubs:
        snprintf(reason, sizeof(reason), "group has %d subscriber(s) on", g.nsubs)
        out_error_quoting(b, h, ERR_GROUP_IN_USE, reason, name, name_len)
        return 0
    b.group_index.destroyed += 1
    g.refs += 1     # named in the reply below
    group_end(b, g)
    out_reply(b, h, "DESTROYED", topic_name(g), g.name_len)
    topic_release(b, g)
    return 0
