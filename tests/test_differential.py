"""Differential test: random sessions run against the Cython core and the reference model.

Every writer call (its bytes and their split into calls), every closer call,
every return value, the counters and each topic's state must agree after every
step. Writers can pause their connection from inside the write, as a transport
crossing its high-water mark does, or fail, as a transport that is gone does.

``PIGEON_STATEFUL_EXAMPLES`` sets the number of sessions (default 150; the
documented long run uses 20000).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from pigeon._core import Broker
from tests.harness import Pair
from tests.model import ModelBroker
from tests.strategies import OWN_ID, TOPICS, command, good_topics, messages

# which live connection a rule acts on (modulo their number)
picks = st.integers(0, 7)


class CoreVsModel(RuleBasedStateMachine):
    """Drives both brokers with the same calls and compares everything they say."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[Pair] = []

    @initialize(
        limits=st.fixed_dictionaries(
            {
                "max_line": st.integers(64, 100),
                "max_backlog": st.sampled_from([0, 2, 5, 100]),
                "max_connections": st.integers(2, 6),
                "max_memory": st.sampled_from([0, 20, 60, 10_000]),
                "max_subscriptions": st.integers(1, 4),
                "max_topics": st.integers(1, 5),
                "max_pending": st.sampled_from([1, 40, 120, 10_000]),
                "idle_ticks": st.sampled_from([0, 0, 0, 1, 3]),
                "out_batch": st.sampled_from([1, 30, 80, 10_000]),
            }
        ),
        nconns=st.integers(1, 4),
    )
    def make(self, limits: dict[str, int], nconns: int) -> None:
        self.core = Broker(**limits)
        self.model = ModelBroker(**limits)
        self._open(nconns)
        # most sessions start with a subscriber, so that publishing routes something
        for pair in self.pairs[: nconns - 1]:
            self._feed(pair, b"SUBSCRIBE <me> a\nSUBSCRIBE <me> b\n")

    def _feed(self, pair: Pair | None, data: bytes) -> None:
        if pair is None or pair.closed:
            return
        cid = (self.core.client_id(pair.handle) or "c0").encode()
        data = data.replace(OWN_ID, cid)
        still_open = self.core.feed(pair.handle, data)
        assert still_open == self.model.feed(pair.handle, data)
        pair.ended = pair.ended or not still_open

    def _open(self, n: int) -> None:
        """Open n connections that CONNECT; one refused over max_connections is closed at once."""
        for _ in range(n):
            pair = Pair(self)
            self.pairs.append(pair)
            if pair.core_end.closes:
                self._close(pair)
            else:
                self._feed(pair, b"CONNECT\n")

    def _pick(self, i: int) -> Pair | None:
        live = [pair for pair in self.pairs if not pair.closed]
        return live[i % len(live)] if live else None

    def _close(self, pair: Pair | None) -> None:
        if pair is not None and not pair.closed:
            pair.closed = True
            self.core.close(pair.handle)
            self.model.close(pair.handle)

    @rule()
    def open(self) -> None:
        self._open(1)

    @rule(i=picks, lines=st.lists(command(), min_size=1, max_size=6), cut=st.integers(0, 8))
    def feed(self, i: int, lines: list[bytes], cut: int) -> None:
        pair = self._pick(i)
        data = b"".join(lines)
        # sometimes leave the end of the last line for a later read
        if cut and len(data) > cut:
            data = data[:-cut]
        self._feed(pair, data)

    @rule(i=picks, topic=good_topics)
    def subscribe(self, i: int, topic: bytes) -> None:
        pair = self._pick(i)
        self._feed(pair, b"CONNECT\nSUBSCRIBE <me> " + topic + b"\n")

    @rule(i=picks, topic=good_topics, bodies=st.lists(messages, min_size=1, max_size=8))
    def publish(self, i: int, topic: bytes, bodies: list[bytes]) -> None:
        pair = self._pick(i)
        self._feed(pair, b"".join(b"PUBLISH <me> " + topic + b" " + body + b"\n" for body in bodies))

    @rule(i=picks)
    def pause(self, i: int) -> None:
        pair = self._pick(i)
        if pair is not None:
            self.core.pause(pair.handle)
            self.model.pause(pair.handle)

    @rule(i=picks)
    def resume(self, i: int) -> None:
        pair = self._pick(i)
        if pair is not None:
            self.core.resume(pair.handle)
            self.model.resume(pair.handle)

    @rule(i=picks, pauses=st.booleans())
    def transport_pauses_on_write(self, i: int, pauses: bool) -> None:
        pair = self._pick(i)
        if pair is not None:
            pair.core_end.pause_on_write = pair.model_end.pause_on_write = pauses

    @rule(i=picks, unsent=st.integers(0, 130))
    def transport_holds(self, i: int, unsent: int) -> None:
        pair = self._pick(i)
        if pair is not None:
            pair.core_end.transport_holds = pair.model_end.transport_holds = unsent

    @rule(i=picks)
    def transport_fails(self, i: int) -> None:
        pair = self._pick(i)
        if pair is not None:
            pair.core_end.fail = pair.model_end.fail = True

    @rule(i=picks)
    def close(self, i: int) -> None:
        pair = self._pick(i)
        self._close(pair)

    @rule()
    def reap(self) -> None:
        """Close the connections the core ended, as the server does once their sockets go."""
        for pair in self.pairs:
            if pair.ended or pair.core_end.closes:
                self._close(pair)

    @rule()
    def tick(self) -> None:
        self.core.tick()
        self.model.tick()

    @rule(n=st.integers(2, 3))
    def open_many(self, n: int) -> None:
        """Several connections at once, to reach max_connections."""
        self._open(n)

    @invariant()
    def same_output(self) -> None:
        for pair in getattr(self, "pairs", []):
            assert pair.core_end.chunks == pair.model_end.chunks, pair.handle
            assert pair.core_end.closes == pair.model_end.closes, pair.handle
            if not pair.closed:
                assert self.core.client_id(pair.handle) == self.model.client_id(pair.handle)

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "core"):
            return
        core_stats = self.core.stats()
        model_stats = self.model.stats()
        assert {k: core_stats[k] for k in model_stats} == model_stats
        for name in TOPICS:
            assert self.core.topic_info(name) == self.model.topic_info(name), name


CoreVsModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("PIGEON_STATEFUL_EXAMPLES", "150")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_core_matches_model = CoreVsModel.TestCase
