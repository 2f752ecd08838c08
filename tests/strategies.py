"""Hypothesis strategies for command streams, shared by the model-based tests."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.harness import OWN_ID

TOPICS = [b"a", b"b", b"c", "é".encode(), b"\x01", b"\xff", "a\u200bb".encode(), b"z" * 256]
GOOD_TOPICS = [b"a", b"b", "é".encode()]
IDS = [OWN_ID, OWN_ID, OWN_ID, b"c1", b"c2", b"nobody"]


ids = st.sampled_from(IDS)
topics = st.sampled_from(TOPICS)
good_topics = st.sampled_from(GOOD_TOPICS)
messages = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"."))
# framed payloads carry any bytes, line ends included
payloads = st.binary(max_size=12)
junk_lines = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
# ... that are not a STATS command (whose figures a test on a shared server cannot predict)
junk_lines_but_stats = junk_lines.filter(lambda b: not b.lstrip(b" \t").lower().startswith(b"stats"))
# fields are separated by spaces or tabs, one or more
separators = st.sampled_from([b" ", b" ", b" ", b"  ", b"\t", b" \t"])
# STATS and the sections, with cursors and counts: pages from cursor 0 are whole listings
stats_lines = st.sampled_from(
    [
        b"STATS",
        b"stats",
        b"STATS TOPICS",
        b"STATS\ttopics 0 1000",
        b"STATS TOPICS 0 1",
        b"STATS TOPICS 7 2",
        b"STATS CONNECTIONS",
        b"STATS connections 0 2",
        b"STATS CONNECTIONS 3",
        b"STATS QUEUES",
        b"STATS TOPICS 0 0",
        b"STATS TOPICS 0 1001",
        b"STATS TOPICS x",
        b"STATS TOPICS 0 5 6",
        b"STATS GROUPS",
        b"STATS groups 0 1",
        b"STATS GROUPS 3 2",
    ]
)


# delivery tags and ranges: a session gives out few tags, so small ones are mostly real; the rest
# are usage errors (0, a range backwards, not a number) or unknown tags
tag_specs = st.sampled_from(
    [
        b"1",
        b"1",
        b"2",
        b"3",
        b"1-2",
        b"1-3",
        b"2-2",
        b"2-9",
        b"99",
        b"5-99",
        b"0",
        b"3-1",
        b"x",
        b"1-",
        b"-1",
        b"1-2-3",
    ]
)
# a NACK's delay: none, 0 (at once), a day (it never comes back in a test), or a usage error
nack_delays = st.sampled_from([b"", b"", b" 0", b" 86400000", b" 86400001", b" x", b" 1 2"])
# SUBSCRIBE's options: plain, ACK, ACK PREFETCH <n>, and usage errors
subscribe_options = st.sampled_from(
    [
        b"",
        b" ACK",
        b" ack",
        b" ACK PREFETCH 1",
        b" ACK PREFETCH 2",
        b" ack prefetch 1000000",
        b" ACK PREFETCH 0",
        b" ACK PREFETCH 1000001",
        b" ACK PREFETCH",
        b" ACK PREFETCH x",
        b" ACK PREFETCH 1 2",
        b" ACK 5",
        b" NACK",
    ]
)


# what follows CONNECT: nothing, a user and password (of tests/harness.USERS, a wrong one, an unknown
# user), or a usage error
credentials = st.sampled_from(
    [b"", b"", b" writer pw", b" worker pw", b" worker wrong", b" mallory pw", b" x"]
)
# a line that logs in: the users of tests/harness.USERS, a wrong password, an unknown user, no credentials
logins = st.sampled_from(
    [
        b"CONNECT writer pw",
        b"CONNECT writer pw",
        b"CONNECT ops pw",
        b"CONNECT worker pw",
        b"CONNECT reader pw",
        b"CONNECT nobody pw",
        b"CONNECT worker wrong",
        b"CONNECT mallory pw",
        b"CONNECT",
    ]
)
# topics for the permission patterns of tests/harness.USERS: `*` and `>` edge cases
pattern_topics = st.sampled_from([b"a", b"a.b", b"a.b.c", b"b.a", b"a.", b"b", b"a.dead", "\u00e9".encode()])


# consumer groups and wildcards (issue 15): patterns and exact topics to subscribe to, with their
# edge cases (`*` against empty tokens, `>` alone, `>` not last), topics to publish to, group options
group_patterns = st.sampled_from(
    [b"a", b"a.b", b"a.*", b"a.>", b">", b"*", b"*.b", b"a.*.c", b"a..b", b"a.", b"a.>.b", b"a*"]
)
group_topics = st.sampled_from([b"a", b"a.b", b"a.c", b"a.b.c", b"b", b"a..b", b"a.", b"a.*", b"x.b", b"a*"])
group_options = st.sampled_from(
    [
        b"",
        b" GROUP g1",
        b" group g2",
        b" GROUP g1 ACK",
        b" GROUP g2 ACK PREFETCH 1",
        b" GROUP g1 ACK PREFETCH 0",
        b" GROUP",
        b" GROUP " + b"x" * 65,
        b" GROUP \xff",
        b" GROUP g1 EXTRA",
    ]
)
unsubscribe_groups = st.sampled_from([b"", b" GROUP g1", b" GROUP g2", b" GROUP", b" GROUP g1 x"])
destroy_groups = st.sampled_from([b" GROUP g1", b" GROUP g2", b" group g1", b"", b" GROUP", b" GROUP g1 x"])


def _case(word: bytes, style: int) -> bytes:
    return (word, word.lower(), word.capitalize())[style]


# HELLO with the protocol versions: 1 and 2 choose one, the rest are usage errors
hello_lines = st.sampled_from(
    [b"HELLO", b"hello", b"HELLO 2", b"hello\t2", b"HELLO 1", b"HELLO 3", b"HELLO 2 2"]
)
# the shapes of a framed PUB: mostly right; a count one short (the frame ends at the payload's last byte,
# which must then be a line end), no count or a word for it (BAD_FRAME); ``long`` (a count one over,
# which takes a byte of what follows) only where a frame left waiting for more input is fine
FRAME_SHAPES = ("ok", "ok", "ok", "ok", "short", "no count", "word")
# a frame's word: mostly PUB, sometimes a request (REQ, the same fields: issue 15, request/reply)
frame_words = st.sampled_from([b"PUB", b"PUB", b"PUB", b"REQ"])
# reply tokens <handle>.<generation>.<id>: a session's first connections are handles 0, 1, 2 of
# generations 1, 2, 3 and ask few requests, so these are mostly real; then stale and malformed ones
reply_tokens = st.sampled_from(
    [b"0.1.1", b"0.1.2", b"1.2.1", b"1.2.2", b"2.3.1", b"0.2.1", b"9.1.1", b"0.1.99", b"x", b"1.2", b"0.1.0"]
)


@st.composite
def frame(
    draw: st.DrawFn,
    topics: st.SearchStrategy[bytes] = topics,
    ids: st.SearchStrategy[bytes] = ids,
    shapes: tuple[str, ...] = FRAME_SHAPES,
) -> bytes:
    """``PUB <id> <topic> <nbytes>`` (or ``REQ``, or ``REPLY <token>``), its line end, any payload and a
    line end: mostly well formed."""
    payload = draw(payloads)
    sep = draw(separators)
    word = draw(st.sampled_from([b"REPLY", b"other"]))
    if word == b"REPLY":
        head = sep.join([_case(word, draw(st.integers(0, 2))), draw(reply_tokens)])
    else:
        head = sep.join([_case(draw(frame_words), draw(st.integers(0, 2))), draw(ids), draw(topics)])
    shape = draw(st.sampled_from(shapes))
    count = {"short": max(len(payload) - 1, 0), "long": len(payload) + 1}.get(shape, len(payload))
    if shape == "no count":
        head += draw(st.sampled_from([b"", sep]))
    else:
        head += sep + (b"x" if shape == "word" else b"%d" % count)
    ends = st.sampled_from([b"\n", b"\n", b"\r\n"])
    return head + draw(ends) + payload + draw(ends)


@st.composite
def command(
    draw: st.DrawFn,
    topics: st.SearchStrategy[bytes] = topics,
    bye: bool = True,
    stats: bool = True,
    group_prefix: bytes = b"",
) -> bytes:
    """One command line, mostly well formed, sometimes not.

    ``bye=False`` leaves out DISCONNECT and broken frames (which close the
    connection); ``stats=False`` leaves STATS out (its figures are the whole
    broker's, which a test of one connection on a shared server cannot predict);
    ``group_prefix`` goes before the topics and patterns of the consumer-group
    commands (a test on a shared server keeps its examples apart with it).
    """
    kinds = ["pub", "pub", "frame", "sub", "sub", "unsub", "ping", "hello", "connect", "junk", "ack", "ack"]
    kinds += ["nack", "gpub", "gsub", "gunsub", "destroy"]
    kinds += (["bye"] if bye else []) + (["stats"] if stats else [])
    kind = draw(st.sampled_from(kinds))
    sep = draw(separators)
    style = draw(st.integers(0, 2))
    if kind == "frame":
        return draw(frame(topics, shapes=FRAME_SHAPES if bye else ("ok",)))
    if kind == "pub":
        line = sep.join([_case(b"PUBLISH", style), draw(ids), draw(topics)]) + b" " + draw(messages)
    elif kind == "sub":
        line = sep.join([_case(b"SUBSCRIBE", style), draw(ids), draw(topics)]) + draw(subscribe_options)
    elif kind == "gpub":
        line = (
            sep.join([_case(b"PUBLISH", style), draw(ids), group_prefix + draw(group_topics)])
            + b" "
            + draw(messages)
        )
    elif kind == "gsub":
        line = sep.join([_case(b"SUBSCRIBE", style), draw(ids), group_prefix + draw(group_patterns)]) + draw(
            group_options
        )
    elif kind == "gunsub":
        line = sep.join(
            [_case(b"UNSUBSCRIBE", style), draw(ids), group_prefix + draw(group_patterns)]
        ) + draw(unsubscribe_groups)
    elif kind == "destroy":
        line = sep.join([_case(b"DESTROY", style), draw(ids), group_prefix + draw(group_patterns)]) + draw(
            destroy_groups
        )
    elif kind == "ack":
        line = sep.join([_case(b"ACK", style), draw(ids), draw(tag_specs)])
    elif kind == "nack":
        line = sep.join([_case(b"NACK", style), draw(ids), draw(tag_specs)]) + draw(nack_delays)
    elif kind == "unsub":
        line = sep.join([_case(b"UNSUBSCRIBE", style), draw(ids), draw(topics)])
    elif kind == "ping":
        line = _case(b"PING", style)
    elif kind == "hello":
        line = draw(hello_lines)
    elif kind == "connect":
        line = _case(b"CONNECT", style) + draw(credentials)
    elif kind == "bye":
        line = _case(b"DISCONNECT", style)
    elif kind == "stats":
        line = draw(stats_lines)
    else:
        line = draw(junk_lines if stats else junk_lines_but_stats)
    if draw(st.booleans()):
        # drop or add arguments: usage errors
        line = draw(st.sampled_from([line + b" extra", line.rsplit(b" ", 1)[0], sep + line]))
    return line + draw(st.sampled_from([b"\n", b"\n", b"\r\n", b"\r\r\n"]))
