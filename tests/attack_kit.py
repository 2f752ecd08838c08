"""The attacks of issue 10 as functions: real sockets against a real ``pigeon`` process.

Shared by ``tests/attacks.py`` (``python -m tests.attacks``), which prints each attack's figures, and the
``tests/test_attacks_*.py`` files, which assert what the fixed broker must do.
Nothing here mocks anything: every figure comes from a socket or from the
server's ``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import random
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pigeon.testing import LineClient, ServerProcess, server_command, signal_and_wait

MiB = 1024 * 1024
KiB = 1024

# Runs the real server command after lowering its address-space limit (RLIMIT_AS),
# so the pid, the exit code and a crash signal are the server's own.
_EXEC_WITH_AS_LIMIT = (
    "import os, resource, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)

MONITORING = re.compile(r"monitoring on (http://\S+/)")

# the event loops the server can run on here
LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


def coded(code: str) -> re.Pattern[bytes]:
    """An ``ERROR <CODE> ...`` reply line with this code (the fixed server's form)."""
    return re.compile(rb"ERROR " + code.encode() + rb"( .*)?")


# ---------------------------------------------------------------- the server process


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, read from /proc/<pid>/status; (0, 0) once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, hwm


def server_flags() -> str:
    """The server's ``--help`` text, to tell which flags it takes."""
    global _HELP
    if _HELP is None:
        _HELP = subprocess.run(
            [*server_command(), "--help"], capture_output=True, text=True, timeout=60
        ).stdout
    return _HELP


_HELP: str | None = None


def split_unknown_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``args`` without the ``--flag VALUE`` pairs the server does not take yet, and those flags.

    The tests assert the missing flags last, so that on a server without them
    the assertion that fails first is the one about the attack's effect.
    """
    known: list[str] = []
    missing: list[str] = []
    help_text = server_flags()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and not re.search(rf"{re.escape(arg)}\b", help_text):
            missing.append(arg)
            i += 2
            continue
        known.append(arg)
        i += 1
    return known, missing


class Server(ServerProcess):
    """A ``ServerProcess`` whose log is read by a thread while it runs, so it can be searched at any time.

    Reading stderr all along also keeps a server that logs a lot (a warning per
    closed connection) from blocking on a full pipe. ``address_space`` starts it
    under that RLIMIT_AS, in bytes.
    """

    def __init__(self, *args: str, loop: str = "auto", address_space: int | None = None) -> None:
        command = None
        if address_space is not None:
            command = [sys.executable, "-c", _EXEC_WITH_AS_LIMIT, str(address_space), *server_command()]
        super().__init__(*args, loop=loop, command=command)
        self.pid = self.proc.pid
        self.baseline_kib = memory_kib(self.pid)[0]
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def text(self) -> str:
        """The log so far."""
        return "".join(self.log)

    def wait_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str] | None:
        """The first match of ``pattern`` in the log lines from index ``start`` on, within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            if exited:
                self._reader.join(5)  # every line it wrote is in
            for line in self.log[start:]:
                match = re.search(pattern, line)
                if match:
                    return match
            if exited or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB."""
        return memory_kib(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server (if it still runs) and return its exit code, negative for a signal."""
        code = signal_and_wait(self.proc, sig, timeout)
        self._close_log()
        return code

    def _close_log(self) -> None:
        self._reader.join(10)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL, for a server that must not outlive a failed test."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()


@contextlib.contextmanager
def running(*args: str, loop: str = "auto", address_space: int | None = None) -> Iterator[Server]:
    """A server for the length of a ``with`` block, killed on the way out if still running."""
    proc = Server(*args, loop=loop, address_space=address_space)
    try:
        yield proc
    finally:
        proc.kill()


def connected(proc: ServerProcess, timeout: float = 10.0) -> LineClient:
    """A new connection that has sent CONNECT."""
    client = proc.client(timeout)
    client.connect()
    return client


def stats(proc: ServerProcess, timeout: float = 10.0) -> dict[str, Any]:
    """The server-wide STATS figures, asked on a fresh connection."""
    client = connected(proc, timeout)
    try:
        reply = client.ask("STATS")
    finally:
        client.close()
    word, _, payload = reply.partition(b" ")
    assert word == b"STATS", reply
    figures: dict[str, Any] = json.loads(payload)
    return figures


def ping_seconds(client: LineClient) -> float:
    """One PING round trip on an open connection, in seconds."""
    start = time.perf_counter()
    reply = client.ask("PING")
    elapsed = time.perf_counter() - start
    assert reply == b"PONG", reply
    return elapsed


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def room_for_sockets(n: int) -> bool:
    """Raise this process's open-files limit to hold n more sockets, if the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 100:
        return False
    if soft != resource.RLIM_INFINITY and soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, hard))
    return True


def hang_up(sock: socket.socket) -> None:
    """Shut a socket down before closing it, which also wakes a thread blocked reading it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def read_what_is_left(sock: socket.socket, timeout: float = 1.0) -> bytes:
    """Everything still readable on a socket the peer has closed or reset, up to EOF or the error."""
    data = b""
    sock.settimeout(timeout)
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk


def small_buffer_socket(proc: ServerProcess, timeout: float = 30.0) -> socket.socket:
    """A connection with a 4 KiB receive buffer (set before connecting), so unread output backs up at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in proc.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(timeout)
    sock.connect((proc.host, proc.port))
    return sock


def small_buffer_client(proc: ServerProcess) -> LineClient:
    """A ``LineClient`` on a ``small_buffer_socket``, after CONNECT."""
    client = LineClient.over(small_buffer_socket(proc))
    client.connect()
    return client


def shown(data: bytes) -> str:
    """Bytes as text with every non-ASCII character escaped, so invisible ones show."""
    return data.decode("utf-8", "replace").encode("ascii", "backslashreplace").decode("ascii")


# Unicode format characters (category Cf) and space separators (Zs) that look like nothing
INVISIBLE = ("\u200b", "\ufeff", "\u202e", "\u2066", "\u00ad", "\u061c", "\u3000", "\u2000")


def error_code(reply: bytes) -> str:
    """The word after ``ERROR`` (the code, once the server sends one)."""
    parts = reply.split(b" ", 2)
    return parts[1].decode("ascii", "replace") if len(parts) > 1 and parts[0] == b"ERROR" else ""


class _Sampler:
    """Calls ``_sample`` every ``interval`` s in a daemon thread until it returns False or ``_halt``.

    A subclass sets what ``_sample`` needs before calling ``__init__``, which starts the thread.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> bool:
        """Take one sample; False ends the thread."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set() and self._sample():
            self._stop.wait(self.interval)

    def _halt(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)


class MemorySampler(_Sampler):
    """Samples a process's VmRSS and VmHWM every ``interval`` s in a thread: the peak survives a crash."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.rss_kib = 0
        self.peak_kib = 0
        super().__init__(interval)

    def _sample(self) -> bool:
        rss, hwm = memory_kib(self.pid)
        if rss == 0:
            return False
        self.rss_kib = rss
        self.peak_kib = max(self.peak_kib, hwm)
        return True

    def stop(self) -> tuple[int, int]:
        """(last VmRSS, highest VmHWM) seen, in KiB."""
        self._halt(5)
        rss, hwm = memory_kib(self.pid)
        if rss:
            self.rss_kib = rss
        self.peak_kib = max(self.peak_kib, hwm)
        return self.rss_kib, self.peak_kib


class Pinger(_Sampler):
    """A bystander that PINGs in a thread and records each round trip, until stopped."""

    def __init__(self, proc: ServerProcess, interval: float = 0.01) -> None:
        self.client = connected(proc, timeout=60)
        self.samples: list[float] = []
        self.failures: list[str] = []
        super().__init__(interval)

    def _sample(self) -> bool:
        try:
            self.samples.append(ping_seconds(self.client))
        except (OSError, EOFError, AssertionError) as exc:
            self.failures.append(repr(exc))
            return False
        return True

    def stop(self) -> list[float]:
        """The round trips seen, in seconds."""
        self._halt(70)
        self.client.close()
        return self.samples


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of samples, in milliseconds."""
    if not samples:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"n": len(ordered), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": ordered[-1] * 1000}


# ---------------------------------------------------------------- 1. STATS output flood


def subscribe_many(client: LineClient, count: int, length: int = 255, prefix: str = "t") -> list[str]:
    """Subscribe ``client`` to ``count`` topics of ``length`` bytes, pipelined; returns the names."""
    names = [f"{prefix}{i:07d}".ljust(length, "x") for i in range(count)]
    for start in range(0, count, 1000):
        chunk = names[start : start + 1000]
        client.send("".join(f"SUBSCRIBE {client.client_id} {n}\n" for n in chunk).encode())
        replies = client.lines(len(chunk))
        assert all(r.startswith(b"SUBSCRIBED ") for r in replies), replies[:3]
    return names


@dataclass
class StatsFlood:
    stats_lines: int
    reply_bytes: int
    baseline_kib: int
    peak_kib: int = 0
    rss_kib: int = 0
    alive: bool = True
    exit_code: int | None = None
    ping_ms: list[float] = field(default_factory=list)
    ping_failures: int = 0
    seconds: float = 0.0
    crash_log: str = ""


def stats_flood(
    proc: Server, lines: int = 3000, subscriptions: int = 10_000, settle: float = 30.0
) -> StatsFlood:
    """One client holds ``subscriptions`` 255-byte topics; another sends ``lines`` STATS CONNECTIONS
    and never reads.

    Waits until the server's count of STATS commands stops moving for 2 s (or
    ``settle`` seconds pass, or the server dies), pinging on a bystander
    connection all along.
    """
    holder = connected(proc)
    subscribe_many(holder, subscriptions)
    sizer = connected(proc)
    reply = sizer.ask("STATS CONNECTIONS")
    sizer.close()
    result = StatsFlood(lines, len(reply) + 1, proc.baseline_kib)
    bystander = connected(proc, timeout=30)
    attacker = connected(proc)
    sampler = MemorySampler(proc.pid)
    start = time.monotonic()
    attacker.send(b"STATS CONNECTIONS\n" * lines)
    last_count, last_change = -1, time.monotonic()
    deadline = start + settle
    asked = 0
    while time.monotonic() < deadline and proc.alive():
        try:
            result.ping_ms.append(ping_seconds(bystander) * 1000)
            asked += 1
            count = stats(proc)["commands"]["stats"] - asked  # not counting our own
        except (OSError, EOFError):
            result.ping_failures += 1
            break
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > 2.0:
            break
        time.sleep(0.2)
    result.seconds = time.monotonic() - start
    result.rss_kib, result.peak_kib = sampler.stop()
    result.alive = proc.alive()
    if not result.alive:
        result.exit_code = proc.stop()
        result.crash_log = "".join(line for line in proc.log if re.search("Error|fault|Fatal", line))
    attacker.close()
    bystander.close()
    holder.close()
    return result


def page_through(client: LineClient, section: str, count: int | None = None) -> tuple[list[Any], list[int]]:
    """Every entry of ``STATS <section> <cursor> [<count>]``, page by page; and each reply's size."""
    entries: list[Any] = []
    sizes: list[int] = []
    cursor = 0
    for _ in range(100_000):
        command = f"STATS {section} {cursor}" + ("" if count is None else f" {count}")
        reply = client.ask(command)
        sizes.append(len(reply) + 1)
        word, _, payload = reply.partition(b" ")
        assert word == b"STATS", reply[:200]
        page = json.loads(payload)
        assert isinstance(page, dict), f"not an object: {payload[:200]!r}"
        items = page[section.lower()]
        assert isinstance(items, list)
        if count is not None:
            assert len(items) <= count, (len(items), count)
        entries.extend(items)
        cursor = page["next"]
        assert isinstance(cursor, int)
        if cursor == 0:
            return entries, sizes
    raise AssertionError("the cursor never came back to 0")


