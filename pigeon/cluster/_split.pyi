from collections.abc import Iterable, Sequence

class SlotSplitter:
    """Which nodes get which records: ``targets[slot]`` (one entry per slot) names the nodes that
    get the ``PUBLISH`` records of ``slot``, ``done_to`` those that get every other record
    (``DONE`` and ``DELIVERED``)."""

    nodes: tuple[str, ...]
    def __init__(self, targets: Sequence[Iterable[str]], done_to: Iterable[str]) -> None: ...
    def split(self, data: bytes | memoryview) -> dict[str, list[memoryview]]: ...
