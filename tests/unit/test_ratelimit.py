import asyncio

from freeal_stream.llm.ratelimit import RateLimiter, estimate_tokens


class FakeTime:
    """A clock that only moves when the limiter sleeps, so tests measure waits exactly and instantly."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def limiter(t: FakeTime, rpm: int = 0, tpm: int = 0) -> RateLimiter:
    return RateLimiter(rpm, tpm, clock=t.clock, sleep=t.sleep)


def test_estimate_is_chars_over_four_plus_max_tokens():
    assert estimate_tokens([("user", "x" * 36)], 8) == 10 + 8
    assert estimate_tokens([], 5) == 5


def test_unlimited_never_waits():
    t = FakeTime()
    lim = limiter(t)

    async def go():
        for _ in range(1000):
            await lim.acquire(10_000)

    asyncio.run(go())
    assert t.now == 0.0


def test_requests_per_minute():
    t = FakeTime()
    lim = limiter(t, rpm=60)

    async def go():
        for _ in range(60):
            await lim.acquire(1)
        assert t.now == 0.0
        await lim.acquire(1)
        assert abs(t.now - 1.0) < 1e-9

    asyncio.run(go())


def test_tokens_per_minute_and_usage_correction():
    t = FakeTime()
    lim = limiter(t, tpm=1000)

    async def go():
        await lim.acquire(600)
        lim.settle(600, 100)  # the server used far less than estimated
        await lim.acquire(900)
        assert t.now == 0.0
        await lim.acquire(600)  # 0 left: 600 tokens take 36 s to refill
        assert abs(t.now - 36.0) < 1e-6

    asyncio.run(go())


def test_request_bigger_than_the_bucket_waits_for_a_full_one():
    t = FakeTime()
    lim = limiter(t, tpm=100)

    async def go():
        await lim.acquire(50)
        await lim.acquire(5000)
        assert abs(t.now - 30.0) < 1e-6

    asyncio.run(go())


def test_pause_holds_everyone():
    t = FakeTime()
    lim = limiter(t)

    async def go():
        lim.pause(5.0)
        await lim.acquire(1)
        assert abs(t.now - 5.0) < 1e-9

    asyncio.run(go())


def test_waiters_are_served_in_arrival_order():
    t = FakeTime()
    lim = limiter(t, rpm=2)
    order: list[int] = []

    async def one(i: int):
        await lim.acquire(1)
        order.append(i)

    async def go():
        await asyncio.gather(*(one(i) for i in range(6)))

    asyncio.run(go())
    assert order == list(range(6))


def test_allowance_carries_over_between_event_loops():
    t = FakeTime()
    lim = limiter(t, rpm=1)
    asyncio.run(lim.acquire(1))
    asyncio.run(lim.acquire(1))
    assert abs(t.now - 60.0) < 1e-6
