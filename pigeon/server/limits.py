"""The broker's limits: their defaults, the keywords that set them, and the open-files limit they need.

The defaults here are the ones the ``pigeon`` command and ``Server`` use. (The
core's ``Broker`` has defaults of its own in ``__cinit__``: the server always
passes every limit, so those apply only to a ``Broker`` made directly.)
"""

from __future__ import annotations

from typing import TypedDict

DEFAULT_MAX_LINE = 1024 * 1024
DEFAULT_MAX_BACKLOG = 100_000
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_MEMORY = 1024 * 1024 * 1024
DEFAULT_MAX_SUBSCRIPTIONS = 10_000
DEFAULT_MAX_TOPICS = 1_000_000
DEFAULT_MAX_PENDING = 64 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 0.0  # seconds; 0 is off


class ServerLimits(TypedDict, total=False):
    """The keywords of ``Server`` after host and port, for APIs that pass them on (``ServerThread``)."""

    max_line: int
    max_backlog: int
    max_connections: int
    max_memory: int
    max_subscriptions: int
    max_topics: int
    max_pending: int
    idle_timeout: float


def raise_open_files_limit(want: int | None = None) -> int | None:
    """Raise this process's soft limit on open files to ``want`` (default: the hard limit), as far as allowed.

    Returns the soft limit now in force, or None where nothing limits open
    files (an unlimited soft limit, or Windows, which has no such limit).
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    unlimited = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None or (hard != unlimited and want > hard) else want
    if soft != unlimited and (target == unlimited or soft < target):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return None if soft == unlimited else soft
