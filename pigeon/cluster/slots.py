"""Topics to slots, and slots to the member that should own each (rendezvous hashing).

Every node computes these the same way, in every process: CRC-32C and BLAKE2b, never Python's
per-process ``hash``. CRC-32C is the core's (the checksum of its log records), which replication's C
walks use too (pigeon/cluster/_records.pxd).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pigeon._core import record_checksum as crc32c

SLOTS = 256


def slot_of(topic: bytes) -> int:
    """The slot of a topic: CRC-32C of its name modulo ``SLOTS``."""
    return crc32c(topic) % SLOTS


def _weight(node: str, slot: int) -> bytes:
    return hashlib.blake2b(f"{node}/{slot}".encode(), digest_size=8).digest()


def preferred_owner(slot: int, members: Iterable[str]) -> str | None:
    """The member that should own ``slot``: the highest rendezvous weight; None without members.

    Adding or removing a member moves only the slots it wins or held (about 1/n of them).
    """
    order = owner_order(slot, members)
    return order[0] if order else None


def owner_order(slot: int, members: Iterable[str]) -> list[str]:
    """The members by decreasing rendezvous weight for ``slot``: the owner, then its successors."""
    return sorted(members, key=lambda node: _weight(node, slot), reverse=True)
