"""Persistence over real processes: restarts, kill -9, torn tails, corruption, the disk limit (issue 13).

Every test runs ``pigeon --data-dir`` as a subprocess and talks to it over TCP.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pigeon.server.store import HEADER, SEGMENT_SUFFIX
from pigeon.testing import LineClient, ServerProcess, inspect_data_dir

DEADLINE = 30.0


def _segments(data: Path) -> list[Path]:
    return sorted(p for p in data.iterdir() if p.suffix == SEGMENT_SUFFIX)


def _records(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of each record of a segment."""
    raw = path.read_bytes()
    pos, found = len(HEADER), []
    while pos < len(raw):
        body = struct.unpack_from("<I", raw, pos)[0]
        found.append((pos, 8 + body))
        pos += 8 + body
    return found


def _stats(client: LineClient) -> dict[str, object]:
    reply = client.ask("STATS").decode()
    assert reply.startswith("STATS "), reply
    return dict(json.loads(reply[6:]))


def _publish(client: LineClient, topic: str, bodies: list[str]) -> None:
    client.send("".join(f"PUBLISH {client.client_id} {topic} {b}\n" for b in bodies).encode())
    for _ in bodies:
        assert client.line() == f"PUBLISHED {topic}".encode()


def _drain(client: LineClient, topic: str, count: int) -> list[str]:
    """Subscribe (plain) and read ``count`` messages of ``topic``."""
    assert client.ask(f"SUBSCRIBE {client.client_id} {topic}") == f"SUBSCRIBED {topic}".encode()
    prefix = f"MESSAGE {topic} ".encode()
    bodies = []
    for line in client.lines(count):
        assert line.startswith(prefix), line
        bodies.append(line[len(prefix) :].decode())
    return bodies


@contextmanager
def _server(data: Path, *args: str) -> Iterator[ServerProcess]:
    server = ServerProcess("--data-dir", str(data), *args)
    try:
        yield server
    finally:
        server.stop()


def _recovered_line(server: ServerProcess) -> str:
    """The start-up line saying what was recovered (logged once every message is back)."""
    return server.wait_for_log(" topics from ")


# ---------------------------------------------------------------- restart, lock, inspect


def test_a_graceful_restart_keeps_every_message_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with _server(data) as server:
        pub = server.client()
        pub.connect()
        for topic in ("a", "b"):
            _publish(pub, topic, [f"{topic}{i}" for i in range(100)])
    with _server(data) as server:
        assert "recovered 200 messages on 2 topics from" in _recovered_line(server)
        sub = server.client()
        sub.connect()
        assert _drain(sub, "a", 100) == [f"a{i}" for i in range(100)]
        assert _drain(sub, "b", 100) == [f"b{i}" for i in range(100)]
        assert _stats(sub)["backlog_messages"] == 0
    with _server(data) as server:
        assert "recovered 0 messages on 0 topics" in _recovered_line(server)


def test_a_second_server_on_the_same_data_dir_refuses_to_start(tmp_path: Path) -> None:
    with _server(tmp_path / "data"):
        second = subprocess.run(
            [sys.executable, "-m", "pigeon", "--port", "0", "--data-dir", str(tmp_path / "data")],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    assert second.returncode == 1
    assert "is in use by another pigeon" in second.stderr


def test_inspect_summarises_a_data_dir_without_serving(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with _server(data) as server:
        pub = server.client()
        pub.connect()
        _publish(pub, "jobs", ["x" * 10] * 3)
        _publish(pub, "mail", ["y"])
    inspected = inspect_data_dir(data, DEADLINE)
    assert inspected.returncode == 0, inspected.stderr
    shown = inspected.stdout
    assert "messages not done: 4 on 2 topics" in shown
    assert f"oldest message: published {time.strftime('%Y-%m-%d', time.gmtime())}" in shown
    assert "  jobs: 3 messages, 30 bytes" in shown and "  mail: 1 messages, 1 bytes" in shown


def test_inspect_changes_nothing_and_refuses_a_running_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with _server(data) as server:
        pub = server.client()
        pub.connect()
        _publish(pub, "jobs", ["x" * 10] * 3)
        refused = inspect_data_dir(data, DEADLINE)
        assert refused.returncode == 1 and "is in use by a pigeon server" in refused.stderr
    last = _segments(data)[-1]
    with last.open("ab") as f:
        f.write(b"\x40\x00\x00\x00torn")  # a record cut short: a crash in the middle of a write
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(data.iterdir())}
    shown = inspect_data_dir(data, DEADLINE)
    assert shown.returncode == 0, shown.stderr
    assert f"torn tail: {last.name} at offset " in shown.stdout and "a start cuts it off" in shown.stdout
    assert "messages not done: 3 on 1 topics" in shown.stdout
    after = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(data.iterdir())}
    assert after == before


