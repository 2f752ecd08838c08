"""The broker's limits: their defaults, the keywords that set them, and the open-files limit they need.

The defaults are the core's own (its ``Limits`` struct is their single
source, read through ``LIMIT_DEFAULTS``), named here for ``Server`` and the
``pigeon`` command.
"""

from __future__ import annotations

import os
import ssl
from typing import TypedDict

from pigeon._core import LIMIT_DEFAULTS

DEFAULT_MAX_LINE: int = LIMIT_DEFAULTS["max_line"]
DEFAULT_MAX_BACKLOG: int = LIMIT_DEFAULTS["max_backlog"]
DEFAULT_MAX_CONNECTIONS: int = LIMIT_DEFAULTS["max_connections"]
DEFAULT_MAX_MEMORY: int = LIMIT_DEFAULTS["max_memory"]
DEFAULT_MAX_SUBSCRIPTIONS: int = LIMIT_DEFAULTS["max_subscriptions"]
DEFAULT_MAX_TOPICS: int = LIMIT_DEFAULTS["max_topics"]
DEFAULT_MAX_PENDING: int = LIMIT_DEFAULTS["max_pending"]
DEFAULT_IDLE_TIMEOUT: float = LIMIT_DEFAULTS["idle_timeout"]  # seconds; 0 is off
DEFAULT_WRITE_TIMEOUT: float = LIMIT_DEFAULTS["write_timeout"]  # seconds; 0 is off
DEFAULT_PREFETCH: int = LIMIT_DEFAULTS["default_prefetch"]
DEFAULT_ACK_TIMEOUT: float = LIMIT_DEFAULTS["ack_timeout"]  # seconds; 0 is off
DEFAULT_MAX_DELIVERIES: int = LIMIT_DEFAULTS["max_deliveries"]  # 0 is no limit
DEFAULT_GROUP_TTL: float = LIMIT_DEFAULTS["group_ttl"]  # seconds


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
    write_timeout: float
    default_prefetch: int
    ack_timeout: float
    max_deliveries: int
    group_ttl: float
    max_disk: int
    data_dir: str | os.PathLike[str] | None
    fsync: str
    repair: bool
    users_file: str | os.PathLike[str] | None
    tls: ssl.SSLContext | None
    tls_handshake_timeout: float
    tls_map_user: bool


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
