"""Fake transports for running one session on the Cython core and on the reference model side by side.

Shared by the differential test (tests/test_differential.py) and the fuzzer
(fuzz/fuzz_core.py): a ``Pair`` is one connection opened on both brokers, each
end recording what its broker wrote and closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pigeon._core import Broker
from tests.model import ModelBroker


class Brokers(Protocol):
    """The two brokers a ``Pair`` opens its connection on."""

    core: Broker
    model: ModelBroker


@dataclass
class Endpoint:
    """A fake transport for one connection, in front of one broker."""

    chunks: list[bytes] = field(default_factory=list)
    closes: list[tuple[str, bool]] = field(default_factory=list)
    fail: bool = False
    pause_on_write: bool = False
    transport_holds: int = 0  # what pending() reports: bytes the transport has not sent


class Pair:
    """One connection open on both brokers."""

    def __init__(self, brokers: Brokers) -> None:
        self.core_end = Endpoint()
        self.model_end = Endpoint()
        self.handle = -1
        self.handle = brokers.core.open(
            self._writer(self.core_end, brokers.core),
            pending=lambda: self.core_end.transport_holds,
            closer=lambda r, f: self.core_end.closes.append((r, f)),
        )
        model_handle = brokers.model.open(
            self._writer(self.model_end, brokers.model),
            pending=lambda: self.model_end.transport_holds,
            closer=lambda r, f: self.model_end.closes.append((r, f)),
        )
        assert self.handle == model_handle
        self.closed = False
        self.ended = False  # the core said to close it

    def _writer(self, end: Endpoint, broker: Broker | ModelBroker) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            end.chunks.append(data)
            if end.fail:
                raise ConnectionResetError("gone")
            if end.pause_on_write and self.handle >= 0:
                broker.pause(self.handle)

        return write