def test_without_a_data_dir_nothing_is_kept(tmp_path: Path) -> None:
    server = ServerProcess()
    pub = server.client()
    pub.connect()
    _publish(pub, "jobs", ["x"])
    server.stop()
    assert any("dropping 1 messages" in line for line in server.log)


# ---------------------------------------------------------------- acknowledged work and its attempts


def test_an_unacked_delivery_comes_back_after_a_crash_with_its_attempt_counted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess("--data-dir", str(data), "--fsync", "always")
    pub, sub = server.client(), server.client()
    pub.connect()
    sub.connect()
    _publish(pub, "jobs", ["one", "two"])
    assert sub.ask(f"SUBSCRIBE {sub.client_id} jobs ACK") == b"SUBSCRIBED jobs"
    assert sub.lines(2) == [b"DELIVER jobs 1 1 one", b"DELIVER jobs 2 1 two"]
    sub.send(f"ACK {sub.client_id} 1")
    assert sub.ask("PING") == b"PONG"  # the ACK was read before the PING
    time.sleep(0.1)  # the DONE record is written at the end of the pass that read it
    server.stop(signal.SIGKILL)
    with _server(data) as server:
        assert "recovered 1 messages on 1 topics" in _recovered_line(server)
        sub = server.client()
        sub.connect()
        assert sub.ask(f"SUBSCRIBE {sub.client_id} jobs ACK") == b"SUBSCRIBED jobs"
        assert sub.line() == b"DELIVER jobs 1 2 two"


# ---------------------------------------------------------------- kill -9 at random moments


class _Publisher(threading.Thread):
    """Pipelines unique bodies with at most ``window`` unconfirmed; ``confirmed`` counts PUBLISHED."""

    def __init__(self, server: ServerProcess, prefix: str, window: int = 1000) -> None:
        super().__init__(daemon=True)
        client = LineClient(server.host, server.port)
        client.connect()
        self.sock = client.sock
        self.command = f"PUBLISH {client.client_id} jobs {prefix}-".encode()
        self.window = window
        self.sent = self.confirmed = 0

    def run(self) -> None:
        buf = b""
        try:
            while True:
                if self.sent - self.confirmed < self.window:
                    batch = range(self.sent, self.sent + 100)
                    self.sock.sendall(b"".join(b"%s%d\n" % (self.command, i) for i in batch))
                    self.sent += 100
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
                self.confirmed += buf.count(b"PUBLISHED jobs\n")
                buf = buf[buf.rfind(b"\n") + 1 :]
        except OSError:
            return


