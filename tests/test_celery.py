"""Celery on Pigeon: real ``celery worker`` processes (prefork, 2 processes) on a real ``pigeon`` process.

The application is tests/celery_app.py, configured through the environment so
that this process (which sends the tasks and reads the results) and the worker
subprocesses share it; results go to a file-system backend in a temporary
directory, so no other service is needed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from celery import chain, chord
from celery.result import AsyncResult

from pigeon import Client
from pigeon.testing import ServerProcess
from tests import celery_app
from tests.celery_app import add, flaky, record, started_at, total

ROOT = Path(__file__).resolve().parent.parent
WAIT = 120.0  # seconds: the longest any wait here may take on a loaded 2-core machine


class Worker:
    """A ``celery worker`` subprocess in a session of its own (so ``kill -9`` can take its pool too)."""

    def __init__(self, env: dict[str, str], log: Path, name: str, *options: str) -> None:
        self.log = log
        command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-n", f"{name}@%h"]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [*command, "--loglevel", "info", *options],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """``kill -9`` the worker and its pool processes at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), or SIGKILL when it does not end in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        """The end of its log, for failure messages."""
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str], Path]]:
    """A broker (ack timeout off: Celery holds ETA tasks unacknowledged), the environment the app reads
    its configuration from, and a directory for logs."""
    server = ServerProcess("--ack-timeout", "0")
    workdir = tmp_path_factory.mktemp("celery")
    env = dict(
        os.environ,
        PIGEON_CELERY_BROKER=f"pigeon://{server.host}:{server.port}",
        PIGEON_CELERY_RESULTS=str(workdir / "results"),
        PIGEON_CELERY_RECORD=str(workdir / "record"),
        PYTHONPATH=str(ROOT),
    )
    (workdir / "results").mkdir()
    conf = celery_app.app.conf
    saved = (conf.broker_url, conf.result_backend, os.environ.get("PIGEON_CELERY_RECORD"))
    conf.broker_url = env["PIGEON_CELERY_BROKER"]
    conf.result_backend = "file://" + env["PIGEON_CELERY_RESULTS"]
    os.environ["PIGEON_CELERY_RECORD"] = env["PIGEON_CELERY_RECORD"]
    yield server, env, workdir
    conf.broker_url, conf.result_backend = saved[0], saved[1]
    if saved[2] is None:
        os.environ.pop("PIGEON_CELERY_RECORD", None)
    celery_app.app.close()
    assert server.stop() == 0, "".join(server.log)


@pytest.fixture(scope="module")
def worker(setup: tuple[ServerProcess, dict[str, str], Path]) -> Iterator[Worker]:
    """One worker, prefork with 2 processes, answering tasks."""
    _, env, workdir = setup
    worker = Worker(env, workdir / "worker.log", "main", "--pool", "prefork", "--concurrency", "2")
    try:
        assert add.delay(20, 22).get(timeout=WAIT) == 42, worker.tail()
        yield worker
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_thousand_delayed_tasks_complete_with_the_right_results(worker: Worker) -> None:
    results = [add.delay(i, i * 1000) for i in range(1000)]
    assert [result.get(timeout=WAIT) for result in results] == [i * 1001 for i in range(1000)], worker.tail()


def test_a_chain_and_a_chord(worker: Worker) -> None:
    assert chain(add.s(1, 2), add.s(3), add.s(4))().get(timeout=WAIT) == 10
    # the chord's callback runs once every header task is done (celery.chord_unlock polls the backend)
    assert chord(add.s(i, i) for i in range(10))(total.s()).get(timeout=WAIT) == 90


def test_countdown_and_eta_tasks_wait_for_their_time(worker: Worker) -> None:
    sent = time.time()
    by_countdown = started_at.apply_async(countdown=1.5)
    by_eta = started_at.apply_async(eta=datetime.now(timezone.utc) + timedelta(seconds=1.5))
    right_away = started_at.delay()
    assert right_away.get(timeout=WAIT) >= sent
    # no upper bound: the machine may be slow; the lower bound is what ETA promises
    assert by_countdown.get(timeout=WAIT) >= sent + 1.5
    assert by_eta.get(timeout=WAIT) >= sent + 1.5


def test_self_retry_runs_the_task_again(worker: Worker) -> None:
    assert flaky.delay(3).get(timeout=WAIT) == 3


def test_purge_empties_a_queue_no_worker_consumes(
    worker: Worker, setup: tuple[ServerProcess, dict[str, str], Path]
) -> None:
    _, env, _ = setup
    for i in range(25):
        add.apply_async((i, i), queue="idle")
    with celery_app.app.connection_for_write() as connection, connection.channel() as channel:
        assert channel.queue_declare("idle", passive=True).message_count == 25
    command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "purge", "-f", "-Q", "idle"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert "Purged 25 messages" in result.stdout


def celery_command(env: dict[str, str], *words: str) -> str:
    """Run ``celery -A tests.celery_app <words>`` and return its output (it must succeed)."""
    command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", *words]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_celery_inspect_and_control_reach_the_worker_through_its_broadcast_queue(
    worker: Worker, setup: tuple[ServerProcess, dict[str, str], Path]
) -> None:
    """The pidbox: a fanout exchange (each worker's queue a consumer group on it) and replies through
    a direct exchange to the asking process's queue."""
    _, env, _ = setup
    # naming the worker, a command returns once it answered (without, it waits the whole timeout)
    to_worker = ("--destination", f"main@{socket.gethostname()}", "--timeout", str(WAIT / 2))
    assert "pong" in celery_command(env, "inspect", "ping", *to_worker)
    assert "'name': 'celery'" in celery_command(env, "inspect", "active_queues", *to_worker)
    assert "add consumer" in celery_command(env, "control", "add_consumer", "extra", *to_worker).lower()
    assert "'name': 'extra'" in celery_command(env, "inspect", "active_queues", *to_worker)
    assert add.apply_async((2, 3), queue="extra").get(timeout=WAIT) == 5
    assert (
        "no longer consuming"
        in celery_command(env, "control", "cancel_consumer", "extra", *to_worker).lower()
    )