# ---------------------------------------------------------------- 2. messages lost after a peer's FIN/RST


VARIANTS = ("fin", "rst", "half-close")


@dataclass
class Loss:
    variant: str
    trials: int = 0
    acked: int = 0
    received: int = 0
    duplicated: int = 0
    lost: int = 0
    losing_trials: int = 0
    unacked: int = 0
    requeued: int = 0
    seconds: float = 0.0


def _collect(clients: Sequence[tuple[LineClient, bool]], want: set[bytes], quiet: float) -> Counter[bytes]:
    """Read MESSAGE bodies from every client until all of ``want`` arrived or nothing came for ``quiet`` s.

    A client whose flag is True may be closed by the server: EOF ends its reading.
    """
    got: Counter[bytes] = Counter()
    selector = selectors.DefaultSelector()
    for client, _ in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
        # lines already buffered by earlier reads
        *done, client.buf = client.buf.split(b"\n")
        for line in done:
            if line.startswith(b"MESSAGE "):
                got[line.split(b" ", 2)[2]] += 1
    last = time.monotonic()
    while not want.issubset(got) and selector.get_map():
        events = selector.select(0.1)
        if not events:
            if time.monotonic() - last > quiet:
                break
            continue
        last = time.monotonic()
        for key, _ in events:
            client = key.data
            try:
                chunk = client.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                selector.unregister(client.sock)
                continue
            *done, client.buf = (client.buf + chunk).split(b"\n")
            for line in done:
                if line.startswith(b"MESSAGE "):
                    got[line.split(b" ", 2)[2]] += 1
    selector.close()
    return got


