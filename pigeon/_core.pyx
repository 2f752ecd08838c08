# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The broker core: parses commands, routes messages, produces output bytes.

The core does no I/O. A connection is a small integer handle; bytes read from
its socket go in through ``get_buffer``/``buffer_updated`` (or ``feed``), and
its output leaves through the writer callable registered with ``open``, at
most once per ``flush``. Parsing, topic lookup, round-robin selection and
writing the ``MESSAGE`` line are C; no Python object is created per message.
The parts live in pigeon/core/ (see _core.pxd for the map).
"""

import json
import math
import time

cimport cython
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcmp, memcpy, memmove, memset, strcat, strlen, strncpy


cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_WRITE
    int PyBUF_READ


include "core/limits.pxi"
include "core/memory.pxi"
include "core/messages.pxi"
include "core/topics.pxi"
include "core/subs.pxi"
include "core/groups.pxi"
include "core/conns.pxi"
include "core/output.pxi"
include "core/acks.pxi"
include "core/parser.pxi"
include "core/commands.pxi"
include "core/requests.pxi"
include "core/flow.pxi"
include "core/auth.pxi"
include "core/log.pxi"
include "core/stats.pxi"

TOPIC_MAX_BYTES = TOPIC_MAX
PROTOCOL_VERSION = 2     # the newest protocol, chosen by HELLO 2
# --fsync, in the order of the FSYNC_* values (log.pxd)
FSYNC_MODES = ("no", "everysec", "always")
# bytes of a log segment file (--data-dir): like a JetStream block, small enough to delete soon
LOG_SEGMENT = 64 * 1024 * 1024
# bytes of a connection's unfinished input kept even when memory is full (hold_input)
INPUT_SLACK_BYTES = INPUT_SLACK


@cython.final
cdef class Broker:
    """All broker state: connections, topics, subscriptions and backlogs.

    The keyword arguments are the limits (``LIMIT_DEFAULTS`` names them all,
    with their defaults); ``tick_interval`` is how many seconds apart the
    server calls ``tick()``, which turns the idle and write timeouts into ticks.
    """

    def __cinit__(self, *, double tick_interval=0.25, bint durable=False, str fsync="everysec",
                  uint64_t log_segment=LOG_SEGMENT, bint auth=False, bint tls=False, **limits):
        cdef str name
        self.limit = limits_default()
        for name, value in limits.items():
            limits_set(&self.limit, name, value)
        if not tick_interval > 0:
            raise ValueError(f"tick_interval must be more than 0 seconds, not {tick_interval!r}")
        self.tick_seconds = tick_interval
        self.idle_ticks = <uint64_t>math.ceil(self.limit.idle_timeout / tick_interval)
        self.write_ticks = <uint64_t>math.ceil(self.limit.write_timeout / tick_interval)
        self.started = time.time()
        self.rbuf.owner = -1
        self.auth = auth
        self.auth_asking = -1
        self.memory_waiter = -1
        self.storage_waiter = -1
        self.woken = -1
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        self.log.durable = durable
        self.log.fsync = FSYNC_MODES.index(fsync)
        if log_segment == 0:
            raise ValueError("log_segment must be more than 0 bytes")
        # with --max-disk, segments small enough that a drained log fits well under the resume mark
        self.log.segment_max = min(log_segment, self.limit.max_disk // 8) if self.limit.max_disk else log_segment
        self.log.segment_max = max(self.log.segment_max, <uint64_t>4096)
        self.wall_ms = <uint64_t>(time.time() * 1000)
        self.now = monotonic()
        self.conns.next_client_id = 1
        self.pool.keep = min(<size_t>POOL_KEEP_MAX, self.limit.max_memory // 16)
        if topics_init(&self.mem, &self.topic_table) < 0 or groups_init(self) < 0:
            raise MemoryError()
        # persistence, auth and tls are the server's: it says which are on (durable, auth, tls)
        features = ["ack", "binary", "groups", "wildcards", "request"]
        features += [name for name, on in (("persistence", durable), ("auth", auth), ("tls", tls)) if on]
        hello = {
            "protocol": 1,
            "max_line": self.limit.max_line,
            "topic_max": TOPIC_MAX,
            "idle_timeout": self.limit.idle_timeout,
            "max_payload": self.limit.max_payload,
            "features": features,
        }
        self.hello = json.dumps(hello, separators=(",", ":")).encode()
        hello["protocol"] = PROTOCOL_VERSION
        self.hello2 = json.dumps(hello, separators=(",", ":")).encode()

    def __dealloc__(self):
        cdef int32_t h
        cdef size_t i
        cdef Topic *t
        cdef Topic *nxt
        cdef Conn *c
        cdef Unacked *e
        self.tearing_down = True     # topics are freed below, all at once
        for h in range(self.conns.cap):
            c = &self.conns.items[h]
            if c.state == CONN_FREE:
                continue
            for i in range(c.ninflight):
                if c.inflight[i].msg != NULL and not c.inflight[i].tag:
                    msg_release(self, c.inflight[i].msg)
            c.ninflight = 0
            for i in range(c.unacked.count):
                e = _at(&c.unacked, <uint32_t>i)
                if e.msg != NULL:
                    msg_release(self, e.msg)
            c.unacked.count = 0
            while c.nsubs:
                sub_free(self, c.subs[c.nsubs - 1])
            conn_free(self, h)
        delayed_free(self)
        if self.topic_table.buckets != NULL:
            # every message first: a group's copy holds the topic it was published to
            for i in range(self.topic_table.nbuckets):
                t = self.topic_table.buckets[i]
                while t != NULL:
                    while t.backlog.count:
                        msg_release(self, queue_pop(&t.backlog))
                    t = t.next
            for i in range(self.topic_table.nbuckets):
                t = self.topic_table.buckets[i]
                while t != NULL:
                    nxt = t.next
                    topic_free(self, t)
                    t = nxt
        groups_free(self)
        log_free(self)
        pool_clear(&self.pool, &self.mem)
        mem_free(&self.mem, self.topic_table.buckets, self.topic_table.nbuckets * sizeof(Topic *))
        mem_free(&self.mem, self.conns.items, self.conns.cap * sizeof(Conn))
        mem_free(&self.mem, self.conns.free, self.conns.cap * sizeof(int32_t))
        mem_free(&self.mem, self.outbox.dirty, self.outbox.dirty_cap * sizeof(int32_t))
        mem_free(&self.mem, self.outbox.closing, self.outbox.closing_cap * sizeof(int32_t))
        mem_free(&self.mem, self.rbuf.data, self.rbuf.cap)
        mem_free(&self.mem, self.rbuf.spare, self.rbuf.spare_cap)

    cdef int _settle(self) except -1:
        """End of a call from Python: get flush() run (now, or by the server through
        on_output), and warn about messages lost since the last warning."""
        cdef uint64_t lost
        if self.counters.lost != self.lost_warned:
            lost = self.counters.lost - self.lost_warned
            self.lost_warned = self.counters.lost
            warn(self, f"out of memory: {lost} message(s) lost while being given back to their topics")
        if self.delayed.count and self.delayed.items[0].due != self.timer_due and self.on_timer is not None:
            self.timer_due = self.delayed.items[0].due
            self.on_timer(max(0.0, self.timer_due - monotonic()))
        if not self.outbox.flush_due:
            return 0
        if self.on_output is None or out_batch_half_full(self):
            # a connection with half a batch of output would fill it during the next read, and
            # what routing skips for a full batch waits in a backlog: hand it over now
            return flush(self)
        if not self.outbox.flush_scheduled:
            self.outbox.flush_scheduled = True
            self.on_output()
        return 0

    # ------------------------------------------------------------ connections

    def open(self, writer, peer=None, transport_size=None):
        """Register a new connection; ``writer(bytes)`` receives its output. Returns its handle.

        ``peer`` is the client's address, as reported by ``connections()``;
        ``transport_size()``, when given, tells how many output bytes its
        transport holds unsent (counted as memory and for max_pending). Over
        max_connections the connection gets an ERROR and is closed through
        on_close at the next flush.
        """
        cdef int32_t h = conns_open(self, writer, transport_size, peer)
        cdef char reason[64]
        self.counters.connections_total += 1
        if self.conns.admitted >= self.limit.max_connections:
            self.conns.items[h].rejected = True
            self.counters.rejected += 1
            snprintf(reason, sizeof(reason), "too many connections (limit %d)", self.limit.max_connections)
            out_error(self, h, ERR_TOO_MANY_CONNECTIONS, reason)
            close_later(self, h, reason, True)
        else:
            self.conns.admitted += 1
        self._settle()
        return h

    def get_buffer(self, int32_t handle):
        """A writable view to read the connection's next bytes into.

        Valid until the matching ``buffer_updated``; the connection's
        carried-over input sits just before it, so a line split across reads
        is joined without copying the new bytes.
        """
        cdef Conn *c = conn_get(self, handle)
        cdef char *data = read_buffer_load(self, handle)
        return PyMemoryView_FromMemory(data + c.input_len, self.rbuf.target_cap - c.input_len, PyBUF_WRITE)

    def buffer_updated(self, int32_t handle, Py_ssize_t nbytes):
        """Process ``nbytes`` just read into the view from ``get_buffer``."""
        cdef Conn *c = conn_get(self, handle)
        cdef size_t total
        if self.rbuf.owner != handle:
            raise RuntimeError("buffer_updated without get_buffer for this connection")
        if nbytes < 0 or <size_t>nbytes > self.rbuf.target_cap - c.input_len:
            raise ValueError("nbytes is outside the buffer")
        self.rbuf.owner = -1
        self.now = monotonic()
        self.wall_ms = <uint64_t>(time.time() * 1000)
        self.counters.bytes_in += nbytes
        c.bytes_in += nbytes
        c.silent_ticks = 0
        total = c.input_len + nbytes
        if c.state != CONN_OPEN:
            pass                        # after DISCONNECT or an error: the rest is ignored
        elif c.reading_stopped:
            # a read already under way when reading stopped: held with the rest
            if conn_keep_input(self, handle, self.rbuf.target, total) < 0:
                close_later(self, handle, "out of memory for its input", False)
        else:
            process_input(self, handle, self.rbuf.target, total)
        self._settle()

    def feed(self, int32_t handle, data):
        """Process bytes read from the connection and flush (a copying ``buffer_updated``, for tests).

        Returns whether the connection is still open.
        """
        cdef const unsigned char[:] src = data
        cdef size_t done = 0, total = src.shape[0], room, chunk
        cdef Conn *c
        while True:
            c = conn_get(self, handle)
            if c.state != CONN_OPEN:
                break
            view = self.get_buffer(handle)
            room = len(view)
            chunk = total - done if total - done < room else room
            if chunk:
                memcpy(self.rbuf.target + c.input_len, &src[done], chunk)
            done += chunk
            self.buffer_updated(handle, chunk)
            if done == total:
                break
        flush(self)
        c = conn_get(self, handle)
        return c.state == CONN_OPEN

    def flush(self):
        """Hand every connection its pending output, then report connections the core closed."""
        flush(self)

    def eof(self, int32_t handle):
        """The client will send nothing more (its FIN arrived): it leaves every rotation at
        once, messages written to it but not handed over go back to their topics, and its
        replies are handed over now, for the server to send before it closes the socket."""
        cdef Conn *c = conn_get(self, handle)
        if c.state == CONN_OPEN:
            conn_leave(self, handle, c.out, LEAVE_CUT_ALL)
            hand_over(self, handle)
        self._settle()

    def pause(self, int32_t handle):
        """The connection's transport is full: skip it in every rotation, keep its output
        here, and stop reading it (on_reading) until ``resume``."""
        cdef Conn *c = conn_get(self, handle)
        if not c.paused:
            c.paused = True
            c.paused_at = self.ticks
            if c.state == CONN_OPEN:
                # the next flush checks max_pending (it may be below the transport's mark); not
                # here, where a writer may be in the middle of taking this connection's output
                note_transport(self, handle)
                mark_dirty(self, handle)
                stop_reading(self, handle)
        self._settle()

    def resume(self, int32_t handle):
        """The connection can take output again: hand it what was kept, deliver backlogs it
        can serve, run the input held while it was paused and read it again."""
        cdef Conn *c = conn_get(self, handle)
        if c.broken:
            return                      # skipped by rotations until the next flush closes it
        c.paused = False
        self.now = monotonic()
        if c.out_len:
            mark_dirty(self, handle)
        if c.state == CONN_OPEN:
            conn_drain_topics(self, handle)
            conn_continue(self, handle)
        self._settle()

    def note_input(self, int32_t handle):
        """The connection sent input that this core does not run (the cluster's router forwarded it
        to another node): its ``--idle-timeout`` counts from now."""
        conn_get(self, handle).silent_ticks = 0

    def hold_input(self, int32_t handle, size_t nbytes):
        """The cluster's router now holds ``nbytes`` of this connection's input, an unfinished
        command: counted against ``--max-memory`` as the core counts the input it holds, until the
        next call or the connection's close. False, and nothing changes, when the hold would grow
        past ``INPUT_SLACK_BYTES`` and the limit: the router then refuses the command (MEMORY_FULL)
        as the core does."""
        cdef Conn *c = conn_get(self, handle)
        if nbytes > c.outside_input and not input_fits(self, c.outside_input, nbytes):
            return False
        self.mem.outside_input = self.mem.outside_input - c.outside_input + nbytes
        c.outside_input = nbytes
        return True

    def keep_open_when_idle(self, int32_t handle):
        """Never close this connection for ``--idle-timeout``: another node's connection on behalf
        of a client of its own, or its replication stream (the cluster's router), whose idleness is
        not this connection's to judge (the client is checked on its own node)."""
        conn_get(self, handle).never_idle = True

    def close(self, int32_t handle):
        """The connection is gone: give back messages it was never handed, leave every rotation, free it."""
        cdef Conn *c = conn_get(self, handle)
        conn_leave(self, handle, c.out, LEAVE_DROP)
        flow_forget(self, handle)
        c = &self.conns.items[handle]
        outbox_forget(&self.outbox, handle, c.dirty, c.close_queued)
        if self.rbuf.owner == handle:
            self.rbuf.owner = -1
        conn_free(self, handle)
        self._settle()

    # ------------------------------------------------------------ authentication

    def grant(self, int32_t handle, str user not None, publish, subscribe, bint admin=False):
        """Set a connection's user and the topic patterns it may publish and subscribe to.

        Patterns follow NATS: tokens split on ``.``, ``*`` one non-empty token,
        ``>`` as the last token one or more tokens; ``admin`` allows everything
        (STATS CONNECTIONS included). Before CONNECT it presets the identity (a
        client certificate: a bare CONNECT then logs in as that user); after
        CONNECT it replaces the permissions, and the subscriptions they no longer
        allow end as with UNSUBSCRIBE (each told through on_warning). ValueError
        for a malformed pattern, and nothing changes.
        """
        auth_grant(self, handle, user, publish, subscribe, admin)
        if self.auth_asking < 0:
            # not from inside on_auth, where a flush would run other connections' input through
            # the read buffer that holds this one's: the call that ran on_auth settles at its end
            self._settle()

    def auth_result(self, int32_t handle, bint ok):
        """Answer a connection's ``CONNECT <user> <password>`` (asked through on_auth).

        ok: ``CONNECTED <id>`` with the permissions last granted, and its input
        goes on; not ok: ``ERROR AUTH_FAILED``, then the connection closes
        (on_close). A handle that closed meanwhile is left alone (its number
        may be reused by then: do not answer for a connection seen closed).
        Not from inside on_auth (RuntimeError): answer once it has returned.
        """
        self.now = monotonic()
        auth_answer(self, handle, ok)
        self._settle()

    # ------------------------------------------------------------ the log (durable)

    def recover(self, data, bint publish_checksums=True):
        """Scan the records of one segment (its bytes after the header), before serving: check
        them and keep what the DONE and DELIVERED records say. Without ``publish_checksums``
        the checksums of its PUBLISH records are left to recover_restore (give it checksums=True).

        Returns ``(offset, problem)``: how far the records were sound, and None or
        what is wrong at that offset (a record cut short, a bad checksum, ...).
        """
        cdef const unsigned char[:] view = data
        if view.shape[0] == 0:
            return 0, None
        return recovery_scan(self, &self.recovery, <const char *>&view[0], view.shape[0],
                             publish_checksums)

    def recover_segment(self):
        """The next recover() calls scan a new segment (call before each one, oldest first)."""
        if log_epoch(self, self.recovery.max_seq + 1) < 0:
            raise MemoryError()

    def log_deletable(self):
        """How many of the oldest segments hold only done messages: the store may delete them,
        then calls log_deleted(n)."""
        return log_deletable(self)

    def log_deleted(self, size_t n):
        """The store deleted the n oldest segments."""
        log_drop_epochs(self, n)

    def recover_scanned(self):
        """Every segment is scanned: the restore starts (recover_restore), and until
        recover_finish every PUBLISH waits. Returns the bytes of records it walks."""
        recovery_scanned(self, &self.recovery)
        return self.recovery.total_bytes

    def recover_restore(self, data, size_t limit, bint checksums=False):
        """Walk the sound records of a segment scanned before (a part of its bytes after the
        header, from a record's start), at most ``limit`` records: the messages not done go to
        the tail of their topics, in order, and their subscribers get them. With ``checksums``
        (the scan left them) each PUBLISH record's checksum is checked before its message goes
        back. Returns ``(walked, problem)``: the bytes walked, and None or what is wrong with
        the record there (the walk stopped before it); call again from there until all of
        ``data`` is walked. MemoryError when the messages cannot be held."""
        cdef const unsigned char[:] view = data
        cdef Py_ssize_t walked
        cdef bint damaged = False
        if view.shape[0] == 0:
            return 0, None
        walked = recovery_restore(self, &self.recovery, <const char *>&view[0], view.shape[0], limit,
                                  checksums, &damaged)
        self._settle()
        return walked, CHECKSUM_MISMATCH if damaged else None

    def take_over(self, records):
        """Put back another node's messages (a cluster node taking over a dead owner's topics):
        ``records`` are its PUBLISH records of the messages not done and their DELIVERED records,
        in its log order. Each message comes back as a recovery brings it back from this node's
        own log (at the tail of its topic, a group's copy in its group, with its attempt), as a
        new message of this log, and its topic's subscribers get it. Returns how many came back;
        MemoryError when they cannot be held; ValueError when a record is not sound: nothing came
        back, or, at a PUBLISH record whose checksum does not match (checked as each message comes
        back, as a restore checks them), the messages before it and none after it."""
        cdef const unsigned char[:] view = records
        cdef uint64_t messages
        cdef Py_ssize_t damaged_at
        if view.shape[0] == 0:
            return 0
        messages = recovery_take_over(self, <const char *>&view[0], view.shape[0], &damaged_at)
        self._settle()
        flush(self)
        if damaged_at >= 0:
            raise ValueError(f"{CHECKSUM_MISMATCH} at offset {damaged_at}: messages put back before it: "
                             f"{messages}, none after it")
        return messages

    @property
    def recovering(self):
        """Whether a restore is running (between recover_scanned and recover_finish)."""
        return bool(self.recovery.restoring)

    def recover_finish(self):
        """After the last restore: the publishers waiting for it go on. Returns ``(messages
        restored, topics, records scanned, seq of the oldest message or 0)``."""
        result = recovery_finish(self, &self.recovery)
        self._settle()
        return result

    def log_synced(self, uint64_t position):
        """The store synced the log up to ``position``: replies waiting for it may go."""
        if position > self.log.synced:
            self.log.synced = position
            self.log.syncs += 1
        if self.log.sync_asked <= position:
            self.log.sync_asked = 0
        log_release(self)
        if self.log.fsync == FSYNC_ALWAYS and self.log.written > self.log.synced and not self.log.sync_asked:
            self.log.sync_asked = self.log.written
            self.on_sync(self.log.written)
        self._settle()

    def log_replicas(self, uint32_t live, uint32_t needed):
        """A cluster node's successors: ``live`` of them hold copies now, and a PUBLISH needs
        ``needed`` (--min-replicas); while fewer are live, a durable PUBLISH gets ERROR
        NOT_ENOUGH_REPLICAS."""
        self.log.replicas_live = live
        self.log.replicas_needed = needed

    def log_wait(self, int32_t handle):
        """The log position this connection's output waits for (its last ``PUBLISHED`` is held until
        the log is confirmed up to there), 0 when none. Once the output has gone it may still say
        the position it waited for, which is then confirmed."""
        return conn_get(self, handle).log_wait

    def log_compaction_started(self):
        """The store started a compaction pass (STATS says log_compacting until it ends)."""
        self.compaction.running = True

    def log_compaction_ended(self, uint64_t rewritten, uint64_t removed, uint64_t reclaimed, bint failed,
                             double seconds):
        """A compaction pass ended: it rewrote ``rewritten`` segments, ``removed`` of them deleted,
        freed ``reclaimed`` bytes of disk in ``seconds``; ``failed`` when an error stopped it."""
        self.compaction.running = False
        self.compaction.runs += 1
        self.compaction.failures += failed
        self.compaction.rewritten += rewritten
        self.compaction.removed += removed
        self.compaction.reclaimed += reclaimed
        self.compaction.last_seconds = seconds
        self.compaction.last_at = time.time()

    @property
    def log_disk(self):
        """Bytes of the log on disk, as the store last said (for --max-disk)."""
        return self.log.disk

    @log_disk.setter
    def log_disk(self, uint64_t value):
        self.log.disk = value
        flow_storage_freed(self)
        self._settle()

    @property
    def log_state(self):
        """Where the log is: positions appended, written and synced, the messages it holds live, the
        segments and the size at which a new one starts."""
        return {
            "appended": self.log.appended,
            "written": self.log.written,
            "synced": self.log.synced,
            "live_messages": self.log.live,
            "live_bytes": self.log.live_bytes,
            "next_seq": self.next_seq + 1,
            "segments": self.log.nepochs,
            "segment_max": self.log.segment_max,
            "segment_live": [self.log.epoch_live[i] for i in range(self.log.nepochs)],
        }

    def run_timers(self):
        """Give back the NACKed messages whose delay is over (the server calls it when on_timer says)."""
        self.timer_due = 0
        self.now = monotonic()
        delayed_fire(self, self.now)
        self._settle()

    def tick(self):
        """Advance the clock by one tick_interval: refresh what transports hold, close
        connections idle or paused for longer than their timeouts."""
        cdef int32_t h
        cdef Conn *c
        cdef char reason[96]
        cdef size_t unsent
        self.ticks += 1
        self.now = monotonic()
        self.wall_ms = <uint64_t>(time.time() * 1000)
        if self.log.len or self.log.nsettled or self.log.failed:
            self.outbox.flush_due = True    # records wait: the flush writes them
        for h in range(self.conns.cap):
            c = &self.conns.items[h]
            if c.state != CONN_OPEN:
                continue
            if c.in_transport:
                unsent = c.in_transport
                note_transport(self, h)
                c = &self.conns.items[h]
                if c.in_transport < unsent:
                    c.paused_at = self.ticks    # its output is moving: the write timeout counts from here
            if c.unacked.live and not c.reading_stopped:
                # not while it is not read: its ACKs may be waiting in the socket
                acks_expire(self, h, self.now)
                c = &self.conns.items[h]
            if self.write_ticks and c.paused and self.ticks - c.paused_at > self.write_ticks:
                self.counters.write_timeouts += 1
                snprintf(reason, sizeof(reason), "write timeout: output not taken for %g s",
                         self.limit.write_timeout)
                close_later(self, h, reason, False)
            elif self.idle_ticks and not c.reading_stopped and not c.never_idle:
                c.silent_ticks += 1
                if c.silent_ticks > self.idle_ticks:
                    self.counters.idle_closed += 1
                    out_error(self, h, ERR_IDLE_TIMEOUT, "idle timeout")
                    close_later(self, h, "idle timeout", not c.paused)
        if self.group_index.count:
            groups_expire(self)
        flow_memory_freed(self)     # output the transports took since the last tick freed memory
        self._settle()

    # ------------------------------------------------------------ reading the state

    def client_id(self, int32_t handle):
        """The id CONNECT gave this connection, or None before CONNECT."""
        cdef Conn *c = conn_get(self, handle)
        if c.client_id == 0:
            return None
        return c.id_text[:c.id_len].decode("ascii")

    def subscribed(self, int32_t handle, topic, group=None):
        """Whether the connection holds a subscription to ``topic`` (a topic or a pattern), in the
        consumer group ``group`` when given: what a SUBSCRIBE of it left (the cluster's router asks)."""
        cdef const unsigned char[:] name = topic
        cdef const unsigned char[:] group_name
        cdef size_t n = name.shape[0], gl = 0
        cdef char *g = NULL
        cdef Conn *c = conn_get(self, handle)
        cdef Topic *t
        if n == 0 or n > <size_t>TOPIC_MAX:
            return False
        if group is not None:
            group_name = group
            gl = group_name.shape[0]
            if gl == 0:
                return False
            g = <char *>&group_name[0]
        t = subscription_topic(self, <char *>&name[0], n, g, gl)
        return t != NULL and sub_find(c, t) != NULL

    def topic_info(self, topic):
        """``(subscribers, backlog_messages)`` for a topic, or None if the broker holds no such topic."""
        cdef const unsigned char[:] name = topic
        cdef size_t n = name.shape[0]
        cdef Topic *t
        if n == 0 or n > <size_t>TOPIC_MAX:
            return None
        t = topics_find(&self.topic_table, <char *>&name[0], n, topic_hash(<char *>&name[0], n))
        if t == NULL:
            return None
        return (t.nsubs, t.backlog.count)

    def stats(self):
        """Server-wide counters and gauges: ints, dicts of ints by kind, and the uptime in seconds."""
        return stats_dict(self)

    def topics(self, size_t cursor=0, size_t count=STATS_PAGE_DEFAULT):
        """One page of topics: ``{"topics": [...], "next": cursor}`` (next 0 at the end).

        Each topic: name, subscribers, backlog depth and bytes, published, delivered.
        """
        return topics_page(self, cursor, count)

    def groups(self, uint64_t cursor=0, size_t count=STATS_PAGE_DEFAULT):
        """One page of the consumer groups, newest first: ``{"groups": [...], "next": cursor}`` (next 0
        at the end; the cursor is a registration serial, see STATS GROUPS)."""
        return groups_page(self, cursor, count)

    def connections(self, size_t cursor=0, size_t count=STATS_PAGE_DEFAULT):
        """One page of connections: ``{"connections": [...], "next": cursor}`` (next 0 at the end)."""
        return connections_page(self, cursor, count)

    @property
    def limits(self):
        """Every limit of this broker, by name."""
        return limits_dict(&self.limit)

    @property
    def tick_interval(self):
        """Seconds between two tick() calls, as the server is to run them."""
        return self.tick_seconds

    def _fail_allocation(self, int64_t n):
        """Tests: make the n-th allocation of the core from now fail (0 cancels)."""
        self.mem.fail_in = n