class _Consumer(threading.Thread):
    """Takes DELIVER lines of ``jobs`` and acks each batch it read as it goes."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.client = LineClient(server.host, server.port)
        self.client.connect()
        self.client.send(f"SUBSCRIBE {self.client.client_id} jobs ACK PREFETCH 1000")
        self.bodies: list[str] = []
        self.acked: list[str] = []

    def run(self) -> None:
        cid = self.client.client_id.encode()
        buf = b""
        try:
            while True:
                chunk = self.client.sock.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
                cut = buf.rfind(b"\n") + 1
                lines, buf = buf[:cut].split(b"\n")[:-1], buf[cut:]
                acks = []
                got = []
                for line in lines:
                    if line.startswith(b"DELIVER "):
                        _, _, tag, _, body = line.split(b" ", 4)
                        acks.append(b"ACK %s %s\n" % (cid, tag))
                        got.append(body.decode())
                self.bodies.extend(got)
                if acks:
                    self.client.sock.sendall(b"".join(acks))
                    self.acked.extend(got)
        except OSError:
            return


def _publisher_lines(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_kill_9_at_random_moments_loses_no_confirmed_message(tmp_path: Path, fsync: str) -> None:
    data = tmp_path / "data"
    rng = random.Random(1313)
    confirmed: list[str] = []
    delivered: list[str] = []
    kills = 20
    for round_ in range(kills):
        server = ServerProcess("--data-dir", str(data), "--fsync", fsync)
        consumers = [_Consumer(server) for _ in range(2)]
        publisher = _Publisher(server, f"r{round_}")
        for worker in (*consumers, publisher):
            worker.start()
        time.sleep(rng.uniform(0.05, 1.0))
        server.stop(signal.SIGKILL)
        for worker in (*consumers, publisher):
            worker.join(DEADLINE)
        # PUBLISHED replies come in order: the first ``confirmed`` bodies of the round were confirmed
        confirmed += _publisher_lines(f"r{round_}", publisher.confirmed)
        delivered += [b for c in consumers for b in c.bodies]
    # the last start: take everything left, ack it, stop cleanly, and find nothing on the next start
    server = ServerProcess("--data-dir", str(data), "--fsync", fsync)
    consumer = _Consumer(server)
    consumer.start()
    probe = server.client()
    probe.connect()
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        stats = _stats(probe)
        # while the log is being recovered, an empty backlog says nothing about what is left
        if stats["backlog_messages"] == 0 and stats["unacked"] == 0 and not stats["log_recovering"]:
            break
        time.sleep(0.05)
    server.stop()
    consumer.join(DEADLINE)
    delivered += consumer.bodies
    lost = set(confirmed) - set(delivered)
    duplicates = len(delivered) - len(set(delivered))
    print(
        f"fsync {fsync}: {kills} kills, {len(confirmed)} confirmed, {len(delivered)} deliveries, "
        f"{duplicates} duplicates, {len(lost)} lost"
    )
    assert len(confirmed) > 1000 and not lost
    with _server(data) as server:
        assert "recovered 0 messages on 0 topics" in _recovered_line(server)


# ---------------------------------------------------------------- torn tails and corruption


def _log_of(tmp_path: Path, bodies: list[str]) -> Path:
    """A data directory whose log holds ``bodies`` on topic jobs (a graceful stop)."""
    data = tmp_path / "made"
    with _server(data) as server:
        pub = server.client()
        pub.connect()
        _publish(pub, "jobs", bodies)
    return data


@pytest.mark.slow
def test_a_torn_tail_at_every_offset_of_the_last_record_is_cut_off(tmp_path: Path) -> None:
    made = _log_of(tmp_path, ["first", "second", "third"])
    (segment,) = _segments(made)
    start, size = _records(segment)[-1]
    for cut in range(start + 1, start + size):  # at start itself the log simply ends there
        data = tmp_path / f"cut{cut}"
        shutil.copytree(made, data)
        os.truncate(data / segment.name, cut)
        with _server(data) as server:
            assert any("the torn tail" in line and f"offset {start}" in line for line in server.log), (
                server.log
            )
            sub = server.client()
            sub.connect()
            assert _drain(sub, "jobs", 2) == ["first", "second"]
            assert sub.ask("PING") == b"PONG"  # and nothing else
        shutil.rmtree(data)


def test_the_zeros_of_a_segment_made_ahead_end_it_and_a_torn_record_before_them_is_cut(
    tmp_path: Path,
) -> None:
    made = _log_of(tmp_path, ["first", "second", "third"])
    (segment,) = _segments(made)
    start, size = _records(segment)[-1]
    # a kill -9 under --fsync always leaves the rest of the segment made ahead: zeros
    whole = tmp_path / "whole"
    shutil.copytree(made, whole)
    with open(whole / segment.name, "ab") as f:
        f.write(bytes(1 << 20))
    with _server(whole) as server:
        assert not [line for line in server.log if "torn" in line], server.log
        sub = server.client()
        sub.connect()
        assert _drain(sub, "jobs", 3) == ["first", "second", "third"]
    assert (whole / segment.name).stat().st_size == start + size  # the zeros are cut off
    # a crash in the middle of the last write: its record cut short, the zeros after it
    torn = tmp_path / "torn"
    shutil.copytree(made, torn)
    os.truncate(torn / segment.name, start + size // 2)
    with open(torn / segment.name, "ab") as f:
        f.write(bytes(1 << 20))
    with _server(torn) as server:
        assert any("the torn tail" in line and f"offset {start}" in line for line in server.log), server.log
        sub = server.client()
        sub.connect()
        assert _drain(sub, "jobs", 2) == ["first", "second"]
        assert sub.ask("PING") == b"PONG"


def _spare_made(data: Path) -> None:
    """Wait until the server has made the next segment ahead (spare.tmp, zeros of a segment)."""
    spare = data / "spare.tmp"
    deadline = time.monotonic() + DEADLINE
    while not (spare.exists() and spare.stat().st_size == 1_000_000) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spare.stat().st_size == 1_000_000


def test_always_makes_the_next_segment_ahead_and_a_kill_leaves_nothing_to_repair(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bodies = [f"m{i:05d}-" + "x" * 60 for i in range(15_000)]  # about 1.5 MB of records
    server = ServerProcess(
        "--data-dir", str(data), "--fsync", "always", "--max-disk", "8000000"
    )  # 1 MB segments
    try:
        pub = server.client()
        pub.connect()
        _spare_made(data)
        _publish(pub, "jobs", bodies[:5000])
        (first,) = _segments(data)
        assert first.stat().st_size == 1_000_000  # the spare, renamed: records, then its zeros
        _spare_made(data)  # the next one
        for i in range(5000, len(bodies), 1000):
            _publish(pub, "jobs", bodies[i : i + 1000])
        _spare_made(data)
        done, current = _segments(data)
        start, size = _records(done)[-1]
        assert done.stat().st_size == start + size  # cut back to its last record when it was full
        assert current.stat().st_size == 1_000_000
    finally:
        server.stop(signal.SIGKILL)
    with _server(data) as server:
        assert "recovered 15000 messages on 1 topics" in _recovered_line(server)
        assert not [line for line in server.log if "torn" in line or "WARNING" in line], server.log
        sub = server.client()
        sub.connect()
        assert _drain(sub, "jobs", len(bodies)) == bodies
    assert not (data / "spare.tmp").exists()  # a graceful stop leaves no spare behind


def test_corruption_before_the_tail_stops_the_start_and_repair_keeps_the_rest(tmp_path: Path) -> None:
    bodies = [f"message-{i:03d}" for i in range(100)]
    data = _log_of(tmp_path, bodies)
    (segment,) = _segments(data)
    offset, size = _records(segment)[50]
    raw = bytearray(segment.read_bytes())
    raw[offset + size - 3] ^= 0xFF  # a byte of message 50's body
    segment.write_bytes(bytes(raw))
    refused = subprocess.run(
        [sys.executable, "-m", "pigeon", "--port", "0", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert refused.returncode == 1
    assert f"{segment}: a record whose checksum does not match at offset {offset}" in refused.stderr
    assert "--repair" in refused.stderr
    assert "Traceback" not in refused.stderr and "BufferError" not in refused.stderr, refused.stderr
    with _server(data, "--repair") as server:
        assert any("dropped" in line and "--repair" in line for line in server.log)
        assert "recovered 99 messages on 1 topics" in _recovered_line(server)
        sub = server.client()
        sub.connect()
        assert _drain(sub, "jobs", 99) == bodies[:50] + bodies[51:]
    with _server(data) as server:  # the repaired log starts as it is
        assert "recovered 0 messages" in _recovered_line(server)


# ---------------------------------------------------------------- disk space


def test_done_segments_are_deleted_so_the_directory_shrinks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # --max-disk 8 MB: segments of 1 MB
    with _server(data, "--max-disk", str(8 << 20)) as server:
        pub, sub = server.client(), server.client()
        pub.connect()
        sub.connect()
        assert sub.ask(f"SUBSCRIBE {sub.client_id} jobs") == b"SUBSCRIBED jobs"
        body = "x" * 1000
        for _ in range(20):
            _publish(pub, "jobs", [body] * 500)  # 10 MB in all, more than the limit
            sub.lines(500)
        deadline = time.monotonic() + DEADLINE
        while len(_segments(data)) > 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_segments(data)) <= 2
        assert sum(p.stat().st_size for p in _segments(data)) <= 2 << 20


def test_publishers_wait_at_max_disk_and_go_on_once_a_consumer_drains(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with _server(data, "--max-disk", str(1 << 20)) as server:
        pub, probe = server.client(), server.client()
        pub.connect()
        probe.connect()
        body = "y" * 1000
        pub.send("".join(f"PUBLISH {pub.client_id} jobs {body}\n" for _ in range(2000)).encode())
        deadline = time.monotonic() + DEADLINE
        while _stats(probe)["publishers_held"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = _stats(probe)
        assert stats["publishers_held"] == 1
        assert isinstance(stats["backlog_messages"], int) and stats["backlog_messages"] < 2000
        too_big = "z" * (300 << 10)  # more than a quarter of the limit: waiting cannot help
        assert probe.ask(f"PUBLISH {probe.client_id} other {too_big}").startswith(b"ERROR STORAGE_FULL ")
        sub = server.client()
        sub.connect()
        assert len(_drain(sub, "jobs", 2000)) == 2000
        assert pub.lines(2000) == [b"PUBLISHED jobs"] * 2000
        assert _stats(probe)["publishers_held"] == 0


def test_max_disk_counts_every_copy_of_a_message_to_groups(tmp_path: Path) -> None:
    data = tmp_path / "data"
    limit = 1 << 20
    with _server(data, "--max-disk", str(limit)) as server:
        pub, probe, member = server.client(), server.client(), server.client()
        for client in (pub, probe, member):
            client.connect()
        for group in range(4):
            reply = member.ask(f"SUBSCRIBE {member.client_id} fan GROUP g{group} ACK PREFETCH 1")
            assert reply == b"SUBSCRIBED fan"
        body = "f" * 55_000
        # each message is four records of 55 KB: four messages fit in the limit, the fifth waits
        # (counting one copy, it was taken and the log went past the limit)
        pub.send("".join(f"PUBLISH {pub.client_id} fan {body}\n" for _ in range(6)))
        deadline = time.monotonic() + DEADLINE
        while _stats(probe)["publishers_held"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = _stats(probe)
        assert stats["publishers_held"] == 1
        assert isinstance(stats["log_disk_bytes"], int) and 4 * 4 * 55_000 < stats["log_disk_bytes"] <= limit
        assert sum(p.stat().st_size for p in _segments(data)) <= limit
        assert pub.lines(4) == [b"PUBLISHED fan"] * 4 and pub.quiet()
        # five copies take more than a quarter of the limit: waiting cannot help
        another = server.client()
        another.connect()
        assert another.ask(f"SUBSCRIBE {another.client_id} fan GROUP g4") == b"SUBSCRIBED fan"
        assert probe.ask(f"PUBLISH {probe.client_id} fan {body}").startswith(b"ERROR STORAGE_FULL ")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs the right to mount; skipped where the environment does not allow it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_makes_publishers_wait_and_serving_resumes_when_space_returns(small_disk: Path) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3 << 20))  # about 1 MiB left for the log
    data = small_disk / "data"
    body = "d" * 1000
    count = 4000
    with _server(data, "--max-disk", str(64 << 20)) as server:
        pub, probe = server.client(), server.client()
        pub.connect()
        probe.connect()
        lines = [f"PUBLISH {pub.client_id} jobs {body}-{i}\n" for i in range(count)]
        pub.send("".join(lines[: count // 2]).encode())
        deadline = time.monotonic() + DEADLINE
        while not _stats(probe)["log_write_failed"] and time.monotonic() < deadline:
            time.sleep(0.05)
        pub.send("".join(lines[count // 2 :]).encode())  # these wait for the disk
        while _stats(probe)["publishers_held"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = _stats(probe)
        assert stats["log_write_failed"] and stats["publishers_held"] == 1
        assert probe.ask("PING") == b"PONG"  # the server keeps serving
        filler.unlink()  # space returns
        assert pub.lines(count) == [b"PUBLISHED jobs"] * count
        assert not _stats(probe)["log_write_failed"]
    with _server(data) as server:
        assert f"recovered {count} messages on 1 topics" in _recovered_line(server)
        sub = server.client()
        sub.connect()
        assert _drain(sub, "jobs", count) == [f"{body}-{i}" for i in range(count)]


@pytest.mark.slow
def test_a_million_messages_on_ten_topics_survive_a_graceful_restart_in_order(tmp_path: Path) -> None:
    data, total, topics = tmp_path / "data", 1_000_000, 10
    with _server(data, "--max-backlog", str(total), "--max-memory", str(4 << 30)) as server:
        pub = server.client(60)
        cid = pub.connect()
        for start in range(0, total, 10_000):
            pub.send(
                b"".join(
                    b"PUBLISH %s t%d %d\n" % (cid.encode(), i % topics, i)
                    for i in range(start, start + 10_000)
                )
            )
            for _ in range(10_000):
                assert pub.line().startswith(b"PUBLISHED t")
    with _server(data, "--max-backlog", str(total), "--max-memory", str(4 << 30)) as server:
        assert f"recovered {total} messages on {topics} topics" in _recovered_line(server)
        sub = server.client(60)
        sub.connect()
        for t in range(topics):
            got = _drain(sub, f"t{t}", total // topics)
            assert got == [str(i) for i in range(t, total, topics)]


def test_a_log_larger_than_max_memory_is_recovered_and_publishers_wait(tmp_path: Path) -> None:
    data = _log_of(tmp_path, ["m" * 1000] * 3000)
    with _server(data, "--max-memory", str(1 << 20)) as server:
        assert "recovered 3000 messages on 1 topics" in _recovered_line(server)
        assert any("more than --max-memory" in line for line in server.log)
        pub, sub = server.client(), server.client()
        pub.connect()
        sub.connect()
        pub.send(f"PUBLISH {pub.client_id} jobs late")  # waits until memory is back under its mark
        assert _drain(sub, "jobs", 3001) == ["m" * 1000] * 3000 + ["late"]
        assert pub.line() == b"PUBLISHED jobs"


def test_the_log_figures_reach_metrics_as_in_stats(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    from tests.monitoring import get, start_monitored

    proc, base = start_monitored("--data-dir", str(tmp_path / "data"), "--fsync", "always")
    try:
        pub = proc.client()
        pub.connect()
        _publish(pub, "jobs", ["a", "b", "c"])
        stats = _stats(pub)
        status, _, body = get(base + "metrics")
        assert status == 200
        metrics = dict(
            line.rsplit(" ", 1) for line in body.decode().splitlines() if line.startswith("pigeon_log_")
        )
        assert float(metrics["pigeon_log_live_messages"]) == stats["log_live_messages"] == 3
        assert float(metrics["pigeon_log_disk_bytes"]) == stats["log_disk_bytes"]
        assert isinstance(stats["log_disk_bytes"], int) and stats["log_disk_bytes"] > 0
        assert float(metrics["pigeon_log_writes_total"]) >= 1
        assert float(metrics["pigeon_log_syncs_total"]) >= 1  # always: PUBLISHED came after a sync
        assert float(metrics["pigeon_log_write_failed"]) == 0
        assert float(metrics["pigeon_log_recovering"]) == 0  # the PUBLISH went through: it is over
    finally:
        proc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_syncs_in_flight_while_segments_rotate_keep_serving(tmp_path: Path, fsync: str) -> None:
    # 5 MB segments (--max-disk / 8) filled by the load generator's durable publisher (1,000
    # unconfirmed) with 4 acknowledging consumers: a new segment every few hundred milliseconds,
    # often started by the busy loop before the sync thread took up the sync asked just before
    # (it synced and closed the old file, then synced it again: EBADF, and --fsync always stopped)
    with _server(tmp_path / "data", "--fsync", fsync, "--max-disk", str(40_000_000)) as server:
        bench = subprocess.run(
            [sys.executable, "-m", "pigeon.bench", "--port", str(server.port), "--workloads",
             "durable_ackqueue4", "--duration", "2", "--no-progress", "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert server.proc.poll() is None, "".join(server.log)
        assert bench.returncode == 0, bench.stderr
        (result,) = json.loads(bench.stdout)["results"]
        assert result["workload"] == "durable_ackqueue4" and result["msgs_per_s"] > 0
    assert not [line for line in server.log if "cannot sync" in line], "".join(server.log)


# ---------------------------------------------------------------- serving while the log is recovered

RECOVERING_TOTAL = 1_000_000  # two topics, a and b: enough records for about 490 passes of the restore
# segments of 25 MiB (--max-disk / 8): the log's 45 MB make a sealed segment, whose PUBLISH
# checksums a start leaves to the restore, and a last one, checked in full before serving
RECOVERING_MAX_DISK = 200 << 20


@pytest.fixture(scope="module")
def recovering_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding a-0, b-1, a-2, ... (RECOVERING_TOTAL messages) in two segments,
    made once."""
    data = tmp_path_factory.mktemp("recovering") / "data"
    limits = ("--max-backlog", str(RECOVERING_TOTAL), "--max-memory", str(4 << 30))
    with _server(data, *limits, "--max-disk", str(RECOVERING_MAX_DISK)) as server:
        pub = server.client(60)
        cid = pub.connect().encode()
        for start in range(0, RECOVERING_TOTAL, 20_000):
            batch = range(start, start + 20_000)
            pub.send(
                b"".join(
                    b"PUBLISH %s %s %s-%d\n" % (cid, b"ab"[i % 2 : i % 2 + 1], b"ab"[i % 2 : i % 2 + 1], i)
                    for i in batch
                )
            )
            _read_lines(pub, len(batch))
    assert len(_segments(data)) == 2
    return data


