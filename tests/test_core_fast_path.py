"""The pipelined PUBLISH fast paths must answer exactly as the general parser does.

Two shortcuts sit in front of the general parser: a line starting with
``PUBLISH `` (any case) skips the command lookup, and a PUBLISH carrying the
connection's own id and the last topic used is matched by comparison alone.
Each case runs once with the caches warm and once through a fresh broker where
no shortcut applies yet, and both must give the same bytes.
"""

from __future__ import annotations

import pytest

from pigeon._core import Broker

# (line after the topic "t" has been published to once, subscriber output, publisher output)
CASES = [
    (b"PUBLISH {id} t hello", b"MESSAGE t hello\n", b"PUBLISHED t\n"),
    (
        b"PUBLISH {id}  t two spaces before the topic",
        b"MESSAGE t two spaces before the topic\n",
        b"PUBLISHED t\n",
    ),
    (b"PUBLISH {id} t  leading space kept", b"MESSAGE t  leading space kept\n", b"PUBLISHED t\n"),
    (b"PUBLISH {id} t ", b"MESSAGE t \n", b"PUBLISHED t\n"),
    (b"PUBLISH {id} t crlf\r", b"MESSAGE t crlf\n", b"PUBLISHED t\n"),
    (b"publish {id} t lower case", b"MESSAGE t lower case\n", b"PUBLISHED t\n"),
    (b"PuBlIsH {id} t mixed case", b"MESSAGE t mixed case\n", b"PUBLISHED t\n"),
    (b"PUBLISH\t{id}\tt\ttabs", b"MESSAGE t tabs\n", b"PUBLISHED t\n"),
    (b"PUBLISH {id}\tt\tx\ty", b"MESSAGE t x\ty\n", b"PUBLISHED t\n"),
    (b"PUBLISH {id} tt other topic", b"", b"PUBLISHED tt\n"),
    (
        b"PUBLISH {id}0 t longer id",
        b"",
        b"ERROR WRONG_CLIENT_ID client id does not belong to this connection: '{id}0'\n",
    ),
    (b"PUBLISH {id} t", b"", b"ERROR USAGE usage: PUBLISH <client_id> <topic> <message>\n"),
    (b"PUBLISHX {id} t m", b"", b"ERROR UNKNOWN_COMMAND unknown command 'PUBLISHX'\n"),
    (b"PUBLISH\x00{id} t m", b"", b"ERROR UNKNOWN_COMMAND unknown command (not shown)\n"),
    (b"PUBLISH", b"", b"ERROR USAGE usage: PUBLISH <client_id> <topic> <message>\n"),
]


def run(line: bytes, warm: bool) -> tuple[bytes, bytes]:
    """(subscriber's output, publisher's output) for ``line``, with or without the caches warmed first."""
    broker = Broker()
    out: dict[int, list[bytes]] = {}

    def connect() -> tuple[int, bytes]:
        chunks: list[bytes] = []
        h = broker.open(chunks.append)
        out[h] = chunks
        broker.feed(h, b"CONNECT\n")
        cid = broker.client_id(h)
        assert cid is not None
        chunks.clear()
        return h, cid.encode()

    sub, sid = connect()
    pub, pid = connect()
    broker.feed(sub, b"SUBSCRIBE %s t\n" % sid)
    broker.feed(pub, b"SUBSCRIBE %s tt\n" % pid if not warm else b"PUBLISH %s t warm\n" % pid)
    out[sub].clear()
    out[pub].clear()
    broker.feed(pub, line.replace(b"{id}", pid) + b"\n")
    publisher = b"".join(out[pub]).replace(b"MESSAGE tt other topic\n", b"")
    return b"".join(out[sub]), publisher.replace(pid, b"{id}")


@pytest.mark.parametrize(("line", "delivered", "reply"), CASES)
def test_fast_and_general_paths_agree(line: bytes, delivered: bytes, reply: bytes) -> None:
    assert run(line, warm=True) == (delivered, reply)
    assert run(line, warm=False) == (delivered, reply)
