"""Test helpers for the monitoring tests: known traffic, monitored servers, blocking HTTP GETs."""

from __future__ import annotations

import json
import re
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
