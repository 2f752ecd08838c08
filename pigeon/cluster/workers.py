"""``pigeon --workers N``: N node processes behind one port (SO_REUSEPORT) forming one cluster.

The supervisor (this process) starts an etcd of its own on free loopback ports when no ``--cluster``
is given (its data in a temporary directory, removed at exit), picks the port when ``--port 0``,
and starts each worker as ``pigeon ... --port P --reuse-port --cluster E --node-name NAME-wI
--node-port 0`` (the node port is how the other workers, and redirected clients, reach that very
process). The kernel spreads new connections over the workers; a worker that dies is started again
and rejoins. SIGTERM, SIGINT and SIGQUIT stop every worker, then etcd.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from pigeon._version import __version__
from pigeon.cluster.etcd import EtcdProcess, free_port
from pigeon.server.protocol import format_address

log = logging.getLogger("pigeon")

# flags the supervisor sets for each worker itself, and how many values each takes
_OWN_FLAGS = {
    "--workers": 1,
    "--cluster": 1,
    "--node-name": 1,
    "--node-port": 1,
    "--advertise": 1,
    "--data-dir": 1,
    "--http-port": 1,
}

WORKER_START_TIMEOUT = 60.0
RESTART_DELAY = 1.0


def without_flags(argv: Sequence[str], flags: dict[str, int]) -> list[str]:
    """``argv`` without the given flags and their values (``--flag value`` and ``--flag=value``)."""
    kept: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = 0 if "=" in arg else flags[name]
            continue
        kept.append(arg)
    return kept


class Worker:
    """One worker process; its log lines go to this process's stderr."""

    def __init__(self, args: list[str], name: str) -> None:
        self.name = name
        self.listening = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pigeon", *args],
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        log.info("started worker %s (pid %d)", name, self.proc.pid)
        threading.Thread(target=self._relay, name=f"pigeon-{name}-log", daemon=True).start()

    def _relay(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if " listening on " in line:
                self.listening.set()
                # the supervisor's own line says when the whole set listens: scripts wait for that one
                line = line.replace(" listening on ", " (worker) ready on ")
            sys.stderr.write(f"[{self.name}] {line}")
            sys.stderr.flush()


def supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``args.workers`` workers until a stop signal; returns the exit code."""
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping %d workers", signal.Signals(signum).name, args.workers)
        stopping.set()

    for name in ("SIGTERM", "SIGINT", "SIGQUIT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)
    etcd = None
    endpoint = args.cluster
    if endpoint is None:
        try:
            etcd = EtcdProcess().start()
        except (OSError, RuntimeError) as exc:
            log.error("--workers without --cluster starts etcd, which failed: %s", exc)
            return 1
        endpoint = etcd.endpoint
        log.info("started etcd for the workers at %s (data in %s)", endpoint, etcd.data_dir)
    port = args.port or free_port(args.host)
    prefix = args.node_name or format_address((args.host, port))
    base = without_flags(argv, _OWN_FLAGS)

    def worker_args(i: int) -> list[str]:
        own = ["--port", str(port), "--reuse-port", "--cluster", endpoint, "--node-name", f"{prefix}-w{i}"]
        own += ["--node-port", "0"]
        if args.data_dir is not None:
            own += ["--data-dir", os.path.join(args.data_dir, f"w{i}")]
        if args.http_port is not None and i == 0:
            own += ["--http-port", str(args.http_port)]  # one HTTP listener: the first worker's
        return [*base, *own]

    workers = [Worker(worker_args(i), f"w{i}") for i in range(args.workers)]
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        for worker in workers:
            while not worker.listening.wait(0.1):
                if stopping.is_set() or worker.proc.poll() is not None or time.monotonic() > deadline:
                    log.error("worker %s did not start", worker.name)
                    return 1
        log.info(
            "pigeon %s listening on %s (workers): %d node processes, etcd %s",
            __version__,
            format_address((args.host, port)),
            args.workers,
            endpoint,
        )
        while not stopping.wait(0.2):
            for i, worker in enumerate(workers):
                if worker.proc.poll() is not None and not stopping.is_set():
                    log.warning(
                        "worker %s exited with %s: starting it again", worker.name, worker.proc.returncode
                    )
                    time.sleep(RESTART_DELAY)
                    workers[i] = Worker(worker_args(i), worker.name)
        return 0
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.terminate()
        for worker in workers:
            try:
                worker.proc.wait(20)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
        if etcd is not None:
            etcd.close()
