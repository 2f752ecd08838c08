"""How ``pigeon://`` and ``pigeons://`` become a kombu transport name once the package is installed.

kombu resolves a URL's scheme through one table, ``kombu.transport.TRANSPORT_ALIASES``; it has no
entry-point group for transports. It does load the entry-point group ``kombu.serializers`` every
time it imports itself (``kombu.serialization``, which ``kombu.Connection`` needs), calling
``register(name, *value)`` with each entry's value. Pigeon's entry there is ``SERIALIZER`` below:
loading it imports this module, which adds the aliases, and kombu registers the serializer it
names as a by-product: plain JSON under the name ``pigeon-json`` and its own content type, which
nothing uses unless asked to (and which no existing content type is displaced by).

This module must import nothing of kombu but ``kombu.transport``, whose import is light: kombu is
half-way through its own import when it loads the entry point.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

TRANSPORT = "pigeon.kombu.transport:Transport"
SCHEMES = ("pigeon", "pigeons")  # pigeons://: over TLS
CONTENT_TYPE = "application/x-pigeon-json"


def register() -> None:
    """Add ``pigeon`` and ``pigeons`` to kombu's transport aliases (idempotent)."""
    from kombu.transport import TRANSPORT_ALIASES

    for scheme in SCHEMES:
        TRANSPORT_ALIASES.setdefault(scheme, TRANSPORT)


def _dumps(value: Any) -> str:
    return json.dumps(value)


register()

# kombu's serializer registration arguments: encoder, decoder, content type, content encoding
SERIALIZER: tuple[Callable[[Any], str], Callable[[str | bytes], Any], str, str] = (
    _dumps,
    json.loads,
    CONTENT_TYPE,
    "utf-8",
)
