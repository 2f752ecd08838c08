"""Compaction of the log over real processes: old messages that nobody takes no longer keep every
later segment on disk, and a kill -9 at any step of a compaction loses and repeats nothing.

Every test runs ``pigeon --data-dir`` as a subprocess and talks to it over TCP. ``--max-disk 8 MiB``
makes segments of 1 MiB (an eighth of it), so the 48 MB of traffic of the first test is 48
segments: the same as 3 GB with the default 64 MiB segments.

The crash tests kill the server from outside at one step of a compaction: strace, attached to the
running server, stops it at the system call that step makes (on the file it makes it on) and kills
it there (SIGKILL, as ``kill -9``); the server has no hook for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pigeon.server.compaction import COMPACT_SUFFIX, INTENT
from pigeon.server.store import SEGMENT_SUFFIX, segment_name
from pigeon.testing import LineClient, ServerProcess, inspect_data_dir

DEADLINE = 30.0
MAX_DISK = 8 << 20
SEGMENT = MAX_DISK // 8
BATCH = 500
BODY = "x" * 1000
KEPT = 40  # messages of a topic nobody reads, published among the traffic
STRACE = shutil.which("strace")
# The system call each step of a compaction stops before (Python's os.fdatasync, os.replace and
# Path.unlink, as strace shows them), the suffix of the files it is made on, and whether the kill
# comes when the call returns rather than when it is made.
STEPS = {
    "before-sync": ("fdatasync", COMPACT_SUFFIX, False),  # the rewrite, written
    "before-rename": ("rename", COMPACT_SUFFIX, False),  # ... synced, over its segment
    "before-directory-sync": ("rename", COMPACT_SUFFIX, True),  # ... renamed
    "before-delete": ("unlink", SEGMENT_SUFFIX, False),  # the segments a merge replaced, or emptied ones
}
HELD = 1.0  # seconds a thread stands still in a traced call before it is taken for held by strace
NAMES = 400  # segment numbers the traced files may have (200 batches of 0.5 MB: at most 100 segments)


def _segments(data: Path) -> list[Path]:
    return sorted(p for p in data.iterdir() if p.suffix == SEGMENT_SUFFIX)


def _disk(data: Path) -> int:
    """Bytes of the segments, as the server leaves them between the listing and each stat: a
    segment compaction deletes meanwhile counts as gone (it is)."""
    return sum(_disk_of(path) for path in _segments(data))


def _disk_of(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_size
    return 0


def _connected(server: ServerProcess) -> LineClient:
    client = server.client()
    client.connect()
    return client


def _tasks(pid: int) -> list[Path]:
    return list(Path(f"/proc/{pid}/task").iterdir())


def _traced_by(pid: int) -> set[int]:
    """The tracers of every thread of process ``pid`` (0: not traced)."""
    tracers = set()
    for task in _tasks(pid):
        with contextlib.suppress(FileNotFoundError):
            status = (task / "status").read_text()
            tracers.add(int(re.search(r"^TracerPid:\s*(\d+)", status, re.M).group(1)))  # type: ignore[union-attr]
    return tracers


class KillAt:
    """strace attached to a running server, that kills it (SIGKILL) at ``step`` of a compaction
    (STEPS): at the first such system call on a file of that kind, whichever compaction makes it."""

    def __init__(self, server: ServerProcess, data: Path, step: str) -> None:
        if STRACE is None:
            pytest.skip(
                "strace is not installed (.ci/run installs it): the crash tests kill the server through it"
            )
        syscall, suffix, after = STEPS[step]
        self.pid = server.proc.pid
        paths = [
            arg
            for n in range(1, NAMES)
            for arg in ("-P", str(data / segment_name(n)).replace(SEGMENT_SUFFIX, suffix))
        ]
        # the kill after a call: strace holds the thread when the call returns, and the test kills
        # the process from outside once it sees the thread held
        action = "delay_exit=120s" if after else "signal=SIGKILL"
        self.tracer = subprocess.Popen(
            [
                STRACE,
                "-f",
                "-qq",
                "-e",
                "signal=none",
                "-e",
                f"trace={syscall}",
                "-e",
                f"inject={syscall}:{action}:when=1",
                *paths,
                "-p",
                str(self.pid),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.seen: list[str] = []  # what strace said (the calls it stopped)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.after = after
        deadline = time.monotonic() + DEADLINE
        while _traced_by(self.pid) != {self.tracer.pid}:
            if self.tracer.poll() is not None:
                self.reader.join(DEADLINE)
                if "Operation not permitted" in "".join(self.seen):
                    pytest.skip(f"this environment does not let strace trace a process: {''.join(self.seen)}")
                raise RuntimeError(f"strace ended: {''.join(self.seen)}")
            assert time.monotonic() < deadline, "strace did not attach to every thread of the server"
            time.sleep(0.05)
        if after:
            threading.Thread(target=self._kill_when_held, daemon=True).start()

    def _read(self) -> None:
        assert self.tracer.stderr is not None
        for line in self.tracer.stderr:
            self.seen.append(line)

    def _kill_when_held(self) -> None:
        """Kill the server once one of its threads stands still in a traced call for HELD seconds:
        strace holds only the call it delays on its return (strace says so only when it lets go)."""
        since: dict[str, tuple[float, str]] = {}  # thread -> since when it stands still, in what
        while self.tracer.poll() is None:
            now = time.monotonic()
            for task in _tasks(self.pid):
                try:
                    state = (task / "stat").read_text().rsplit(") ", 1)[1][0]
                    call = (task / "syscall").read_text()
                except (FileNotFoundError, ProcessLookupError, IndexError):
                    continue
                if state != "t":
                    since.pop(task.name, None)
                elif since.get(task.name, (now, call))[1] != call:
                    since[task.name] = (now, call)
                else:
                    since.setdefault(task.name, (now, call))
                    if now - since[task.name][0] >= HELD:
                        # the held thread runs no more code: SIGKILL is pending when strace lets go
                        # of it; strace must go, as it does not let go of a thread it delays
                        os.kill(self.pid, signal.SIGKILL)
                        self.tracer.kill()
                        return
            time.sleep(0.05)

    def close(self) -> str:
        """Wait for strace to end (with its server); what it said."""
        try:
            self.tracer.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.tracer.kill()
            self.tracer.wait()
        self.reader.join(DEADLINE)
        return "".join(self.seen)


class Scene:
    """An old message nobody reads (``parked``), one delivered and never acked (``work``), a topic
    nobody reads whose messages are spread through the log (``kept``), and traffic that a plain
    subscriber takes at once (``traffic``): everything but the traffic stays live."""

    def __init__(self, server: ServerProcess) -> None:
        self.pub, self.sub, self.worker = _connected(server), _connected(server), _connected(server)
        self.kept: list[str] = []
        self.tag, self.attempt = 1, 1  # the unacked message's delivery, confirmed by a PONG
        self.published: set[str] = set()  # traffic whose PUBLISHED came back
        self.done: set[str] = set()  # traffic the subscriber took, confirmed by a later PONG
        self.pub.publish("parked", "old-message")
        assert self.worker.ask(f"SUBSCRIBE {self.worker.client_id} work ACK") == b"SUBSCRIBED work"
        self.pub.publish("work", "unacked")
        assert self.worker.line() == b"DELIVER work 1 1 unacked"
        self.sub.subscribe("traffic")

    def batch(self, number: int) -> None:
        """One batch of traffic, taken by the subscriber; every KEPT-th batch adds a kept message."""
        bodies = [f"t{number}.{i}.{BODY}" for i in range(BATCH)]
        self.pub.send("".join(f"PUBLISH {self.pub.client_id} traffic {body}\n" for body in bodies))
        for body in bodies:
            assert self.pub.line() == b"PUBLISHED traffic"
            self.published.add(body)
        taken = [line.decode().split(" ", 2)[2] for line in self.sub.lines(BATCH)]
        # the PING is read in a later pass than the one that handed the batch over, and the DONE
        # records of a pass are written at its end
        assert self.sub.ask("PING") == b"PONG"
        self.done.update(taken)
        if len(self.kept) < KEPT:
            self.kept.append(f"kept-{len(self.kept)}")
            self.pub.publish("kept", self.kept[-1])
        if number % 8 == 7 and self.attempt < 4:  # --max-deliveries (5) would move it to work.dead
            # given back and delivered again: its DELIVERED records spread over the segments
            self.worker.send(f"NACK {self.worker.client_id} {self.tag}")
            topic, tag, attempt, body = self.worker.line().decode().split(" ")[1:]
            assert (topic, int(attempt), body) == ("work", self.attempt + 1, "unacked")
            assert self.worker.ask("PING") == b"PONG"
            self.tag, self.attempt = int(tag), int(attempt)


def _stats(client: LineClient) -> dict[str, Any]:
    reply = client.ask("STATS").decode()
    assert reply.startswith("STATS "), reply
    return dict(json.loads(reply[6:]))


def _recovered(server: ServerProcess) -> int:
    line = server.wait_for_log(" topics from ")
    match = re.search(r"recovered (\d+) messages", line)
    assert match, line
    return int(match.group(1))


def _check_recovered(server: ServerProcess, scene: Scene, attempts: tuple[int, ...]) -> list[str]:
    """The live messages came back (in order, the unacked one with one of ``attempts``); returns
    the traffic that came back too."""
    recovered = _recovered(server)
    client = _connected(server)
    client.subscribe("parked")
    assert client.line() == b"MESSAGE parked old-message"
    client.subscribe("kept")
    assert [line.decode() for line in client.lines(len(scene.kept))] == [
        f"MESSAGE kept {body}" for body in scene.kept
    ]
    assert client.ask(f"SUBSCRIBE {client.client_id} work ACK") == b"SUBSCRIBED work"
    topic, _, attempt, body = client.line().decode().split(" ")[1:]
    assert (topic, body) == ("work", "unacked")
    assert int(attempt) in attempts
    traffic = recovered - 2 - len(scene.kept)
    client.subscribe("traffic")
    back = [line.decode().split(" ", 2)[2] for line in client.lines(traffic)]
    assert client.quiet()
    return back


@pytest.mark.slow
@pytest.mark.parametrize("fsync", ["everysec", "always"])
def test_one_old_message_no_longer_keeps_every_later_segment(tmp_path: Path, fsync: str) -> None:
    data = tmp_path / "data"
    server = ServerProcess("--data-dir", str(data), "--max-disk", str(MAX_DISK), "--fsync", fsync)
    try:
        scene = Scene(server)
        # 48 MB of traffic through an 8 MiB bound: without compaction the publisher would wait
        # for ever once the log reached it (the old messages pin the first segment)
        for number in range(96):
            scene.batch(number)
        deadline = time.monotonic() + DEADLINE
        while (_disk(data) > 2 * SEGMENT or len(_segments(data)) > 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _disk(data) <= 2 * SEGMENT, [(p.name, p.stat().st_size) for p in _segments(data)]
        assert len(_segments(data)) <= 3, [(p.name, p.stat().st_size) for p in _segments(data)]
        stats = _stats(scene.pub)
        assert stats["log_compactions"] > 0 and not stats["log_compaction_failures"]
        assert stats["log_compacted_segments"] >= stats["log_compaction_removed_segments"] > 0
        # nothing but compaction removed a segment (the parked message pins the first): what was
        # written, at least the payloads, is on disk or was reclaimed by it
        assert stats["log_compaction_reclaimed_bytes"] + stats["log_disk_bytes"] >= 96 * BATCH * len(BODY)
        assert stats["log_compaction_last_at"] > 0 and stats["log_compaction_last_seconds"] > 0
        server.stop(9)
        server = ServerProcess("--data-dir", str(data))
        # every traffic message was done: none comes back
        assert _check_recovered(server, scene, (scene.attempt + 1,)) == []
    finally:
        server.stop()


COMPACTION_METRICS = {
    "pigeon_compactions_total": "log_compactions",
    "pigeon_compaction_segments_rewritten_total": "log_compacted_segments",
    "pigeon_compaction_segments_removed_total": "log_compaction_removed_segments",
    "pigeon_compaction_reclaimed_bytes_total": "log_compaction_reclaimed_bytes",
    "pigeon_compaction_failures_total": "log_compaction_failures",
    "pigeon_compaction_running": "log_compacting",
    "pigeon_compaction_last_duration_seconds": "log_compaction_last_seconds",
    "pigeon_compaction_last_run_timestamp_seconds": "log_compaction_last_at",
}


def _compaction_metrics(base: str) -> dict[str, float]:
    from tests.monitoring import get

    status, _, body = get(base + "metrics")
    assert status == 200
    pairs = (line.rsplit(" ", 1) for line in body.decode().splitlines() if not line.startswith("#"))
    return {name: float(value) for name, value in pairs if name in COMPACTION_METRICS}


@pytest.mark.slow
def test_a_message_done_in_the_head_frees_its_older_segment(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    from tests.monitoring import start_monitored

    data = tmp_path / "data"
    server, base = start_monitored("--data-dir", str(data), "--max-disk", str(MAX_DISK))
    try:
        scene = Scene(server)
        for number in range(2):
            scene.batch(number)
        big = "B" * (SEGMENT * 6 // 10)  # most of a segment: its segment is never under half live
        scene.pub.publish("big", big)
        holder = _segments(data)[-1]  # PUBLISHED: its record is written, to the newest segment
        number = 2
        while _segments(data)[-1] == holder:  # until the big message's segment is sealed
            scene.batch(number)
            number += 1

        def sealed() -> int:
            """Bytes of the sealed segments (all but the one being written)."""
            return _disk(data) - _disk_of(_segments(data)[-1])

        deadline = time.monotonic() + DEADLINE
        while sealed() > len(big) + SEGMENT // 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(big) < sealed() <= len(big) + SEGMENT // 2, "compaction did not settle around the message"
        head = _segments(data)[-1]
        taker = _connected(server)
        taker.subscribe("big")
        assert taker.line() == f"MESSAGE big {big}".encode()
        assert taker.ask("PING") == b"PONG"  # its DONE record is written, in the head segment
        while sealed() > len(big) // 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sealed() <= len(big) // 2, [(p.name, p.stat().st_size) for p in _segments(data)]
        assert _segments(data)[-1] == head, "the head segment was sealed meanwhile: the test shows nothing"
        # the figures, once no pass runs (STATS read the same before and after /metrics)
        while time.monotonic() < deadline:
            before, metrics, after = _stats(taker), _compaction_metrics(base), _stats(taker)
            if before == after or all(before[key] == after[key] for key in COMPACTION_METRICS.values()):
                break
        assert {name: metrics[name] for name in COMPACTION_METRICS} == {
            name: float(after[key]) for name, key in COMPACTION_METRICS.items()
        }
        assert metrics["pigeon_compaction_reclaimed_bytes_total"] >= len(big)
    finally:
        server.stop()


def _killed_at(tmp_path: Path, step: str) -> Scene:
    """A server with a Scene's traffic killed at ``step`` of a compaction (its data in tmp_path/data)."""
    data = tmp_path / "data"
    server = ServerProcess("--data-dir", str(data), "--max-disk", str(MAX_DISK))
    try:
        killer = KillAt(server, data, step)
        scene = Scene(server)
        died = False
        for number in range(200):
            try:
                scene.batch(number)
            except (EOFError, ConnectionError):
                died = True
                break
        assert died, f"the server was not killed {step}"
        assert server.proc.wait(timeout=DEADLINE) == -signal.SIGKILL
        seen = killer.close()
        assert f"{STEPS[step][0]}(" in seen, seen
        renamed = not list(data.glob("*" + COMPACT_SUFFIX))
        assert renamed == (step in ("before-directory-sync", "before-delete")), (
            f"the kill came at another step than {step}"
        )
        return scene
    finally:
        server.stop()


