"""What a cluster node's upstream costs to relay an owner's answers to its client, in instructions.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python benchmarks/router_relay.py 0
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python benchmarks/router_relay.py 20

Each round hands ``Upstream.data_received`` 1,000 ``PUBLISHED`` lines (replies to a publisher) and
1,000 ``MSG`` frames of 64 bytes (deliveries), as an owner sends them; the router behind it is a stub
that drops what it is given. The difference of the two counts divided by 20,000 is the instructions
per (reply, frame) pair, which the machine's load does not change: run it on two trees to compare.
"""

from __future__ import annotations

import sys

from pigeon.cluster.router import Upstream


class StubRouter:
    """What an Upstream calls on its client's connection, doing nothing."""

    protocol = 2

    def relay_chunk(self, chunk: bytes) -> None:
        """Drop what would go to the client."""

    def source_idle(self, node: str) -> None:
        """Nothing waits for the owner."""


def main() -> None:
    upstream = Upstream(StubRouter(), "n1")  # type: ignore[arg-type]
    upstream.client_id = b"c1"
    published = b"PUBLISHED topic3\n" * 1000
    frames = b"".join(b"MSG topic%d 64\n%s\n" % (i % 8, b"x" * 64) for i in range(1000))
    for _ in range(int(sys.argv[1])):
        upstream.outstanding = 1000
        upstream.data_received(published)
        upstream.data_received(frames)


if __name__ == "__main__":
    main()
