"""A kombu message as one Pigeon v1 message: one line of JSON.

kombu hands a transport a dict (``body``, ``content-type``, ``content-encoding``,
``headers``, ``properties``). The body is already base64 text by then (the virtual
channel's ``body_encoding``), so binary bodies are safe; the whole dict is written with
kombu's JSON encoder, which escapes every newline and control character inside strings
and writes none between fields, so the result is one line, as v1 requires. Protocol 2
(binary frames) will make the base64 step unnecessary.
"""

from __future__ import annotations

from typing import Any, cast

from kombu.utils import json


def encode(message: dict[str, Any]) -> bytes:
    """The line that carries ``message``."""
    return cast(str, json.dumps(message)).encode()


def decode(line: bytes) -> dict[str, Any]:
    """The message dict a line carries; ValueError when the line is not one."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("properties"), dict):
        raise ValueError(f"not a kombu message: {line[:100]!r}")
    return cast(dict[str, Any], message)
