"""The core's log (pigeon/core/log): checksums, records, segments that are done (issue 13)."""

from __future__ import annotations

import os
import struct

from pigeon._core import Broker, checksum_in_hardware, record_checksum


def test_the_record_checksum_is_crc32c() -> None:
    assert record_checksum(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert record_checksum(b"") == 0


def test_the_instruction_and_the_fallback_agree() -> None:
    for n in range(0, 200):
        data = os.urandom(n)
        assert record_checksum(data) == record_checksum(data, hardware=False)
    if os.uname().machine in ("x86_64", "aarch64"):
        assert checksum_in_hardware()


class _Log:
    """A durable broker whose records land in memory, one list entry per write."""

    def __init__(self, max_disk: int = 0) -> None:
        self.writes: list[tuple[bytes, bool]] = []
        self.broker = Broker(durable=True, max_disk=max_disk)
        self.broker.on_log = lambda view, new_segment: self.writes.append((bytes(view), new_segment))
        self.broker.on_sync = lambda position: None

    def records(self) -> list[tuple[int, bytes]]:
        """(kind, body after the kind) of every record written, each checked against its checksum."""
        found = []
        for data, _ in self.writes:
            pos = 0
            while pos < len(data):
                size, crc = struct.unpack_from("<II", data, pos)
                body = data[pos + 8 : pos + 8 + size]
                assert record_checksum(body) == crc
                found.append((body[0], body[1:]))
                pos += 8 + size
        return found


def _open(b: Broker, chunks: list[bytes]) -> int:
    h = b.open(chunks.append)
    b.feed(h, b"CONNECT\n")
    return h


def test_a_publish_taken_by_a_plain_subscriber_is_recorded_then_done() -> None:
    log = _Log()
    b = log.broker
    out: list[bytes] = []
    sub = _open(b, out)
    b.feed(sub, b"SUBSCRIBE c1 t\n")
    pub = _open(b, [])
    b.feed(pub, b"PUBLISH c2 t hello\n")
    b.flush()
    kinds = [kind for kind, _ in log.records()]
    assert kinds[0] == 1 and 2 in kinds  # PUBLISH, then DONE
    assert b.log_state["live_messages"] == 0
    assert log.writes[0][1] is True  # the first write starts a segment


def test_segments_whose_messages_are_all_done_can_be_deleted_oldest_first() -> None:
    log = _Log(max_disk=8 * 4096)  # segments of 4096 bytes
    b = log.broker
    pub = _open(b, [])
    for i in range(3):  # three segments, one message each, nobody takes them
        b.feed(pub, b"PUBLISH c1 t%d %s\n" % (i, b"x" * 4000))
        b.flush()
    assert [new for _, new in log.writes] == [True, True, True]
    assert b.log_state["segment_live"] == [1, 1, 1]
    assert b.log_deletable() == 0
    sub = _open(b, [])
    b.feed(sub, b"SUBSCRIBE c2 t1\n")  # the message of the middle segment is done
    b.flush()
    assert b.log_state["segment_live"] == [1, 0, 1]
    assert b.log_deletable() == 0  # the oldest still holds one: the log is deleted from its start
    b.feed(sub, b"SUBSCRIBE c2 t0\n")
    b.flush()
    assert b.log_deletable() == 2
    b.log_deleted(2)
    assert b.log_state["segment_live"] == [1]
