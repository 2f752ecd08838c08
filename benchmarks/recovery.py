"""How fast a durable Pigeon comes back: fill a data directory, kill -9, restart, consume.

    python benchmarks/recovery.py --messages 10000000          # the recovery figure
    python benchmarks/recovery.py --messages 1000000 --consume  # first message, all consumed by 4 ackers

Reports the server's own "recovered N messages ... in T s", the time from the restart's exec to the
first DELIVER a waiting consumer gets, and (with --consume) to the last of the messages acked by 4
acknowledging consumers (prefetch 1,000, one ACK range per read).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from pigeon.testing import LineClient, ServerProcess

RECOVERED = re.compile(r"recovered (\d+) messages on (\d+) topics from \S+ in ([0-9.]+) s")


def _roomy(messages: int) -> list[str]:
    """Limits that let all the messages wait in one backlog."""
    return ["--max-backlog", str(messages), "--max-memory", str(16 << 30)]


def fill(data: Path, messages: int, size: int) -> float:
    """Publish ``messages`` to topic jobs with a window of 1,000; kill -9 once all are confirmed."""
    server = ServerProcess(
        "--data-dir", str(data), "--max-backlog", str(messages), "--max-memory", str(16 << 30)
    )
    client = LineClient(server.host, server.port, 60)
    cid = client.connect()
    line = b"PUBLISH %s jobs %s\n" % (cid.encode(), b"x" * size)
    started = time.perf_counter()
    sent = confirmed = 0
    while confirmed < messages:
        if sent < messages and sent - confirmed <= 500:
            batch = min(500, messages - sent)
            client.sock.sendall(line * batch)
            sent += batch
        confirmed += client.sock.recv(1 << 20).count(b"\n")
    elapsed = time.perf_counter() - started
    server.stop(signal.SIGKILL)
    return messages / elapsed


class _Acker(threading.Thread):
    """An acknowledging consumer of jobs: counts what it acked, notes when it saw its first DELIVER."""

    def __init__(self, host: str, port: int, counts: list[int], index: int, first: list[float]) -> None:
        super().__init__(daemon=True)
        self.client = LineClient(host, port, 60)
        self.client.connect()
        self.counts, self.index, self.first = counts, index, first

    def run(self) -> None:
        cid = self.client.client_id.encode()
        sock = self.client.sock
        sock.sendall(b"SUBSCRIBE %s jobs ACK PREFETCH 1000\n" % cid)
        buf = b""
        pending: list[bytes] = []
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            if not self.first:
                self.first.append(time.perf_counter())
            buf += chunk
            cut = buf.rfind(b"\n") + 1
            for record in buf[:cut].split(b"\n")[:-1]:
                if record.startswith(b"DELIVER "):
                    pending.append(record.split(b" ", 3)[2])
            buf = buf[cut:]
            if pending:  # the tags of one read are consecutive: one range acks them all
                try:
                    sock.sendall(b"ACK %s %s-%s\n" % (cid, pending[0], pending[-1]))
                except OSError:
                    return
                self.counts[self.index] += len(pending)
                pending.clear()


def restart(data: Path, messages: int, consume: bool) -> None:
    """Start on ``data``, connect consumers at once, report the figures."""
    started = time.perf_counter()
    server = ServerProcess(
        "--data-dir", str(data), "--max-backlog", str(messages), "--max-memory", str(16 << 30)
    )
    listening = time.perf_counter() - started
    found = next(RECOVERED.search(line) for line in server.log if RECOVERED.search(line))
    assert found is not None
    print(
        f"recovered {found.group(1)} messages in {found.group(3)} s (server's figure); "
        f"listening after {listening:.2f} s"
    )
    counts = [0] * 4
    first: list[float] = []
    ackers = [_Acker(server.host, server.port, counts, i, first) for i in range(4 if consume else 1)]
    for acker in ackers:
        acker.start()
    deadline = time.monotonic() + 600
    while not first and time.monotonic() < deadline:
        time.sleep(0.001)
    print(f"first message {first[0] - started:.2f} s after the restart's exec")
    if consume:
        while sum(counts) < messages and time.monotonic() < deadline:
            time.sleep(0.005)
        print(f"all {sum(counts)} acked by 4 consumers {time.perf_counter() - started:.2f} s after the exec")
    server.stop()


def main() -> None:
    """Fill, kill -9, restart, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--consume", action="store_true", help="also time 4 acking consumers taking all")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="pigeon-recovery-"))
    try:
        rate = fill(data, args.messages, args.size)
        print(
            f"filled {args.messages} messages of {args.size} bytes at {rate:,.0f} confirmed/s, then kill -9"
        )
        restart(data, args.messages, args.consume)
    finally:
        shutil.rmtree(data)


if __name__ == "__main__":
    main()
