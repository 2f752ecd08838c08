"""The wire protocol's constants (docs/protocol.md), defined once for the clients, the server and the tools.

Plain literals on purpose: the build will read ``TOPIC_MAX`` from here for the C core.
"""

DEFAULT_HOST = "127.0.0.1"  # where the server listens, and the clients connect, by default
DEFAULT_PORT = 3333
TOPIC_MAX = 255  # the longest topic, in bytes of UTF-8