def lost_after_close(
    proc: ServerProcess,
    variant: str,
    trials: int = 30,
    burst: int = 2000,
    busy: int = 0,
    stop_on_loss: bool = False,
) -> Loss:
    """Per trial: subscribers A and B of a fresh topic; B closes (``variant``), then a publisher
    pipelines ``burst`` messages with unique bodies and reads every reply. Counts what A (and, for a
    half-close, B, which keeps reading) receive.

    With ``busy``, a third client first sends that many ``STATS`` lines, which keep the server's
    loop busy for some milliseconds while B's close and the burst arrive: the next pass of the loop
    then sees both, B's first (the order they were sent in). Without it, whether they fall in one
    pass is up to the scheduler. ``stop_on_loss`` ends the run after the first trial that lost
    a message (a test has failed by then).
    """
    loss = Loss(variant)
    start = time.monotonic()
    loader = connected(proc) if busy else None
    for trial in range(trials):
        topic = f"loss.{variant}.{trial}"
        a, b, pub = connected(proc), connected(proc), connected(proc)
        a.subscribe(topic)
        b.subscribe(topic)
        bodies = [f"{trial}-{i}".encode() for i in range(burst)]
        lines = b"".join(f"PUBLISH {pub.client_id} {topic} ".encode() + body + b"\n" for body in bodies)
        if loader is not None:
            loader.send(b"STATS\n" * busy)
        if variant == "fin":
            b.close()
        elif variant == "rst":
            reset(b.sock)
        else:
            b.sock.shutdown(socket.SHUT_WR)
        pub.send(lines)
        replies = pub.lines(burst)
        acked = {body for body, reply in zip(bodies, replies, strict=True) if reply.startswith(b"PUBLISHED ")}
        readers = [(a, False)] + ([(b, True)] if variant == "half-close" else [])
        got = _collect(readers, acked, quiet=1.0)
        missing = len(acked - set(got))
        loss.trials += 1
        loss.acked += len(acked)
        loss.received += len(set(got) & acked)
        loss.duplicated += sum(n - 1 for n in got.values() if n > 1)
        loss.unacked += len(set(got) - acked)
        loss.lost += missing
        loss.losing_trials += missing > 0
        for client in (a, b, pub):
            client.close()
        if loader is not None:
            assert all(line.startswith(b"STATS {") for line in loader.lines(busy))
        if missing and stop_on_loss:
            break
    if loader is not None:
        loader.close()
    loss.requeued = stats(proc)["requeued"]
    loss.seconds = time.monotonic() - start
    return loss


