"""The log on disk under ``--data-dir``: segment files the core's records are appended to.

The core decides what is recorded and when a reply may leave (pigeon/core/log.pxd);
this module only appends the bytes it is handed, syncs them off the event loop,
reads the segments back at start and deletes the ones the core says are done.
The format and the guarantees are in docs/storage.md.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pigeon._core import Broker, record_checksum, segment_kept
from pigeon.server import compaction
from pigeon.server.confirmed import ConfirmedLog

log = logging.getLogger("pigeon")

MAGIC = b"PIGEONLG"
FORMAT_VERSION = 1
# magic, format version, 4 bytes reserved: a segment's records start after it
HEADER = MAGIC + struct.pack("<II", FORMAT_VERSION, 0)
SEGMENT_SUFFIX = ".seg"
LOCK_NAME = "LOCK"
RECORD_HEAD = struct.Struct("<II")  # body length, CRC-32C of the body
PUBLISH_KIND = 1
PUBLISH_FIELDS = struct.Struct("<QQ")  # a PUBLISH record's seq and time (ms), after its kind
# how often the store syncs under --fsync everysec and deletes the segments that are done
HOUSEKEEPING_INTERVAL = 1.0
# Under --fsync always the next segment is made ahead, off the loop, filled with zeros and synced
# (a spare): records then overwrite blocks the file already has, and fdatasync has no size or
# block allocation to put through the filesystem's journal. On ext4 that is 0.10 instead of 0.17 ms
# on an idle disk, and 0.1-0.4 instead of 1.7-4 ms while other processes keep the journal busy.
SPARE_NAME = "spare.tmp"
SPARE_MAKING = "spare.tmp.part"  # its name until it is whole and synced
# Left by a restore that found a damaged record (the start had left the checksums of sealed
# segments to it): the next start checks every checksum before it serves, as --repair does.
DAMAGED_NAME = "DAMAGED"
ZEROS = bytes(1 << 20)
# Records the restore walks per pass of the event loop while the server serves: about 0.25 ms of
# 64-byte messages on this machine. Every reply waits for the chunk of its pass, so a client that
# sets itself up with a few round trips while a large log comes back (CONNECT, SUBSCRIBE) waits a
# chunk per round trip: 16,384 records (2 ms a chunk) made 4 consumers' set-up take 120-180 ms
# under load where 2,048 took 30-60 ms, for up to 10-20 % more CPU in the restore (BENCHMARKS.md).
RESTORE_CHUNK = 2048


class StoreError(Exception):
    """The data directory cannot be used; the message says why."""


class DataDirLocked(StoreError):
    """Another pigeon process holds the data directory."""


class CorruptLog(StoreError):
    """A record before the tail of the log is damaged: ``pigeon --repair`` keeps the rest."""

    def __init__(self, path: Path, offset: int, problem: str) -> None:
        super().__init__(
            f"{path}: {problem} at offset {offset}; start with --repair to keep every valid record "
            "and drop the damaged ones"
        )
        self.path = path
        self.offset = offset
        self.problem = problem


@dataclass
class Recovered:
    """What a start found in the data directory."""

    messages: int = 0
    topics: int = 0
    segments: int = 0
    records: int = 0
    seconds: float = 0.0
    torn: list[tuple[Path, int, str]] = field(default_factory=list)
    dropped_bytes: int = 0
    oldest_seq: int = 0  # the oldest message not done, 0: none


def segment_name(number: int) -> str:
    """The file name of segment ``number`` (names sort in the order of the log)."""
    return f"{number:016d}{SEGMENT_SUFFIX}"


def _segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == SEGMENT_SUFFIX and p.stem.isdigit())


def _valid_record_at(data: memoryview, pos: int) -> int:
    """The size of a sound record starting at ``pos``, or 0 (used by --repair only)."""
    if len(data) - pos < RECORD_HEAD.size:
        return 0
    body: int
    crc: int
    body, crc = RECORD_HEAD.unpack_from(data, pos)
    end = pos + RECORD_HEAD.size + body
    if body == 0 or end > len(data) or record_checksum(data[pos + RECORD_HEAD.size : end]) != crc:
        return 0
    return end - pos


def _zeros(data: memoryview) -> bool:
    """Whether ``data`` holds nothing but zero bytes (at C speed: a segment made ahead is 64 MiB)."""
    return bytes(data).count(0) == len(data)


def _is_tail(data: memoryview, offset: int) -> bool:
    """Whether damage at ``offset`` is a torn tail: a record cut short by the end of the file,
    zeros to the end, or a bad last record, followed by nothing but the zeros of a segment made
    ahead (a crash in the middle of a write)."""
    rest = data[offset:]
    if _zeros(rest):
        return True
    if len(rest) < RECORD_HEAD.size:
        return True
    body: int = RECORD_HEAD.unpack_from(rest, 0)[0]
    return RECORD_HEAD.size + body >= len(rest) or _zeros(rest[RECORD_HEAD.size + body :])


class Store:
    """The segment files of one data directory, held with a lock for the life of the process.

    ``open()`` takes the lock, ``recover(broker)`` scans the log into a broker
    that has not served yet, ``attach(broker, loop)`` makes the store the
    broker's log writer, ``restore(broker)`` (called until it returns True, a
    chunk per pass of the loop while the server serves) puts the messages back,
    ``close()`` syncs and lets go.
    """

    def __init__(self, directory: str | os.PathLike[str], fsync: str = "everysec") -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self._lock_fd: int | None = None
        self._sizes: dict[Path, int] = {}  # every segment on disk, oldest first, and its size
        self._fd: int | None = None  # the segment being written
        self._unsynced: list[int] = []  # earlier segments written since their last sync, still open
        self._next_number = 1
        self._broker: Broker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._syncer: ThreadPoolExecutor | None = None
        self._sync_in_flight = False
        self._directory_changed = False  # a segment was created: the next sync syncs the directory too
        self._housekeeping: asyncio.TimerHandle | None = None
        self._mutex = threading.Lock()  # the fd lists and the spare, between the loop and the threads
        self._spare: int | None = None  # the next segment, made ahead (always), ready to be named
        self._preparer: ThreadPoolExecutor | None = None
        self._segment_max = 0  # bytes of a segment made ahead
        # the recovery: the segments mapped, the sound parts of each the restore has yet to walk
        self.recovered: Recovered | None = None
        self._left_out: set[Path] = set()  # segments a start deletes, left out when only reading
        self._started = 0.0
        self._mappings: list[mmap.mmap] = []
        # per segment: its path, its records, their sound parts still to walk, and whether the
        # restore checks their PUBLISH checksums (the scan left them)
        self._restoring: list[tuple[Path, memoryview, list[tuple[int, int]], bool]] = []
        self._check_every_record = False  # a restore found damage before: check all before serving
        # compaction (pigeon/server/compaction.py): one pass at a time, on a thread of its own
        self._compactor: ThreadPoolExecutor | None = None
        self._compacting = False
        self._compacted_at: object = None  # what the sealed segments looked like at the last pass
        self._summaries: dict[Path, tuple[int, int, compaction.Summary]] = {}  # by (size, mtime)
        # the bytes a rewrite would keep of each sealed segment, for which of its messages were done
        self._kept_bytes: dict[Path, tuple[compaction.Runs, int]] = {}
        self._head_done: tuple[Path | None, int, compaction.Runs] = (None, 0, [])  # read up to an offset
        # who hears that the log is synced up to a position: ``confirmed``, unless replication must
        # also confirm it before the replies waiting for it go (pigeon.cluster.replication)
        self.on_synced: Callable[[int], None] | None = None
        self.confirmed: ConfirmedLog | None = None  # once attached: how far the log is confirmed

    # ------------------------------------------------------------ the directory

    def open(self) -> None:
        """Create the directory if need be and take its lock; DataDirLocked when another process has it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot use {self.directory}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirLocked(
                f"{self.directory} is in use by another pigeon (pid {holder}); one server per data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        for name in (SPARE_NAME, SPARE_MAKING):  # made ahead before a crash
            (self.directory / name).unlink(missing_ok=True)
        self._check_every_record = (self.directory / DAMAGED_NAME).exists()
        compaction.finish_interrupted(self.directory)

    def open_to_read(self) -> compaction.Interrupted:
        """Take the lock (shared: a server holds it alone) without changing a byte of the directory
        (--inspect); returns what a compaction cut short left, whose replaced segments the reading
        leaves out, as a start would delete them. DataDirLocked while a server uses the directory."""
        if not self.directory.is_dir():
            raise StoreError(f"cannot use {self.directory}: no such directory")
        try:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:  # never served: nothing to share it with
            fd = -1
        except OSError as exc:
            raise StoreError(f"cannot use {self.directory}: {exc.strerror or exc}") from exc
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise DataDirLocked(f"{self.directory} is in use by a pigeon server (pid {holder})") from None
            self._lock_fd = fd
        found = compaction.interrupted(self.directory)
        self._left_out = {self.directory / name for name in found.replaced}
        return found

    def segments(self) -> list[Path]:
        """The segment files, oldest first (without those a merge cut short replaced, --inspect)."""
        return [path for path in _segments(self.directory) if path not in self._left_out]

    def tail(self) -> tuple[Path, int] | None:
        """The segment being written and how many of its bytes hold records (the rest is being
        written, or zeros made ahead), or None before the first."""
        if not self._sizes:
            return None
        path = next(reversed(self._sizes))
        return path, self._sizes[path]

    def disk_bytes(self) -> int:
        """Bytes of the segments on disk."""
        return sum(self._sizes.values())

    # ------------------------------------------------------------ reading back

    def recover(self, broker: Broker, repair: bool = False, change: bool = True) -> Recovered:
        """Scan every segment into ``broker``, oldest first: check each record and keep what the
        DONE and DELIVERED records say. A torn tail is cut off with a warning; damage before it
        raises CorruptLog, or with ``repair`` is skipped (the segment rewritten with its sound
        records). With ``change`` False the files are only read (--inspect). The messages come
        back afterwards, a chunk at a time, with ``restore`` (the server serves meanwhile).

        The checksums of the PUBLISH records of sealed segments (all but the last, which a crash
        may have torn) are left to ``restore``: they are most of the bytes, and checking them
        before serving would delay the first delivery by that much (docs/storage.md, "Recovery").
        ``repair``, ``change`` False and a data directory whose restore found damage before
        check every record here."""
        self._started = time.perf_counter()
        found = Recovered()
        paths = self.segments()
        try:
            for index, path in enumerate(paths):
                self._scan(broker, path, index == len(paths) - 1, repair, change, found)
                if path.exists():
                    self._sizes[path] = path.stat().st_size
            broker.recover_scanned()
        except MemoryError:
            raise StoreError(f"not enough memory to recover the messages of {self.directory}") from None
        except StoreError as exc:
            # the scan's views of the mapped segment live on in the traceback's frames: let them
            # go, so that close() can unmap it (BufferError: cannot close exported pointers exist)
            traceback.clear_frames(exc.__traceback__)
            raise
        if change:
            # every checksum was checked, and the damage, if any, repaired
            (self.directory / DAMAGED_NAME).unlink(missing_ok=True)
        if paths:
            self._next_number = int(paths[-1].stem) + 1
        found.segments = len(self._sizes)
        broker.log_disk = self.disk_bytes()
        self.recovered = found
        return found

    def restore(self, broker: Broker, limit: int = RESTORE_CHUNK) -> bool:
        """Put back the messages of about ``limit`` more records (in log order, each at the tail of
        its topic); True once every one is back (then the recovery is over and ``recovered`` says
        what came back). StoreError when they cannot be held in memory; CorruptLog at a PUBLISH
        record whose checksum the scan left and that does not match (the messages before it are
        back, none after it; the next start checks every record before serving)."""
        try:
            while self._restoring:
                path, records, parts, checksums = self._restoring[0]
                part = parts[0]
                walked, problem = broker.recover_restore(records[part[0] : part[1]], limit, checksums)
                if problem is not None:
                    self._found_damage(path, len(HEADER) + part[0] + walked, problem)
                if walked < part[1] - part[0]:
                    parts[0] = (part[0] + walked, part[1])
                    return False
                parts.pop(0)
                if not parts:
                    self._restoring.pop(0)
                    records.release()
                return False
        except MemoryError:
            raise StoreError(f"not enough memory to recover the messages of {self.directory}") from None
        found = self.recovered
        assert found is not None
        found.messages, found.topics, found.records, found.oldest_seq = broker.recover_finish()
        found.seconds = time.perf_counter() - self._started
        for mapping in self._mappings:
            mapping.close()
        self._mappings = []
        stats = broker.stats()
        if stats["memory_bytes"] > stats["memory_limit_bytes"]:
            log.warning(
                "the recovered messages take %d bytes, more than --max-memory %d: publishers wait "
                "until consumers drain them",
                stats["memory_bytes"],
                stats["memory_limit_bytes"],
            )
        return True

    def _found_damage(self, path: Path, offset: int, problem: str) -> None:
        """A damaged record found while serving: leave DAMAGED for the next start and raise."""
        damage = CorruptLog(path, offset, problem)
        (self.directory / DAMAGED_NAME).write_text(f"{damage}\n")
        raise damage

    def _map(self, path: Path) -> memoryview:
        """The bytes of ``path``, mapped (read from the page cache as they are walked, never copied)."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return memoryview(b"")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._mappings.append(mapping)
        return memoryview(mapping)

    def _scan(
        self, broker: Broker, path: Path, last: bool, repair: bool, change: bool, found: Recovered
    ) -> None:
        data = self._map(path)
        if len(data) < len(HEADER):
            if last and HEADER.startswith(bytes(data)):
                # a crash while the segment was being created: nothing in it yet
                self._cut(path, 0, "a segment header cut short", change, found)
                if change:
                    path.unlink()
                return
            raise CorruptLog(path, 0, "a segment header cut short")
        if bytes(data[: len(MAGIC)]) != MAGIC:
            raise StoreError(f"{path}: not a pigeon log segment (no {MAGIC.decode()} header)")
        version = struct.unpack_from("<I", data, len(MAGIC))[0]
        if version != FORMAT_VERSION:
            raise StoreError(f"{path}: log format {version}, this pigeon reads format {FORMAT_VERSION}")
        broker.recover_segment()
        records = data[len(HEADER) :]
        publish_checksums = last or repair or not change or self._check_every_record
        pos = 0
        kept: list[tuple[int, int]] = []  # the sound parts of records, walked again by restore
        dropped = 0
        while pos < len(records):
            sound, problem = broker.recover(records[pos:], publish_checksums)
            kept.append((pos, pos + sound))
            pos += sound
            if problem is None:
                break
            offset = len(HEADER) + pos
            if _zeros(records[pos:]):
                # the zeros of a segment made ahead, never written: its end, not damage
                if change:
                    os.truncate(path, offset)
                break
            if last and _is_tail(records, pos):
                self._cut(path, offset, problem, change, found)
                break
            if not repair:
                raise CorruptLog(path, offset, problem)
            skip = pos + 1
            while skip < len(records) and not _valid_record_at(records, skip):
                skip += 1
            log.warning("%s: %s at offset %d: dropped %d bytes (--repair)", path, problem, offset, skip - pos)
            dropped += skip - pos
            pos = skip
        found.dropped_bytes += dropped
        if dropped and change:
            self._rewrite(path, [records[start:end] for start, end in kept])
        parts = [part for part in kept if part[1] > part[0]] or [(0, 0)]
        self._restoring.append((path, records, parts, not publish_checksums))

    def _cut(self, path: Path, offset: int, problem: str, change: bool, found: Recovered) -> None:
        """Cut a torn tail off ``path`` at ``offset`` (only report it when not ``change``)."""
        log.warning(
            "%s: %s at offset %d: %s the torn tail (a crash in the middle of a write)",
            path,
            problem,
            offset,
            "cut off" if change else "would cut off",
        )
        found.torn.append((path, offset, problem))
        if change:
            os.truncate(path, offset)

    def _rewrite(self, path: Path, kept: list[memoryview]) -> None:
        """Replace ``path`` with its sound records only (--repair), atomically."""
        temporary = path.with_suffix(".repair")
        with open(temporary, "wb") as f:
            f.write(HEADER)
            for part in kept:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)

    # ------------------------------------------------------------ writing

    def attach(self, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        """Become ``broker``'s log: it hands its records to ``write`` and asks ``sync`` to sync them."""
        self._broker = broker
        self._loop = loop
        self.confirmed = ConfirmedLog(broker)
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-fsync")
        if self.fsync == "always":
            self._segment_max = broker.log_state["segment_max"]
            self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-spare")
            self._preparer.submit(self._prepare_spare)
        self._compactor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-compact")
        broker.on_log = self.write
        broker.on_sync = self.sync
        self._housekeeping = loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeep)

    def write(self, records: memoryview, new_segment: bool) -> None:
        """Append ``records`` (one write per pass of the loop); on OSError (disk full) the file is
        left as it was and the error raised, so the core keeps the records to try again."""
        if new_segment or self._fd is None:
            self._start_segment()
        fd = self._fd
        assert fd is not None
        path = next(reversed(self._sizes))
        size = self._sizes[path]
        done = 0
        try:
            while done < len(records):
                done += os.pwrite(fd, records[done:], size + done)
        except OSError:
            os.ftruncate(fd, size)
            raise
        self._sizes[path] = size + done
        assert self._broker is not None
        self._broker.log_disk = self.disk_bytes()

    def _start_segment(self) -> None:
        path = self.directory / segment_name(self._next_number)
        with self._mutex:
            spare, self._spare = self._spare, None
        if spare is not None:
            os.rename(self.directory / SPARE_NAME, path)
            fd = spare
            if self._preparer is not None:
                self._preparer.submit(self._prepare_spare)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, HEADER, 0)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._next_number += 1
        if self._fd is not None and self.fsync == "always":
            # a segment made ahead ends where its records do, not with the zeros after them
            os.ftruncate(self._fd, self._sizes[next(reversed(self._sizes))])
        # one step for the sync thread: the file it takes as the one being written is never also
        # among the earlier ones it syncs and closes
        with self._mutex:
            if self._fd is not None:
                self._unsynced.append(self._fd)
            self._fd = fd
        if self.fsync == "no":
            self._close_unsynced()
        self._sizes[path] = len(HEADER)
        # the new file's name must survive a crash too: the sync thread syncs the directory
        self._directory_changed = True

    def _prepare_spare(self) -> None:
        """Make the next segment ahead, off the loop: zeros of a whole segment, synced (always);
        it is named SPARE_NAME once ready."""
        path = self.directory / SPARE_MAKING
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            log.warning("cannot make the next log segment ahead: %s", exc.strerror or exc)
            return
        try:
            done = 0
            while done < self._segment_max:
                done += os.write(fd, ZEROS[: min(len(ZEROS), self._segment_max - done)])
            os.fdatasync(fd)
            with self._mutex:
                os.rename(path, self.directory / SPARE_NAME)
                self._spare = fd
        except OSError as exc:
            # a full disk: the next segment grows as it is written, as without a spare
            log.warning("cannot make the next log segment ahead: %s", exc.strerror or exc)
            os.close(fd)
            path.unlink(missing_ok=True)

    def _close_unsynced(self) -> None:
        with self._mutex:
            fds, self._unsynced = self._unsynced, []
        for fd in fds:
            os.close(fd)

    def sync(self, position: int) -> None:
        """Sync what was written up to ``position`` off the loop, then tell the core (group commit:
        the core asks again only once this one is done, for everything written meanwhile)."""
        if self._syncer is None or self._fd is None:
            return
        self._sync_in_flight = True
        directory, self._directory_changed = self._directory_changed, False
        self._syncer.submit(self._sync_files, position, directory)

    def _sync_written(self) -> None:
        """fdatasync the earlier segments written since their last sync (closing them), then the one
        being written. Both are taken when the sync starts: a segment started after the sync was
        asked holds records written after ``position`` only, and its predecessor is synced here
        as the earlier one it has become."""
        with self._mutex:
            earlier, self._unsynced = self._unsynced, []
            current = self._fd
        for fd in earlier:
            os.fdatasync(fd)
            os.close(fd)
        if current is not None:
            os.fdatasync(current)

    def _sync_files(self, position: int, directory: bool) -> None:
        assert self._loop is not None
        try:
            self._sync_written()
            if directory:
                compaction.sync_directory(self.directory)
        except OSError as exc:
            self._loop.call_soon_threadsafe(self._sync_failed, exc)
            return
        self._loop.call_soon_threadsafe(self._synced, position)

    def _synced(self, position: int) -> None:
        self._sync_in_flight = False
        if self.on_synced is not None:
            self.on_synced(position)
        elif self.confirmed is not None:
            self.confirmed.confirmed(position)

    def _sync_failed(self, exc: OSError) -> None:
        """A failed fdatasync may have lost written pages (the kernel forgets the error once
        reported), so a retry could report success for data that is gone. Under ``always`` every
        confirmation would be a lie: stop, as Redis does. Otherwise the next sync tries again."""
        self._sync_in_flight = False
        if self.fsync == "always":
            log.critical("cannot sync the log: %s; stopping (--fsync always)", exc.strerror or exc)
            os._exit(1)
        log.error("cannot sync the log: %s; trying again in %g s", exc.strerror or exc, HOUSEKEEPING_INTERVAL)

    def _housekeep(self) -> None:
        """Once a second: sync under everysec, delete the segments whose messages are all done,
        and compact the sealed segments left behind an old message."""
        broker, loop = self._broker, self._loop
        assert broker is not None and loop is not None
        state = broker.log_state
        if self.fsync == "everysec" and state["written"] > state["synced"] and not self._sync_in_flight:
            self.sync(state["written"])
        done = broker.log_deletable()
        if done and not self._compacting:  # a pass may be rewriting one of them
            for path in list(self._sizes)[:done]:
                path.unlink(missing_ok=True)  # a segment compaction emptied is gone already
                del self._sizes[path]
            broker.log_deleted(done)
            broker.log_disk = self.disk_bytes()
        self._compact(state)
        self._housekeeping = loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeep)

    def _compact(self, state: dict[str, Any]) -> None:
        """Start a compaction pass over the sealed segments when they changed since the last one
        (a segment was sealed, or an old message in one got done), and none is running."""
        broker = self._broker
        assert broker is not None and self._compactor is not None
        if self._compacting or broker.recovering or broker.stats()["log_write_failed"]:
            return
        sealed = [path for path in list(self._sizes)[:-1] if self._sizes[path]]
        looks = (sealed, state["segment_live"][: len(self._sizes) - 1])
        if not sealed or looks == self._compacted_at:
            return
        self._compacted_at = looks
        self._compacting = True
        broker.log_compaction_started()
        head = next(reversed(self._sizes))
        all_done = self._all_done(state["segment_live"])
        written = (head, self._sizes[head])
        self._compactor.submit(self._compaction_pass, sealed, all_done, written, state["segment_max"])

    def _all_done(self, segment_live: list[int]) -> list[bool]:
        """For each sealed segment on disk, whether the core counts none of its messages live (its
        DONE records may be in a later segment, the one being written too). A segment merged into
        a newer one is counted with it (its entry in ``_sizes`` is 0); the entries of ``_sizes``
        are the core's segments, oldest first."""
        if len(segment_live) != len(self._sizes):
            return [False] * (len(self._sizes) - 1)
        found: list[bool] = []
        live = 0
        for size, count in zip(list(self._sizes.values())[:-1], segment_live, strict=False):
            live += count
            if size:
                found.append(not live)
                live = 0
        return found

    def _summary(self, path: Path) -> compaction.Summary:
        """The compaction Summary of sealed segment ``path``, read once per version of the file."""
        status = path.stat()
        cached = self._summaries.get(path)
        if cached is not None and cached[:2] == (status.st_size, status.st_mtime_ns):
            return cached[2]
        with (
            open(path, "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapping,
            memoryview(mapping) as data,
        ):
            summary = compaction.summarize(data, len(HEADER))
        self._summaries[path] = (status.st_size, status.st_mtime_ns, summary)
        self._kept_bytes.pop(path, None)
        return summary

    def _done_in_head(self, head: Path, size: int) -> compaction.Runs:
        """The DONE runs of the segment being written, in its first ``size`` bytes (whole records,
        written before the pass started); what was read before is not read again."""
        path, offset, runs = self._head_done
        if path != head:
            offset, runs = len(HEADER), []
        if size > offset:
            with (
                open(head, "rb") as f,
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapping,
                memoryview(mapping) as data,
            ):
                runs = compaction.merge(runs + compaction.summarize(data[:size], offset).done)
            offset = size
        self._head_done = (head, offset, runs)
        return runs

    def _kept_of(self, path: Path, summary: compaction.Summary, done: compaction.Runs, runs: bytes) -> int:
        """The bytes a rewrite of sealed segment ``path`` would keep with ``done`` (walked in C once
        per change of which of its messages are done). Its DELIVERED records of older messages count
        as they were at that walk: a message of an older segment done since then is counted live
        here until the next walk (the choice is conservative; the rewrite itself uses ``done``), so
        that acks of old messages do not make every newer segment be walked again."""
        finished = compaction.intersect(summary.published, done)
        cached = self._kept_bytes.get(path)
        if cached is None or cached[0] != finished:
            with (
                open(path, "rb") as f,
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapping,
                memoryview(mapping) as data,
            ):
                kept = segment_kept(data[len(HEADER) :], runs)
            cached = (finished, sum(end - start for start, end in kept))
            self._kept_bytes[path] = cached
        return cached[1]

    def _replace(self, group: list[Path], kept: list[bytes], kept_bytes: int) -> dict[Path, int]:
        """Replace consecutive segments with one holding ``kept``: their new sizes (0: deleted).
        A lone segment that would keep every byte is left alone."""
        if len(group) == 1 and len(HEADER) + kept_bytes >= group[0].stat().st_size:
            return {}
        size = compaction.replace(group, HEADER, list(kept))
        return {**{path: 0 for path in group[:-1]}, group[-1]: size}

    def _kept(self, path: Path, done: bytes, keep_done: compaction.Runs) -> list[bytes]:
        """The records segment ``path`` keeps, copied out of its mapping (what is kept is small)."""
        with (
            open(path, "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapping,
            memoryview(mapping) as data,
        ):
            kept = segment_kept(data[len(HEADER) :], done)
            return [bytes(part) for part in compaction.rewrite(data, len(HEADER), kept, keep_done)]

    def _compaction_pass(
        self, sealed: list[Path], all_done: list[bool], head: tuple[Path, int], segment_max: int
    ) -> None:
        """One pass, off the loop: rewrite the sealed segments the plan chooses, oldest first,
        consecutive ones merged up to ``segment_max`` bytes. The DONE records written so far to
        the segment being written (``head``: it and its size) count too. A segment whose messages
        are ``all_done`` keeps about nothing: it is not walked to count what it keeps (its
        DELIVERED records of older messages, which a rewrite keeps, are left out of the count)."""
        assert self._loop is not None
        started = time.perf_counter()
        sizes: dict[Path, int] = {}
        before: dict[Path, int] = {}
        failed = False
        try:
            for path in [path for path in self._summaries if path not in sealed]:
                del self._summaries[path]
                self._kept_bytes.pop(path, None)
            summaries = [self._summary(path) for path in sealed]
            done = compaction.all_done(summaries, self._done_in_head(*head))
            done_array = compaction.as_array(done)
            kept = [
                0 if empty else self._kept_of(path, summary, done, done_array)
                for path, summary, empty in zip(sealed, summaries, all_done, strict=True)
            ]
            # a segment of up to a quarter of the most is merged with its neighbours
            chosen = compaction.plan(summaries, kept, done, segment_max // 4)
            group: list[Path] = []  # consecutive segments rewritten into one, and what they keep
            records: list[bytes] = []
            kept_bytes = 0
            for index, keep_done in sorted(chosen.keep_done.items()):
                path = sealed[index]
                before[path] = summaries[index].size
                parts = self._kept(path, chosen.done, keep_done)
                size = sum(len(part) for part in parts)
                full = len(HEADER) + kept_bytes + size > segment_max
                if group and (group[-1] != sealed[index - 1] or full):
                    sizes.update(self._replace(group, records, kept_bytes))
                    group, records, kept_bytes = [], [], 0
                group.append(path)
                records.extend(parts)
                kept_bytes += size
            if group:
                sizes.update(self._replace(group, records, kept_bytes))
        except OSError as exc:
            failed = True
            log.warning("log compaction stopped: %s; trying again later", exc.strerror or exc)
        except Exception:  # a bug: said, not swallowed by the thread's future; the log stays sound
            failed = True
            log.exception("log compaction failed")
        finally:
            reclaimed = sum(before[path] - size for path, size in sizes.items())
            seconds = time.perf_counter() - started
            self._loop.call_soon_threadsafe(self._compacted, sizes, reclaimed, failed, seconds)

    def _compacted(self, sizes: dict[Path, int], reclaimed: int, failed: bool, seconds: float) -> None:
        """A pass ended (on the loop): the segments it rewrote have their new sizes (0: deleted)."""
        self._compacting = False
        for path, size in sizes.items():
            if path in self._sizes:
                self._sizes[path] = size
        if self._broker is None:
            return
        removed = sum(1 for size in sizes.values() if not size)
        self._broker.log_compaction_ended(len(sizes), removed, reclaimed, failed, seconds)
        if sizes:
            self._broker.log_disk = self.disk_bytes()
            log.debug("log compaction: %d segments rewritten, %d bytes freed", len(sizes), reclaimed)

    def close(self) -> None:
        """Sync what was written (unless --fsync no), close the files and let go of the lock."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        if self._compactor is not None:
            self._compactor.shutdown(wait=True)
            self._compactor = None
        if self._preparer is not None:
            self._preparer.shutdown(wait=True, cancel_futures=True)
            self._preparer = None
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            (self.directory / SPARE_NAME).unlink(missing_ok=True)
        if self._fd is not None:
            if self.fsync == "always":
                os.ftruncate(self._fd, self._sizes[next(reversed(self._sizes))])
            if self.fsync != "no":
                self._sync_written()
            self._close_unsynced()
            os.close(self._fd)
            self._fd = None
        self._restoring = []  # a stop before the restore ended: the rest stays in the log
        for mapping in self._mappings:
            mapping.close()
        self._mappings = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _published_at(segments: list[Path], seq: int) -> int | None:
    """When the message ``seq`` was published (ms since the epoch), read from its PUBLISH record."""
    if not seq:
        return None
    for path in segments:
        data = memoryview(path.read_bytes())
        pos = len(HEADER)
        while pos + RECORD_HEAD.size < len(data):
            body: int = RECORD_HEAD.unpack_from(data, pos)[0]
            kind = data[pos + RECORD_HEAD.size]
            if kind == PUBLISH_KIND:
                found, published = PUBLISH_FIELDS.unpack_from(data, pos + RECORD_HEAD.size + 1)
                if found == seq:
                    return int(published)
                if found > seq:
                    return None
            pos += RECORD_HEAD.size + body
    return None


def inspect(directory: str | os.PathLike[str]) -> Iterator[str]:
    """Lines describing a data directory (segments, messages per topic), read without serving and
    without changing it: what a start would change (a torn tail, a compaction a crash cut short) is
    said instead."""
    store = Store(directory)
    interrupted = store.open_to_read()
    try:
        broker = Broker(durable=True)
        found = store.recover(broker, change=False)
        while not store.restore(broker):
            pass
        yield f"data directory {store.directory}"
        yield f"segments: {found.segments} ({store.disk_bytes()} bytes), records: {found.records}"
        yield from interrupted.lines()
        for path, offset, problem in found.torn:
            yield f"torn tail: {path.name} at offset {offset} ({problem}); a start cuts it off"
        yield f"messages not done: {found.messages} on {found.topics} topics"
        published = _published_at(store.segments(), found.oldest_seq)
        if published is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(published / 1000))
            yield f"oldest message: published {when} UTC (seq {found.oldest_seq})"
        cursor = 0
        while True:
            page = broker.topics(cursor, 1000)
            for topic in page["topics"]:
                name, count, size = topic["name"], topic["backlog_messages"], topic["backlog_bytes"]
                yield f"  {name}: {count} messages, {size} bytes"
            cursor = page["next"]
            if not cursor:
                break
    finally:
        store.close()
