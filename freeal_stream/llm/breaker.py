"""The circuit breaker, in one place: stop hammering an endpoint that keeps failing, and give up on a dead one.

Per-request retries (retry.py) help with one unlucky request; they make things worse when the whole
endpoint is down, because every request in flight retries on its own. The breaker watches all requests
of one client together: after `failures` consecutive transient failures it opens, and no request is sent
for a cool-down (doubling, up to 8x); then one probe goes out (half-open) while the others wait. A success
anywhere closes it. When failures have continued for `give_up_after_s` the endpoint counts as dead and
the run stops with a FatalLLMError; everything answered so far is stored, so the next run resumes.

429 does not count: a server that says "slow down" is alive, and the rate limiter handles it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from freeal_stream.errors import FreealError


class EndpointDead(FreealError):
    """Failures went on for longer than the breaker's give_up_after_s."""


class CircuitBreaker:
    """Shared by all requests of one client (one asyncio loop); not thread-safe by design."""

    def __init__(
        self, failures: int, cooldown_s: float, give_up_after_s: float, clock: Callable[[], float] = time.monotonic
    ):
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.give_up_after_s = give_up_after_s
        self.opened = 0  # how many times the circuit opened (for the ledger)
        self._clock = clock
        self._streak = 0  # consecutive failures, all requests together
        self._failing_since: float | None = None
        self._open_until = 0.0
        self._cooldowns = 0  # consecutive opens without a success: the cool-down doubles
        self._probing = False  # half-open: one request is out, the others wait for its outcome
        self._last_kind = ""

    @property
    def is_open(self) -> bool:
        return self._streak >= self.failures

    async def admit(self) -> None:
        """Wait until a request may be sent: at once when closed; one probe per cool-down when open."""
        while self.is_open:
            self._check_dead()
            wait = self._open_until - self._clock()
            if wait <= 0 and not self._probing:
                self._probing = True
                return
            await asyncio.sleep(min(max(wait, 0.05), 1.0))

    def success(self) -> None:
        self._streak = 0
        self._cooldowns = 0
        self._failing_since = None
        self._probing = False

    def failure(self, kind: str) -> None:
        """Count a transient failure (not 429); opens the circuit, or re-opens it after a failed probe."""
        now = self._clock()
        self._last_kind = kind
        if self._failing_since is None:
            self._failing_since = now
        self._streak += 1
        if self._probing or self._streak == self.failures:
            self._probing = False
            self._open_until = now + self.cooldown_s * 2 ** min(self._cooldowns, 3)
            self._cooldowns += 1
            self.opened += 1
        self._check_dead()

    def _check_dead(self) -> None:
        if (
            self.is_open
            and self._failing_since is not None
            and self._clock() - self._failing_since >= self.give_up_after_s
        ):
            raise EndpointDead(
                f"{self._streak} requests in a row failed over "
                f"{self._clock() - self._failing_since:.0f} s (last: {self._last_kind})"
            )
