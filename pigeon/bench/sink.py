"""A null broker that measures the load generator's own ceiling.

It answers CONNECT and SUBSCRIBE like Pigeon, then does as little as a broker
possibly could: a subscriber gets prebuilt MESSAGE lines as fast as the socket
takes them, and a publisher's bytes are read, their lines counted, and as many
prebuilt PUBLISHED lines sent back. ``pigeon-cli bench --workloads pipe``
against it shows the most the generator can count on this machine; a broker
measured near that figure is being held back by the generator, not by itself.

Run ``python -m pigeon.bench.sink --port 0``; it prints the port it listens on.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
from collections.abc import Sequence

from pigeon.bench.load import READ_BYTES
from pigeon.protocol import DEFAULT_HOST

CHUNK_BYTES = 256 * 1024  # bytes of MESSAGE lines per sendall


def _stream(sock: socket.socket, topic: bytes, size: int) -> None:
    line = b"MESSAGE %s %s\n" % (topic, b"x" * size)
    chunk = line * max(1, CHUNK_BYTES // len(line))
    while True:
        sock.sendall(chunk)


def _discard(sock: socket.socket, topic: bytes, pending: bytes) -> None:
    ack = b"PUBLISHED %s\n" % topic
    acks = ack * (READ_BYTES // 8)
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    lines = pending.count(b"\n")
    while True:
        if lines:
            sock.sendall(acks[: lines * len(ack)])
        n = sock.recv_into(view)
        if n == 0:
            return
        lines = buf.count(b"\n", 0, n)


def _serve(sock: socket.socket, size: int) -> None:
    """Speak just enough of the protocol to reach the streaming or discarding phase."""
    buf = b""
    try:
        while True:
            while b"\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            line, _, buf = buf.partition(b"\n")
            words = line.split()
            if not words:
                continue
            verb = words[0].upper()
            if verb == b"CONNECT":
                sock.sendall(b"CONNECTED c1\n")
            elif verb == b"SUBSCRIBE" and len(words) == 3:
                sock.sendall(b"SUBSCRIBED %s\n" % words[2])
                _stream(sock, words[2], size)
            elif verb == b"PUBLISH" and len(words) >= 3:
                _discard(sock, words[2], line + b"\n" + buf)
                return
            else:
                sock.sendall(b"ERROR the sink only takes CONNECT, SUBSCRIBE and PUBLISH\n")
    except OSError:
        pass
    finally:
        sock.close()


def serve(host: str, port: int, size: int, ready: threading.Event | None = None) -> None:
    """Accept connections forever, a thread each; prints the bound address first."""
    listener = socket.create_server((host, port))
    print(f"sink listening on {host}:{listener.getsockname()[1]}", flush=True)
    if ready is not None:
        ready.set()
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve, args=(sock, size), daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pigeon.bench.sink``."""
    parser = argparse.ArgumentParser(prog="python -m pigeon.bench.sink", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--size", type=int, default=64, help="message bytes streamed to subscribers")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.host, args.port, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
