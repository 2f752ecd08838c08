"""Hypothesis strategies for command streams, shared by the model-based tests."""

from __future__ import annotations

from hypothesis import strategies as st

TOPICS = [b"a", b"b", b"c", "é".encode(), b"\x01", b"\xff", b"z" * 256]
GOOD_TOPICS = [b"a", b"b", "é".encode()]
OWN_ID = b"<me>"
IDS = [OWN_ID, OWN_ID, OWN_ID, b"c1", b"c2", b"nobody"]


ids = st.sampled_from(IDS)
topics = st.sampled_from(TOPICS)
good_topics = st.sampled_from(GOOD_TOPICS)
messages = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"."))
# random bytes for a line; never STATS, whose reply (it holds the uptime) the model cannot predict
junk_lines = (
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")).filter(lambda b: b"stats" not in b.lower())
)
spaces = st.sampled_from([b" ", b" ", b" ", b"  "])


def _case(word: bytes, style: int) -> bytes:
    return (word, word.lower(), word.capitalize())[style]


@st.composite
def command(draw: st.DrawFn, topics: st.SearchStrategy[bytes] = topics, bye: bool = True) -> bytes:
    """One command line, mostly well formed, sometimes not; ``bye=False`` leaves DISCONNECT out."""
    kinds = ["pub", "pub", "sub", "sub", "unsub", "ping", "connect", "junk"] + (["bye"] if bye else [])
    kind = draw(st.sampled_from(kinds))
    sp = draw(spaces)
    style = draw(st.integers(0, 2))
    if kind == "pub":
        line = sp.join([_case(b"PUBLISH", style), draw(ids), draw(topics)]) + b" " + draw(messages)
    elif kind == "sub":
        line = sp.join([_case(b"SUBSCRIBE", style), draw(ids), draw(topics)])
    elif kind == "unsub":
        line = sp.join([_case(b"UNSUBSCRIBE", style), draw(ids), draw(topics)])
    elif kind == "ping":
        line = _case(b"PING", style)
    elif kind == "connect":
        line = _case(b"CONNECT", style)
    elif kind == "bye":
        line = _case(b"DISCONNECT", style)
    else:
        line = draw(junk_lines)
    if draw(st.booleans()):
        # drop or add arguments: usage errors
        line = draw(st.sampled_from([line + b" extra", line.rsplit(b" ", 1)[0], b" " + line]))
    return line + draw(st.sampled_from([b"\n", b"\n", b"\r\n", b"\r\r\n"]))
