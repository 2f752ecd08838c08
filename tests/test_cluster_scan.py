"""The cluster router's scan of a client's input (pigeon/cluster/_scan.pyx) on random input, against
the core's rules written out in Python here: one final ``\\r`` ends a line, only spaces and tabs
separate fields (``next_field`` in pigeon/core/parser.pxi), verbs in any case. Over real sockets,
the same rules are checked against one server in tests/test_cluster_routing.py and the cluster
differential test."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from pigeon.cluster._scan import VerbScanner, command_fields

VERBS = (b"PUB", b"PUBLISH", b"ACK", b"DISCONNECT")
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
def test_a_plain_run_ends_at_the_first_line_with_a_verb(lines: list[bytes], unfinished: bytes) -> None:
    data = b"".join(line + b"\n" for line in lines) + unfinished
    end = 0
    for line in lines:
        words = fields_as_the_core_reads(line, -1)
        if words and words[0].upper() in VERBS:
            break
        end += len(line) + 1
    assert VerbScanner(VERBS).plain_run_end(data, 0) == end
