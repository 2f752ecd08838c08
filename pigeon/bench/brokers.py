"""The brokers the benchmarks compare, and how to start and stop each: Pigeon, nats-server (and
JetStream), redis-server, RabbitMQ, and the null broker that measures the generator's ceiling.

Each starts on a free loopback port with its files in a scratch directory it is given, in a
session of its own (stopping it stops whatever it started), optionally pinned with a taskset
prefix. ``durable_brokers()`` are the flavours that keep their queues on disk. Used by
benchmarks/compare.py and benchmarks/recovery.py.
"""

from __future__ import annotations

import compileall
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace

import psutil

import pigeon
from pigeon import __version__
from pigeon.bench.load import BrokerProbe
from pigeon.server.limits import raise_open_files_limit

START_TIMEOUT = 60.0  # RabbitMQ boots an Erlang node

# Pigeon without a consumer for the whole run: every message stays in one backlog
ROOMY = ["--max-backlog", str(1 << 30), "--max-backlog-bytes", str(8 << 30), "--max-memory", str(12 << 30)]


class BrokerProcess(subprocess.Popen[str]):
    """A broker's process, with every line it printed so far (stdout and stderr together)."""

    lines: list[str]


# (taskset prefix, the broker's scratch directory) -> (process, port)
Starter = Callable[[list[str], str], tuple[BrokerProcess, int]]


@dataclass
class Broker:
    """How to start one broker on a free loopback port."""

    name: str
    dialect: str
    executable: str | None
    start: Starter
    version: str = ""
    start_acks: Starter | None = None  # for ackqueue
    plain: bool = True  # runs pipe, queue, fanin, latency and connections
    probe_by_port: bool = False  # the started process is a wrapper; find the broker by its port


def _spawn(cmd: list[str], env: dict[str, str] | None = None) -> BrokerProcess:
    # thousands of idle connections need thousands of descriptors on both ends; a session of its
    # own, so that stopping a broker stops the processes it started (RabbitMQ's Erlang node)
    proc = BrokerProcess(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=raise_open_files_limit,
        start_new_session=True,
    )
    proc.lines = []
    return proc


