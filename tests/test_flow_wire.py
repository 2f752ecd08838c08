"""Publisher flow control over real sockets (issue 12): a publisher that never waits for its
replies, flooding topics whose subscribers read slowly, is slowed down, not refused."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pigeon.testing import LineClient, ServerProcess
from tests.conftest import LOOPS

MiB = 1024 * 1024


def vmhwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


class SlowReader(threading.Thread):
    """A subscriber that reads in small pieces with a pause between them, checking order as it goes."""

    def __init__(self, client: LineClient, topic: str, expected: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.client, self.topic, self.expected, self.pause = client, topic, expected, pause
        self.received = 0
        self.out_of_order = 0
        self.other_lines: list[bytes] = []

    def run(self) -> None:
        prefix = b"MESSAGE %s " % self.topic.encode()
        rest = b""
        self.client.sock.settimeout(120)
        while self.received < self.expected:
            chunk = self.client.sock.recv(64 * 1024)
            if not chunk:
                return
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            for line in data[:cut].splitlines():
                if not line.startswith(prefix):
                    self.other_lines.append(line)
                    continue
                if int(line[len(prefix) :]) != self.received:
                    self.out_of_order += 1
                self.received += 1
            time.sleep(self.pause)


class Flooder(threading.Thread):
    """Pipelines ``count`` PUBLISHes of 64-byte numbers without waiting; another thread counts the replies."""

    def __init__(self, client: LineClient, topic: str, count: int) -> None:
        super().__init__(daemon=True)
        self.client, self.topic, self.count = client, topic, count
        self.published = 0
        self.errors: list[bytes] = []
        self.seconds = 0.0

    def run(self) -> None:
        self.client.sock.settimeout(120)
        replies = threading.Thread(target=self._replies, daemon=True)
        replies.start()
        head = b"PUBLISH %s %s " % (self.client.client_id.encode(), self.topic.encode())
        flood = memoryview(b"".join(head + b"%064d\n" % i for i in range(self.count)))
        start = time.monotonic()
        for first in range(0, len(flood), 1 << 20):
            self.client.sock.sendall(flood[first : first + (1 << 20)])
        self.seconds = time.monotonic() - start
        replies.join(180)

    def _replies(self) -> None:
        rest = b""
        while self.published + len(self.errors) < self.count:
            data = rest + self.client.sock.recv(1 << 20)
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            self.published += data.count(b"PUBLISHED ", 0, cut)
            if b"ERROR" in data[:cut]:
                self.errors += [line for line in data[:cut].splitlines() if line.startswith(b"ERROR")]


@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("topics", [1, 8])
def test_a_flood_into_slow_subscribers_is_slowed_not_refused(loop: str, topics: int) -> None:
    total = 2_000_000
    per_topic = total // topics
    server = ServerProcess(loop=loop)  # default flags: --max-backlog 100000
    try:
        baseline = vmhwm_kib(server.proc.pid)
        readers = []
        for t in range(topics):
            sub = server.client()
            sub.connect()
            sub.subscribe(f"flood.{t}")
            readers.append(SlowReader(sub, f"flood.{t}", per_topic, pause=0.002 if topics == 1 else 0.02))
        flooders = []
        for t in range(topics):
            pub = server.client()
            pub.connect()
            flooders.append(Flooder(pub, f"flood.{t}", per_topic))
        for thread in readers + flooders:
            thread.start()
        for thread in flooders + readers:
            thread.join(240)
        assert [f.errors[:3] for f in flooders] == [[]] * topics  # not one ERROR line
        assert [f.published for f in flooders] == [per_topic] * topics
        assert [r.received for r in readers] == [per_topic] * topics  # each delivered once
        assert [r.out_of_order for r in readers] == [0] * topics  # and in order
        assert [r.other_lines[:3] for r in readers] == [[]] * topics
        checker = server.client()
        checker.connect()
        figures = json.loads(checker.ask("STATS").split(b" ", 1)[1])
        assert figures["publish_holds"] > 0  # the publishers were made to wait
        assert figures["refused"] == 0 and figures["backlog_messages"] == 0
        peak = vmhwm_kib(server.proc.pid) - baseline
        assert peak < 160 * 1024, f"broker RSS grew by {peak // 1024} MiB"
        print(
            f"\n{topics} topic(s), {loop}: peak RSS {baseline // 1024} + {peak // 1024} MiB, "
            f"publishers slowed to {total / max(f.seconds for f in flooders):,.0f} msgs/s, "
            f"{figures['publish_holds']} holds"
        )
    finally:
        assert server.stop() == 0, "".join(server.log)