def _read_lines(client: LineClient, count: int) -> list[bytes]:
    """The next ``count`` lines, read in large chunks (LineClient.line is for a few lines)."""
    lines = client.buf.split(b"\n")
    client.buf = lines.pop()
    while len(lines) < count:
        chunk = client.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"connection closed after {len(lines)} lines")
        more = (client.buf + chunk).split(b"\n")
        client.buf = more.pop()
        lines += more
    client.buf = b"\n".join([*lines[count:], client.buf]) if len(lines) > count else client.buf
    return lines[:count]


def _copy_of(data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    return copy


@pytest.mark.slow
def test_a_subscriber_served_during_recovery_gets_every_message_in_order_and_publishes_wait(
    recovering_log: Path, tmp_path: Path
) -> None:
    data = _copy_of(recovering_log, tmp_path)
    limits = ("--max-backlog", str(RECOVERING_TOTAL + 1), "--max-memory", str(4 << 30))
    with _server(data, *limits) as server:
        probe, sub, pub = server.client(60), server.client(60), server.client(60)
        probe.connect()
        stats = _stats(probe)  # the restore walks a chunk per pass of the loop: it has far to go
        assert stats["log_recovering"] is True, stats
        done, total = stats["log_recovery_done_bytes"], stats["log_recovery_total_bytes"]
        assert isinstance(done, int) and isinstance(total, int) and 0 <= done < total, stats
        pub.connect()
        pub.send(f"PUBLISH {pub.client_id} a late")  # waits until every recovered message is back
        sub.connect()
        assert sub.ask(f"SUBSCRIBE {sub.client_id} a") == b"SUBSCRIBED a"
        half = RECOVERING_TOTAL // 2
        assert _read_lines(sub, 1) == [b"MESSAGE a a-0"]
        assert _stats(probe)["log_recovering"] is True  # the first message came before the end
        assert not [line for line in server.log if "recovered" in line]
        got = [b"MESSAGE a a-0", *_read_lines(sub, half)]
        assert got[:-1] == [b"MESSAGE a a-%d" % i for i in range(0, RECOVERING_TOTAL, 2)]
        assert got[-1] == b"MESSAGE a late"  # after every recovered message of its topic
        assert pub.line() == b"PUBLISHED a"
        assert "recovered 1000000 messages on 2 topics" in _recovered_line(server)
        stats = _stats(probe)
        assert stats["log_recovering"] is False
        assert stats["log_recovered_messages"] == RECOVERING_TOTAL
        assert stats["log_recovery_done_bytes"] == stats["log_recovery_total_bytes"]
        assert stats["backlog_messages"] == half  # topic b


@pytest.mark.slow
def test_a_kill_9_during_recovery_loses_nothing_confirmed(recovering_log: Path, tmp_path: Path) -> None:
    data = _copy_of(recovering_log, tmp_path)
    limits = ("--max-backlog", str(RECOVERING_TOTAL), "--max-memory", str(4 << 30))
    with _server(data, *limits) as server:
        sub, probe = server.client(60), server.client(60)
        sub.connect()
        probe.connect()
        assert sub.ask(f"SUBSCRIBE {sub.client_id} b ACK PREFETCH 1000") == b"SUBSCRIBED b"
        acked = []
        for line in _read_lines(sub, 1000):  # acknowledge the first thousand of b while recovering
            _, _, tag, _, body = line.split(b" ", 4)
            sub.send(b"ACK %s %s\n" % (sub.client_id.encode(), tag))
            acked.append(body)
        deadline = time.monotonic() + DEADLINE
        stats = _stats(probe)
        while stats["acks"] != 1000 and time.monotonic() < deadline:
            stats = _stats(probe)  # its reply leaves after the log write of its pass: the DONE records
        recovering = stats["log_recovering"]

        server.stop(signal.SIGKILL)
    with _server(data, *limits) as server:
        recovered = _recovered_line(server)
        sub = server.client(60)
        sub.connect()
        b_left = (RECOVERING_TOTAL // 2) - 1000
        assert _read_a_topic(sub, "b", b_left) == [b"b-%d" % i for i in range(2001, RECOVERING_TOTAL, 2)]
        assert _read_a_topic(sub, "a", RECOVERING_TOTAL // 2) == [
            b"a-%d" % i for i in range(0, RECOVERING_TOTAL, 2)
        ]
    assert acked == [b"b-%d" % i for i in range(1, 2001, 2)]
    assert f"recovered {RECOVERING_TOTAL - 1000} messages on 2 topics" in recovered, recovered
    # the restore walks a chunk per pass of the loop, about 490 passes: the kill came in the middle
    assert recovering is True


def _read_a_topic(client: LineClient, topic: str, count: int) -> list[bytes]:
    """Subscribe (plain) and read ``count`` message bodies of ``topic``."""
    assert client.ask(f"SUBSCRIBE {client.client_id} {topic}") == f"SUBSCRIBED {topic}".encode()
    prefix = f"MESSAGE {topic} ".encode()
    bodies = []
    for line in _read_lines(client, count):
        assert line.startswith(prefix), line
        bodies.append(line[len(prefix) :])
    return bodies


@pytest.mark.slow
def test_a_damaged_record_found_while_serving_stops_the_server_and_the_next_start(
    recovering_log: Path, tmp_path: Path
) -> None:
    data = _copy_of(recovering_log, tmp_path)
    sealed = _segments(data)[0]  # the checksums of its PUBLISH records are left to the restore
    records = _records(sealed)
    offset, size = records[len(records) // 2]  # far from the first chunk the restore walks
    raw = bytearray(sealed.read_bytes())
    raw[offset + size - 2] ^= 0xFF  # a byte of that message's body
    sealed.write_bytes(bytes(raw))
    damage = f"{sealed}: a record whose checksum does not match at offset {offset}"
    limits = ("--max-backlog", str(RECOVERING_TOTAL), "--max-memory", str(4 << 30))
    server = ServerProcess("--data-dir", str(data), *limits)
    try:
        sub = server.client(60)
        sub.connect()
        # unacknowledged, the two messages it holds come back at the next start
        assert sub.ask(f"SUBSCRIBE {sub.client_id} a ACK PREFETCH 2") == b"SUBSCRIBED a"
        got = [line.split(b" ")[-1] for line in _read_lines(sub, 2)]
        assert got == [b"a-0", b"a-2"]  # served before the restore reached the damage
        assert damage in server.wait_for_log("stopping")
        assert server.proc.wait(DEADLINE) == 1
    finally:
        server.stop()
    assert "recovered" not in "".join(server.log)
    assert (data / "DAMAGED").read_text().startswith(damage)
    refused = subprocess.run(  # the next start checks every record before it serves, and refuses
        [sys.executable, "-m", "pigeon", "--port", "0", "--data-dir", str(data), *limits],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert refused.returncode == 1
    assert damage in refused.stderr and "--repair" in refused.stderr
    assert "listening" not in refused.stderr
    with _server(data, "--repair", *limits) as server:
        assert f"recovered {RECOVERING_TOTAL - 1} messages on 2 topics" in _recovered_line(server)
    assert not (data / "DAMAGED").exists()
    with _server(data, *limits) as server:  # the repaired log serves as usual
        assert f"recovered {RECOVERING_TOTAL - 1} messages on 2 topics" in _recovered_line(server)
