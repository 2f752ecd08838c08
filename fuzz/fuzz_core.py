"""Coverage-guided fuzzing of the broker core with atheris, differential against the reference model.

Each input is a session: limits, then operations (open, feed bytes, pause,
resume, close, tick, transports that pause or fail) run on the Cython core and
on tests/model.py, through the fake transports of tests/harness.py (which the
differential test uses too); any difference in output, closes, counters or
topic state, and any crash, is a finding. Coverage comes from the instrumented model, whose
branches follow the core's rules one for one, so it guides the search through
the core's states too.

    python fuzz/fuzz_core.py fuzz/corpus -dict=fuzz/pigeon.dict -max_total_time=600

A finding is saved as crash-*: copy it into fuzz/regressions/, which the test
suite replays (tests/test_fuzz.py), and add a test that names the bug.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports(include=["tests"]):
    from tests.harness import Pair
    from tests.model import ModelBroker

from pigeon._core import Broker


class Session:
    """The two brokers under test and their connections."""

    def __init__(self, fdp: atheris.FuzzedDataProvider) -> None:
        limits = {
            "max_line": fdp.ConsumeIntInRange(64, 200),
            "max_backlog": fdp.ConsumeIntInRange(0, 6),
            "max_connections": fdp.ConsumeIntInRange(1, 6),
            "max_memory": fdp.ConsumeIntInRange(0, 200),
            "max_subscriptions": fdp.ConsumeIntInRange(1, 4),
            "max_topics": fdp.ConsumeIntInRange(1, 6),
            "max_pending": fdp.ConsumeIntInRange(1, 300),
            "idle_ticks": fdp.ConsumeIntInRange(0, 3),
            "out_batch": fdp.ConsumeIntInRange(1, 200),
        }
        self.core = Broker(**limits)
        self.model = ModelBroker(**limits)
        self.pairs: list[Pair] = []

    def live(self, fdp: atheris.FuzzedDataProvider) -> Pair | None:
        pairs = [p for p in self.pairs if not p.closed]
        return pairs[fdp.ConsumeIntInRange(0, len(pairs) - 1)] if pairs else None

    def step(self, fdp: atheris.FuzzedDataProvider) -> None:
        op = fdp.ConsumeIntInRange(0, 10)
        if op == 0 or not self.pairs:
            self.pairs.append(Pair(self))
            return
        if op == 7:
            self.core.tick()
            self.model.tick()
            return
        pair = self.live(fdp)
        if pair is None:
            return
        if op <= 3:
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
            assert self.core.feed(pair.handle, data) == self.model.feed(pair.handle, data)
        elif op == 4:
            self.core.pause(pair.handle)
            self.model.pause(pair.handle)
        elif op == 5:
            self.core.resume(pair.handle)
            self.model.resume(pair.handle)
        elif op == 6:
            pair.closed = True
            self.core.close(pair.handle)
            self.model.close(pair.handle)
        elif op == 8:
            pair.core_end.pause_on_write = pair.model_end.pause_on_write = fdp.ConsumeBool()
        elif op == 9:
            unsent = fdp.ConsumeIntInRange(0, 400)
            pair.core_end.transport_holds = pair.model_end.transport_holds = unsent
        else:
            pair.core_end.fail = pair.model_end.fail = True

    def check(self) -> None:
        for pair in self.pairs:
            assert pair.core_end.chunks == pair.model_end.chunks
            assert pair.core_end.closes == pair.model_end.closes
        core_stats = self.core.stats()
        model_stats = self.model.stats()
        assert {k: core_stats[k] for k in model_stats} == model_stats
        for name in self.model.topics:
            assert self.core.topic_info(name) == self.model.topic_info(name)


def test_one_input(data: bytes) -> None:
    """One fuzz case: a whole session from the input's bytes."""
    if b"stats" in data.lower():
        return  # STATS replies carry the uptime: the model does not predict them
    fdp = atheris.FuzzedDataProvider(data)
    session = Session(fdp)
    while fdp.remaining_bytes():
        session.step(fdp)
        session.check()
    for pair in session.pairs:
        if not pair.closed:
            session.core.close(pair.handle)
            session.model.close(pair.handle)
    session.check()


def main() -> None:
    """Run the fuzzer with libFuzzer's command line (``-help=1`` lists the flags)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
