# Log: durability (--data-dir). The core decides what is recorded and when a
# reply may leave; the store (pigeon/server/store.py) only appends the bytes
# the core hands it, syncs them, reads segments back and deletes them.
#
# Every accepted message is a PUBLISH record; a message is done when a plain
# subscriber's socket took it or an acknowledged subscriber acked it, and
# DONE records say so, by runs of sequence numbers; a delivery to an
# acknowledged subscription is a DELIVERED record with its attempt. Recovery
# replays the records: the messages published and not done come back, per
# topic in sequence order, with their attempts. docs/storage.md is the format.
#
# Records of one pass of the event loop are appended together (one write per
# pass); a connection whose output holds a PUBLISHED reply waits until its
# record is written (--fsync everysec, no) or on stable storage (always).

from libc.stdint cimport int32_t, uint32_t, uint64_t


cdef enum:
    FSYNC_NO = 0
    FSYNC_EVERYSEC = 1
    FSYNC_ALWAYS = 2

    REC_PUBLISH = 1         # u64 seq, u64 time_ms, u32 attempt, u16 topic_len, topic, u32 len, payload
    REC_DONE = 2            # u64 first, u64 last: every message published with a seq in it is done
    REC_DELIVERED = 3       # u64 seq, u32 attempt: out for delivery to an acknowledged subscription

    RECORD_HEAD = 8         # u32 body length, u32 CRC-32C of the body


ctypedef struct Log:
    bint durable            # --data-dir given: every message is recorded
    int fsync               # FSYNC_*
    char *buf               # records not yet handed to the store
    size_t len
    size_t cap
    uint64_t appended       # log bytes produced (handed over or in buf), a position in the log
    uint64_t written        # ... handed to the store and written
    uint64_t synced         # ... on stable storage
    uint64_t sync_asked     # the position of the sync in flight, 0: none
    uint64_t disk           # bytes of the log on disk, as the store last said
    uint64_t *settled       # seqs done since the last flush, recorded as runs at its end
    size_t nsettled
    size_t settled_cap
    bint failed             # the last write failed (disk full): publishers wait, replies too
    # a cluster node's successors (--replicas) that are live, and how many a PUBLISH needs
    # (--min-replicas): while fewer are live, a PUBLISH is refused (NOT_ENOUGH_REPLICAS)
    uint32_t replicas_live
    uint32_t replicas_needed
    int32_t *waiting        # connections whose output waits for the log (Conn.log_wait)
    int32_t nwaiting
    size_t waiting_cap
    uint64_t records        # records appended
    uint64_t writes         # writes handed to the store
    uint64_t syncs          # syncs completed
    uint64_t live           # messages published and not done
    uint64_t live_bytes     # their PUBLISH records' bytes
    # Segments: the store keeps the log in files of about segment_max bytes, one
    # epoch each. A message belongs to the epoch its PUBLISH record was written
    # in; the epochs are told apart by their first seq (records are appended in
    # seq order). A prefix of epochs with no live message can be deleted.
    uint64_t segment_max    # start a new segment before one would grow past this
    uint64_t segment_bytes  # bytes written to the current segment
    bint rotate_next        # the next write starts a new segment (after recovery)
    uint64_t buf_first_seq  # seq of the first PUBLISH record in buf, 0: none
    uint64_t buf_live       # messages recorded in buf and not done
    uint64_t *epoch_first   # per segment on disk, oldest first: the first seq written in it
    uint64_t *epoch_live    # ... and how many of its messages are not done
    size_t nepochs
    size_t epochs_cap


ctypedef struct Compaction:
    # What the store's compaction passes did (pigeon/server/compaction.py), for STATS: the store
    # says when a pass starts and what it did when it ends; the core only keeps the figures.
    bint running            # a pass is running
    uint64_t runs           # passes ended
    uint64_t failures       # ... stopped by an error (the log stays sound; a later pass tries again)
    uint64_t rewritten      # segments rewritten (written anew with what they keep, or deleted)
    uint64_t removed        # ... of them deleted: merged into a newer one, or left with no record
    uint64_t reclaimed      # bytes of disk the passes freed
    double last_seconds     # how long the last pass took
    double last_at          # when it ended (seconds since the epoch), 0: none yet

ctypedef struct Recovery:
    # Replaying a log takes two steps (docs/storage.md, "Recovery"). The scan, before
    # serving, checks every record and collects what DONE and DELIVERED records say;
    # the restore, while serving, walks the PUBLISH records again, oldest first, a
    # chunk per pass of the event loop, and puts the messages not done at the tail
    # of their topics.
    uint64_t *done          # DONE runs, (first, last) pairs; sorted and merged when the scan ends
    size_t ndone
    size_t done_cap
    uint64_t *delivered     # DELIVERED records, (seq, attempt) pairs; sorted when the scan ends
    size_t ndelivered
    size_t delivered_cap
    size_t done_at          # the restore walks seqs upwards: the first run / DELIVERED pair
    size_t delivered_at     # ... that may concern the next message
    uint64_t records        # records scanned
    uint64_t max_seq
    bint restoring          # the scan is over, the restore is not: PUBLISH waits (HELD_STORAGE)
    uint64_t total_bytes    # bytes of records the restore walks, and how many it walked
    uint64_t done_bytes
    uint64_t messages       # messages restored
    uint64_t oldest         # the seq of the first of them, 0: none
    uint64_t *topics        # an open-addressing set of the serials of the topics restored into
    size_t ntopics
    size_t topics_cap       # a power of two, or 0


cdef int log_publish(Broker b, uint64_t seq, Topic *t, const char *data, size_t n,
                     uint32_t attempt) noexcept
cdef int log_publish_copy(Broker b, Msg *msg) noexcept
cdef void log_settle(Broker b, uint64_t seq) noexcept
cdef void log_delivered(Broker b, uint64_t seq, uint32_t attempt) noexcept
cdef void log_wait(Broker b, int32_t h) noexcept
cdef bint log_ready(Broker b, Conn *c) noexcept
cdef int log_write(Broker b) except -1
cdef void log_release(Broker b) noexcept
cdef void log_free(Broker b) noexcept
cdef uint32_t record_crc(const char *body, size_t n) noexcept
cdef int log_epoch(Broker b, uint64_t first) noexcept
cdef size_t log_deletable(Broker b) noexcept
cdef void log_drop_epochs(Broker b, size_t n) noexcept
cdef bint log_restoring_hold(Broker b, int32_t h) noexcept
