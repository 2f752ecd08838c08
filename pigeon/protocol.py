"""The wire protocol's constants (docs/protocol.md), and the rule a topic name follows, defined once for
the clients, the server and the tools.

Plain literals on purpose: the build will read ``TOPIC_MAX`` from here for the C core.
"""

import unicodedata

DEFAULT_HOST = "127.0.0.1"  # where the server listens, and the clients connect, by default
DEFAULT_PORT = 3333
TOPIC_MAX = 255  # the longest topic, in bytes of UTF-8

# The server refuses these Unicode categories in a topic: controls (Cc), format
# characters (Cf: zero-width, BOM, bidi controls), spaces (Zs) and line and
# paragraph separators (Zl, Zp).
REFUSED_IN_TOPICS = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def topic_problem(text: str) -> str | None:
    """Why the server would refuse ``text`` as a topic (``topic must ...``), or None when it would not."""
    size = len(text.encode(errors="surrogatepass"))
    if not size:
        return "topic must not be empty"
    if size > TOPIC_MAX:
        return f"topic must be at most {TOPIC_MAX} bytes, not {size}"
    if any(unicodedata.category(char) in REFUSED_IN_TOPICS for char in text):
        return f"topic {text!r} must not contain whitespace, control, format or separator characters"
    return None


def parse_host_port(text: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` too), as cluster nodes advertise themselves, as a pair; None when
    it is not one."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    return (host, int(port)) if host and port.isdigit() else None
