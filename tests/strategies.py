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


@st.composite
def command(
    draw: st.DrawFn, topics: st.SearchStrategy[bytes] = topics, bye: bool = True, stats: bool = True
) -> bytes:
    """One command line, mostly well formed, sometimes not.

    ``bye=False`` leaves DISCONNECT out; ``stats=False`` leaves STATS out (its
    figures are the whole broker's, which a test of one connection on a shared
    server cannot predict).
    """
    kinds = ["pub", "pub", "sub", "sub", "unsub", "ping", "hello", "connect", "junk", "ack", "ack", "nack"]
    kinds += ["gpub", "gsub", "gunsub", "destroy"]
    kinds += (["bye"] if bye else []) + (["stats"] if stats else [])
    kind = draw(st.sampled_from(kinds))
    sep = draw(separators)
    style = draw(st.integers(0, 2))
    if kind == "pub":
        line = sep.join([_case(b"PUBLISH", style), draw(ids), draw(topics)]) + b" " + draw(messages)
    elif kind == "sub":
        line = sep.join([_case(b"SUBSCRIBE", style), draw(ids), draw(topics)]) + draw(subscribe_options)
    elif kind == "gpub":
        line = sep.join([_case(b"PUBLISH", style), draw(ids), draw(group_topics)]) + b" " + draw(messages)
    elif kind == "gsub":
        line = sep.join([_case(b"SUBSCRIBE", style), draw(ids), draw(group_patterns)]) + draw(group_options)
    elif kind == "gunsub":
        line = sep.join([_case(b"UNSUBSCRIBE", style), draw(ids), draw(group_patterns)]) + draw(unsubscribe_groups)
    elif kind == "destroy":
        line = sep.join([_case(b"DESTROY", style), draw(ids), draw(group_patterns)]) + draw(destroy_groups)
    elif kind == "ack":
        line = sep.join([_case(b"ACK", style), draw(ids), draw(tag_specs)])
    elif kind == "nack":
        line = sep.join([_case(b"NACK", style), draw(ids), draw(tag_specs)]) + draw(nack_delays)
    elif kind == "unsub":
        line = sep.join([_case(b"UNSUBSCRIBE", style), draw(ids), draw(topics)])
    elif kind == "ping":
        line = _case(b"PING", style)
    elif kind == "hello":
        line = _case(b"HELLO", style)
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
