"""Request/reply round trips per second, Pigeon against nats-server, with one generator for both.

    python benchmarks/reqrep.py                      # 16 requesters, 2 s, median of 3
    python benchmarks/reqrep.py --requesters 1 --repeat 5

Each requester is a thread with a connection of its own that sends one request,
waits for its reply and sends the next (``--requesters`` of them at once); one
responder process answers every request with its own payload (``--size``
bytes). Pigeon: ``REQ <id> svc <n>`` (answered ``REQUESTED <id>``), the
responder reads ``MSG svc <token> <n>`` and sends ``REPLY <token> <n>``, the
requester reads ``RMSG <id> <n>`` (docs/protocol.md, "Request/reply"). NATS:
each requester subscribes to its own inbox ``_INBOX.<k>`` and sends ``PUB svc
_INBOX.<k> <n>``; the responder (a queue subscriber) reads ``MSG svc 1
_INBOX.<k> <n>`` and sends ``PUB _INBOX.<k> <n>``, which the requester reads,
as the NATS clients' ``request()`` does. The brokers take turns within each
repeat, each fresh and pinned to ``--broker-cpu`` with taskset; the
generator runs on the other CPU. The load average is printed before and after.

    python -m benchmarks.reqrep --cluster [--repeat 3]

measures Pigeon on a 3-node cluster instead (etcd and three ``pigeon --cluster`` nodes, nothing
pinned), for each placement of the requesters and the responder relative to the owner of ``svc``
(docs/cluster.md, "Request/reply"), against one ``pigeon`` process, in turns within each repeat.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable

from pigeon.bench.brokers import brokers, running
from pigeon.bench.load import render_rows

TOPIC = b"svc"


class Reader:
    """Buffered reads of lines and counted payloads from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            self.fill()
        line, self.buf = self.buf[:end].rstrip(b"\r"), self.buf[end + 1 :]
        return line

    def header(self) -> list[bytes]:
        """The fields of the next frame header; a server's PING (nats-server sends them) is answered."""
        while (line := self.line()) == b"PING":
            self.sock.sendall(b"PONG\r\n")
        return line.split(b" ")

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _connect(port: int) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, Reader(sock)


def _expect(reader: Reader, prefix: bytes) -> bytes:
    line = reader.line()
    if not line.startswith(prefix):
        raise RuntimeError(f"expected {prefix!r}, got {line!r}")
    return line


def _pigeon_session(port: int) -> tuple[socket.socket, Reader, bytes]:
    sock, reader = _connect(port)
    sock.sendall(b"HELLO 2\nCONNECT\n")
    _expect(reader, b"HELLO ")
    return sock, reader, _expect(reader, b"CONNECTED ").split()[1]


def _nats_session(port: int) -> tuple[socket.socket, Reader]:
    sock, reader = _connect(port)
    _expect(reader, b"INFO ")
    sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
    _expect(reader, b"PONG")
    return sock, reader


def respond(dialect: str, port: int, ready: multiprocessing.synchronize.Event) -> None:
    """The responder: answer every request with its payload, one write per read of requests."""
    if dialect == "pigeon":
        sock, reader, cid = _pigeon_session(port)
        sock.sendall(b"SUBSCRIBE %s %s GROUP workers\n" % (cid, TOPIC))
        _expect(reader, b"SUBSCRIBED ")
    else:
        sock, reader = _nats_session(port)
        sock.sendall(b"SUB %s workers 1\r\nPING\r\n" % TOPIC)
        _expect(reader, b"PONG")
    ready.set()
    eol = 1 if dialect == "pigeon" else 2
    while True:
        out = []
        while True:
            fields = reader.header()
            n = int(fields[-1])
            payload = reader.take(n + eol)[:n]
            if dialect == "pigeon":  # MSG svc <token> <n>
                out.append(b"REPLY %s %d\n%s\n" % (fields[2], n, payload))
            else:  # MSG svc 1 <reply subject> <n>
                out.append(b"PUB %s %d\r\n%s\r\n" % (fields[3], n, payload))
            if b"\n" not in reader.buf:
                break
        sock.sendall(b"".join(out))


def request_loop(
    dialect: str, port: int, k: int, size: int, stop: threading.Event, counts: list[int]
) -> None:
    """One requester: a request, its reply, checked to be its own, and again until ``stop``."""
    payload_of: Callable[[int], bytes] = lambda i: (b"%d:%d:" % (k, i)).ljust(size, b"x")  # noqa: E731
    if dialect == "pigeon":
        sock, reader, cid = _pigeon_session(port)
        head = b"REQ %s %s " % (cid, TOPIC)
    else:
        sock, reader = _nats_session(port)
        inbox = b"_INBOX.%d" % k
        sock.sendall(b"SUB %s 9\r\nPING\r\n" % inbox)
        _expect(reader, b"PONG")
        head = b"PUB %s %s " % (TOPIC, inbox)
    eol = b"\n" if dialect == "pigeon" else b"\r\n"
    i = 0
    while not stop.is_set():
        payload = payload_of(i)
        sock.sendall(head + b"%d%s%s%s" % (len(payload), eol, payload, eol))
        if dialect == "pigeon":
            _expect(reader, b"REQUESTED ")
        fields = reader.header()
        n = int(fields[-1])
        if reader.take(n + len(eol))[:n] != payload:
            raise RuntimeError(f"requester {k} got someone else's reply")
        counts[k] += 1
        i += 1
    sock.close()


