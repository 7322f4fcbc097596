"""The actor layer on a real local Ray: supervision, faults through the pool, the budget at dispatch."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import ray

from freeal_stream.actors.annotators import BUDGET_ERROR, AnnotatorPool, share
from freeal_stream.actors.store_actor import start_store
from freeal_stream.budget import BudgetGuard, spent_from_usage
from freeal_stream.config import BudgetConfig, LLMConfig, Price
from freeal_stream.llm.client import ChatRequest
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer, error, ok, slow
from freeal_stream.testing.local_ray import local_ray


@pytest.fixture(scope="module", autouse=True)
def a_local_ray():
    with local_ray(cpus=2):
        yield


@pytest.fixture
def store(tmp_path):
    s = start_store(tmp_path / "state.duckdb")
    yield s
    s.close()


def requests(n: int, cfg: LLMConfig) -> list[ChatRequest]:
    return [ChatRequest.build([{"role": "user", "content": f"text {i}"}], cfg, "t") for i in range(n)]


def test_shares_add_up_to_the_jobs_limits():
    parts = share(LLMConfig(concurrency=5, requests_per_minute=601, tokens_per_minute=0), 2)
    assert [(p.concurrency, p.requests_per_minute, p.tokens_per_minute) for p in parts] == [(3, 301, 0), (2, 300, 0)]
    one = share(LLMConfig(concurrency=1), 2)  # a one-slot server: one annotator, never 2 requests at once
    assert [p.concurrency for p in one] == [1]
    assert len(share(LLMConfig(concurrency=8, requests_per_minute=3), 4)) == 3


def test_a_killed_annotator_is_replaced_and_nothing_stored_is_sent_again(store):
    """Kill one annotator mid-run: its chunk goes to a new actor; answers stored before are not re-sent."""
    with FakeOpenAIServer(lambda body: slow(0.15, "positive")) as server:
        cfg = LLMConfig(base_url=server.base_url, model="m", concurrency=2, max_retries=0)
        pool = AnnotatorPool(cfg, server.base_url, None, store, size=2, chunk_size=4, max_restarts=3)
        reqs = requests(40, cfg)
        seen = []

        def killer():
            while len(server.requests) < 6:
                time.sleep(0.02)
            ray.kill(pool.actors[0], no_restart=True)

        t = threading.Thread(target=killer)
        t.start()
        answers = pool.complete_many(reqs, on_answers=lambda idx, ans: seen.extend(idx))
        t.join()
    assert pool.restarts == 1
    assert all(a.content == "positive" for a in answers) and sorted(seen) == list(range(40))
    stored = store.get_answers([r.key() for r in reqs])
    assert len(stored) == 40
    dupes = sum(c - 1 for c in server.hash_counts.values())
    assert dupes <= 4  # at most the killed actor's chunk in flight, never a stored answer


def test_faults_are_retried_inside_the_actors(store):
    with FakeOpenAIServer() as server:
        server.script(error(429, headers={"Retry-After": "0.1"}), error(500), error(503), ok("negative"))
        cfg = LLMConfig(base_url=server.base_url, model="m", concurrency=1, max_retries=5)
        pool = AnnotatorPool(cfg, server.base_url, None, store, size=1, chunk_size=2, max_restarts=0)
        answers = pool.complete_many(requests(3, cfg))
    assert [a.error for a in answers] == [None, None, None]
    assert pool.ledger.retries == 3 and pool.ledger.requests_sent == 6


def test_money_cap_stops_dispatch_within_the_requests_in_flight(store):
    """Each request costs ~ (prompt 4 + output 8 tokens); the cap admits chunks only while they fit."""
    price = Price(input=1000.0, output=1000.0)  # money per million tokens: 0.001 a token
    budget = BudgetConfig(max_cost=0.1, prices={"m": price})
    with FakeOpenAIServer() as server:
        cfg = LLMConfig(base_url=server.base_url, model="m", concurrency=2)
        guard = BudgetGuard(budget, lambda: spent_from_usage(store.usage_by_model(), budget))
        pool = AnnotatorPool(
            cfg, server.base_url, None, store, size=2, chunk_size=2, max_restarts=0, guard=guard, price=price
        )
        answers = pool.complete_many(requests(50, dataclasses.replace(cfg, max_tokens=8)))
    sent = [a for a in answers if a.error is None]
    refused = [a for a in answers if a.error == BUDGET_ERROR]
    assert sent and refused and len(sent) + len(refused) == 50
    spent = spent_from_usage(store.usage_by_model(), budget)
    assert spent.cost <= 0.1 and len(server.requests) == len(sent)
