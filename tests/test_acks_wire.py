"""At-least-once work queues over real sockets (issue 12): every rule against a ``pigeon`` process,
and a crash test where consumers die with a reset in the middle of their batches."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from pigeon.testing import LineClient, ServerProcess
from tests.conftest import LOOPS


def deliveries(client: LineClient, n: int) -> list[tuple[str, int, int, str]]:
    """The next n DELIVER lines as (topic, tag, attempt, body); any other line fails the test."""
    out = []
    for _ in range(n):
        line = client.line().decode()
        assert line.startswith("DELIVER "), line
        _, topic, tag, attempt, body = line.split(" ", 4)
        out.append((topic, int(tag), int(attempt), body))
    return out


def ask_ack(client: LineClient, line: str) -> bytes:
    """Send an ACK or NACK, then a PING: the reply before the PONG, if any, is the ACK's."""
    client.send(f"{line}\nPING")
    reply = client.line()
    if reply == b"PONG":
        return b""
    assert client.line() == b"PONG"
    return reply


def reset(client: LineClient) -> None:
    """Close with a TCP reset, as a crashed process's kernel does with unread data."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


def test_deliver_ack_and_unknown_tags(connect: Callable[[], LineClient]) -> None:
    sub, pub = connect(), connect()
    assert sub.ask(f"SUBSCRIBE {sub.client_id} jobs ACK PREFETCH 10") == b"SUBSCRIBED jobs"
    for i in range(5):
        pub.publish("jobs", f"job {i}")
    got = deliveries(sub, 5)
    assert [(tag, attempt, body) for _, tag, attempt, body in got] == [
        (i + 1, 1, f"job {i}") for i in range(5)
    ]
    assert ask_ack(sub, f"ACK {sub.client_id} 2-4") == b""
    assert ask_ack(sub, f"ACK {sub.client_id} 3") == b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 3"
    assert (
        ask_ack(sub, f"ACK {sub.client_id} 9-12") == b"ERROR UNKNOWN_DELIVERY_TAG unknown delivery tag 9-12"
    )
    assert ask_ack(sub, f"ACK {pub.client_id} 1").startswith(b"ERROR WRONG_CLIENT_ID")
    assert ask_ack(sub, f"ACK {sub.client_id} 1-5") == b""


def test_prefetch_skips_a_full_subscription(connect: Callable[[], LineClient]) -> None:
    slow, fast, pub = connect(), connect(), connect()
    slow.ask(f"SUBSCRIBE {slow.client_id} jobs ACK PREFETCH 1")
    fast.ask(f"SUBSCRIBE {fast.client_id} jobs ACK")
    for i in range(6):
        pub.publish("jobs", str(i))
    assert [d[3] for d in deliveries(slow, 1)] == ["0"]
    assert [d[3] for d in deliveries(fast, 5)] == ["1", "2", "3", "4", "5"]
    assert slow.quiet()


def test_nack_now_and_after_a_delay(connect: Callable[[], LineClient]) -> None:
    sub, pub = connect(), connect()
    sub.ask(f"SUBSCRIBE {sub.client_id} jobs ACK")
    pub.publish("jobs", "a")
    pub.publish("jobs", "b")
    deliveries(sub, 2)
    sub.send(f"NACK {sub.client_id} 1")
    assert deliveries(sub, 1) == [("jobs", 3, 2, "a")]
    start = time.monotonic()
    sub.send(f"NACK {sub.client_id} 2 300")
    pub.publish("jobs", "c")
    assert deliveries(sub, 1) == [("jobs", 4, 1, "c")]  # not held back by the delayed one
    assert deliveries(sub, 1) == [("jobs", 5, 2, "b")]
    assert time.monotonic() - start >= 0.3


def test_redelivery_when_a_consumer_resets_unsubscribes_or_times_out() -> None:
    for loop in LOOPS:
        server = ServerProcess("--ack-timeout", "0.5", loop=loop)
        try:
            first, second, pub = server.client(), server.client(), server.client()
            for c in (first, second, pub):
                c.connect()
            first.ask(f"SUBSCRIBE {first.client_id} jobs ACK")
            for i in range(3):
                pub.publish("jobs", f"m{i}")
            assert [d[3] for d in deliveries(first, 3)] == ["m0", "m1", "m2"]
            reset(first)  # dies holding three unacknowledged messages
            second.ask(f"SUBSCRIBE {second.client_id} jobs ACK")
            assert [(d[2], d[3]) for d in deliveries(second, 3)] == [(2, "m0"), (2, "m1"), (2, "m2")]
            assert second.ask(f"UNSUBSCRIBE {second.client_id} jobs") == b"UNSUBSCRIBED jobs"
            third = server.client()
            third.connect()
            third.ask(f"SUBSCRIBE {third.client_id} jobs ACK")
            got = deliveries(third, 3)
            assert [(d[2], d[3]) for d in got] == [(3, "m0"), (3, "m1"), (3, "m2")]
            # never acknowledged: after --ack-timeout they come again, as attempt 4
            assert [(d[2], d[3]) for d in deliveries(third, 3)] == [(4, "m0"), (4, "m1"), (4, "m2")]
        finally:
            assert server.stop() == 0, "".join(server.log)


def test_dead_letters_after_max_deliveries(server: ServerProcess) -> None:
    sub, pub, dead = server.client(), server.client(), server.client()
    for c in (sub, pub, dead):
        c.connect()
    sub.ask(f"SUBSCRIBE {sub.client_id} jobs ACK")
    pub.publish("jobs", "poison")
    tag = 0
    for attempt in range(1, 6):  # the default --max-deliveries is 5
        ((_, tag, seen, body),) = deliveries(sub, 1)
        assert (seen, body) == (attempt, "poison")
        sub.send(f"NACK {sub.client_id} {tag}")
    assert sub.quiet()
    dead.ask(f"SUBSCRIBE {dead.client_id} jobs.dead ACK")
    assert deliveries(dead, 1) == [("jobs.dead", 1, 1, "poison")]


class Consumer(threading.Thread):
    """Reads DELIVER lines as fast as they come and acks them in ranges of at most 100.

    ``die_after``: once that many are acked, and a PONG after its last ACK shows the server has
    them, it takes what comes next without acking and dies with a reset, holding those.
    """

    def __init__(self, server: ServerProcess, die_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.client = server.client(timeout=60)
        self.client.connect()
        self.die_after = die_after
        self.acked: list[str] = []
        self.held: list[str] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self._consume()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _consume(self) -> None:
        c, cid = self.client, self.client.client_id
        pending: list[tuple[int, str]] = []
        pings = pongs = 0
        assert c.ask(f"SUBSCRIBE {cid} jobs ACK PREFETCH 1000") == b"SUBSCRIBED jobs"
        while not self.done.is_set():
            dying = self.die_after is not None and len(self.acked) >= self.die_after
            if dying and pongs == pings and self.held:
                c.sock.settimeout(1.0)  # die soon, holding what it has
            try:
                line = c.line()
            except TimeoutError:
                if dying and pongs == pings and self.held:
                    reset(c)
                    return
                continue
            if line == b"PONG":
                pongs += 1
                continue
            _, _, tag, _, body = line.decode().split(" ", 4)
            if dying:
                self.held.append(body)
                if len(self.held) >= 500 and pongs == pings:
                    reset(c)
                    return
                continue
            pending.append((int(tag), body))
            if len(pending) == 100 or not c.buf:
                c.send(f"ACK {cid} {pending[0][0]}-{pending[-1][0]}")
                if self.die_after is not None:
                    c.send("PING")  # its PONG shows the server has the acks
                    pings += 1
                self.acked += [body for _, body in pending]
                pending.clear()


@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
def test_consumers_dying_mid_batch_lose_nothing(loop: str) -> None:
    """1,000,000 messages, 4 consumers of which 2 die with a reset mid-stream: every message is
    acked exactly once by someone."""
    total = 1_000_000
    server = ServerProcess(loop=loop)
    try:
        consumers = [Consumer(server), Consumer(server), Consumer(server, 50_000), Consumer(server, 120_000)]
        for c in consumers:
            c.start()
        pub = server.client(timeout=60)
        pub.connect()
        replies = [0]

        def read_replies() -> None:
            rest = b""
            while replies[0] < total:
                data = rest + pub.sock.recv(1 << 20)
                if data == rest:
                    return
                cut = data.rfind(b"\n") + 1
                replies[0] += data.count(b"PUBLISHED jobs\n", 0, cut)
                rest = data[cut:]

        reader = threading.Thread(target=read_replies, daemon=True)
        reader.start()
        batch = 10_000
        for start in range(0, total, batch):
            pub.send(
                b"".join(
                    b"PUBLISH %s jobs %d\n" % (pub.client_id.encode(), i) for i in range(start, start + batch)
                )
            )
        reader.join(120)
        assert replies[0] == total
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(len(c.acked) for c in consumers) >= total:
                break
            time.sleep(0.2)
        for c in consumers:
            c.done.set()
            assert c.error is None, c.error
        acked = Counter(body for c in consumers for body in c.acked)
        assert len(acked) == total, f"{total - len(acked)} never acked"
        assert not [body for body, n in acked.items() if n > 1], "acked twice"
        # the two that died held unacknowledged messages, which came again to the others
        assert all(len(c.held) > 0 for c in consumers[2:])
        checker = server.client()
        checker.connect()
        figures = checker.ask("STATS").decode()
        assert '"unacked":0' in figures and '"backlog_messages":0' in figures, figures
    finally:
        assert server.stop() == 0, "".join(server.log)
