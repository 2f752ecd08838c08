"""Compaction's parts on their own: the runs of seqs, the choice of segments, the records kept, and
what a start does with a merge a crash cut short (the whole, over real processes, is in
tests/test_compaction_wire.py)."""

from __future__ import annotations

import struct
from array import array
from pathlib import Path

from pigeon._core import record_checksum, segment_kept, segment_summary
from pigeon.server import compaction
from pigeon.server.compaction import (
    COMPACT_SUFFIX,
    INTENT,
    Summary,
    all_done,
    finish_interrupted,
    interrupted,
    intersect,
    merge,
    plan,
    summarize,
)
from pigeon.server.store import HEADER


def _record(body: bytes) -> bytes:
    return struct.pack("<II", len(body), record_checksum(body)) + body


def publish(seq: int, topic: bytes = b"jobs", payload: bytes = b"hello") -> bytes:
    """A PUBLISH record (docs/storage.md, "The format")."""
    fields = struct.pack("<QQIH", seq, 0, 1, len(topic)) + topic + struct.pack("<I", len(payload)) + payload
    return _record(b"\x01" + fields)


def done(first: int, last: int) -> bytes:
    """A DONE record."""
    return _record(b"\x02" + struct.pack("<QQ", first, last))


def delivered(seq: int, attempt: int) -> bytes:
    """A DELIVERED record."""
    return _record(b"\x03" + struct.pack("<QI", seq, attempt))


def runs(pairs: list[tuple[int, int]]) -> bytes:
    """Runs of seqs as segment_kept takes them."""
    return array("Q", [seq for pair in pairs for seq in pair]).tobytes()


def test_runs_merge_and_intersect() -> None:
    assert merge([(5, 6), (1, 2), (3, 3), (8, 9), (9, 12)]) == [(1, 3), (5, 6), (8, 12)]
    assert intersect([(1, 6), (8, 12)], [(4, 9)]) == [(4, 6), (8, 9)]
    assert intersect([(1, 2)], [(3, 4)]) == []


def test_segment_summary_reads_publishes_as_runs_and_done_runs() -> None:
    records = publish(1) + publish(2) + done(1, 1) + publish(4) + delivered(4, 2) + done(2, 2)
    published, publishes, done_runs, others = segment_summary(records)
    assert (published, publishes, done_runs, others) == ([(1, 2), (4, 4)], 3, [(1, 1), (2, 2)], 3)
    # the zeros after the records of a segment made ahead end it
    assert segment_summary(records + bytes(100))[1] == 3


def test_segment_kept_keeps_publish_and_delivered_of_messages_not_done() -> None:
    parts = [publish(1), publish(2), delivered(1, 2), done(1, 1), publish(3), delivered(3, 2)]
    records = b"".join(parts)
    offsets = [sum(len(p) for p in parts[:i]) for i in range(len(parts) + 1)]
    kept = segment_kept(records, runs([(1, 1)]))
    # seq 2 and its neighbours' records are kept, seq 1 (done) and the DONE record are not
    assert kept == [(offsets[1], offsets[2]), (offsets[4], offsets[6])]
    assert segment_kept(records, runs([])) == [(0, offsets[3]), (offsets[4], offsets[6])]


def test_plan_rewrites_mostly_done_segments_and_keeps_the_done_runs_older_segments_need() -> None:
    first = Summary(size=10_000, publishes=10, published=[(1, 10)], done=[(1, 9)])  # 1 of 10 live
    second = Summary(size=10_000, publishes=10, published=[(11, 20)], done=[(11, 13)])  # 7 of 10 live
    third = Summary(size=10_000, publishes=10, published=[(21, 30)], done=[(12, 12), (21, 30)])
    summaries = [first, second, third]
    chosen = plan(summaries, [1000, 7000, 0], all_done(summaries, []), small=100)
    # the first and third are rewritten; the second keeps its done messages 11-13, so the third
    # keeps the part of its DONE runs that covers one of them (12); the first's DONE runs cover
    # its own messages only, gone with them
    assert chosen.keep_done == {0: [], 2: [(12, 12)]}
    assert array("Q", chosen.done).tolist() == [1, 9, 11, 13, 21, 30]


