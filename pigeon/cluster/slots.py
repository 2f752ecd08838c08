"""Topics to slots, and slots to the member that should own each (rendezvous hashing).

Every node computes these the same way, in every process: CRC-32C and BLAKE2b, never Python's
per-process ``hash``. ``SLOTS`` and ``slot_of`` are C (pigeon/cluster/_slot.pxd): CRC-32C, as the core
checksums its log records (pigeon/_crc32c.pxd), and the same code replication's C walks use to find
a record's slot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pigeon.cluster._slot import SLOTS, slot_of

__all__ = ["SLOTS", "owner_order", "preferred_owner", "slot_of"]


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