def consumers(server: ServerProcess, queue: str) -> int:
    """How many subscribers the broker's topic ``queue`` has."""
    with Client(server.host, server.port) as client:
        return sum(entry["subscribers"] for entry in client.stats("topics") if entry["name"] == queue)


@pytest.mark.slow
def test_acks_late_tasks_of_a_worker_killed_mid_task_complete_elsewhere(
    setup: tuple[ServerProcess, dict[str, str], Path], record_property: Callable[[str, object], None]
) -> None:
    """Two workers; one is killed with ``kill -9`` (its pool too) while it runs and holds tasks: the
    broker redelivers what it held, every task completes at least once, the repeats are counted."""
    server, env, workdir = setup
    record_file = Path(env["PIGEON_CELERY_RECORD"])
    record_file.unlink(missing_ok=True)
    # a queue of their own, which the module's other worker does not consume
    options = ("--pool", "prefork", "--concurrency", "2", "--queues", "killed")
    doomed = Worker(env, workdir / "doomed.log", "doomed", *options)
    survivor = Worker(env, workdir / "survivor.log", "survivor", *options)
    try:
        deadline = time.monotonic() + WAIT
        while consumers(server, "killed") < 2:  # both workers consume the queue before the tasks go out
            assert time.monotonic() < deadline, doomed.tail() + survivor.tail()
            time.sleep(0.05)
        names = [f"task-{i}" for i in range(40)]
        results = [record.apply_async((name, 0.5), queue="killed") for name in names]
        while not (record_file.exists() and record_file.read_text().count(" doomed@") >= 2):
            assert time.monotonic() < deadline, doomed.tail() + survivor.tail()
            time.sleep(0.05)
        doomed.kill()
        for result in results:
            result.get(timeout=WAIT)
        lines = record_file.read_text().splitlines()  # "start|done <task> <worker>"
        starts = Counter(line.split()[1] for line in lines if line.startswith("start "))
        completions = Counter(line.split()[1] for line in lines if line.startswith("done "))
        with Client(server.host, server.port) as client:
            redelivered = client.stats()["redelivered"]
    finally:
        doomed.stop()
        survivor.stop()
    repeats = sum(starts.values()) - len(starts)
    record_property("repeats", repeats)
    print(
        f"kill -9 mid-task: {len(names)} tasks, {sum(starts.values())} starts ({repeats} repeats), "
        f"{sum(completions.values())} completions, {redelivered} messages redelivered by the broker"
    )
    assert set(completions) == set(names)  # every task completed at least once
    assert redelivered >= 1  # the kill did catch the worker holding tasks


def parked(server: ServerProcess) -> int:
    """Messages in the backlog of the queue ``parked``."""
    with Client(server.host, server.port) as client:
        return sum(entry["backlog_messages"] for entry in client.stats("topics") if entry["name"] == "parked")


@pytest.mark.slow
def test_a_worker_stays_connected_through_idle_time_and_reconnects_after_a_broker_restart(
    tmp_path: Path,
) -> None:
    """A broker that closes quiet connections (``--idle-timeout 2``): the worker's heartbeats keep its
    connection through 5 quiet seconds. Then the broker is killed (``kill -9``) and started again on
    the same port and data directory: the worker and the sender reconnect by themselves, every task
    sent before and after completes, and the task that waited in the broker's log is not lost."""
    from celery import Celery

    data = tmp_path / "data"
    options = ("--ack-timeout", "0", "--idle-timeout", "2", "--data-dir", str(data))
    server = ServerProcess(*options)
    url = f"pigeon://{server.host}:{server.port}"
    env = dict(
        os.environ, PIGEON_CELERY_BROKER=url, PIGEON_CELERY_RESULTS=str(tmp_path), PYTHONPATH=str(ROOT)
    )
    sender = Celery("sender", broker=url, backend=f"file://{tmp_path}")
    worker = Worker(env, tmp_path / "worker.log", "restart", "--pool", "solo", "--queues", "restart")

    def add_remote(x: int, y: int) -> AsyncResult:
        return sender.send_task("tests.celery_app.add", (x, y), queue="restart")

    try:
        assert add_remote(1, 2).get(timeout=WAIT) == 3, worker.tail()
        time.sleep(5)  # more than twice the idle timeout, with nothing to do
        assert add_remote(3, 4).get(timeout=WAIT) == 7, worker.tail()
        with Client(server.host, server.port) as client:
            assert client.stats()["idle_closed"] >= 1  # the broker did close the quiet sender
        for restart in range(1, 4):
            # a queue nobody consumes; the publish is not confirmed, so wait until the broker holds it
            sender.send_task("tests.celery_app.add", (5, 6), queue="parked")
            deadline = time.monotonic() + WAIT
            while parked(server) != restart:
                assert time.monotonic() < deadline, parked(server)
                time.sleep(0.05)
            server.stop(signal.SIGKILL)
            server = ServerProcess(*options, "--port", str(server.port))
            results = [add_remote(i, restart) for i in range(20)]
            assert [result.get(timeout=WAIT) for result in results] == [i + restart for i in range(20)], (
                worker.tail()
            )
            assert parked(server) == restart  # every parked task survived every kill
    finally:
        worker.stop()
        sender.close()
        server.stop()
