"""Properties over a real socket, checked against the reference model.

Any split of a command stream into reads gives the output the model predicts
for the whole stream; garbage between valid commands gets its ERROR lines and
disturbs neither the valid commands around it nor other clients.
"""

from __future__ import annotations

import itertools
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigeon.testing import LineClient, ServerProcess
from tests.harness import OWN_ID
from tests.model import ModelBroker
from tests.strategies import command, junk_lines_but_stats

NONCE = b"<T>"
wire_topics = st.sampled_from([NONCE + b"a", NONCE + b"b", NONCE + "é".encode(), b"\x01", b"z" * 256])
# STATS is left out: its figures are the whole server's, shared with the other tests' connections
# consumer groups' topics and patterns get the nonce too: a backlog one example leaves on a shared
# server must not reach the next example's subscriber
streams = st.lists(
    command(topics=wire_topics, bye=False, stats=False, group_prefix=NONCE), min_size=1, max_size=12
)
junk = junk_lines_but_stats.map(lambda b: b + b"\n")
example_settings = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class Expect:
    """The model's prediction for one connection that has sent CONNECT and got ``client_id``."""

    def __init__(self, client_id: str) -> None:
        self.model = ModelBroker()
        self.model.next_client = int(client_id[1:])
        self.out: list[bytes] = []
        self.h = self.model.open(self.out.append)
        self.model.feed(self.h, b"CONNECT\n")
        self.out.clear()

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """The bytes the stream gets back, and whether the connection stays open."""
        still_open = self.model.feed(self.h, data)
        return b"".join(self.out), still_open


def _read_exactly(client: LineClient, n: int) -> bytes:
    while len(client.buf) < n:
        chunk = client.sock.recv(1 << 20)
        if not chunk:
            break
        client.buf += chunk
    data, client.buf = client.buf[:n], client.buf[n:]
    return data


def _until_closed(client_id: str, lines: list[bytes]) -> list[bytes]:
    """The lines up to the one after which the server closes the connection (all of them when
    none does): bytes sent after the close would race with it (a reset, a broken pipe)."""
    for k in range(1, len(lines)):
        if not Expect(client_id).feed(b"".join(lines[:k]))[1]:
            return lines[:k]
    return lines


def _check_stream(server: ServerProcess, lines: list[bytes], cuts: list[int]) -> None:
    """Send the stream cut at ``cuts`` on a new connection; its output must be the model's."""
    client = server.client()
    cid = client.connect()
    nonce = b"p%d." % next(_nonces)
    lines = _until_closed(cid, [line.replace(NONCE, nonce).replace(OWN_ID, cid.encode()) for line in lines])
    stream = b"".join(lines)
    expected, still_open = Expect(cid).feed(stream)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in itertools.pairwise(points):
        client.send(stream[a:b])
        time.sleep(0.001)  # give the server a chance to read each piece on its own
    assert _read_exactly(client, len(expected)) == expected
    if still_open:
        # nothing more than predicted: the next reply is the PING's
        assert client.ask("PING") == b"PONG"
    else:
        assert client.at_eof()
    client.close()


_nonces = itertools.count()


def test_any_split_gives_the_same_output(server: ServerProcess) -> None:
    @example_settings
    @given(lines=streams, cuts=st.lists(st.integers(0, 2000), max_size=10))
    def check(lines: list[bytes], cuts: list[int]) -> None:
        _check_stream(server, lines, cuts)

    check()


def test_garbage_disturbs_nobody(server: ServerProcess) -> None:
    sub, pub = server.client(), server.client()
    sub.connect()
    pub.connect()
    sub.subscribe("bystanders")

    @example_settings
    @given(
        parts=st.lists(
            st.one_of(junk, command(topics=wire_topics, bye=False, stats=False)), min_size=1, max_size=15
        )
    )
    def check(parts: list[bytes]) -> None:
        _check_stream(server, parts, [])
        pub.publish("bystanders", "still here")
        assert sub.line() == b"MESSAGE bystanders still here"

    check()
