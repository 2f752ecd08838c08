"""etcd for the cluster: the ``--cluster`` endpoint list, and a local etcd process for tests and tools."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from types import TracebackType

ETCD_START_TIMEOUT = 20.0


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """``etcd://host:port[,host:port...]`` (the scheme may be left out) as (host, port) pairs.

    Raises ValueError for an empty list or an endpoint without a valid port.
    """
    rest = text.strip()
    if rest.startswith("etcd://"):
        rest = rest[len("etcd://") :]
    endpoints: list[tuple[str, int]] = []
    for item in rest.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not an etcd endpoint host:port: {item.strip()!r}")
        endpoints.append((host.strip("[]"), int(port)))
    return endpoints


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (a small race remains until it is bound)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def etcd_binary() -> str | None:
    """The path of the ``etcd`` server program, or None when it is not installed."""
    return shutil.which("etcd")


class EtcdProcess:
    """A single-member etcd on free loopback ports with its data in a temporary directory.

    ``endpoint`` is its client address as ``etcd://127.0.0.1:PORT``. ``stop()`` ends it (and keeps
    its data, so ``start()`` brings the same etcd back on the same ports); ``close()`` also removes
    the data. For tests and for ``pigeon --workers`` without ``--cluster``.
    """

    def __init__(self, data_dir: str | None = None) -> None:
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError("etcd is not installed (apt-get install etcd-server)")
        self._binary = binary
        self._own_dir = data_dir is None
        self.data_dir = data_dir if data_dir is not None else tempfile.mkdtemp(prefix="pigeon-etcd-")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The ``--cluster`` value that reaches this etcd."""
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self) -> EtcdProcess:
        """Start etcd and wait until it answers /health; raises RuntimeError when it does not."""
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            self._binary,
            "--name",
            "pigeon-etcd",
            "--data-dir",
            os.path.join(self.data_dir, "etcd"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"pigeon-etcd={peer}",
            "--log-level",
            "error",
        ]
        with open(os.path.join(self.data_dir, "etcd.log"), "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + ETCD_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: see {self.data_dir}/etcd.log")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{client}/health", timeout=1) as reply:
                if b'"true"' in reply.read():
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {ETCD_START_TIMEOUT} s")

    def stop(self) -> None:
        """End the etcd process (SIGTERM, then SIGKILL after 10 s), keeping its data."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Stop etcd and remove its data directory if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
