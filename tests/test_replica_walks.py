"""Replication's C walks over log records (pigeon/cluster/_split.pyx, pigeon/cluster/_index.pyx)
against the Python they replaced (with replstate's DELIVERED records and forgetting), on random
record streams: the same runs per node, the same messages not done after DONE ranges with the same
last DELIVERED record each, taken as the same bytes, forgotten alike."""

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


def delivered(seq: int, attempt: int = 2) -> bytes:
    return record(DELIVERED.pack(3, seq, attempt))


# -- the Python reference (pigeon/cluster/replication.py before the walks went to C) ----------------


def reference_split(
    data: bytes, targets: Callable[[int], tuple[str, ...]], done_to: Iterable[str]
) -> dict[str, list[tuple[int, int]]]:
    """(start, end) runs per node: a PUBLISH to its slot's targets, any other record to ``done_to``."""
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
        else:
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
    """seq -> (slot, PUBLISH record) of the messages not done, and seq -> (attempt, record) of
    their last DELIVERED record (the highest attempt; of equal ones, the later)."""

    def __init__(self) -> None:
        self.messages: dict[int, tuple[int, bytes]] = {}
        self.delivered: dict[int, tuple[int, bytes]] = {}

    def keep(self, chunk: bytes) -> None:
        pos = 0
        while pos + RECORD_HEAD.size < len(chunk):
            body = LENGTH.unpack_from(chunk, pos)[0]
            whole = chunk[pos : pos + RECORD_HEAD.size + body]
            kind = chunk[pos + RECORD_HEAD.size]
            if kind == 1:
                _, seq, _, _, topic_len = PUBLISH_HEAD.unpack_from(chunk, pos + RECORD_HEAD.size)
                at = pos + RECORD_HEAD.size + PUBLISH_HEAD.size
                self.messages[seq] = (slot_of(chunk[at : at + topic_len].split(b" ", 1)[0]), whole)
            elif kind == 2:
                _, first, last = DONE.unpack_from(chunk, pos + RECORD_HEAD.size)
                if last - first < len(self.messages):
                    done_ones = [seq for seq in range(first, last + 1) if seq in self.messages]
                else:
                    done_ones = [seq for seq in self.messages if first <= seq <= last]
                for seq in done_ones:
                    self._drop(seq)
            elif kind == 3:
                _, seq, attempt = DELIVERED.unpack_from(chunk, pos + RECORD_HEAD.size)
                if seq in self.messages and attempt >= self.delivered.get(seq, (0, b""))[0]:
                    self.delivered[seq] = (attempt, whole)
            pos += RECORD_HEAD.size + body

    def _drop(self, seq: int) -> None:
        del self.messages[seq]
        self.delivered.pop(seq, None)

    def _of(self, slots: set[int]) -> list[int]:
        return sorted(seq for seq, (slot, _) in self.messages.items() if slot in slots)

    def take(self, slots: set[int]) -> bytes:
        taken = []
        for seq in self._of(slots):
            taken.append(self.messages[seq][1] + self.delivered.get(seq, (0, b""))[1])
            self._drop(seq)
        return b"".join(taken)

    def forget(self, slots: set[int]) -> int:
        forgotten = self._of(slots)
        for seq in forgotten:
            self._drop(seq)
        return len(forgotten)


# -- random record streams ----------------------------------------------------------------------------

TOPIC_FIELDS = [b"a", b"b", b"orders", b"bench7", b"t9 group1", b"a g", b"x" * 40, b""]
TOPICS = st.sampled_from(TOPIC_FIELDS)


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
            records.append(delivered(draw(st.integers(first - 2, seq + 2)), draw(st.integers(1, 4))))
        else:
            records.append(publish(draw(st.integers(first - 2, seq + 2)), draw(TOPICS), b"again"))
    return records


# sets of slots, most of them slots of TOPICS
SLOT_SETS = st.sets(
    st.sampled_from(sorted({slot_of(field.split(b" ")[0]) for field in TOPIC_FIELDS}))
    | st.integers(0, SLOTS - 1)
)

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
    targets = {slot_of(b"a"): ("n1", "n2"), slot_of(b"b"): ("n2",)}
    rest = done(1, 1) + delivered(2)
    parts = split_records(first + second + rest, lambda slot: targets.get(slot, ()), ["n2", "n2"])
    assert {node: [bytes(part) for part in runs] for node, runs in parts.items()} == {
        "n1": [first],
        "n2": [first + second + rest],
    }


@given(st.lists(st.tuples(streams(max_seq=30, start=100), SLOT_SETS), max_size=6), SLOT_SETS)
@settings(max_examples=300, deadline=None)
def test_the_c_index_keeps_forgets_and_gives_the_records_the_python_one_did(
    steps: list[tuple[list[bytes], set[int]]], slots: set[int]
) -> None:
    """Chunks kept, each followed by the slots another node took over being forgotten; then a take
    of some slots, and of the rest: the same bytes (each PUBLISH record, then its last DELIVERED)."""
    index, reference = ReplicaIndex(), ReferenceIndex()
    for records, taken_over in steps:
        chunk = b"".join(records)
        index.keep(chunk)
        reference.keep(chunk)
        assert len(index) == len(reference.messages)
        assert index.forget(taken_over) == reference.forget(taken_over)
        assert len(index) == len(reference.messages)
    assert index.take(slots) == reference.take(slots)
    assert len(index) == len(reference.messages)
    everything = set(range(SLOTS))
    assert index.take(everything) == reference.take(everything)
    assert len(index) == 0
    assert index.take(everything) == b""


def test_the_index_survives_many_messages_done_out_of_order() -> None:
    """Enough entries to grow, compact and drop chunks, DELIVERED records in chunks of their own
    (some replacing others, some older): every other message is done, then half the rest; what
    is left is taken, with its last DELIVERED record each."""
    index, reference = ReplicaIndex(), ReferenceIndex()
    chunks = []
    for start in range(1, 20_001, 1000):
        chunks.append(
            b"".join(publish(seq, b"t%d" % (seq % 7), b"m%d" % seq) for seq in range(start, start + 1000))
        )
        chunks.append(b"".join(delivered(seq, 2) for seq in range(start, start + 1000, 3)))
    chunks.append(b"".join(delivered(seq, 1 + seq % 3) for seq in range(1, 20_001, 5)))
    chunks.append(b"".join(done(seq, seq) for seq in range(1, 20_001, 2)))
    chunks.append(done(2, 10_000))
    chunks.append(b"".join(delivered(seq, 5) for seq in range(1, 20_001, 7)))
    for chunk in chunks:
        index.keep(chunk)
        reference.keep(chunk)
        assert len(index) == len(reference.messages)
    assert len(index) == 5000
    assert index.take(set(range(SLOTS))) == reference.take(set(range(SLOTS)))


def test_a_slot_targets_a_tuple_of_nodes_not_a_name() -> None:
    with pytest.raises(TypeError, match="slot 3"):
        SlotSplitter([()] * 3 + ["n1"] + [()] * (SLOTS - 4), ())