# ---------------------------------------------------------------- 3. --max-memory


@dataclass
class Flood:
    limit: int
    baseline_kib: int
    sent: int = 0
    accepted: int = 0
    refused_memory: int = 0
    errors: int = 0
    other_replies: int = 0
    first_other: bytes = b""
    peak_kib: int = 0
    rss_kib: int = 0
    backlog_messages: int = 0
    backlog_bytes: int = 0
    publish_holds: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    alive: bool = True


class _ReplyCounter(threading.Thread):
    """Counts reply lines by kind as fast as they come, until EOF."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.published = 0
        self.memory_full = 0
        self.errors = 0
        self.other = 0
        self.first_other = b""
        self.lines = 0

    def run(self) -> None:
        rest = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 22)
            except OSError:
                return
            if not chunk:
                return
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            data, rest = data[:cut], data[cut:]
            n = data.count(b"\n")
            published = data.count(b"PUBLISHED ")
            memory_full = data.count(b"ERROR MEMORY_FULL")
            self.published += published
            self.memory_full += memory_full
            self.errors += data.count(b"ERROR ")
            self.lines += n
            if n - published - memory_full and not self.first_other:
                self.first_other = next(
                    line
                    for line in data.split(b"\n")
                    if line and not line.startswith((b"PUBLISHED ", b"ERROR MEMORY_FULL"))
                )
            self.other += n - published - memory_full


def publish_flood(
    proc: Server,
    limit: int,
    message: bytes = b"",
    topics: int = 1332,
    seconds: float = 15.0,
    stop_above_kib: int | None = None,
) -> Flood:
    """Pipeline ``PUBLISH <id> <topic> <message>`` round robin over ``topics`` topics for ``seconds``.

    Replies are counted by a thread. Stops early once the server's RSS passes
    ``stop_above_kib`` (a test that has already failed need not eat the machine).
    """
    flood = Flood(limit, proc.baseline_kib)
    client = connected(proc)
    names = [f"m{i}" for i in range(topics)]
    chunk = b"".join(f"PUBLISH {client.client_id} {n} ".encode() + message + b"\n" for n in names) * 50
    per_chunk = topics * 50
    counter = _ReplyCounter(client.sock)
    counter.start()
    start = time.monotonic()
    next_check = start
    client.sock.settimeout(5.0)
    while time.monotonic() - start < seconds:
        try:
            client.sock.sendall(chunk)
        except (TimeoutError, OSError):
            break
        flood.sent += per_chunk
        if time.monotonic() >= next_check:
            next_check += 0.1
            hwm = proc.memory()[1]
            if stop_above_kib is not None and hwm > stop_above_kib:
                flood.stopped_early = True
                break
            if not proc.alive():
                break
    flood.seconds = time.monotonic() - start
    # every reply in, or the server stopped answering
    deadline = time.monotonic() + 30
    last, still_since = -1, time.monotonic()
    while counter.lines < flood.sent and time.monotonic() < deadline and counter.is_alive():
        if counter.lines != last:
            last, still_since = counter.lines, time.monotonic()
        elif time.monotonic() - still_since > 2:
            break  # no reply for 2 s: the server holds the publisher (flow control)
        if stop_above_kib is not None and proc.memory()[1] > stop_above_kib:
            flood.stopped_early = True
            break
        time.sleep(0.05)
    flood.accepted = counter.published
    flood.refused_memory = counter.memory_full
    flood.errors = counter.errors
    flood.other_replies = counter.other
    flood.first_other = counter.first_other
    flood.rss_kib, flood.peak_kib = proc.memory()
    flood.alive = proc.alive()
    if flood.alive:
        figures = stats(proc)
        flood.backlog_messages = figures["backlog_messages"]
        flood.backlog_bytes = figures["backlog_bytes"]
        flood.publish_holds = figures.get("publish_holds", 0)
    hang_up(client.sock)
    counter.join(5)
    return flood


@dataclass
class Unfinished:
    connections: int
    line_bytes: int
    limit: int
    baseline_kib: int
    bytes_sent: int = 0
    fully_sent: int = 0
    memory_full: int = 0
    closed: int = 0
    other_replies: int = 0
    first_other: bytes = b""
    closed_without_error: int = 0
    refused_not_closed: int = 0
    peak_kib: int = 0
    rss_kib: int = 0
    seconds: float = 0.0
    bystander_ok: bool = False


def unfinished_lines(
    proc: Server, limit: int, connections: int = 1000, line_bytes: int = MiB, seconds: float = 30.0
) -> Unfinished:
    """``connections`` connections each send ``line_bytes`` of one line with no newline, then wait."""
    result = Unfinished(connections, line_bytes, limit, proc.baseline_kib)
    bystander = connected(proc, timeout=30)
    socks = [socket.create_connection((proc.host, proc.port), timeout=30) for _ in range(connections)]
    sent = dict.fromkeys(range(connections), 0)
    replies = {i: b"" for i in range(connections)}
    eof: set[int] = set()
    payload = memoryview(b"x" * line_bytes)
    selector = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
    start = time.monotonic()
    last_progress = start
    while selector.get_map() and time.monotonic() - start < seconds:
        events = selector.select(0.2)
        if events:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > 3.0:
            break
        for key, mask in events:
            i = key.data
            sock = socks[i]
            if mask & selectors.EVENT_READ:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    eof.add(i)
                    selector.unregister(sock)
                    continue
                if data:
                    replies[i] += data
            if mask & selectors.EVENT_WRITE and sent[i] < line_bytes:
                try:
                    sent[i] += sock.send(payload[sent[i] : sent[i] + 262144])
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    # closed by the server (a reset, when it closed with input unread): what it
                    # sent before is still there to read
                    replies[i] += read_what_is_left(sock)
                    eof.add(i)
                    selector.unregister(sock)
                    continue
                if sent[i] >= line_bytes:
                    selector.modify(sock, selectors.EVENT_READ, i)
        everything_sent = all(v >= line_bytes or i in eof for i, v in sent.items())
        if not events and everything_sent and time.monotonic() - last_progress > 1.0:
            break  # the server had a moment to answer
    result.seconds = time.monotonic() - start
    selector.close()
    result.rss_kib, result.peak_kib = proc.memory()
    result.bytes_sent = sum(sent.values())
    result.fully_sent = sum(v >= line_bytes for v in sent.values())
    for i in range(connections):
        lines = [line for line in replies[i].split(b"\n") if line]
        if any(error_code(line) == "MEMORY_FULL" for line in lines):
            result.memory_full += 1
        others = [line for line in lines if error_code(line) != "MEMORY_FULL"]
        if others:
            result.other_replies += 1
            result.first_other = result.first_other or others[0]
        if i in eof:
            result.closed += 1
            if not lines:
                result.closed_without_error += 1
        elif lines:
            result.refused_not_closed += 1
    try:
        result.bystander_ok = bystander.ask("PING") == b"PONG"
    except (OSError, EOFError):
        result.bystander_ok = False
    for sock in socks:
        sock.close()
    bystander.close()
    return result


# ---------------------------------------------------------------- 4. clients that never read


@dataclass
class NeverRead:
    attackers: int
    junk_bytes: int
    baseline_kib: int
    sent: list[int] = field(default_factory=list)
    peak_kib: int = 0
    rss_kib: int = 0
    rss_after_kib: int = 0
    last_progress: float = 0.0
    closed_after: float | None = None
    connections_after: int = -1
    new_clients_ok: int = 0
    new_clients_refused: int = 0
    first_refusal: bytes = b""
    seconds: float = 0.0
    stopped_early: bool = False


def never_read(
    proc: Server,
    attackers: int = 30,
    junk_bytes: int = 4_500_000,
    newcomers: int = 20,
    wait_closed: float = 30.0,
    stop_above_kib: int | None = None,
) -> NeverRead:
    """``attackers`` connections send ``junk_bytes`` of junk lines each (every one answered by an ERROR)
    and never read. Records how much each managed to send, the RSS, how long until the server has
    closed them all (counted by STATS ``connections``, waiting up to ``wait_closed`` s after the
    sending ends), then how ``newcomers`` new clients, all open at once, fare. Stops early (and
    skips the rest) once VmHWM passes ``stop_above_kib``."""
    result = NeverRead(attackers, junk_bytes, proc.baseline_kib)
    line = b"x\n"
    payload = memoryview(line * (junk_bytes // len(line)))
    socks = [small_buffer_socket(proc) for _ in range(attackers)]
    for sock in socks:
        sock.setblocking(False)
    sent = [0] * attackers
    selector = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_WRITE, i)
    sampler = MemorySampler(proc.pid)

    def too_big() -> bool:
        result.stopped_early = stop_above_kib is not None and sampler.peak_kib > stop_above_kib
        return result.stopped_early

    start = time.monotonic()
    last_progress = start
    while selector.get_map() and not too_big():
        events = selector.select(0.2)
        now = time.monotonic()
        for key, _ in events:
            i = key.data
            sock = socks[i]
            try:
                n = sock.send(payload[sent[i] : sent[i] + 262144])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                selector.unregister(sock)
                continue
            if n:
                sent[i] += n
                last_progress = now
            if sent[i] >= len(payload):
                selector.unregister(sock)
        # no attacker could send anything for 3 s: the server stopped reading them
        if now - last_progress > 3.0 or now - start > 60:
            break
    selector.close()
    result.sent = sent
    result.last_progress = last_progress - start
    result.rss_kib = sampler.rss_kib
    # wait until the server holds nothing but the STATS connection itself
    deadline = time.monotonic() + wait_closed
    while time.monotonic() < deadline and not too_big():
        try:
            count = stats(proc, timeout=max(1.0, deadline - time.monotonic()))["connections"]
        except (OSError, EOFError):
            continue  # too busy to answer in time
        result.connections_after = count - 1
        if count == 1:
            result.closed_after = time.monotonic() - start
            break
        time.sleep(0.1)
    kept: list[LineClient] = []
    for _ in range(0 if result.stopped_early else newcomers):
        try:
            kept.append(proc.client(timeout=5.0))
            reply = kept[-1].ask("PING")
        except (OSError, EOFError) as exc:
            reply = repr(exc).encode()
        if reply == b"PONG":
            result.new_clients_ok += 1
        else:
            result.new_clients_refused += 1
            result.first_refusal = result.first_refusal or reply
    result.seconds = time.monotonic() - start
    result.rss_after_kib, result.peak_kib = sampler.stop()
    for client in kept:
        client.close()
    for sock in socks:
        sock.close()
    return result


def kernel_queued(server_port: int, client_ports: Iterable[int]) -> int:
    """Bytes the kernel holds between the server and these client ports: the server side's send
    queue plus the client side's receive queue, from /proc/net/tcp and tcp6."""
    ports = set(client_ports)
    total = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as table:
                rows = table.readlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            tx, rx = (int(v, 16) for v in fields[4].split(":"))
            if local == server_port and remote in ports:
                total += tx
            elif local in ports and remote == server_port:
                total += rx
    return total


