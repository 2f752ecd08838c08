"""The Celery application the Celery tests run in real ``celery worker`` processes (tests/test_celery.py).

Configured from the environment, so the test and its worker subprocesses share it:
``PIGEON_CELERY_BROKER`` (the broker URL), ``PIGEON_CELERY_RESULTS`` (a directory: the
file-system result backend, so no service is needed), ``PIGEON_CELERY_RECORD`` (a file
each run of ``record`` appends lines to, with ``O_APPEND``, so that the test can count runs) and
``PIGEON_CELERY_CA`` (a CA file: ``broker_use_ssl`` checks a ``pigeons://`` broker against it).
"""

from __future__ import annotations

import os
import ssl
import time

from celery import Celery, Task

app = Celery("pigeon_tests")
app.conf.update(
    broker_url=os.environ.get("PIGEON_CELERY_BROKER", "pigeon://127.0.0.1:3333"),
    result_backend="file://" + os.environ.get("PIGEON_CELERY_RESULTS", "/tmp/pigeon-celery-results"),
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("PIGEON_CELERY_CA"):
    app.conf.broker_use_ssl = {"ca_certs": os.environ["PIGEON_CELERY_CA"], "cert_reqs": ssl.CERT_REQUIRED}


@app.task
def add(x: int, y: int) -> int:
    """x + y."""
    return x + y


@app.task
def total(numbers: list[int]) -> int:
    """The sum of a chord's results."""
    return sum(numbers)


@app.task
def started_at() -> float:
    """When the task started (for ETA/countdown tests): the worker's clock, a Unix time."""
    return time.time()


@app.task(bind=True, max_retries=5)
def flaky(self: Task, failures: int) -> int:
    """Fails ``failures`` times through ``self.retry`` (after 0.1 s each), then returns its retry count."""
    if self.request.retries < failures:
        raise self.retry(countdown=0.1)
    return int(self.request.retries)


@app.task(bind=True, acks_late=True)
def record(self: Task, name: str, seconds: float) -> str:
    """Appends ``start <name> <worker>`` to the record file, sleeps ``seconds``, appends ``done ...``."""
    _append(f"start {name} {self.request.hostname}")
    time.sleep(seconds)
    _append(f"done {name} {self.request.hostname}")
    return name


def _append(line: str) -> None:
    # O_APPEND: the lines of concurrent pool processes never mix
    fd = os.open(os.environ["PIGEON_CELERY_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
