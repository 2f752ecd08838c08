"""Compaction of the log: sealed segments rewritten in place with only the records a recovery needs.

A segment is deleted from the front of the log once all its messages are done; one old message
that nobody takes would otherwise keep its segment and every later one on disk. A compaction pass
reads the sealed segments (never rewriting the one being written), learns from their DONE records,
and from those written so far to the one being written, which messages are done, and rewrites each
segment whose live share (the bytes of the records a rewrite keeps) is below ``LIVE_SHARE`` with only:

- the PUBLISH records of messages not done (in their order: seqs still increase through the log,
  so a recovery puts each topic's messages back in their original order);
- the DELIVERED records of messages not done (a recovery takes the highest attempt of a message
  wherever its records are);
- the parts of DONE runs that still cover a PUBLISH record left in an older segment this pass does
  not rewrite (the DONE runs of a message whose PUBLISH is gone are no longer needed).

Consecutive rewritten segments are merged into one (under the newest one's name) up to a segment's
size. A rewrite is made as ``<segment>.compact``, synced, renamed over the segment and the directory
synced, oldest segment first: a DONE run is dropped only once the PUBLISH records it covers are
gone for good, so a crash at any step leaves a log that recovers to the same messages, with the
same attempts. docs/storage.md, "Compaction".
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from pigeon._core import record_checksum, segment_summary

# A sealed segment is rewritten when a rewrite would keep less than this share of its bytes (Kafka's
# log cleaner starts at a dirty ratio of 0.5 too, counted in bytes: at most half of what it reads is
# kept). Bytes, not messages: one live 1 MiB message among many done small ones is most of its segment.
LIVE_SHARE = 0.5
COMPACT_SUFFIX = ".compact"  # a rewrite until it is synced and renamed over its segment
INTENT = "compact.intent"  # the segments a merge replaces, while it runs
INTENT_MAKING = "compact.intent.part"  # its name until it is whole and synced

RECORD_HEAD = struct.Struct("<II")  # body length, CRC-32C of the body
DONE_KIND = 2
RUN = struct.Struct("<QQ")  # a DONE record's first and last seq

Runs = list[tuple[int, int]]  # sorted, disjoint, inclusive ranges of seqs
Ranges = list[tuple[int, int]]  # (start, end) offsets of records in a segment


def merge(runs: Runs) -> Runs:
    """``runs`` sorted, with overlapping and adjacent ranges joined."""
    merged: Runs = []
    for first, last in sorted(runs):
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def intersect(a: Runs, b: Runs) -> Runs:
    """The seqs in both ``a`` and ``b`` (both merged)."""
    found: Runs = []
    i = j = 0
    while i < len(a) and j < len(b):
        first, last = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if first <= last:
            found.append((first, last))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return found


def count(runs: Runs) -> int:
    """How many seqs ``runs`` holds."""
    return sum(last - first + 1 for first, last in runs)


@dataclass
class Summary:
    """What compaction needs to know of a sealed segment, read once."""

    size: int
    publishes: int = 0
    published: Runs = field(default_factory=list)  # seqs of its PUBLISH records
    done: Runs = field(default_factory=list)  # what its DONE records say, merged
    others: int = 0  # its DONE and DELIVERED records


def summarize(data: memoryview, start: int) -> Summary:
    """The Summary of a segment's bytes, its records starting at ``start`` (walked in C)."""
    published, publishes, done, others = segment_summary(data[start:])
    return Summary(len(data), publishes, published, merge(done), others)


@dataclass
class Plan:
    """Which sealed segments a pass rewrites, and what each keeps of its DONE runs."""

    done: bytes  # every message the sealed segments' DONE records say is done, as runs (array('Q'))
    keep_done: dict[int, Runs]  # segment index -> the DONE runs it keeps


def all_done(summaries: list[Summary], head: Runs) -> Runs:
    """Every message the DONE records of the sealed segments and ``head`` (those written so far to
    the segment being written) say is done, merged."""
    return merge([run for summary in summaries for run in summary.done] + head)


def as_array(runs: Runs) -> bytes:
    """``runs`` as segment_kept takes them: the bytes of an array('Q') of first, last, first, ..."""
    return array("Q", [seq for run in runs for seq in run]).tobytes()


def plan(summaries: list[Summary], kept: list[int], done: Runs, small: int) -> Plan:
    """Choose the segments to rewrite (oldest first): those whose ``kept`` bytes (what a rewrite
    keeps of each: the PUBLISH and DELIVERED records of the messages not in ``done``) are below
    LIVE_SHARE of their size and that hold records a recovery no longer needs, and those of at
    most ``small`` bytes next to one chosen or as small (to be merged with it)."""
    low = [
        size < summary.size * LIVE_SHARE or not summary.publishes
        for summary, size in zip(summaries, kept, strict=True)
    ]
    little = [summary.size <= small for summary in summaries]
    keep_done: dict[int, Runs] = {}
    left: Runs = []  # PUBLISH records of done messages left in older segments not rewritten
    for index, summary in enumerate(summaries):
        finished = intersect(summary.published, done)
        needed = intersect(summary.done, left)
        droppable = low[index] and (count(finished) > 0 or summary.done != needed)
        neighbours = [i for i in (index - 1, index + 1) if 0 <= i < len(summaries)]
        mergeable = little[index] and any(little[i] or low[i] for i in neighbours)
        if droppable or mergeable:
            keep_done[index] = needed
        else:
            left = merge(left + finished)
    return Plan(as_array(done), keep_done)


