"""A supervised pool of annotator actors that send chat requests for the coordinator.

Each annotator is an `LLMClient` in its own process with a share of the job's concurrency and of its request and
token rate limits; the shares add up to the job's limits, so together they stay under them. The pool sends
chunks of consecutive requests (prompts that share a demo prefix stay on one annotator and hit its server's
prefix cache), admits each chunk through the budget guard, and replaces an annotator that dies: its chunk is
sent again, and answers it stored before dying come back from the store, not the API. Ray's ActorPool does
neither (it does not replace dead actors), hence this small supervisor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError, RayTaskError

from freeal_stream import budget as budget_policy
from freeal_stream.actors.runtime import Secret
from freeal_stream.config import LLMConfig
from freeal_stream.errors import ActorsDied, UserError
from freeal_stream.llm.client import ChatAnswer, ChatRequest, Ledger, LLMClient, add_ledger

log = logging.getLogger(__name__)

BUDGET_ERROR = "budget_exhausted"  # a request the budget did not admit (not sent, not stored)
ProgressFn = Callable[[int, int, Ledger], None]
AnswersFn = Callable[[list[int], list[ChatAnswer]], None]


class Annotators(Protocol):
    """What the coordinator sends its LLM requests through: live (AnnotatorPool) or a provider's batch API
    (llm.batch.BatchAnnotators)."""

    ledger: Ledger
    size: int  # annotator actors (0: none, requests go out as batch files)

    def complete_many(
        self, requests: Sequence[ChatRequest], progress: ProgressFn | None = None, on_answers: AnswersFn | None = None
    ) -> list[ChatAnswer]: ...

    def shutdown(self) -> None: ...


class Delivery:
    """One `complete_many` call's answers: stored ones first, duplicates sent once, each new answer handed
    to `on_answers(indices, answers)` (so labels are committed as they arrive) and counted in `progress`."""

    def __init__(
        self,
        requests: Sequence[ChatRequest],
        store: Any,
        ledger: Ledger,
        progress: ProgressFn | None,
        on_answers: AnswersFn | None,
    ):
        self.keys = [r.key() for r in requests]
        self.where: dict[str, list[int]] = {}
        for i, k in enumerate(self.keys):
            self.where.setdefault(k, []).append(i)
        self.answers: dict[str, ChatAnswer] = store.get_answers(list(self.where)) if self.keys else {}
        ledger.cache_hits += sum(len(self.where[k]) for k in self.answers)
        self.ledger, self.progress, self.on_answers = ledger, progress, on_answers
        self.done = 0
        if self.answers:
            self.deliver(list(self.answers.values()))
        self.unsent = [requests[self.where[k][0]] for k in self.where if k not in self.answers]

    def deliver(self, batch: list[ChatAnswer]) -> None:
        batch = [a for a in batch if a.key in self.where]
        idx = [i for a in batch for i in self.where[a.key]]
        for a in batch:
            self.answers[a.key] = a
        self.done += len(idx)
        if self.on_answers is not None and idx:
            self.on_answers(idx, [self.answers[self.keys[i]] for i in idx])
        if self.progress is not None:
            self.progress(self.done, len(self.keys), self.ledger)

    def result(self) -> list[ChatAnswer]:
        return [self.answers[k] for k in self.keys]


@ray.remote(num_cpus=0, max_restarts=0)
class Annotator:
    """One LLM client process. Restarts are the pool's job (a new actor, not a re-run __init__). It takes several
    chunks at once (`max_concurrency`), which share its client's concurrency, so a chunk's slow tail never
    leaves the client idle."""

    def __init__(self, cfg: LLMConfig, base_url: str, api_key: Secret | None, store: Any):
        self.client = LLMClient(cfg, base_url, api_key.value if api_key else None, cache=store)

    def complete(self, requests: list[ChatRequest]) -> tuple[list[ChatAnswer], Ledger]:
        """Answers for one chunk, and what sending it cost."""
        return self.client.complete(requests)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def share(cfg: LLMConfig, n: int) -> list[LLMConfig]:
    """Per-annotator parts of the job's concurrency and rate limits that add up to exactly the job's.

    Fewer than `n` annotators when a limit is smaller than `n` (each needs at least 1 of each limit; a
    limit of 0 means unlimited and stays 0).
    """
    limits = [v for v in (cfg.concurrency, cfg.requests_per_minute, cfg.tokens_per_minute) if v > 0]
    k = max(1, min([n, *limits]))
    part = lambda v, i: 0 if v == 0 else v // k + (i < v % k)
    return [
        dataclasses.replace(
            cfg,
            concurrency=part(cfg.concurrency, i),
            requests_per_minute=part(cfg.requests_per_minute, i),
            tokens_per_minute=part(cfg.tokens_per_minute, i),
        )
        for i in range(k)
    ]


@dataclass
class _Chunk:
    positions: list[int]  # indices into the unique-request list
    estimates: list[budget_policy.Spent]


class AnnotatorPool:
    """`complete_many` like `LLMClient`'s, run by N supervised annotator actors."""

    def __init__(
        self,
        cfg: LLMConfig,
        base_url: str,
        api_key: str | None,
        store: Any,
        *,
        size: int,
        chunk_size: int,
        max_restarts: int,
        resources: dict[str, float] | None = None,
        guard: budget_policy.BudgetGuard | None = None,
        price: Any = None,
    ):
        self.cfg, self.base_url, self.store = cfg, base_url, store
        self._key = Secret(api_key) if api_key else None
        self._actor_cfgs = share(cfg, size)
        self.size, self.chunk_size, self.max_restarts = len(self._actor_cfgs), chunk_size, max_restarts
        self.resources = resources or {}
        self.guard, self.price = guard, price
        self.ledger = Ledger()
        self.restarts = 0
        # chunks in flight per annotator: enough queued requests to keep its share of the concurrency busy
        self.in_flight = max(2, math.ceil(2 * max(c.concurrency for c in self._actor_cfgs) / chunk_size))
        self.actors = [self._new_actor(slot) for slot in range(self.size)]

    def _new_actor(self, slot: int) -> Any:
        # mypy does not apply the @ray.remote class decorator, so it cannot see ActorClass.options
        return Annotator.options(  # type: ignore[attr-defined]
            resources=self.resources, max_concurrency=self.in_flight
        ).remote(self._actor_cfgs[slot], self.base_url, self._key, self.store)

    def node_ids(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.actors])

    def complete_many(
        self, requests: Sequence[ChatRequest], progress: ProgressFn | None = None, on_answers: AnswersFn | None = None
    ) -> list[ChatAnswer]:
        """Answers in the order of `requests`. Stored answers are read, not sent; duplicates go once.

        `on_answers(indices, answers)` sees each batch as it completes (so labels are committed as they
        arrive). A request the budget does not admit comes back failed with error BUDGET_ERROR.
        """
        d = Delivery(requests, self.store, self.ledger, progress, on_answers)
        unique = d.unsent
        chunks = [list(range(s, min(s + self.chunk_size, len(unique)))) for s in range(0, len(unique), self.chunk_size)]
        for refused in self._run_chunks(unique, chunks, d.deliver):
            d.deliver([not_admitted(unique[p].key()) for p in refused])
        return d.result()

    def _run_chunks(
        self, unique: list[ChatRequest], chunks: list[list[int]], deliver: Callable[[list[ChatAnswer]], None]
    ) -> list[list[int]]:
        """Keep each annotator busy with `in_flight` chunks; returns the positions the budget refused."""
        queue = list(reversed(chunks))
        running: dict[Any, tuple[int, Any, _Chunk]] = {}  # ObjectRef -> (actor slot, actor, chunk)
        refused: list[list[int]] = []
        load = [0] * self.size

        def submit(slot: int, chunk: _Chunk) -> None:
            ref = self.actors[slot].complete.remote([unique[p] for p in chunk.positions])
            running[ref] = (slot, self.actors[slot], chunk)
            load[slot] += 1

        while queue or running:
            for slot in range(self.size):
                while queue and load[slot] < self.in_flight:
                    positions = queue.pop()
                    est = [
                        budget_policy.estimate(unique[p].messages, unique[p].max_tokens, self.price) for p in positions
                    ]
                    n = self.guard.admit(est) if self.guard is not None else len(positions)
                    if n < len(positions):  # the cap is reached: send what fits, refuse the rest
                        refused.append(positions[n:])
                        refused.extend(reversed(queue))
                        queue.clear()
                    if n:
                        submit(slot, _Chunk(positions[:n], est[:n]))
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            slot, actor, chunk = running.pop(ready[0])
            load[slot] -= 1
            try:
                batch, spent = ray.get(ready[0])
            except RayTaskError as e:
                self._release(chunk)
                raise (e.cause or e) from None  # e.g. FatalLLMError: the same clean message as in-process
            except RayActorError:
                if self.actors[slot] is actor:  # its other chunk in flight fails too: replace once
                    self._replace(slot)
                self._release(chunk)
                queue.append(chunk.positions)  # sent again first; stored answers come from the store
                continue
            self._release(chunk)
            add_ledger(self.ledger, spent)
            deliver(batch)
        return refused

    def _release(self, chunk: _Chunk) -> None:
        if self.guard is not None:
            self.guard.release(chunk.estimates)

    def _replace(self, slot: int) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise ActorsDied("annotator", self.restarts, self.max_restarts)
        log.warning("annotator %d died; starting a replacement (%d/%d)", slot, self.restarts, self.max_restarts)
        self.actors[slot] = self._new_actor(slot)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)


def not_admitted(key: str) -> ChatAnswer:
    return ChatAnswer.failure(key, BUDGET_ERROR, attempts=0)


def wait_for_actors(pool: AnnotatorPool, timeout_s: float = 120.0) -> None:
    """Block until every annotator has started (placement on a pinned node can take a moment)."""
    deadline = time.monotonic() + timeout_s
    _, pending = ray.wait(
        [a.node_id.remote() for a in pool.actors], num_returns=pool.size, timeout=max(0.0, deadline - time.monotonic())
    )
    if pending:
        raise UserError(
            f"{len(pending)} of {pool.size} annotator actors could not be placed within "
            f"{timeout_s:.0f} s (resources asked: {pool.resources or 'none'}). Fix: check "
            "ray.annotator_resources against the cluster's nodes (`ray status`)"
        )
