"""Replication's C walks over log records (pigeon/cluster/_split.pyx, pigeon/cluster/_index.pyx)
against the Python they replaced, on random record streams: the same runs per node, the same
messages not done after DONE ranges, taken in the same order."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.cluster._index import ReplicaIndex
from pigeon.cluster._split import SlotSplitter
from pigeon.cluster.replication import split_records
from pigeon.cluster.slots import SLOTS, slot_of

RECORD_HEAD = struct.Struct("<II")
PUBLISH_HEAD = struct.Struct("<BQQIH")
DONE = struct.Struct("<BQQ")
DELIVERED = struct.Struct("<BQI")
LENGTH = struct.Struct("<I")
NODES = ["n1", "n2", "n3"]


def record(body: bytes) -> bytes:
    """A record around ``body`` (the checksum is not read by these walks: any value)."""
    return RECORD_HEAD.pack(len(body), 0) + body


def publish(seq: int, topic: bytes, message: bytes) -> bytes:
    return record(PUBLISH_HEAD.pack(1, seq, 0, 1, len(topic)) + topic + LENGTH.pack(len(message)) + message)


def done(first: int, last: int) -> bytes:
    return record(DONE.pack(2, first, last))


def delivered(seq: int) -> bytes:
    return record(DELIVERED.pack(3, seq, 2))


# -- the Python reference (pigeon/cluster/replication.py before the walks went to C) ----------------


def reference_split(
    data: bytes, targets: Callable[[int], tuple[str, ...]], done_to: Iterable[str]
) -> dict[str, list[tuple[int, int]]]:
    """(start, end) runs per node: a PUBLISH to its slot's targets, a DONE to ``done_to``."""
    runs: dict[str, list[list[int]]] = {}
    pos = 0
    while pos + RECORD_HEAD.size < len(data):
        body = LENGTH.unpack_from(data, pos)[0]
        if body == 0:
            break
        end = pos + RECORD_HEAD.size + body
        kind = data[pos + RECORD_HEAD.size]
        nodes: Iterable[str] = ()
        if kind == 1:
            topic_len = PUBLISH_HEAD.unpack_from(data, pos + RECORD_HEAD.size)[4]
            at = pos + RECORD_HEAD.size + PUBLISH_HEAD.size
            nodes = targets(slot_of(data[at : at + topic_len].split(b" ", 1)[0]))
        elif kind == 2:
            nodes = done_to
        for node in nodes:
            spans = runs.setdefault(node, [])
            if spans and spans[-1][1] == pos:
                spans[-1][1] = end
            else:
                spans.append([pos, end])
        pos = end
    return {node: [(start, end) for start, end in spans] for node, spans in runs.items()}


class ReferenceIndex:
    """seq -> (slot, topic field, message) of the messages not done."""

    def __init__(self) -> None:
        self.messages: dict[int, tuple[int, bytes, bytes]] = {}

    def keep(self, chunk: bytes) -> None:
        pos = 0
        while pos + RECORD_HEAD.size < len(chunk):
            body = LENGTH.unpack_from(chunk, pos)[0]
            kind = chunk[pos + RECORD_HEAD.size]
            if kind == 1:
                _, seq, _, _, topic_len = PUBLISH_HEAD.unpack_from(chunk, pos + RECORD_HEAD.size)
                at = pos + RECORD_HEAD.size + PUBLISH_HEAD.size
                topic = chunk[at : at + topic_len]
                size = LENGTH.unpack_from(chunk, at + topic_len)[0]
                message = chunk[at + topic_len + 4 : at + topic_len + 4 + size]
                self.messages[seq] = (slot_of(topic.split(b" ", 1)[0]), topic, message)
            elif kind == 2:
                _, first, last = DONE.unpack_from(chunk, pos + RECORD_HEAD.size)
                if last - first < len(self.messages):
                    for seq in range(first, last + 1):
                        self.messages.pop(seq, None)
                else:
                    for seq in [seq for seq in self.messages if first <= seq <= last]:
                        del self.messages[seq]
            pos += RECORD_HEAD.size + body

    def take(self, slots: set[int]) -> list[tuple[bytes, bytes]]:
        mine = sorted(seq for seq, (slot, _, _) in self.messages.items() if slot in slots)
        return [self.messages.pop(seq)[1:] for seq in mine]


# -- random record streams ----------------------------------------------------------------------------

TOPICS = st.sampled_from([b"a", b"b", b"orders", b"bench7", b"t9 group1", b"a g", b"x" * 40, b""])


