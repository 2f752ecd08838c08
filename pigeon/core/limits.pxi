# Limits: defaults, validation of values from Python, and their report.

LIMIT_NAMES = ("max_line", "max_backlog", "max_connections", "max_memory", "max_subscriptions",
               "max_topics", "max_pending", "idle_timeout", "write_timeout", "out_batch", "default_prefetch",
               "ack_timeout", "max_deliveries", "max_disk", "max_payload", "max_backlog_bytes", "group_ttl")


# (smallest, largest) accepted for each integer limit; the largest is what its C field holds
cdef dict _INT_RANGES = {
    "max_line": (64, 1 << 32),
    "max_backlog": (0, (1 << 32) - 1),
    "max_connections": (1, (1 << 31) - 1),
    "max_memory": (0, (1 << 63) - 1),
    "max_subscriptions": (1, (1 << 31) - 1),
    "max_topics": (1, (1 << 63) - 1),
    "max_pending": (1, (1 << 63) - 1),
    "out_batch": (1, 1 << 40),
    "default_prefetch": (1, PREFETCH_MAX),
    "max_deliveries": (0, (1 << 32) - 1),
    "max_disk": (0, (1 << 63) - 1),
    # the log records a payload's length in 32 bits
    "max_payload": (0, (1 << 31) - 1),
    "max_backlog_bytes": (0, (1 << 63) - 1),
}


cdef Limits limits_default() noexcept:
    cdef Limits limits
    limits.max_line = 1024 * 1024
    limits.max_backlog = 100_000
    limits.max_connections = 10_000
    limits.max_memory = 1024 * 1024 * 1024
    limits.max_subscriptions = 10_000
    limits.max_topics = 1_000_000
    limits.max_pending = 64 * 1024 * 1024
    limits.idle_timeout = 0.0
    limits.write_timeout = 10.0
    limits.out_batch = 1024 * 1024
    limits.default_prefetch = 1000
    limits.ack_timeout = 30.0
    limits.max_deliveries = 5
    limits.max_disk = 0
    limits.max_payload = 8 * 1024 * 1024
    limits.max_backlog_bytes = 64 * 1024 * 1024
    limits.group_ttl = 3600.0
    return limits


cdef int limits_set(Limits *limits, str name, object value) except -1:
    """Set one limit from a Python value; ValueError (naming the limit) when it is out of range."""
    cdef double seconds
    if name in ("idle_timeout", "write_timeout", "ack_timeout", "group_ttl"):
        seconds = float(value)
        if not seconds >= 0 or seconds == float("inf"):      # also refuses nan
            raise ValueError(f"{name} must be a finite number of seconds, 0 or more, not {value!r}")
        if name == "idle_timeout":
            limits.idle_timeout = seconds
        elif name == "write_timeout":
            limits.write_timeout = seconds
        elif name == "group_ttl":
            limits.group_ttl = seconds
        else:
            limits.ack_timeout = seconds
        return 0
    if name not in _INT_RANGES:
        raise TypeError(f"unknown limit {name!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    low, high = _INT_RANGES[name]
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, not {value}")
    if name == "max_line":
        limits.max_line = value
    elif name == "max_backlog":
        limits.max_backlog = value
    elif name == "max_connections":
        limits.max_connections = value
    elif name == "max_memory":
        limits.max_memory = value
    elif name == "max_subscriptions":
        limits.max_subscriptions = value
    elif name == "max_topics":
        limits.max_topics = value
    elif name == "max_pending":
        limits.max_pending = value
    elif name == "out_batch":
        limits.out_batch = value
    elif name == "default_prefetch":
        limits.default_prefetch = value
    elif name == "max_deliveries":
        limits.max_deliveries = value
    elif name == "max_payload":
        limits.max_payload = value
    elif name == "max_backlog_bytes":
        limits.max_backlog_bytes = value
    else:
        limits.max_disk = value
    return 0


cdef dict limits_dict(const Limits *limits):
    return {
        "max_line": limits.max_line,
        "max_backlog": limits.max_backlog,
        "max_connections": limits.max_connections,
        "max_memory": limits.max_memory,
        "max_subscriptions": limits.max_subscriptions,
        "max_topics": limits.max_topics,
        "max_pending": limits.max_pending,
        "idle_timeout": limits.idle_timeout,
        "write_timeout": limits.write_timeout,
        "out_batch": limits.out_batch,
        "default_prefetch": limits.default_prefetch,
        "ack_timeout": limits.ack_timeout,
        "max_deliveries": limits.max_deliveries,
        "max_disk": limits.max_disk,
        "max_payload": limits.max_payload,
        "max_backlog_bytes": limits.max_backlog_bytes,
        "group_ttl": limits.group_ttl,
    }


cdef Limits _defaults = limits_default()
LIMIT_DEFAULTS = limits_dict(&_defaults)