def test_plan_merges_small_segments_with_their_neighbours() -> None:
    small = Summary(size=50, publishes=1, published=[(1, 1)])  # live, nothing to drop
    big = Summary(size=10_000, publishes=10, published=[(2, 11)])  # all live
    assert plan([small, small, big], [40, 40, 9_990], [], small=100).keep_done == {0: [], 1: []}
    assert plan([small, big], [40, 9_990], [], small=100).keep_done == {}


def _kept_bytes(records: bytes, done_runs: list[tuple[int, int]]) -> int:
    return sum(end - start for start, end in segment_kept(records, runs(done_runs)))


def test_the_live_share_is_counted_in_bytes() -> None:
    big, small = b"b" * 9000, b"s"
    # one live 1 MiB-like message among many done small ones: most of the segment is live
    records = publish(1, payload=big) + b"".join(publish(seq, payload=small) for seq in range(2, 40))
    summary = summarize(memoryview(HEADER + records), len(HEADER))
    done = all_done([summary], [(2, 39)])
    assert plan([summary], [_kept_bytes(records, done)], done, small=100).keep_done == {}
    # many live small messages and one done big one: most of the segment can go
    records = b"".join(publish(seq, payload=small) for seq in range(1, 39)) + publish(39, payload=big)
    summary = summarize(memoryview(HEADER + records), len(HEADER))
    done = all_done([summary], [(39, 39)])
    assert plan([summary], [_kept_bytes(records, done)], done, small=100).keep_done == {0: []}


def test_done_records_of_the_segment_being_written_count() -> None:
    summary = Summary(size=10_000, publishes=10, published=[(1, 10)])
    # the DONE records of seqs 1-9 are in the head only: the sealed segment is rewritten all the same
    done = all_done([summary], [(1, 9), (11, 40)])
    assert done == [(1, 9), (11, 40)]
    assert plan([summary], [1000], done, small=100).keep_done == {0: []}


def test_an_interrupted_merge_is_described_without_a_change(tmp_path: Path) -> None:
    paths = _segments(tmp_path, 1, 2, 3)
    (tmp_path / INTENT).write_text("".join(f"{p.name}\n" for p in paths))
    before = sorted(tmp_path.iterdir())
    found = interrupted(tmp_path)
    assert (found.merged_into, found.renamed) == (paths[-1].name, True)
    assert found.replaced == [p.name for p in paths[:2]]
    assert found.leftovers == [INTENT]
    assert "a start completes it, deleting the segments it replaced: " in found.lines()[0]
    assert sorted(tmp_path.iterdir()) == before
    paths[-1].with_suffix(COMPACT_SUFFIX).write_bytes(HEADER)
    found = interrupted(tmp_path)
    assert (found.renamed, found.replaced) == (False, [])
    assert found.leftovers == [INTENT, paths[-1].with_suffix(COMPACT_SUFFIX).name]
    assert "was not renamed into place; a start forgets it" in found.lines()[0]


def _segments(directory: Path, *numbers: int) -> list[Path]:
    paths = [directory / f"{n:016d}.seg" for n in numbers]
    for path in paths:
        path.write_bytes(HEADER + publish(int(path.stem)))
    return paths


def test_a_merge_cut_short_before_its_rename_is_forgotten(tmp_path: Path) -> None:
    paths = _segments(tmp_path, 1, 2, 3)
    (tmp_path / INTENT).write_text("".join(f"{p.name}\n" for p in paths))
    paths[-1].with_suffix(COMPACT_SUFFIX).write_bytes(HEADER)
    finish_interrupted(tmp_path)
    assert sorted(tmp_path.iterdir()) == paths


def test_a_merge_cut_short_after_its_rename_is_completed(tmp_path: Path) -> None:
    paths = _segments(tmp_path, 1, 2, 3)
    (tmp_path / INTENT).write_text("".join(f"{p.name}\n" for p in paths))
    finish_interrupted(tmp_path)
    assert sorted(tmp_path.iterdir()) == paths[-1:]


def test_replace_merges_into_the_newest_name_and_deletes_the_rest(tmp_path: Path) -> None:
    paths = _segments(tmp_path, 4, 5, 6)
    size = compaction.replace(paths, HEADER, [publish(4), publish(6)])
    assert sorted(tmp_path.iterdir()) == paths[-1:]
    assert paths[-1].read_bytes() == HEADER + publish(4) + publish(6)
    assert size == len(HEADER + publish(4) + publish(6))
    assert compaction.replace(paths[-1:], HEADER, []) == 0
    assert list(tmp_path.iterdir()) == []