class QueueSampler(_Sampler):
    """The most the kernel held at once (``kernel_queued``) for some connections, sampled in a thread."""

    def __init__(self, server_port: int, client_ports: Iterable[int], interval: float = 0.02) -> None:
        self.server_port = server_port
        self.client_ports = list(client_ports)
        self.most = 0
        super().__init__(interval)

    def _sample(self) -> bool:
        self.most = max(self.most, kernel_queued(self.server_port, self.client_ports))
        return True

    def stop(self) -> int:
        """The most bytes the kernel held at once."""
        self._halt(5)
        return self.most


@dataclass
class DeadSubscribers:
    messages: int
    body_bytes: int
    line_bytes: int = 0
    acked: int = 0
    kernel_bytes: int = 0
    closed_after: float | None = None
    stuck_pending: list[int] = field(default_factory=list)
    received: int = 0
    in_order: bool = True
    duplicates: int = 0
    backlog_left: int = -1
    requeued: int = 0
    seconds: float = 0.0


def dead_subscribers(
    proc: Server, messages: int = 100_000, body_bytes: int = 200, wait_closed: float = 20.0
) -> DeadSubscribers:
    """Two subscribers of a topic stop reading while a publisher puts ``messages`` on it; then a
    third subscriber arrives once the server has closed them (or ``wait_closed`` passed) and reads
    what is left. Bodies carry their publish index, so order and duplicates can be checked."""
    result = DeadSubscribers(messages, body_bytes, line_bytes=len(b"MESSAGE work \n") + body_bytes)
    dead = []
    for _ in range(2):
        client = small_buffer_client(proc)
        client.subscribe("work")
        dead.append(client)
    queues = QueueSampler(proc.port, (c.sock.getsockname()[1] for c in dead))
    pub = connected(proc)
    counter = _ReplyCounter(pub.sock)
    counter.start()
    pad = b"p" * (body_bytes - 8)
    start = time.monotonic()
    batch = 5000
    for first in range(0, messages, batch):
        pub.sock.sendall(
            b"".join(
                f"PUBLISH {pub.client_id} work {i:08d}".encode() + pad + b"\n"
                for i in range(first, min(messages, first + batch))
            )
        )
    deadline = time.monotonic() + 60
    while counter.lines < messages and time.monotonic() < deadline:
        time.sleep(0.05)
    result.acked = counter.published
    # the server must close both silent subscribers on its own
    deadline = time.monotonic() + wait_closed
    while time.monotonic() < deadline:
        if stats(proc)["connections"] <= 2:  # the publisher and the STATS connection
            result.closed_after = time.monotonic() - start
            break
        time.sleep(0.1)
    result.kernel_bytes = queues.stop()
    if result.closed_after is None:
        result.stuck_pending = [
            c.get("pending_bytes", -1)
            for c in _connection_entries(proc)
            if "work" in c.get("subscriptions", ())
        ]
    third = connected(proc)
    third.subscribe("work")
    got: list[int] = []
    seen: set[int] = set()
    third.sock.settimeout(0.5)
    quiet_since = time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = third.sock.recv(1 << 20)
        except TimeoutError:
            if time.monotonic() - quiet_since > 1.5 and stats(proc)["backlog_messages"] == 0:
                break
            continue
        if not chunk:
            break
        quiet_since = time.monotonic()
        *lines, third.buf = (third.buf + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"MESSAGE work "):
                index = int(line[13:21])
                if index in seen:
                    result.duplicates += 1
                if got and index <= got[-1]:
                    result.in_order = False
                seen.add(index)
                got.append(index)
    result.received = len(got)
    figures = stats(proc)
    result.backlog_left = figures["backlog_messages"]
    result.requeued = figures["requeued"]
    result.seconds = time.monotonic() - start
    for client in (*dead, pub, third):
        hang_up(client.sock)
    counter.join(5)
    return result


