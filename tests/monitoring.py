"""Test helpers for the monitoring tests: known traffic, monitored servers, blocking HTTP GETs, STATS."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

from pigeon.testing import LineClient, ServerProcess

MONITORING = re.compile(r"monitoring on (http://\S+/)")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """Status, content type and body of a GET (an HTTP error status is returned, not raised)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def get_json(url: str) -> Any:
    """The decoded JSON body of a GET that must succeed."""
    status, kind, body = get(url)
    assert status == 200 and kind.startswith("application/json"), (status, kind, body)
    return json.loads(body)


def start_monitored(*args: str, loop: str = "auto") -> tuple[ServerProcess, str]:
    """A server with its HTTP listener on a free port (and more flags), and that listener's base URL."""
    proc = ServerProcess("--http-port", "0", *args, loop=loop)
    urls = [m.group(1) for m in map(MONITORING.search, proc.log) if m]
    assert urls, "".join(proc.log)
    return proc, urls[0]


def traffic(proc: ServerProcess) -> tuple[LineClient, LineClient]:
    """A subscriber of 'jobs' that got 4 messages, and a publisher that also left 3 in 'idle'."""
    sub = proc.client()
    sub.connect()
    sub.subscribe("jobs")
    pub = proc.client()
    pub.connect()
    for i in range(4):
        pub.publish("jobs", f"job-{i}")
    for i in range(3):
        pub.publish("idle", f"wait-{i}")
    assert sub.lines(4) == [f"MESSAGE jobs job-{i}".encode() for i in range(4)]
    assert pub.ask("NOPE") == b"ERROR UNKNOWN_COMMAND unknown command 'NOPE'"
    return sub, pub


def stats_of(client: LineClient, section: str = "") -> Any:
    """Send STATS (with a section) and decode the JSON of the one-line reply."""
    reply = client.ask(f"STATS {section}".strip())
    word, _, payload = reply.partition(b" ")
    assert word == b"STATS", reply
    return json.loads(payload)


def wait_for_held(observer: LineClient, want: int) -> dict[str, Any]:
    """STATS once ``want`` publishers wait for flow control (polled, with a deadline)."""
    deadline = time.monotonic() + 30
    while True:
        figures: dict[str, Any] = stats_of(observer)
        if figures["publishers_held"] == want:
            return figures
        assert time.monotonic() < deadline, figures
        time.sleep(0.02)


# the flags ack_traffic needs: a backlog of two holds a third publish, a second delivery is the
# last, and no ack timeout moves the figures while a slow machine runs the test
ACK_FLAGS = ("--max-backlog", "2", "--max-deliveries", "2", "--ack-timeout", "0")

# what ack_traffic leaves in STATS
ACK_FIGURES = {
    "acks": 4,
    "nacks": 3,
    "redelivered": 1,
    "dead_lettered": 1,
    "delayed": 1,
    "unacked": 1,
    "publishers_held": 1,
    "publish_holds": 1,
}


def ack_traffic(proc: ServerProcess) -> tuple[LineClient, LineClient]:
    """On a server started with ACK_FLAGS: a consumer of 'work' that acked, NACKed and still holds
    deliveries, and a publisher held by flow control on 'full'. Leaves ACK_FIGURES.

    The consumer got w0 to w6 (tags 1 to 7); it acked 1-4, NACKed w4 (tag 5), which came back as
    tag 8 and, NACKed again on its last delivery, went to 'work.dead'; it NACKed w5 (tag 6) with a
    delay of ten minutes and holds w6 (tag 7). The publisher's third PUBLISH to 'full' waits.
    """
    consumer, pub = proc.client(), proc.client()
    cid, pid = consumer.connect(), pub.connect()
    assert consumer.ask(f"SUBSCRIBE {cid} work ACK PREFETCH 10") == b"SUBSCRIBED work"
    for i in range(7):
        pub.publish("work", f"w{i}")
    assert consumer.lines(7) == [f"DELIVER work {i + 1} 1 w{i}".encode() for i in range(7)]
    consumer.send(f"ACK {cid} 1-4\nNACK {cid} 5")
    assert consumer.line() == b"DELIVER work 8 2 w4"
    consumer.send(f"NACK {cid} 8\nNACK {cid} 6 600000\nPING")
    assert consumer.line() == b"PONG"
    pub.publish("full", "f0")
    pub.publish("full", "f1")
    pub.send(f"PUBLISH {pid} full f2")
    wait_for_held(consumer, 1)
    return consumer, pub
