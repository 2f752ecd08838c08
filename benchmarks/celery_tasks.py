"""The Celery application benchmarks/celery_bench.py runs its workers on.

``PIGEON_BENCH_BROKER`` names the broker; ``PIGEON_BENCH_STAMPS`` a file each ``stamp`` task appends
its delay()-to-start time to. No result backend: the benchmark measures the broker.
"""

from __future__ import annotations

import os
import time

from celery import Celery


def noop() -> None:
    """Nothing: what is measured is the broker and Celery around it."""


def stamp(sent: float) -> None:
    """Append the seconds from ``sent`` (the caller's ``time.time()`` at delay()) to this task's start."""
    started = time.time()
    fd = os.open(os.environ["PIGEON_BENCH_STAMPS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"%.6f\n" % (started - sent))
    finally:
        os.close(fd)


def bench_app(broker: str) -> Celery:
    """A Celery app on ``broker`` with the two tasks (``app.tasks[NOOP]``, ``app.tasks[STAMP]``)."""
    app = Celery("pigeon_bench", broker=broker)
    app.conf.update(
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=NOOP)(noop)
    app.task(name=STAMP)(stamp)
    return app


NOOP = "bench.noop"
STAMP = "bench.stamp"

# what `celery -A benchmarks.celery_tasks worker` runs
app = bench_app(os.environ.get("PIGEON_BENCH_BROKER", "pigeon://127.0.0.1:3333"))
