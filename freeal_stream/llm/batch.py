"""`llm.mode: batch`: the coordinator's requests go out as batch files through the provider's batch API.

The same `complete_many` as the live annotator pool: stored answers are read, not sent; the rest is cut
into files (one model, <= batch_max_requests lines, <= 200 MB, <= the enqueued-token limit), each admitted
whole or cut by the budget guard, recorded in the state with its requests before its upload, then uploaded,
created and polled with backoff. A finished batch's answers are stored (Store.put_answer, priced at the batch
discount) before they count. Rows an expired, cancelled or failed batch never ran go out again in a new
batch (up to llm.max_retries times); rows the provider refused are recorded as failures, like live ones.
A killed run finds its submissions in the state and polls them (or finishes sending them) instead of
submitting again, so nothing is paid twice.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from openai.types import Batch

from freeal_stream import budget as budget_policy
from freeal_stream.actors.annotators import AnswersFn, Delivery, ProgressFn, not_admitted
from freeal_stream.config import LLMConfig, Price
from freeal_stream.llm.batch_api import BatchAPI, BatchAPIUnavailable
from freeal_stream.llm.batch_format import (
    UNFINISHED,
    BatchFile,
    RowResult,
    failed,
    plan_files,
    read_results,
    request_from_json,
    request_json,
)
from freeal_stream.llm.client import ChatAnswer, ChatRequest, FatalLLMError, Ledger
from freeal_stream.progress import fmt_duration

log = logging.getLogger(__name__)

TERMINAL = ("completed", "expired", "cancelled", "failed")
BACKOFF = 1.5  # each quiet poll waits this much longer, up to llm.batch_poll_max_s
SAY_EVERY_S = 300.0  # a batch that is still running is reported at least this often


class BatchTimeLimit(FatalLLMError):
    """Batches still running after llm.batch_max_wait_s: the run stops; the next one resumes polling them."""


@dataclass
class _Submission:
    """One batch file on its way: recorded, uploaded (file_id), created (batch_id), collected."""

    submission: str
    model: str
    requests: dict[str, ChatRequest]  # by key, in file order
    prompt_tokens: int
    estimates: list[budget_policy.Spent]  # reserved in the budget guard until its results are stored
    created_at: float
    file_id: str | None = None
    batch_id: str | None = None
    state: str = "prepared"
    resumed: bool = False
    said_at: float = 0.0
    failing_since: float | None = None  # polls failing since (monotonic), while the endpoint is unavailable


class BatchAnnotators:
    """`complete_many` like AnnotatorPool's, through a provider's files and batches API."""

    size = 0

    def __init__(
        self,
        cfg: LLMConfig,
        base_url: str,
        api_key: str | None,
        store: Any,
        *,
        guard: budget_policy.BudgetGuard | None = None,
        price: Price | None = None,
        say: Callable[[str], None] | None = None,
    ):
        """`price` is the model's list price (the batch discount is applied here)."""
        self.cfg, self.store, self.guard = cfg, store, guard
        self.list_price, self.price = price, budget_policy.mode_price(price, True)
        self.api = BatchAPI(cfg, base_url, api_key)
        self.say = say or log.info
        self.ledger = Ledger()
        self.batches_created = 0

    def shutdown(self) -> None:
        self.api.client.close()

    def complete_many(
        self, requests: Sequence[ChatRequest], progress: ProgressFn | None = None, on_answers: AnswersFn | None = None
    ) -> list[ChatAnswer]:
        """Answers in the order of `requests` (see AnnotatorPool.complete_many); returns once every batch
        holding one of them is collected. Submissions an earlier run left in flight are polled first."""
        d = Delivery(requests, self.store, self.ledger, progress, on_answers)
        in_flight = self._resume()
        waiting = {k for s in in_flight for k in s.requests}
        fresh = [r for r in d.unsent if r.key() not in waiting]
        if fresh:
            self._say_preflight(fresh)
        queue = collections.deque(self._plan(fresh))
        tries: collections.Counter[str] = collections.Counter()
        started = time.monotonic()
        wait = self.cfg.batch_poll_s
        while True:
            self._submit_what_fits(queue, in_flight, d)
            changed = False
            for sub in list(in_flight):
                batch = self._poll(sub)
                if batch is not None and batch.status in TERMINAL:
                    in_flight.remove(sub)
                    queue.extend(self._plan(self._collect(sub, batch, d, tries)))
                    changed = True
            if not in_flight and not queue:
                return d.result()
            if time.monotonic() - started > self.cfg.batch_max_wait_s:
                raise self._time_limit(in_flight)
            wait = self.cfg.batch_poll_s if changed else min(wait * BACKOFF, self.cfg.batch_poll_max_s)
            time.sleep(wait)

    # ---- planning and sending -----------------------------------------------------------------------
    def _plan(self, requests: Sequence[ChatRequest]) -> list[BatchFile]:
        return plan_files(requests, self.cfg.batch_max_requests, max_tokens=self.cfg.batch_enqueued_tokens)

    def _say_preflight(self, requests: Sequence[ChatRequest]) -> None:
        """What the requests will cost at most in batch mode, and what they would cost live."""
        live, batch = (
            [budget_policy.estimate(r.messages, r.max_tokens, p) for r in requests]
            for p in (self.list_price, self.price)
        )
        money = (
            (f"; cost at most ~{sum(e.cost for e in batch):.4f} in batch mode (live: ~{sum(e.cost for e in live):.4f})")
            if self.list_price
            else ""
        )
        self.say(f"batch mode: {len(requests)} requests, ~{sum(e.tokens for e in batch)} tokens at most{money}")

    def _submit_what_fits(self, queue: collections.deque[BatchFile], in_flight: list[_Submission], d: Delivery) -> None:
        """Send queued files while the enqueued-token limit has room; the budget admits each whole or cut."""
        while queue and self._fits(queue[0], in_flight):
            f = queue.popleft()
            est = [budget_policy.estimate(r.messages, r.max_tokens, self.price) for r in f.requests]
            n = self.guard.admit(est) if self.guard is not None else len(est)
            if n < len(est):  # the cap is reached: send what fits, refuse the rest
                refused = list(f.requests[n:]) + [r for rest in queue for r in rest.requests]
                queue.clear()
                d.deliver([not_admitted(r.key()) for r in refused])
                if not n:
                    return
                f = plan_files(f.requests[:n], len(f.requests))[0]
            in_flight.append(self._submit(f, est[:n]))

    def _fits(self, f: BatchFile, in_flight: list[_Submission]) -> bool:
        limit = self.cfg.batch_enqueued_tokens
        queued = sum(s.prompt_tokens for s in in_flight if s.model == f.model)
        return not limit or queued + f.prompt_tokens <= limit

    def _submit(self, f: BatchFile, estimates: list[budget_policy.Spent]) -> _Submission:
        """Record the file's requests, then upload and create: a kill in between is found by `_send`."""
        sub = _Submission(
            uuid.uuid4().hex[:20], f.model, {r.key(): r for r in f.requests}, f.prompt_tokens, estimates, time.time()
        )
        self.store.add_batch(
            sub.submission, sub.model, sub.prompt_tokens, [(k, request_json(r)) for k, r in sub.requests.items()]
        )
        self._send(sub)
        return sub

    def _send(self, sub: _Submission) -> None:
        """Upload and create what is not yet; a resumed submission first looks for what a killed run sent."""
        if sub.file_id is None:
            sub.file_id = self.api.find_file(sub.submission, sub.created_at) if sub.resumed else None
            if sub.file_id is None:
                content = BatchFile(tuple(sub.requests.values()), sub.prompt_tokens).content()
                sub.file_id = self.api.upload(sub.submission, content)
            sub.state = "uploaded"
            self.store.update_batch(sub.submission, sub.state, file_id=sub.file_id)
        if sub.batch_id is None:
            batch = self.api.find_batch(sub.submission, sub.file_id, sub.created_at) if sub.resumed else None
            if batch is None:
                batch = self.api.create(sub.submission, sub.file_id)
                self.batches_created += 1
                self.ledger.requests_sent += len(sub.requests)
            sub.batch_id, sub.state, sub.said_at = batch.id, batch.status, time.monotonic()
            self.store.update_batch(sub.submission, sub.state, batch_id=sub.batch_id)
            self.say(
                f"batch {sub.batch_id}: {len(sub.requests)} requests to {sub.model} "
                f"(~{sub.prompt_tokens} prompt tokens), {sub.state}"
            )

    def _resume(self) -> list[_Submission]:
        """Submissions an earlier run recorded and never collected: reserved in the guard, sent if need be."""
        subs = []
        for row in self.store.open_batches():
            requests = [request_from_json(text) for _, text in self.store.batch_requests(row["submission"])]
            est = [budget_policy.estimate(r.messages, r.max_tokens, self.price) for r in requests]
            if self.guard is not None:
                self.guard.reserve(est)  # already sent (or about to be): it counts whatever the caps say now
            subs.append(
                _Submission(
                    row["submission"],
                    row["model"],
                    {r.key(): r for r in requests},
                    row["prompt_tokens"],
                    est,
                    row["created_at"],
                    row["file_id"],
                    row["batch_id"],
                    row["state"],
                    resumed=True,
                )
            )
        if subs:
            self.say(
                f"resuming {len(subs)} batch submission(s) an earlier run left in flight "
                f"({sum(len(s.requests) for s in subs)} requests): polling them, not submitting again"
            )
        for sub in subs:
            self._send(sub)
        return subs

    # ---- polling and collecting -----------------------------------------------------------------------
    def _poll(self, sub: _Submission) -> Batch | None:
        """The batch's state now (None while the endpoint is unavailable, until llm.give_up_after_s)."""
        assert sub.batch_id is not None  # only sent submissions are in flight
        try:
            batch = self.api.retrieve(sub.batch_id)
            sub.failing_since = None
        except BatchAPIUnavailable as e:
            sub.failing_since = sub.failing_since or time.monotonic()
            if time.monotonic() - sub.failing_since > self.cfg.give_up_after_s:
                raise
            log.warning("%s; polling again", e)
            return None
        counts = batch.request_counts
        done = f" {counts.completed + counts.failed}/{counts.total} done" if counts and counts.total else ""
        if batch.status != sub.state or time.monotonic() - sub.said_at > SAY_EVERY_S:
            self.say(f"batch {sub.batch_id}: {batch.status}{done}")
            sub.said_at = time.monotonic()
        if batch.status != sub.state:
            sub.state = batch.status
            self.store.update_batch(sub.submission, sub.state)
        return batch

    def _collect(
        self, sub: _Submission, batch: Batch, d: Delivery, tries: collections.Counter[str]
    ) -> list[ChatRequest]:
        """Store a finished batch's results, then count them; returns the rows to send again."""
        ended = batch.completed_at or batch.expired_at or batch.cancelled_at or batch.failed_at or time.time()
        latency = max(0.0, float(ended - batch.created_at))
        rows: dict[str, RowResult] = {}
        for file_id in (batch.error_file_id, batch.output_file_id):  # an answer wins over an error line
            if file_id:
                rows.update({r.key: r for r in read_results(self.api.download(file_id), latency, sub.requests)})
        answers, failures, again = [], [], []
        for key, request in sub.requests.items():
            row = rows.get(key) or RowResult(key, failed(key, UNFINISHED, latency), retry=True)
            if row.answer.error is None:
                answers.append((request, row.answer))
            elif row.retry and key in d.where and tries[key] < self.cfg.max_retries:
                tries[key] += 1
                again.append(request)
            else:
                error = row.answer.error + ("_exhausted" if row.retry and key in d.where else "")
                failures.append((request, dataclasses.replace(row.answer, error=error)))
        self.store.put_batch_results(answers, failures, sub.submission)
        self.store.finish_batch(sub.submission, batch.status, _errors(batch))
        if self.guard is not None:
            self.guard.release(sub.estimates)
        for _, a in answers:
            self.ledger.prompt_tokens += a.prompt_tokens
            self.ledger.completion_tokens += a.completion_tokens
            self.ledger.cached_tokens += a.cached_tokens
        for _, a in failures:
            assert a.error is not None  # a failure always names its error
            self.ledger.failures[a.error] = self.ledger.failures.get(a.error, 0) + 1
        self.say(
            f"batch {sub.batch_id}: {batch.status}; {len(answers)} answers stored, {len(failures)} failed, "
            f"{len(again)} to send again" + (f" ({_errors(batch)})" if _errors(batch) else "")
        )
        d.deliver([a for _, a in answers + failures])
        return again

    def _time_limit(self, in_flight: list[_Submission]) -> BatchTimeLimit:
        listed = ", ".join(f"{s.batch_id or s.submission} ({s.state})" for s in in_flight)
        return BatchTimeLimit(
            f"{len(in_flight)} batch(es) still not finished after waiting {fmt_duration(self.cfg.batch_max_wait_s)} "
            f"(llm.batch_max_wait_s): {listed}. They are recorded in the state and keep running at "
            f"{self.api.base_url}; everything answered so far is stored. Run again to resume polling them "
            "(nothing is submitted twice), or raise llm.batch_max_wait_s"
        )


def _errors(batch: Batch) -> str | None:
    """The provider's batch-level errors (a failed batch's reasons), short."""
    data = (batch.errors.data or []) if batch.errors else []
    return "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in data[:3]) or None