def _wait_for_line(proc: BrokerProcess, pattern: re.Pattern[str]) -> re.Match[str]:
    """Read the broker's log (into ``proc.lines``) until a line matches ``pattern``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        proc.lines.append(line)
        match = pattern.search(line)
        if match:
            return match
    proc.kill()
    raise RuntimeError(f"{proc.args!r} did not start: {''.join(proc.lines)}")


def _free_port() -> int:
    # redis-server cannot pick its own port, so take one the kernel just handed out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def _compile_pigeon() -> None:
    """Compile Pigeon's modules to bytecode once, as pip does when it installs the package: with
    PYTHONDONTWRITEBYTECODE set (or a source tree that is not writable) every start would compile
    them again, about 40 ms of every restart measured by benchmarks/recovery.py."""
    compileall.compile_dir(os.path.dirname(pigeon.__file__), quiet=1)


def _start_pigeon(pin: list[str], scratch: str, *flags: str) -> tuple[BrokerProcess, int]:
    _compile_pigeon()
    proc = _spawn([*pin, sys.executable, "-m", "pigeon", "--port", "0", "--loop", "uvloop", *flags])
    return proc, int(_wait_for_line(proc, re.compile(r"listening on \S+:(\d+)")).group(1))


def pigeon_with(*flags: str) -> Starter:
    """Pigeon started with ``flags`` (benchmarks/frames.py: a ``--max-line`` that takes 1 MiB lines)."""

    def start(pin: list[str], scratch: str) -> tuple[BrokerProcess, int]:
        return _start_pigeon(pin, scratch, *flags)

    return start


def _pigeon_durable(fsync: str | None) -> Starter:
    """Pigeon with a data directory in the scratch directory and ``--fsync fsync``; None: in memory."""

    def start(pin: list[str], scratch: str) -> tuple[BrokerProcess, int]:
        flags = ["--data-dir", os.path.join(scratch, "data"), "--fsync", fsync] if fsync else []
        return _start_pigeon(pin, scratch, *ROOMY, *flags)

    return start


def _go_env() -> dict[str, str]:
    # Go sizes GOMAXPROCS by the CPU affinity it starts with: 1 under taskset, which serialises
    # nats-server's reading, routing and writing goroutines on one thread and makes JetStream write
    # every delivery on its own. Pinned or not, it gets the machine's count, as it would unpinned.
    return os.environ | {"GOMAXPROCS": str(os.cpu_count() or 1)}


def _start_nats(pin: list[str], scratch: str) -> tuple[BrokerProcess, int]:
    proc = _spawn([*pin, "nats-server", "-a", "127.0.0.1", "-p", "-1"], _go_env())
    return proc, int(_wait_for_line(proc, re.compile(r"client connections on \S+:(\d+)")).group(1))


def _start_jetstream(pin: list[str], scratch: str) -> tuple[BrokerProcess, int]:
    # memory streams only, but JetStream wants a store directory all the same
    proc = _spawn([*pin, "nats-server", "-js", "-sd", scratch, "-a", "127.0.0.1", "-p", "-1"], _go_env())
    return proc, int(_wait_for_line(proc, re.compile(r"client connections on \S+:(\d+)")).group(1))


def _start_rabbitmq(pin: list[str], scratch: str) -> tuple[BrokerProcess, int]:
    """A throwaway RabbitMQ node: its own name, port and directories, no plugins, logging to stdout.

    Its ports are kept in ``scratch``: the node's name (and so its database) follows its port, so
    a restart on the same directory is the same node, with its durable queues.
    """
    ports_file = os.path.join(scratch, "ports")
    if os.path.exists(ports_file):
        with open(ports_file) as f:
            port, dist_port = (int(word) for word in f.read().split())
    else:
        port, dist_port = _free_port(), _free_port()
        with open(ports_file, "w") as f:
            f.write(f"{port} {dist_port}\n")
    with open(os.path.join(scratch, "enabled_plugins"), "w") as f:
        f.write("[].\n")
    if os.geteuid() == 0:
        # rabbitmq-server started as root drops to the rabbitmq user, who must own its directories
        shutil.chown(scratch, "rabbitmq")
        shutil.chown(os.path.join(scratch, "enabled_plugins"), "rabbitmq")
    env = os.environ | {
        "RABBITMQ_NODENAME": f"pigeonbench{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": os.path.join(scratch, "mnesia"),
        "RABBITMQ_LOG_BASE": os.path.join(scratch, "log"),
        "RABBITMQ_LOGS": "-",
        "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(scratch, "enabled_plugins"),
    }
    proc = _spawn([*pin, "rabbitmq-server"], env)
    _wait_for_line(proc, re.compile(r"Server startup complete"))
    return proc, port


def _start_redis(pin: list[str], scratch: str, *flags: str) -> tuple[BrokerProcess, int]:
    port = _free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = _spawn([*pin, *cmd, *(flags or ("--appendonly", "no"))])
    _wait_for_line(proc, re.compile(r"Ready to accept connections"))
    return proc, port


def _redis_aof(fsync: str) -> Starter:
    """Redis with its append-only file in the scratch directory, ``appendfsync fsync``."""

    def start(pin: list[str], scratch: str) -> tuple[BrokerProcess, int]:
        return _start_redis(pin, scratch, "--dir", scratch, "--appendonly", "yes", "--appendfsync", fsync)

    return start


def _start_sink(pin: list[str], scratch: str) -> tuple[BrokerProcess, int]:
    proc = _spawn([*pin, sys.executable, "-m", "pigeon.bench.sink", "--port", "0"])
    return proc, int(_wait_for_line(proc, re.compile(r"listening on \S+:(\d+)")).group(1))


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def brokers(include_sink: bool) -> list[Broker]:
    """Every broker to measure, Pigeon first; ``executable`` None marks one that is not installed."""
    found = [
        Broker("pigeon", "pigeon", sys.executable, _start_pigeon, f"pigeon {__version__}"),
        Broker("nats", "nats", shutil.which("nats-server"), _start_nats, start_acks=_start_jetstream),
        Broker("redis", "redis", shutil.which("redis-server"), _start_redis),
        Broker(
            "rabbitmq",
            "rabbitmq",
            shutil.which("rabbitmq-server"),
            _start_rabbitmq,
            plain=False,
            probe_by_port=True,
        ),
    ]
    if include_sink:
        found.append(
            Broker(
                "ceiling",
                "pigeon",
                sys.executable,
                _start_sink,
                "null broker (pigeon.bench.sink)",
            )
        )
    for b in found[1:3]:
        if b.executable:
            b.version = _version([b.executable, "--version"])
    if found[3].executable:
        found[3].version = "rabbitmq-server " + _version(
            ["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"]
        )
    return found


def durable_brokers() -> list[Broker]:
    """The brokers of the durable table, each flavour a broker of its own (start_acks unused)."""
    peers = {b.name: b for b in brokers(include_sink=False)}
    pigeon = peers["pigeon"]
    found = [
        replace(pigeon, name="pigeon-memory", start=_pigeon_durable(None)),
        replace(pigeon, name="pigeon-everysec", start=_pigeon_durable("everysec")),
        replace(pigeon, name="pigeon-always", start=_pigeon_durable("always")),
        replace(peers["redis"], name="redis-everysec", start=_redis_aof("everysec")),
        replace(peers["redis"], name="redis-always", start=_redis_aof("always")),
        replace(peers["rabbitmq"], plain=True),
        replace(peers["nats"], name="jetstream", start=_start_jetstream),
    ]
    return [replace(b, start_acks=None) for b in found]


@dataclass
class Started:
    """A broker process started by ``start_broker``."""

    proc: BrokerProcess
    port: int
    pid: int | None  # None: the broker must be found by its listening port
    tree: list[psutil.Process]  # the node found by its port, and its children (RabbitMQ)
    drain: threading.Thread


def start_broker(broker: Broker, pin: list[str], scratch: str, acks: bool = False) -> Started:
    """Start ``broker`` (the ackqueue flavour if ``acks``) with its files in ``scratch``."""
    start = broker.start_acks if acks and broker.start_acks else broker.start
    proc, port = start(pin, scratch)
    # keep reading its log, so a chatty broker never blocks on a full pipe
    drain = threading.Thread(target=_drain, args=(proc,), daemon=True)
    drain.start()
    # rabbitmq-server as root runs its node in a session of its own: stop it by its process tree
    node = BrokerProbe(None, port).process if broker.probe_by_port else None
    tree = [node, *node.children(recursive=True)] if node is not None else []
    return Started(proc, port, None if broker.probe_by_port else proc.pid, tree, drain)


def stop_broker(started: Started, sig: int = signal.SIGTERM) -> None:
    """Stop a started broker with ``sig`` (SIGKILL: as a crash would), every process it started too."""
    _stop_group(started.proc, sig)
    for p in started.tree:
        with suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    _, alive = psutil.wait_procs(started.tree, timeout=20)
    for p in alive:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    try:
        started.proc.wait(20)
    except subprocess.TimeoutExpired:
        _stop_group(started.proc, signal.SIGKILL)
        started.proc.wait()
    started.drain.join(10)


@contextmanager
def running(broker: Broker, pin: list[str], acks: bool = False) -> Iterator[tuple[int | None, int]]:
    """A fresh broker process (the ackqueue flavour if ``acks``): yields (pid, port); stopped afterwards.

    The pid is None when the broker must be found by its listening port.
    """
    with tempfile.TemporaryDirectory(prefix=f"pigeon-bench-{broker.name}-") as scratch:
        started = start_broker(broker, pin, scratch, acks)
        try:
            yield started.pid, started.port
        finally:
            stop_broker(started)


def _stop_group(proc: subprocess.Popen[str], sig: int) -> None:
    # the broker's own session (see _spawn): the process and whatever it started
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _drain(proc: BrokerProcess) -> None:
    assert proc.stdout is not None
    proc.lines.extend(proc.stdout)
    proc.stdout.close()
