"""Client-side requests/minute and tokens/minute limits, so a run stays under a provider's quota.

Each limit is a token bucket holding one minute's allowance (0 = unlimited). A request's tokens are
estimated before sending (it must wait for them) and corrected once the server reports its usage.
Waiters are served first come, first served, so requests still start in the order they were queued.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable


def estimate_usage(messages: Iterable[tuple[str, str]], max_tokens: int) -> tuple[int, int]:
    """(prompt, completion) tokens of a request before the server tells us: ~4 characters per input
    token, and the answer at its cap. Also what an answer is charged when the server reports no usage."""
    chars = sum(len(role) + len(content) for role, content in messages)
    return math.ceil(chars / 4), max_tokens


def estimate_tokens(messages: Iterable[tuple[str, str]], max_tokens: int) -> int:
    """A request's whole estimate (`estimate_usage`, summed)."""
    return sum(estimate_usage(messages, max_tokens))


class _Bucket:
    """One per-minute allowance that refills continuously."""

    def __init__(self, per_minute: int, now: float):
        self.per_minute = per_minute
        self.level = float(per_minute)
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.stamp) * self.per_minute / 60.0)
        self.stamp = now

    def wait_s(self, amount: int) -> float:
        """Seconds until `amount` is available; a request larger than the bucket waits for a full one."""
        if not self.per_minute:
            return 0.0
        missing = min(amount, self.per_minute) - self.level
        return max(missing, 0.0) * 60.0 / self.per_minute

    def take(self, amount: float) -> None:
        if self.per_minute:
            self.level -= amount


class RateLimiter:
    """asyncio limiter for requests/minute and tokens/minute (0 = unlimited)."""

    def __init__(
        self,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        now = clock()
        self._requests = _Bucket(requests_per_minute, now)
        self._tokens = _Bucket(tokens_per_minute, now)
        self._paused_until = now
        self._clock, self._sleep = clock, sleep
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _fifo(self) -> asyncio.Lock:
        """The lock that serves waiters in arrival order; one per event loop, since the allowance
        outlives the loop of a single `complete_many` call."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def acquire(self, tokens: int) -> None:
        """Wait until one request of about `tokens` tokens may be sent, then book it."""
        async with self._fifo():
            while True:
                now = self._clock()
                self._requests.refill(now)
                self._tokens.refill(now)
                wait = max(self._paused_until - now, self._requests.wait_s(1), self._tokens.wait_s(tokens))
                if wait <= 0:
                    break
                await self._sleep(wait)
            self._requests.take(1)
            self._tokens.take(tokens)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct a booked estimate with the usage the server reported."""
        self._tokens.take(actual - estimated)

    def pause(self, seconds: float) -> None:
        """Hold every sender for `seconds` (a server's Retry-After applies to the whole client)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)