def _connection_entries(proc: ServerProcess) -> list[dict[str, Any]]:
    """STATS CONNECTIONS entries, whichever shape (a list today, pages after the fix)."""
    client = connected(proc)
    try:
        reply = client.ask("STATS CONNECTIONS")
    finally:
        client.close()
    data = json.loads(reply.partition(b" ")[2])
    entries: list[dict[str, Any]] = data if isinstance(data, list) else data.get("connections", [])
    return entries


# ---------------------------------------------------------------- 5. hash flooding

FNV_OFFSET = 14695981039346656037
FNV_PRIME = 1099511628211
# printable ASCII without space: every byte is valid in a topic name
ALPHABET = bytes(range(0x21, 0x7F))


def fnv1a(data: bytes) -> int:
    """The unseeded 64-bit FNV-1a of v1's topic table."""
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def colliding_names(count: int, bits: int = 17, target: int = 0, seed: int = 1) -> list[bytes]:
    """``count`` distinct topic names whose FNV-1a hashes agree in their low ``bits`` bits.

    The low k bits of FNV-1a depend only on the low k bits of the state and the
    bytes, and each step (xor a byte, multiply by an odd prime) is invertible
    modulo 2**k. So for every 3-byte suffix, run the steps backwards from the
    target to get the state a prefix must reach; then hash prefixes forwards and
    pair each with the suffixes whose required state it hit (meet in the middle).
    """
    mask = (1 << bits) - 1
    inverse = pow(FNV_PRIME, -1, 1 << bits)
    prime = FNV_PRIME & mask
    need: dict[int, list[bytes]] = {}
    for c in ALPHABET:
        s3 = (target * inverse & mask) ^ c
        for b in ALPHABET:
            s2 = (s3 * inverse & mask) ^ b
            for a in ALPHABET:
                s1 = (s2 * inverse & mask) ^ a
                need.setdefault(s1, []).append(bytes((a, b, c)))
    rng = random.Random(seed)
    names: list[bytes] = []
    seen: set[bytes] = set()
    while len(names) < count:
        prefix = b"h" + bytes(rng.choice(ALPHABET) for _ in range(5))
        h = FNV_OFFSET & mask
        for byte in prefix:
            h = ((h ^ byte) * prime) & mask
        for suffix in need.get(h, ()):
            name = prefix + suffix
            if name not in seen:
                seen.add(name)
                names.append(name)
    return names[:count]


