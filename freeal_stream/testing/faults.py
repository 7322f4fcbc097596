"""Fault injection for whole-job tests: a responder that plays a random fault on a share of requests and
keeps the books a provider would (faults by kind, real answers delivered per request body)."""

from __future__ import annotations

import dataclasses
import random
import threading

from freeal_stream.testing.fake_openai_server import body_hash, drop, error, garbage, ok
from freeal_stream.testing.keyword_llm import respond

FAULTS = {
    "429 with Retry-After": lambda: error(429, headers={"Retry-After": "0.2"}),
    "429 without Retry-After": lambda: error(429),
    "500": lambda: error(500),
    "503": lambda: error(503),
    "timeout": lambda: dataclasses.replace(ok("billing"), delay_s=3.0),
    "dropped connection": drop,
    "garbage body": garbage,
    "empty answer": lambda: ok(""),
    "two labels": lambda: ok("billing technical"),
    "truncated answer": lambda: ok("bill", finish_reason="length"),
    "wrong language": lambda: ok("facturación"),
}
# faults that arrive as a 200 with an answer: a provider bills them, so they are stored (with no label)
ANSWERED_FAULTS = ("empty answer", "two labels", "truncated answer", "wrong language")


class Flaky:
    """Faults on a share of requests (seeded), the deterministic keyword answer otherwise."""

    def __init__(self, seed: int = 7, rate: float = 0.35):
        self.rng = random.Random(seed)
        self.rate = rate
        self.lock = threading.Lock()
        self.injected: dict[str, int] = {}
        self.answered: dict[str, int] = {}  # body hash -> real answers delivered (what a provider bills)

    def __call__(self, body):
        with self.lock:
            kind = self.rng.choice(list(FAULTS)) if self.rng.random() < self.rate else None
            if kind:
                self.injected[kind] = self.injected.get(kind, 0) + 1
            else:
                self.answered[body_hash(body)] = self.answered.get(body_hash(body), 0) + 1
        return FAULTS[kind]() if kind else respond(body)

    def paid_answers(self) -> int:
        """Answers a provider bills: real ones plus the faults that arrive as answers."""
        return sum(self.answered.values()) + sum(self.injected.get(kind, 0) for kind in ANSWERED_FAULTS)
