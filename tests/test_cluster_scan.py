"""The cluster router's scan of a client's input (pigeon/cluster/_scan.pyx) on random input, against
the core's rules written out in Python here: one final ``\\r`` ends a line, only spaces and tabs
separate fields (``next_field`` in pigeon/core/parser.pxi), verbs in any case. Over real sockets,
the same rules are checked against one server in tests/test_cluster_routing.py and the cluster
differential test."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from pigeon.cluster._scan import InputScanner, PlainLines, command_fields, publish_slots
from pigeon.cluster.slots import slot_of

ROUTED = frozenset((b"PUBLISH", b"ACK", b"DISCONNECT"))
FRAMED = frozenset((b"PUB",))
# bytes that look like separators to bytes.split but not to the core, and words near the verbs
PIECES = st.sampled_from(
    [
        b" ",
        b"\t",
        b"\r",
        b"\x0b",
        b"\x0c",
        b"\x00",
        b"x",
        b"pub",
        b"PUB",
        b"Publish",
        b"ack",
        b"acks",
        b"disconnect",
    ]
)
LINE = st.lists(PIECES, max_size=12).map(b"".join)
TOPIC_PIECES = st.sampled_from([b"", b" ", b"\t", b"\r", b"\x0b", b"jobs", b"a", b"b.c", b"*", b" m"])


def fields_as_the_core_reads(line: bytes, maxsplit: int) -> list[bytes]:
    """The oracle: the line without one final \\r, split at runs of blanks; with maxsplit, the rest
    of the (whole) line from the first byte of that field."""
    end = len(line) - 1 if line.endswith(b"\r") else len(line)
    found: list[bytes] = []
    for match in re.finditer(rb"[^ \t]+", line[:end]):
        if len(found) == maxsplit:
            return [*found, line[match.start() :]]
        found.append(match[0])
    return found


@given(LINE, st.integers(-1, 4))
def test_fields_are_those_the_core_reads(line: bytes, maxsplit: int) -> None:
    assert command_fields(line, maxsplit) == fields_as_the_core_reads(line, maxsplit)


@given(st.binary(max_size=40))
def test_a_frames_payload_is_kept_whole_in_the_rest(payload: bytes) -> None:
    # what the router forwards of a frame is its rest: the payload's own last byte (a \r) included
    item = b"PUB c1 t %d\n%s" % (len(payload), payload)
    assert command_fields(item, 2) == [b"PUB", b"c1", b"t %d\n%s" % (len(payload), payload)]


@given(st.lists(LINE, max_size=8), st.sampled_from([b"", b"PUB c1", b"ping"]))
def test_lines_are_cut_into_plain_runs_and_routed_lines_up_to_a_frame(
    lines: list[bytes], unfinished: bytes
) -> None:
    data = b"".join(line + b"\n" for line in lines) + unfinished
    expected: list[bytes] = []
    plain: list[bytes] = []
    stop = 0
    for line in lines:
        words = fields_as_the_core_reads(line, -1)
        verb = words[0].upper() if words else b""
        if verb not in ROUTED and verb not in FRAMED:
            plain.append(line)
        else:
            expected += [b"\n".join(plain)] if plain else []
            plain = []
            if (
                verb in FRAMED
                and line[:1] not in (b" ", b"\t")
                and re.match(rb"[^ \t]+[ \t]", line[:-1] if line.endswith(b"\r") else line)
            ):
                break  # a frame begins: the router reads it itself
            expected.append(line)
        stop += len(line) + 1
    expected += [b"\n".join(plain)] if plain else []
    items: list[bytes] = []
    assert InputScanner(ROUTED, FRAMED).split_lines(data, 0, items) == stop
    assert items == expected
    assert [type(item) is PlainLines for item in items] == [
        not (fields := fields_as_the_core_reads(item.split(b"\n", 1)[0], -1))
        or fields[0].upper() not in ROUTED | FRAMED
        for item in items
    ]


@given(st.lists(st.lists(TOPIC_PIECES, max_size=5).map(b"".join), min_size=1, max_size=8))
def test_publish_slots_are_those_of_the_topics_the_router_reads_one_by_one(rests: list[bytes]) -> None:
    # a batch of one client's PUBLISH lines: the slots of the topics _classify would route each to
    prefix = b"PUBLISH c1 "
    lines = [prefix + rest for rest in rests]
    topics = [fields_as_the_core_reads(line, 2)[2:] for line in lines]
    if not all(topics) or any(rest[:1] in (b" ", b"\t") for rest in rests):
        # no topic, or one after more blanks: read one by one
        expected = None
    else:
        expected = sorted({slot_of(fields_as_the_core_reads(t[0], 1)[0]) for t in topics})
    assert publish_slots(b"".join(line + b"\n" for line in lines), len(prefix)) == expected
