"""The pipelined PUBLISH fast path must answer exactly as the general parser does."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pigeon.testing import LineClient

# (line after the topic "t" has been published to once, expected subscriber line or None, publisher reply)
CASES = [
    ("PUBLISH {id} t hello", b"MESSAGE t hello", b"PUBLISHED t"),
    ("PUBLISH {id}  t two spaces before the topic", b"MESSAGE t two spaces before the topic", b"PUBLISHED t"),
    ("PUBLISH {id} t  leading space kept", b"MESSAGE t  leading space kept", b"PUBLISHED t"),
    ("PUBLISH {id} t ", b"MESSAGE t ", b"PUBLISHED t"),
    ("PUBLISH {id} t crlf\r", b"MESSAGE t crlf", b"PUBLISHED t"),
    ("publish {id} t lower case", b"MESSAGE t lower case", b"PUBLISHED t"),
    ("PUBLISH {id} tt other topic", None, b"PUBLISHED tt"),
    ("PUBLISH {id}0 t longer id", None, b"ERROR WRONG_CLIENT_ID client id does not belong to this connection: '{id}0'"),
    ("PUBLISH {id} t", None, b"ERROR USAGE usage: PUBLISH <client_id> <topic> <message>"),
]


@pytest.mark.parametrize(("line", "delivered", "reply"), CASES)
def test_after_a_cached_topic(
    connect: Callable[[], LineClient], line: str, delivered: bytes | None, reply: bytes
) -> None:
    sub = connect()
    sub.subscribe("t")
    pub = connect()
    pub.publish("t", "warm the last-topic cache")
    assert sub.line() == b"MESSAGE t warm the last-topic cache"
    pub.send(line.format(id=pub.client_id).encode() + b"\n")
    assert pub.line() == reply.replace(b"{id}", pub.client_id.encode())
    if delivered is None:
        assert sub.quiet()
    else:
        assert sub.line() == delivered
