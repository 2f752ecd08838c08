"""A kombu transport for Pigeon: ``kombu.Connection("pigeon://host:3333")``, Celery's ``broker_url``.

Installed with the extra ``pigeon-broker[celery]`` (which pulls in kombu);
docs/celery.md says what maps to what. ``Transport`` is loaded on first use,
so that ``pigeon.kombu.registration``, which kombu imports while it loads
itself, does not import kombu's transport machinery half-way through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pigeon.kombu.transport import Channel, Transport

__all__ = ["Channel", "Transport"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pigeon.kombu import transport

        return getattr(transport, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