def random_names(count: int, length: int = 9, seed: int = 2) -> list[bytes]:
    """``count`` distinct random topic names of ``length`` printable bytes."""
    rng = random.Random(seed)
    names: set[bytes] = set()
    while len(names) < count:
        names.add(b"r" + bytes(rng.choice(ALPHABET) for _ in range(length - 1)))
    return sorted(names)


@dataclass
class TopicCreation:
    kind: str
    topics: int
    seconds: float = 0.0
    complete: bool = False
    published: int = 0
    ping_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class HashFlood:
    random_seconds: list[float] = field(default_factory=list)
    colliding_seconds: list[float] = field(default_factory=list)
    gave_up: int = 0

    @property
    def ratio(self) -> float:
        """Best colliding time over best random time."""
        return min(self.colliding_seconds) / min(self.random_seconds)


def hash_flood(
    colliding: Sequence[bytes], randoms: Sequence[bytes], loop: str, runs: int = 3, slack: float = 5.0
) -> HashFlood:
    """Time creating the colliding and the random topics, ``runs`` times each, alternating, each on a
    fresh server. A colliding run is given up after 3 times the best random run plus ``slack`` seconds
    (its time then counts as that long: the ratio is over 3 either way)."""
    result = HashFlood()
    for _ in range(runs):
        with running(loop=loop) as proc:
            result.random_seconds.append(create_topics(proc, randoms, "random", bystander=False).seconds)
        give_up = 3 * min(result.random_seconds) + slack
        with running(loop=loop) as proc:
            run = create_topics(proc, colliding, "colliding", bystander=False, give_up=give_up)
        result.colliding_seconds.append(run.seconds)
        result.gave_up += not run.complete
    return result


