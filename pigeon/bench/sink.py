"""A null broker that measures the load generator's own ceiling.

It answers CONNECT and SUBSCRIBE like Pigeon, then does as little as a broker
possibly could: a subscriber gets prebuilt MESSAGE lines as fast as the socket
takes them, an acknowledged subscriber (``SUBSCRIBE <id> <topic> ACK [PREFETCH
<n>]``) DELIVER lines numbered 1, 2, ... as fast as its ACK ranges let it (only
the last ACK line of each read is looked at), and a publisher's bytes are read,
their lines counted, and as many prebuilt PUBLISHED lines sent back. ``pigeon-cli bench --workloads pipe``
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
DEFAULT_PREFETCH = 1000  # as pigeon's --default-prefetch


def _stream(sock: socket.socket, topic: bytes, size: int) -> None:
    line = b"MESSAGE %s %s\n" % (topic, b"x" * size)
    chunk = line * max(1, CHUNK_BYTES // len(line))
    while True:
        sock.sendall(chunk)


def _deliver(sock: socket.socket, topic: bytes, size: int, prefetch: int) -> None:
    """DELIVER lines with tags 1, 2, ..., never more than ``prefetch`` of them unacknowledged."""
    acked = [0]
    changed = threading.Condition()
    threading.Thread(target=_read_acks, args=(sock, acked, changed), daemon=True).start()
    blocks = _DeliverBlocks(topic, size)
    tag = 0
    while True:
        with changed:
            while tag - acked[0] >= prefetch:
                changed.wait()
            room = prefetch - (tag - acked[0])
        lines = blocks.lines(tag + 1, room)
        sock.sendall(lines)
        tag += blocks.count


class _DeliverBlocks:
    """DELIVER lines by blocks of 1,000 tags, made by one ``bytes.replace`` of a template each.

    Formatting a line per tag in Python would make the sink, not the generator, the limit. Within
    block k (tags k000 to k999) the lines differ only in their last three digits, so they share one
    template with a marker for the leading digits, and all have the same length.
    """

    def __init__(self, topic: bytes, size: int) -> None:
        self._prefix = b"DELIVER %s " % topic
        self._suffix = b" 1 %s\n" % (b"x" * size)
        self._template = b"".join(b"%s\0%03d%s" % (self._prefix, j, self._suffix) for j in range(1000))
        self._block = 0
        self._data = b""
        self.count = 0  # lines in the last ``lines`` result

    def lines(self, first: int, most: int) -> bytes:
        """Up to ``most`` lines from tag ``first`` on, not past the end of its block."""
        block, start = divmod(first, 1000)
        self.count = min(most, 1000 - start)
        if block == 0:  # tags 1 to 999: no leading digits, lines of three widths; formatted once each
            tags = range(first, first + self.count)
            return b"".join(b"%s%d%s" % (self._prefix, t, self._suffix) for t in tags)
        if block != self._block:
            self._block = block
            self._data = self._template.replace(b"\0", b"%d" % block)
        width = len(self._data) // 1000
        return self._data[start * width : (start + self.count) * width]


def _read_acks(sock: socket.socket, acked: list[int], changed: threading.Condition) -> None:
    """Keep ``acked[0]`` at the last tag of the last ``ACK <id> <tag>|<first>-<last>`` line read."""
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    carry = b""
    with contextlib.suppress(OSError):
        while True:
            n = sock.recv_into(view)
            if n == 0:
                return
            data = carry + buf[:n]
            end = data.rfind(b"\n")
            if end < 0:
                carry = data
                continue
            last = data[data.rfind(b"\n", 0, end) + 1 : end].split()
            carry = data[end + 1 :]
            if len(last) == 3 and last[0] == b"ACK":
                with changed:
                    acked[0] = int(last[2].rpartition(b"-")[2])
                    changed.notify()


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
            elif verb == b"SUBSCRIBE" and len(words) >= 4 and words[3].upper() == b"ACK":
                sock.sendall(b"SUBSCRIBED %s\n" % words[2])
                prefetch = int(words[5]) if len(words) == 6 else DEFAULT_PREFETCH
                _deliver(sock, words[2], size, prefetch)
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