def _done_record(first: int, last: int) -> bytes:
    body = bytes([DONE_KIND]) + RUN.pack(first, last)
    return RECORD_HEAD.pack(len(body), record_checksum(body)) + body


def rewrite(data: memoryview, start: int, kept: Ranges, keep_done: Runs) -> list[bytes | memoryview]:
    """The records of a segment that a recovery still needs: its ``kept`` parts (segment_kept's
    offsets after ``start``: the PUBLISH and DELIVERED records of messages not done, in their
    order), then the DONE runs in ``keep_done``."""
    records = data[start:]
    parts: list[bytes | memoryview] = [records[first:end] for first, end in kept]
    parts.extend(_done_record(first, last) for first, last in keep_done)
    return parts


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that the names created, renamed or deleted in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, parts: list[bytes | memoryview]) -> int:
    """Write ``parts`` to a new file ``path`` and sync it; returns its size."""
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)
        f.flush()
        os.fdatasync(f.fileno())
        return f.tell()


def replace(segments: list[Path], header: bytes, records: list[bytes | memoryview]) -> int:
    """Replace consecutive sealed ``segments`` with one holding ``records`` under the name of the
    newest of them, or delete them all when there is no record; returns its new size.

    Crash-safe: the new segment is written as ``<newest>.compact`` and synced; when it replaces
    several, an intent naming them is written (synced) before the rename and the older ones are
    deleted after it, so that ``finish_interrupted`` completes or forgets a merge a crash cut short
    (a seq must never be in two segments at a start)."""
    directory, target, older = segments[-1].parent, segments[-1], segments[:-1]
    if not records:
        for path in segments:
            path.unlink()
        sync_directory(directory)
        return 0
    temporary = target.with_suffix(COMPACT_SUFFIX)
    size = _write_synced(temporary, [header, *records])
    if older:
        _write_synced(directory / INTENT_MAKING, ["".join(f"{p.name}\n" for p in segments).encode()])
        os.replace(directory / INTENT_MAKING, directory / INTENT)
        sync_directory(directory)
    os.replace(temporary, target)
    sync_directory(directory)
    if older:
        for path in older:
            path.unlink()
        sync_directory(directory)
        (directory / INTENT).unlink()
    return size


@dataclass
class Interrupted:
    """What a compaction cut short by a crash left in a data directory, and what a start does."""

    merged_into: str = ""  # the segment a merge was making, "" when none was under way
    renamed: bool = False  # ... whether its new segment was renamed into place
    replaced: list[str] = field(default_factory=list)  # segments that merge replaced: a start deletes them
    leftovers: list[str] = field(default_factory=list)  # its intent, unfinished rewrites: deleted too

    def lines(self) -> list[str]:
        """What ``pigeon --inspect`` says of it (nothing when no compaction was cut short)."""
        said = []
        if self.merged_into and self.renamed:
            said.append(
                f"interrupted compaction: a merge into {self.merged_into} was renamed into place; a start "
                f"completes it, deleting the segments it replaced: {', '.join(self.replaced) or 'none left'}"
            )
        elif self.merged_into:
            said.append(
                f"interrupted compaction: a merge into {self.merged_into} was not renamed into place; a "
                "start forgets it (its segments stay as they are)"
            )
        if self.leftovers:
            said.append(f"unfinished compaction files, deleted at start: {', '.join(self.leftovers)}")
        return said


def interrupted(directory: Path) -> Interrupted:
    """What a compaction cut short left in ``directory``; reads only, changes nothing (--inspect)."""
    found = Interrupted()
    intent = directory / INTENT
    if intent.exists():
        names = intent.read_text().split()
        if names:
            found.merged_into = names[-1]
            found.renamed = not (directory / names[-1]).with_suffix(COMPACT_SUFFIX).exists()
            if found.renamed:
                found.replaced = [name for name in names[:-1] if (directory / name).exists()]
        # the intent goes before the rewrites: without it, a start takes a merge whose .compact is
        # gone for one renamed into place, and would delete the segments it did not replace
        found.leftovers.append(INTENT)
    if (directory / INTENT_MAKING).exists():
        found.leftovers.append(INTENT_MAKING)
    found.leftovers.extend(sorted(path.name for path in directory.glob("*" + COMPACT_SUFFIX)))
    return found


def finish_interrupted(directory: Path) -> None:
    """At start, before the log is read: complete a merge whose new segment was renamed into place
    (delete the segments it replaced), forget one that was not, and delete unfinished rewrites."""
    found = interrupted(directory)
    for name in found.replaced + found.leftovers:  # in this order (see interrupted)
        (directory / name).unlink(missing_ok=True)
    sync_directory(directory)
