"""The circuit breaker: a dead endpoint gets a handful of requests, not a retry storm, and the run stops with
a clear error; an endpoint that comes back is used again."""

import asyncio
import time

import pytest

from freeal_stream.llm.breaker import CircuitBreaker, EndpointDead
from freeal_stream.llm.client import FatalLLMError
from freeal_stream.llm.retry import RetryPolicy
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer, error, ok
from tests.unit.test_client import MemoryCache, make_client, req

PATIENT = RetryPolicy(max_retries=10, base_delay_s=0.01, max_delay_s=0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_a_success_closes_it():
    clock = Clock()
    b = CircuitBreaker(failures=3, cooldown_s=10, give_up_after_s=100, clock=clock)
    b.failure("http_503")
    b.failure("http_503")
    assert not b.is_open
    b.success()  # a success in between resets the streak
    for _ in range(3):
        b.failure("timeout")
    assert b.is_open and b.opened == 1


def test_one_probe_per_cooldown_and_cooldown_doubles():
    clock = Clock()
    b = CircuitBreaker(failures=2, cooldown_s=1, give_up_after_s=100, clock=clock)
    b.failure("http_500")
    b.failure("http_500")
    clock.now = 1.0  # cool-down over: exactly one request may go out
    asyncio.run(b.admit())
    assert b._probing

    async def second_waits():
        await asyncio.wait_for(b.admit(), 0.2)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(second_waits())
    b.failure("http_500")  # the probe failed: open again, for twice as long
    assert b._open_until == pytest.approx(1.0 + 2.0)


def test_gives_up_after_failing_for_long_enough():
    clock = Clock()
    b = CircuitBreaker(failures=2, cooldown_s=1, give_up_after_s=30, clock=clock)
    b.failure("connection")
    clock.now = 29.0
    b.failure("connection")
    clock.now = 31.0
    with pytest.raises(EndpointDead, match="2 requests in a row failed over 31 s .last: connection"):
        asyncio.run(b.admit())


def test_dead_endpoint_gets_few_requests_and_a_clear_error():
    with FakeOpenAIServer(lambda body: error(503)) as server:
        client = make_client(
            server,
            MemoryCache(),
            policy=PATIENT,
            concurrency=4,
            circuit_failures=3,
            circuit_cooldown_s=0.2,
            give_up_after_s=2.0,
        )
        started = time.monotonic()
        with pytest.raises(FatalLLMError, match="looks down: .* requests in a row failed .*http_503.*run again"):
            client.complete_many([req(f"text {i}") for i in range(40)])
        took = time.monotonic() - started
        sent = len(server.requests)
    # 40 requests x 11 attempts = 440 without a breaker; with it: the first failures, then one probe per cool-down
    assert sent <= 3 + 4 + 6, sent
    assert took < 10


def test_endpoint_that_comes_back_is_used_again():
    with FakeOpenAIServer(lambda body: ok("positive")) as server:
        server.script(*[error(500)] * 6)
        cache = MemoryCache()
        client = make_client(
            server, cache, policy=PATIENT, concurrency=2, circuit_failures=3, circuit_cooldown_s=0.1, give_up_after_s=30
        )
        answers = client.complete_many([req(f"text {i}") for i in range(10)])
    assert all(a.error is None and a.content == "positive" for a in answers)
    assert client.breaker.opened >= 1 and not client.breaker.is_open
    assert len(cache.puts) == 10


def test_rate_limits_do_not_open_the_circuit():
    with FakeOpenAIServer(lambda body: ok("positive")) as server:
        server.script(*[error(429)] * 8)
        client = make_client(
            server,
            MemoryCache(),
            policy=PATIENT,
            concurrency=1,
            circuit_failures=3,
            circuit_cooldown_s=60,
            give_up_after_s=1,
        )
        answers = client.complete_many([req("a"), req("b")])
    assert all(a.error is None for a in answers) and client.breaker.opened == 0