def create_topics(
    proc: ServerProcess, names: Sequence[bytes], kind: str, bystander: bool = True, give_up: float = 300.0
) -> TopicCreation:
    """PUBLISH one message to each name, pipelined, and time it until the last reply arrived
    (``complete`` is False when ``give_up`` seconds passed first)."""
    result = TopicCreation(kind, len(names))
    client = connected(proc, timeout=120)
    data = b"".join(b"PUBLISH " + client.client_id.encode() + b" " + n + b" x\n" for n in names)
    counter = _ReplyCounter(client.sock)
    pinger = Pinger(proc) if bystander else None
    start = time.perf_counter()
    counter.start()
    client.sock.sendall(data)
    deadline = time.monotonic() + give_up
    while counter.lines < len(names) and counter.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    result.seconds = time.perf_counter() - start
    result.complete = counter.lines >= len(names)
    if pinger is not None:
        result.ping_ms = percentiles(pinger.stop())
    result.published = counter.published
    hang_up(client.sock)
    counter.join(5)
    return result


# ---------------------------------------------------------------- 6. monitoring


def monitoring_url(proc: Server) -> str:
    """The base URL the server logged for its HTTP listener."""
    match = proc.wait_log(MONITORING.pattern, timeout=10)
    assert match, proc.text()
    return match.group(1)


def http_get(url: str, path: str, host: str | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    """Status and body of GET ``path``, with a ``Host`` header of our choosing (default: the URL's)."""
    parsed = re.match(r"http://([^/:]+|\[[^\]]+\]):(\d+)/", url)
    assert parsed, url
    conn = http.client.HTTPConnection(parsed.group(1).strip("[]"), int(parsed.group(2)), timeout=timeout)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"{parsed.group(1)}:{parsed.group(2)}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def publish_to_topics(proc: ServerProcess, names: Iterable[str], repeat: int = 1) -> int:
    """PUBLISH ``repeat`` messages to each topic, pipelined; returns how many were acknowledged."""
    client = connected(proc, timeout=120)
    counter = _ReplyCounter(client.sock)
    counter.start()
    data = b"".join(f"PUBLISH {client.client_id} {n} x\n".encode() * repeat for n in names)
    total = data.count(b"\n")
    client.sock.sendall(data)
    deadline = time.monotonic() + 120
    while counter.lines < total and counter.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    hang_up(client.sock)
    counter.join(5)
    return counter.published


@dataclass
class Scrapes:
    path: str
    scrapes: int
    body_bytes: int = 0
    seconds: list[float] = field(default_factory=list)
    ping_ms: dict[str, float] = field(default_factory=dict)


def scrape_while_pinging(proc: ServerProcess, url: str, path: str, scrapes: int = 10) -> Scrapes:
    """GET ``path`` ``scrapes`` times in a row while a bystander PINGs; the bystander's round trips."""
    result = Scrapes(path, scrapes)
    pinger = Pinger(proc, interval=0.005)
    for _ in range(scrapes):
        start = time.perf_counter()
        status, body = http_get(url, path)
        result.seconds.append(time.perf_counter() - start)
        assert status == 200, (status, body[:200])
        result.body_bytes = len(body)
    result.ping_ms = percentiles(pinger.stop())
    return result
