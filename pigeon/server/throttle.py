"""Slowing down password guessing: a growing delay before answering logins from an address that keeps failing.

The rule (docs/security.md): once an address has 5 failed logins within the
last 60 seconds, the answer to each further login from it, right or wrong, is
delayed by 2^k seconds, capped at 30, where k is the number of failures within
the window beyond the 5th; and answers to one address go out one delay apart,
so opening many connections at once does not guess faster. IPv6 addresses
count by their /64 network, which one host usually has whole.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress

FREE_FAILURES = 5
WINDOW = 60.0
MAX_DELAY = 30.0
# the table of addresses is swept of forgotten ones when it reaches this size, then at twice its size
SWEEP_AT = 1024


def address_key(host: str) -> str:
    """What failures are counted by: the IPv4 address, or the /64 network of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclasses.dataclass
class _Address:
    failures: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    # when the last delayed answer to this address is due: the next one goes after it
    next_answer: float = 0.0


class LoginThrottle:
    """Failed logins by address, and the delay each new login's answer gets (times: one monotonic clock)."""

    def __init__(
        self, free_failures: int = FREE_FAILURES, window: float = WINDOW, max_delay: float = MAX_DELAY
    ) -> None:
        self.free_failures = free_failures
        self.window = window
        self.max_delay = max_delay
        self.throttled = 0  # logins whose answer was delayed, since start
        self._addresses: dict[str, _Address] = {}
        self._sweep_at = SWEEP_AT

    def _recent(self, key: str, now: float) -> _Address | None:
        state = self._addresses.get(key)
        if state is not None:
            while state.failures and state.failures[0] <= now - self.window:
                state.failures.popleft()
        return state

    def delay(self, host: str, now: float) -> float:
        """Seconds to wait before answering a login from ``host`` arriving at ``now`` (0: answer at once)."""
        state = self._recent(address_key(host), now)
        if state is None or len(state.failures) < self.free_failures:
            return 0.0
        beyond = len(state.failures) - self.free_failures
        step = min(2.0**beyond if beyond < 64 else self.max_delay, self.max_delay)
        state.next_answer = max(now, state.next_answer) + step
        self.throttled += 1
        return state.next_answer - now

    def failed(self, host: str, now: float) -> None:
        """A login from ``host`` failed at ``now``."""
        key = address_key(host)
        state = self._recent(key, now)
        if state is None:
            if len(self._addresses) >= self._sweep_at:
                self._sweep(now)
            state = self._addresses[key] = _Address()
        state.failures.append(now)

    def _sweep(self, now: float) -> None:
        """Forget addresses with no failure in the window and no answer pending."""
        for key in list(self._addresses):
            state = self._recent(key, now)
            if state is not None and not state.failures and state.next_answer <= now:
                del self._addresses[key]
        self._sweep_at = max(SWEEP_AT, 2 * len(self._addresses))

    def __len__(self) -> int:
        """Addresses remembered."""
        return len(self._addresses)
