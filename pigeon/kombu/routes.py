"""How kombu's exchanges, bindings and queues map to Pigeon topics and consumer groups.

AMQP routes a message through an exchange to every queue bound to it; Pigeon routes a message
published to a topic to one subscriber of each consumer group whose pattern matches the topic
(docs/protocol.md). So a kombu queue that is bound to an exchange is a consumer group named after
the queue, subscribed to the topics the binding covers, and every queue gets its own copy:

- the default exchange (``""``): the topic named by the routing key, which is the queue's name;
  the queue consumes it with a plain subscription (no group);
- a direct exchange: the topic named by the routing key (the exchange's name is not part of it);
  a queue bound with a routing key other than its own name (kombu's pidbox replies do that)
  joins that topic as group ``<queue>``; one bound with its own name (Celery's task queues)
  is its plain subscription, as with the default exchange;
- a fanout exchange ``E``: the topic ``_ex.E``; each bound queue is a group on it;
- a topic exchange ``E``: the topic ``_ex.E.<routing key>`` (``_ex.E`` for an empty key); a
  binding key becomes a pattern: ``*`` is Pigeon's ``*``, a ``#`` at the end is the pattern
  without it plus the pattern with ``>`` (``#`` matches zero or more words, ``>`` one or more),
  so ``a.#`` is ``_ex.E.a`` and ``_ex.E.a.>``. A ``#`` before the end has no Pigeon pattern and is
  refused.

Group names are at most 64 bytes: a longer queue name is cut and ends with a digest of the whole,
the same in every process.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable

from pigeon.client import codec

EXCHANGE_PREFIX = "_ex."  # fanout and topic exchanges' topics; the underscore keeps them apart from queues
SUPPORTED = frozenset(["direct", "fanout", "topic"])


class ExchangeTypeNotSupported(NotImplementedError):
    """An exchange type or a binding key that has no Pigeon equivalent (a headers exchange, a ``#``
    before the end of a topic binding)."""


class OverlappingQueues(ValueError):
    """Two queues consumed on one channel whose topics can overlap: a delivery names only its topic,
    so it could not be told which queue it is for."""


def publish_topic(kind: str, exchange: str, routing_key: str) -> str:
    """The topic a message published to ``exchange`` (of type ``kind``, not the default one) goes to."""
    if kind == "direct":
        return routing_key
    if kind == "fanout":
        return EXCHANGE_PREFIX + exchange
    if kind == "topic":
        return EXCHANGE_PREFIX + exchange + ("." + routing_key if routing_key else "")
    raise ExchangeTypeNotSupported(
        f"pigeon:// cannot route through the {kind} exchange {exchange!r}: "
        f"it supports {', '.join(sorted(SUPPORTED))}"
    )


def binding_patterns(kind: str, exchange: str, routing_key: str, queue: str) -> list[str]:
    """The topics or patterns ``queue`` subscribes to, as a group, for its binding to ``exchange``
    with ``routing_key`` (none when its plain subscription to its own topic covers the binding)."""
    if kind == "direct":
        return [] if routing_key == queue else [routing_key]
    if kind == "fanout":
        return [publish_topic(kind, exchange, routing_key)]
    if kind == "topic":
        words = routing_key.split(".") if routing_key else []
        if "#" in words[:-1]:
            raise ExchangeTypeNotSupported(
                f"pigeon:// cannot bind {queue!r} to {exchange!r} with {routing_key!r}: a '#' is only "
                "supported as the last word (Pigeon's '>' ends a pattern)"
            )
        base = EXCHANGE_PREFIX + exchange
        if words and words[-1] == "#":
            head = ".".join([base, *words[:-1]])
            return [head, head + ".>"]
        return [".".join([base, *words])]
    raise ExchangeTypeNotSupported(f"pigeon:// cannot bind to the {kind} exchange {exchange!r}")


def group_name(queue: str) -> str:
    """The consumer group a bound queue is: its name, or when that passes 64 bytes its start and a
    digest of the whole (the same in every process)."""
    raw = queue.encode()
    if len(raw) <= codec.GROUP_NAME_MAX:
        return queue
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[: codec.GROUP_NAME_MAX - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def patterns_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both patterns (so its deliveries could not be told apart)."""
    return _overlap(a.split("."), b.split("."))


def _overlap(a: list[str], b: list[str]) -> bool:
    if not a or not b:
        return not a and not b
    if a[0] == ">" or b[0] == ">":
        return True  # '>' takes one or more of the other's remaining tokens, which are not empty
    if a[0] != b[0] and "*" not in (a[0], b[0]):
        return False
    return _overlap(a[1:], b[1:])


def matcher(pattern: str) -> Callable[[str], bool]:
    """A test of whether a topic's deliveries belong to a subscription to ``pattern``."""
    return functools.partial(codec.topic_matches, pattern)


def first_overlap(pattern: str, others: Iterable[str]) -> str | None:
    """One of ``others`` that overlaps ``pattern``, or None."""
    return next((other for other in others if patterns_overlap(pattern, other)), None)
