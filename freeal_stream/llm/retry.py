"""The retry policy, in one place: which errors are worth retrying, and how long to wait.

Transient: 408/409/429, 5xx, timeouts, refused or dropped connections, unreadable answers.
Everything else (400, 401, 403, 404, 422, ...) is final: retrying it only burns time and quota.
The openai client runs with max_retries=0 so that this module is the only one that retries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import openai

from freeal_stream.config import LLMConfig
from freeal_stream.errors import FreealError

_TRANSIENT_STATUS = {408, 409, 429}


class BadResponse(FreealError):
    """A 200 whose body is not a usable chat completion (proxy error page, truncated JSON)."""


@dataclass(frozen=True)
class Failure:
    """What went wrong with one attempt, in the terms the retry loop needs."""

    kind: str  # rate_limited | timeout | http_<status> | connection | unreachable | bad_response
    transient: bool
    status: int | None = None
    retry_after_s: float | None = None
    message: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter; a server's Retry-After wins when it sends one."""

    max_retries: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_retry_after_s: float = 120.0

    @classmethod
    def from_config(cls, cfg: LLMConfig, **overrides: Any) -> RetryPolicy:
        return replace(cls(max_retries=cfg.max_retries), **overrides)

    def delay(self, retry_index: int, retry_after_s: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry_index` (0-based)."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_retry_after_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2**retry_index)
        return (rng or random).uniform(0.0, ceiling)


def retry_after_s(headers: Any) -> float | None:
    """Seconds a server asked us to wait (retry-after-ms or retry-after in seconds), else None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) * scale, 0.0)
        except ValueError:
            continue  # an HTTP-date: rare for APIs; fall back to our own backoff
    return None


def _caused_by_connect_error(exc: BaseException) -> bool:
    """True when the transport never reached the server (refused, DNS, unroutable).

    Matched by class name so it holds for both the httpx and httpx2 transports openai may use.
    """
    seen: BaseException | None = exc.__cause__ or exc.__context__
    while seen is not None:
        if type(seen).__name__ == "ConnectError":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def status_failure(status: int, message: str = "", wait: float | None = None) -> Failure:
    """The Failure an HTTP error status stands for (a live answer's, or a batch result line's)."""
    if status == 429:
        return Failure("rate_limited", True, status, wait, message)
    if status == 408:
        return Failure("timeout", True, status, wait, message)
    transient = status in _TRANSIENT_STATUS or 500 <= status <= 599
    return Failure(f"http_{status}", transient, status, wait if transient else None, message)


def classify(exc: openai.OpenAIError | BadResponse) -> Failure:
    """Map an openai exception (or a BadResponse) to a Failure, transient or final."""
    if isinstance(exc, openai.APIStatusError):
        return status_failure(exc.status_code, exc.message, retry_after_s(exc.response.headers))
    if isinstance(exc, openai.APITimeoutError):
        return Failure("timeout", True, message=str(exc))
    if isinstance(exc, openai.APIConnectionError):
        kind = "unreachable" if _caused_by_connect_error(exc) else "connection"
        return Failure(kind, True, message=str(exc))
    return Failure("bad_response", True, message=f"{type(exc).__name__}: {exc}")