def measure(
    dialect: str, port: int, requesters: int, size: int, duration: float, responder_port: int | None = None
) -> float:
    """Round trips per second over ``duration`` seconds, after half a second of warm-up; the
    responder connects to ``responder_port`` when given (another node of a cluster), else to ``port``."""
    ready = multiprocessing.Event()
    responder = multiprocessing.Process(
        target=respond, args=(dialect, responder_port or port, ready), daemon=True
    )
    responder.start()
    try:
        if not ready.wait(20):
            raise RuntimeError("the responder did not start")
        stop = threading.Event()
        counts = [0] * requesters
        threads = [
            threading.Thread(target=request_loop, args=(dialect, port, k, size, stop, counts), daemon=True)
            for k in range(requesters)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        before, start = sum(counts), time.perf_counter()
        time.sleep(duration)
        done, elapsed = sum(counts), time.perf_counter() - start
        stop.set()
        for thread in threads:
            thread.join(10)
        return (done - before) / elapsed
    finally:
        responder.kill()
        responder.join(10)


def measure_cluster(requesters: int, size: int, duration: float, repeat: int) -> None:
    """``--cluster``: each placement of requesters and responder on a 3-node cluster, and one process."""
    from benchmarks.cluster import wait_spread  # only this mode needs it (and the repository root)
    from pigeon.cluster.etcd import EtcdProcess
    from pigeon.cluster.slots import slot_of
    from pigeon.testing import ServerProcess

    print(f"load average before: {os.getloadavg()}", flush=True)
    rates: dict[str, list[float]] = {}
    with EtcdProcess() as etcd:
        nodes = [
            ServerProcess("--cluster", etcd.endpoint, "--node-name", f"n{i}", loop="uvloop") for i in range(3)
        ]
        single = ServerProcess(loop="uvloop")
        try:
            wait_spread(nodes[0].port, 3)
            owner = next(n for n in nodes if slot_of(TOPIC) in _owned(n.port))
            owner_port, (a, b) = owner.port, [n.port for n in nodes if n is not owner]
            placements = {
                "one process": (single.port, single.port),
                "cluster, all on the owner": (owner_port, owner_port),
                "requesters on another node": (a, owner_port),
                "responder on another node": (owner_port, a),
                "all three on different nodes": (a, b),
            }
            for _ in range(repeat):
                for name, (asking, answering) in placements.items():
                    rate = measure("pigeon", asking, requesters, size, duration, answering)
                    rates.setdefault(name, []).append(rate)
        finally:
            for node in [*nodes, single]:
                node.stop()
    print(f"load average after: {os.getloadavg()}")
    base = statistics.median(rates["one process"])
    print(f"{requesters} requesters, {size} B payloads, {duration} s x {repeat}")
    print(rates_table(rates, ["placement", "/ one process"], lambda median: median / base))


def rates_table(rates: dict[str, list[float]], titles: list[str], ratio: Callable[[float], float]) -> str:
    """The table of medians and runs per row name; ``titles`` of the first and last columns, the last
    being ``ratio(median)``."""
    rows = [[titles[0], "round trips/s (median)", "runs", titles[1]]]
    for name, runs in rates.items():
        median = statistics.median(runs)
        rows.append([name, f"{median:,.0f}", " ".join(f"{r:,.0f}" for r in runs), f"{ratio(median):.2f}"])
    return render_rows(rows)


def _owned(port: int) -> set[int]:
    """The slots the node on ``port`` serves."""
    sock, reader = _connect(port)
    sock.sendall(b"CLUSTER STATUS\n")
    owned = set(json.loads(_expect(reader, b"CLUSTER ")[len(b"CLUSTER ") :])["owned"])
    sock.close()
    return owned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requesters", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="payload bytes of a request and its reply")
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--broker-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--cluster", action="store_true", help="placements on a 3-node cluster")
    args = parser.parse_args()
    if args.cluster:
        measure_cluster(args.requesters, args.size, args.duration, args.repeat)
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_cpu})
    pin = ["taskset", "-c", str(args.broker_cpu)]
    found = {b.name: b for b in brokers(include_sink=False)}
    compared = [found["pigeon"]] + ([found["nats"]] if found["nats"].executable else [])
    print(f"load average before: {os.getloadavg()}", flush=True)
    rates: dict[str, list[float]] = {b.name: [] for b in compared}
    for _ in range(args.repeat):
        for broker in compared:
            with running(broker, pin) as (_, port):
                dialect = "pigeon" if broker.name == "pigeon" else "nats"
                rates[broker.name].append(measure(dialect, port, args.requesters, args.size, args.duration))
    print(f"load average after: {os.getloadavg()}")
    best = statistics.median(rates["pigeon"])
    print(f"{args.requesters} requesters, {args.size} B payloads, {args.duration} s x {args.repeat}")
    print(rates_table(rates, ["broker", "pigeon / broker"], lambda median: best / median))


if __name__ == "__main__":
    main()