def _check_nothing_lost_or_repeated(data: Path, scene: Scene) -> None:
    server = ServerProcess("--data-dir", str(data), "--max-disk", str(MAX_DISK))
    try:
        # a NACK read before the kill may have been delivered again unseen
        back = _check_recovered(server, scene, (scene.attempt + 1, scene.attempt + 2))
        assert not set(back) & scene.done, "a message done before the kill came back"
        # nothing whose PUBLISHED came back is lost: what the subscriber did not take is back
        taken_or_back = scene.done | set(back)
        assert len(back) == len(set(back))
        missing = scene.published - taken_or_back
        # the last batch may have been handed over without its PONG: taken, not confirmed done
        assert len(missing) <= BATCH
        assert not list(data.glob("*" + COMPACT_SUFFIX)), "a rewrite a crash cut short is left behind"
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("step", list(STEPS))
def test_a_kill_at_any_step_of_a_compaction_loses_and_repeats_nothing(tmp_path: Path, step: str) -> None:
    scene = _killed_at(tmp_path, step)
    _check_nothing_lost_or_repeated(tmp_path / "data", scene)


def _files(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(directory.iterdir())}


@pytest.mark.slow
def test_inspect_reports_a_merge_cut_short_and_changes_nothing(tmp_path: Path) -> None:
    scene = _killed_at(tmp_path, "before-delete")
    data = tmp_path / "data"
    # the first segment deleted is one a merge replaced (the live messages of the first segment
    # are merged with the next ones): its intent is there, its new segment renamed into place
    assert (data / INTENT).exists()
    replaced = (data / INTENT).read_text().split()[:-1]
    before = _files(data)
    inspected = inspect_data_dir(data, DEADLINE)
    assert inspected.returncode == 0, inspected.stderr
    shown = inspected.stdout
    assert _files(data) == before, "--inspect changed the data directory"
    assert "a start completes it, deleting the segments it replaced: " + ", ".join(replaced) in shown, shown
    # what it counts is what the start recovers: the replaced segments are left out, as the start deletes them
    messages = int(re.search(r"messages not done: (\d+)", shown).group(1))  # type: ignore[union-attr]
    assert messages >= 2 + len(scene.kept)
    server = ServerProcess("--data-dir", str(data), "--max-disk", str(MAX_DISK))
    try:
        assert _recovered(server) == messages
    finally:
        server.stop()
    assert not (data / INTENT).exists() and not any((data / name).exists() for name in replaced)