@st.composite
def streams(draw: st.DrawFn, max_seq: int = 60, start: int = 1 << 40) -> list[bytes]:
    """Records as a core writes them (PUBLISH seqs rising), with DONE runs and DELIVERED records;
    sometimes a PUBLISH again of an earlier seq (a snapshot sent after newer records). Seqs begin
    between 3 and ``start``: a small one makes several streams' seqs meet."""
    records: list[bytes] = []
    seq = draw(st.integers(3, start))
    first = seq
    for _ in range(draw(st.integers(0, max_seq))):
        kind = draw(st.sampled_from(["publish", "publish", "publish", "done", "delivered", "again"]))
        if kind == "publish":
            records.append(publish(seq, draw(TOPICS), draw(st.binary(max_size=20))))
            seq += 1
        elif kind == "done":
            low = draw(st.integers(first - 2, seq + 2))
            records.append(done(low, low + draw(st.integers(0, 30))))
        elif kind == "delivered":
            records.append(delivered(draw(st.integers(first, seq))))
        else:
            records.append(publish(draw(st.integers(first - 2, seq + 2)), draw(TOPICS), b"again"))
    return records


# the targets of slot s are the (s % 8)th of eight drawn choices
TARGETS = st.lists(
    st.lists(st.sampled_from(NODES), max_size=3, unique=True).map(tuple), min_size=8, max_size=8
).map(lambda choices: [choices[slot % 8] for slot in range(SLOTS)])


@given(streams(), TARGETS, st.lists(st.sampled_from(NODES), unique=True), st.sampled_from([b"", b"\0" * 12]))
@settings(max_examples=200, deadline=None)
def test_the_c_split_gives_each_node_the_runs_the_python_one_gave(
    records: list[bytes], targets: list[tuple[str, ...]], done_to: list[str], tail: bytes
) -> None:
    data = b"".join(records) + tail  # a segment made ahead ends in zeros
    got = split_records(data, targets.__getitem__, done_to)
    expected = reference_split(data, targets.__getitem__, done_to)
    view = memoryview(data)
    assert {node: [bytes(part) for part in parts] for node, parts in got.items()} == {
        node: [bytes(view[start:end]) for start, end in spans] for node, spans in expected.items()
    }
    for parts in got.values():  # slices of the data, not copies
        assert [part.obj is data for part in parts] == [True] * len(parts)


def test_a_slot_may_have_several_targets_and_a_node_gets_a_record_once() -> None:
    first, second = publish(1, b"a", b"m1"), publish(2, b"b", b"m2")
    targets: dict[int, str | tuple[str, ...]] = {slot_of(b"a"): ("n1", "n2"), slot_of(b"b"): "n2"}
    parts = split_records(first + second + done(1, 1), targets.get, ["n2", "n2"])
    assert {node: [bytes(part) for part in runs] for node, runs in parts.items()} == {
        "n1": [first],
        "n2": [first + second + done(1, 1)],
    }


@given(st.lists(streams(max_seq=30, start=100), max_size=6), st.sets(st.integers(0, SLOTS - 1)))
@settings(max_examples=200, deadline=None)
def test_the_c_index_keeps_and_gives_the_messages_the_python_one_did(
    chunks: list[list[bytes]], slots: set[int]
) -> None:
    index, reference = ReplicaIndex(), ReferenceIndex()
    for records in chunks:
        chunk = b"".join(records)
        index.keep(chunk)
        reference.keep(chunk)
        assert len(index) == len(reference.messages)
    assert index.take(slots) == reference.take(slots)
    assert len(index) == len(reference.messages)
    everything = set(range(SLOTS))
    assert index.take(everything) == reference.take(everything)
    assert len(index) == 0


def test_the_index_survives_many_messages_done_out_of_order() -> None:
    """Enough entries to grow, compact and drop chunks: every other message is done, then the rest."""
    index, reference = ReplicaIndex(), ReferenceIndex()
    for start in range(1, 20_001, 1000):
        chunk = b"".join(publish(seq, b"t%d" % (seq % 7), b"m%d" % seq) for seq in range(start, start + 1000))
        index.keep(chunk)
        reference.keep(chunk)
    odd = b"".join(done(seq, seq) for seq in range(1, 20_001, 2))
    for chunk in (odd, done(2, 10_000)):
        index.keep(chunk)
        reference.keep(chunk)
        assert len(index) == len(reference.messages)
    assert index.take(set(range(SLOTS))) == reference.take(set(range(SLOTS)))


def test_a_slot_targets_a_tuple_of_nodes_not_a_name() -> None:
    with pytest.raises(TypeError, match="slot 3"):
        SlotSplitter([()] * 3 + ["n1"] + [()] * (SLOTS - 4), ())
