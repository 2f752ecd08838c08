SLOTS: int

def slot_of(topic: bytes) -> int:
    """The slot of ``topic`` (its name's bytes): CRC-32C modulo ``SLOTS``."""
