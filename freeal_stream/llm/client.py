"""Send many chat requests to an OpenAI-compatible server: cached, deduplicated, bounded, retried.

A request's key (sha256 of everything that shapes the answer) is at once the cache key, the resume log
and the billing record: an answer is stored before it counts, so a killed run never pays twice, and a
request already answered is never sent again. Failed answers are not stored (a later run retries them).
Problems no retry can fix (bad key, unknown model, no server) raise FatalLLMError at once.

At hosted-API speed the client's own overhead matters: one persistent AsyncOpenAI client on a background
event loop (connections are kept alive across calls), requests posted as plain JSON (the SDK's parameter
transform cost ~26 ms a request, more than the rest of the round trip), answers read as plain JSON and
checked field by field (`answer_check`), and stored in groups: while one group is being written, the next
collects (`_GroupCommit`), so a store call is paid per group, not per answer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, TypeVar

import openai

from freeal_stream.config import LLMConfig
from freeal_stream.errors import UserError
from freeal_stream.llm import answer_check
from freeal_stream.llm.breaker import CircuitBreaker, EndpointDead
from freeal_stream.llm.ratelimit import RateLimiter, estimate_tokens, estimate_usage
from freeal_stream.llm.retry import BadResponse, Failure, RetryPolicy, classify

log = logging.getLogger(__name__)

UNREACHABLE_AFTER = 3  # refused connections, before the server ever answered, that mean 'no server there'
_NO_KEY = "no-key"  # local servers need none; never let openai pick up OPENAI_API_KEY for a foreign URL


@dataclass(frozen=True)
class ChatRequest:
    """Everything that shapes an answer; hashable, and its key() identifies the answer everywhere."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    model: str
    temperature: float
    max_tokens: int
    logprobs: bool
    top_logprobs: int
    template_version: str
    seed: int | None = None  # sampling seed, for reproducible answers at temperature > 0
    grammar: str | None = None  # GBNF the answer must match (llama.cpp's `grammar` field)

    @classmethod
    def build(
        cls,
        messages: Sequence[Mapping[str, str]],
        cfg: LLMConfig,
        template_version: str,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        logprobs: bool | None = None,
        seed: int | None = None,
        grammar: str | None = None,
    ) -> ChatRequest:
        """A request from chat messages and the job's LLM settings (overrides for e.g. generation)."""
        want_logprobs = cfg.logprobs if logprobs is None else logprobs
        return cls(
            messages=tuple((m["role"], m["content"]) for m in messages),
            model=cfg.model,
            temperature=cfg.temperature if temperature is None else temperature,
            max_tokens=cfg.max_tokens if max_tokens is None else max_tokens,
            logprobs=want_logprobs,
            top_logprobs=cfg.top_logprobs if want_logprobs else 0,  # unused fields must not split keys
            template_version=template_version,
            seed=seed,
            grammar=grammar,
        )

    def key(self) -> str:
        """sha256 hex of the canonical JSON of all fields (`seed` and `grammar` only when set, so keys without
        them are stable)."""
        return self._key

    @cached_property
    def _key(self) -> str:  # computed once: a request is keyed to price it, to look it up and to store it
        fields = {
            "messages": [list(m) for m in self.messages],
            "model": self.model,
            "temperature": float(self.temperature),
            "max_tokens": self.max_tokens,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
            "template_version": self.template_version,
        }
        if self.seed is not None:
            fields["seed"] = self.seed
        if self.grammar is not None:
            fields["grammar"] = self.grammar
        canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class ChatAnswer:
    """One answer (or the record of a failure: `error` set, `content` None).

    `malformed`: why a paid answer failed the checks of `answer_check` (then `content` is "" and it
    gives no label). `usage_estimated`: the server reported no usable usage, so the tokens are the
    pre-flight estimate (what the budget charges)."""

    key: str
    content: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    top_logprobs: list[list[tuple[str, float]]] | None
    latency_s: float  # the answering attempt's round trip; for a failure, the time spent trying
    attempts: int
    error: str | None
    from_cache: bool = False
    malformed: str | None = None
    usage_estimated: bool = False

    @classmethod
    def failure(cls, key: str, error: str, attempts: int, latency_s: float = 0.0) -> ChatAnswer:
        """The record of a request that got no answer: nothing paid, nothing to read."""
        return cls(
            key=key,
            content=None,
            finish_reason=None,
            prompt_tokens=0,
            completion_tokens=0,
            cached_tokens=0,
            top_logprobs=None,
            latency_s=latency_s,
            attempts=attempts,
            error=error,
        )


class AnswerCache(Protocol):
    """Where answers live between runs (keyed by ChatRequest.key())."""

    def get_answers(self, keys: Sequence[str]) -> dict[str, ChatAnswer]: ...

    def put_answers(self, pairs: Sequence[tuple[ChatRequest, ChatAnswer]]) -> None:
        """Store answers (and failures: `error` set) in one write."""


class Completer(Protocol):
    """What answers chat requests, in order: an `LLMClient` in this process, or the job's annotators (live actors
    or a provider's batch API, `actors.annotators.Annotators`). Demo generation and benchmarks take either."""

    def complete_many(
        self, requests: Sequence[ChatRequest], progress: Callable[[int, int, Ledger], None] | None = None
    ) -> list[ChatAnswer]: ...


class FatalLLMError(UserError):
    """A problem no retry fixes (bad key, unknown model, no server); its message never holds the key."""


@dataclass
class Ledger:
    """What this client has spent. `requests_sent` counts HTTP attempts, retries included."""

    requests_sent: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    retries: int = 0
    cache_hits: int = 0
    failures: dict[str, int] = field(default_factory=dict)


def add_ledger(total: Ledger, part: Ledger) -> None:
    """Add `part`'s figures to `total`'s."""
    for f in dataclasses.fields(Ledger):
        if f.name == "failures":
            for k, v in part.failures.items():
                total.failures[k] = total.failures.get(k, 0) + v
        else:
            setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))


def _read_answer(response: Any, request: ChatRequest, key: str, attempts: int, latency_s: float) -> ChatAnswer:
    """A ChatAnswer from a completion, every field checked (answer_check); BadResponse when the body is not
    a completion at all (retried, not paid). A completion with a malformed field is a paid answer with no
    label: `malformed` says why, and usage the server did not give (or gave wrong) is the estimate."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices:
        raise BadResponse(f"not a chat completion: {str(response)[:200]!r}")
    reasons = []
    try:
        choice = answer_check.read_choice(choices[0], request.max_tokens)
    except answer_check.Malformed as e:
        choice, reasons = answer_check.Choice("", None, None), [str(e)]
    estimate = estimate_usage(request.messages, request.max_tokens)
    try:
        usage = answer_check.read_usage(response.get("usage"), estimate)
    except answer_check.Malformed as e:
        usage = answer_check.estimated_usage(estimate)
        reasons.append(str(e))
    if reasons:
        log.warning("request %s: malformed answer stored with no label: %s", key[:12], "; ".join(reasons))
        choice = answer_check.Choice("", None, None)
    return ChatAnswer(
        key=key,
        content=choice.content,
        finish_reason=choice.finish_reason,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        top_logprobs=choice.top_logprobs,
        latency_s=latency_s,
        attempts=attempts,
        error=None,
        malformed="; ".join(reasons) or None,
        usage_estimated=usage.estimated,
    )


T = TypeVar("T")


class _GroupCommit:
    """Answers stored in groups: an answer joins the group collecting while the previous one is written, and
    counts (its `store` returns) only once its group is in the store. One write in flight at a time."""

    def __init__(self, cache: AnswerCache):
        self.cache = cache
        self._waiting: list[tuple[ChatRequest, ChatAnswer, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def store(self, request: ChatRequest, answer: ChatAnswer) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, answer, done))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        await done

    async def _flush(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:  # off the event loop: the store may be an actor
                    await asyncio.to_thread(self.cache.put_answers, [(r, a) for r, a, _ in group])
                except BaseException as e:  # every answer of the group must see the failure
                    for *_, done in group:
                        done.set_exception(e)
                else:
                    for *_, done in group:
                        done.set_result(None)
        finally:
            self._flusher = None


def request_body(request: ChatRequest, logprobs_supported: bool = True) -> dict[str, Any]:
    """The chat-completions body for a request (live, or as a line of a batch file)."""
    payload: dict[str, Any] = {
        "model": request.model,
        "messages": request.as_messages(),
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    if request.seed is not None:
        payload["seed"] = request.seed
    if request.grammar is not None:  # not an OpenAI field: sent only where the job asks (llm.grammar)
        payload["grammar"] = request.grammar
    if request.logprobs and logprobs_supported:
        payload["logprobs"] = True
        if request.top_logprobs:
            payload["top_logprobs"] = request.top_logprobs
    return payload


class LLMClient:
    """Sync front (`complete_many`) over one persistent asyncio openai client; one instance per process.

    Calls may come from several threads at once (an annotator actor runs a few chunks together): they share
    the event loop, the `cfg.concurrency` limit, the rate limiter, the circuit breaker and the group commit.
    """

    def __init__(
        self,
        cfg: LLMConfig,
        base_url: str,
        api_key: str | None,
        cache: AnswerCache | None = None,
        *,
        retry_policy: RetryPolicy | None = None,
    ):
        self.cfg = cfg
        self.base_url = base_url
        self.cache = cache
        self.retry = retry_policy or RetryPolicy.from_config(cfg)
        self.ledger = Ledger()
        self._api_key = api_key
        self._limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        self.breaker = CircuitBreaker(cfg.circuit_failures, cfg.circuit_cooldown_s, cfg.give_up_after_s)
        self._logprobs_supported = True  # until a server says otherwise, for this session
        self._heard_from_server = False
        self._refused = 0
        self._rng = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._api: openai.AsyncOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None
        self._writer = _GroupCommit(cache) if cache is not None else None

    def complete_many(
        self, requests: Sequence[ChatRequest], progress: Callable[[int, int, Ledger], None] | None = None
    ) -> list[ChatAnswer]:
        """Answers in the order of `requests`; cached ones are not sent, duplicates are sent once.

        Requests start in the order given (so prompts sharing a prefix run back to back), at most
        `cfg.concurrency` at a time. `progress(done, total, ledger)` follows completed answers.
        """
        return self.complete(requests, progress)[0]

    def complete(
        self, requests: Sequence[ChatRequest], progress: Callable[[int, int, Ledger], None] | None = None
    ) -> tuple[list[ChatAnswer], Ledger]:
        """`complete_many`, with what this call alone spent (calls running together each get their own)."""
        keys = [r.key() for r in requests]
        copies = collections.Counter(keys)
        answers: dict[str, ChatAnswer] = {}
        spent = Ledger()
        if self.cache is not None and keys:
            for key, answer in self.cache.get_answers(list(copies)).items():
                answers[key] = dataclasses.replace(answer, from_cache=True)
        done = sum(copies[k] for k in answers)
        spent.cache_hits += done
        if progress is not None and done:
            progress(done, len(keys), spent)

        def on_answer(key: str, answer: ChatAnswer) -> None:
            nonlocal done
            answers[key] = answer
            done += copies[key]
            if progress is not None:
                progress(done, len(keys), spent)

        todo = {k: r for k, r in zip(keys, requests) if k not in answers}
        try:
            if todo:
                self._run(self._send_all(list(todo.items()), on_answer, spent))
        finally:
            self._run(self._add(spent))
        return [answers[k] for k in keys], spent

    def close(self) -> None:
        """Close the connections and stop the event loop (a new call starts them again)."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._close_api(), loop).result()
        loop.call_soon_threadsafe(loop.stop)

    def _run(self, coro: Awaitable[T]) -> T:
        """Run `coro` on the client's own event loop (started on first use) and wait for it."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="llm-client", daemon=True).start()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()  # type: ignore[arg-type]

    async def _add(self, spent: Ledger) -> None:
        """Fold a call's spending into the client's ledger (on the loop: no two calls add at once)."""
        add_ledger(self.ledger, spent)

    async def _close_api(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def _send_all(
        self, todo: list[tuple[str, ChatRequest]], on_answer: Callable[[str, ChatAnswer], None], spent: Ledger
    ) -> None:
        """A FatalLLMError stops new requests but lets those in flight finish and store their answers
        (cancelling them could lose an answer already paid for); then it is raised."""
        if self._api is None:  # created on the loop it will serve, once: its connections are kept alive
            self._api = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key or _NO_KEY, max_retries=0, timeout=self.cfg.timeout_s
            )
            self._slots = asyncio.Semaphore(self.cfg.concurrency)
        assert self._slots is not None
        fatal: list[FatalLLMError] = []
        try:
            async with asyncio.TaskGroup() as group:
                for key, request in todo:
                    await self._slots.acquire()  # started strictly in the given order
                    if fatal:
                        self._slots.release()
                        break
                    group.create_task(self._complete_one(key, request, on_answer, spent, fatal))
        except BaseExceptionGroup as errors:  # e.g. the store failed: raise the first error as it was
            raise errors.exceptions[0] from None
        if fatal:
            raise fatal[0]

    async def _complete_one(
        self,
        key: str,
        request: ChatRequest,
        on_answer: Callable[[str, ChatAnswer], None],
        spent: Ledger,
        fatal: list[FatalLLMError],
    ) -> None:
        assert self._slots is not None
        try:
            answer = await self._with_retries(key, request, spent)
        except FatalLLMError as e:
            fatal.append(e)
            return
        finally:
            self._slots.release()
        if answer.error is not None:
            spent.failures[answer.error] = spent.failures.get(answer.error, 0) + 1
        if self._writer is not None:  # an answer is stored before it counts: never paid twice
            await self._writer.store(request, answer)
        on_answer(key, answer)

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        return request_body(request, self._logprobs_supported)

    async def _post(self, payload: dict[str, Any]) -> Any:
        """POST /chat/completions with `payload` as it is, the answer as plain JSON (the SDK still handles
        errors, timeouts and the status code; it skips its own parameter transform and answer parsing)."""
        assert self._api is not None
        try:
            return await self._api.post("/chat/completions", body=payload, cast_to=object)
        except ValueError as e:  # a 200 whose body is not JSON (a proxy's error page)
            raise BadResponse(f"the body is not JSON: {e}") from None

    async def _with_retries(self, key: str, request: ChatRequest, spent: Ledger) -> ChatAnswer:
        estimate = estimate_tokens(request.messages, request.max_tokens)
        started = time.monotonic()
        attempts = retries = 0
        while True:
            attempts += 1
            payload = self._payload(request)
            await self._admit()
            await self._limiter.acquire(estimate)
            spent.requests_sent += 1
            sent = time.monotonic()
            try:
                response = await self._post(payload)
                answer = _read_answer(response, request, key, attempts, time.monotonic() - sent)
            except (openai.OpenAIError, BadResponse) as exc:
                failure = classify(exc)
                self._check_fatal(failure)
                self._tell_breaker(failure)
                if failure.status == 400 and "logprobs" in payload and "logprob" in failure.message.lower():
                    log.warning("%s rejects logprobs; asking without them for the rest of this session", self.base_url)
                    self._logprobs_supported = False
                    continue
                if failure.status == 400 and request.grammar is not None and "grammar" in failure.message.lower():
                    raise FatalLLMError(
                        f"HTTP 400 from {self.base_url} (model '{self.cfg.model}'): {self._scrub(failure.message)}. "
                        "The endpoint does not take llama.cpp's `grammar` field; set llm.grammar: false"
                    ) from None
                if not failure.transient or retries >= self.retry.max_retries:
                    if failure.kind == "unreachable":
                        raise self._unreachable(attempts) from None
                    suffix = "_exhausted" if failure.transient else ""
                    return self._failed(key, f"{failure.kind}{suffix}", attempts, started)
                wait = self.retry.delay(retries, failure.retry_after_s, self._rng)
                if failure.kind == "rate_limited" and failure.retry_after_s is not None:
                    self._limiter.pause(wait)
                retries += 1
                spent.retries += 1
                log.debug("retrying %s in %.2fs after %s", key[:12], wait, failure.kind)
                await asyncio.sleep(wait)
                continue
            self._heard_from_server = True
            self.breaker.success()
            self._limiter.settle(estimate, answer.prompt_tokens + answer.completion_tokens)
            spent.prompt_tokens += answer.prompt_tokens
            spent.completion_tokens += answer.completion_tokens
            spent.cached_tokens += answer.cached_tokens
            return answer

    async def _admit(self) -> None:
        try:
            await self.breaker.admit()
        except EndpointDead as dead:
            raise self._dead(dead) from None

    def _tell_breaker(self, failure: Failure) -> None:
        """Transient failures other than 429 count towards the breaker; any other answer shows the server is alive."""
        try:
            if failure.transient and failure.kind != "rate_limited":
                self.breaker.failure(failure.kind)
            elif not failure.transient:
                self.breaker.success()
        except EndpointDead as dead:
            raise self._dead(dead) from None

    def _dead(self, dead: EndpointDead) -> FatalLLMError:
        return FatalLLMError(
            f"{self.base_url} (model '{self.cfg.model}') looks down: {dead}. Everything answered so far is "
            "stored; fix the endpoint (or raise llm.give_up_after_s) and run again to resume"
        )

    def _check_fatal(self, failure: Failure) -> None:
        """Raise FatalLLMError for failures that would fail every request alike."""
        if failure.kind != "unreachable":
            self._heard_from_server = True
        elif not self._heard_from_server:
            self._refused += 1
            if self._refused >= UNREACHABLE_AFTER:
                raise self._unreachable(self._refused)
        where = f"{self.base_url} (model '{self.cfg.model}')"
        if failure.status in (401, 403):
            # the server's text is left out on purpose: providers echo (part of) the key in it
            hint = (
                f"check the key in the environment variable {self.cfg.api_key_env}"
                if self._api_key
                else f"no key was given: set the environment variable {self.cfg.api_key_env}"
            )
            problem = "the API key was refused" if failure.status == 401 else "the API key lacks permission"
            raise FatalLLMError(f"HTTP {failure.status} from {where}: {problem}; {hint}")
        if failure.status == 404:
            raise FatalLLMError(
                f"HTTP 404 from {where}: {self._scrub(failure.message)}. The model is not served there "
                "(check llm.model) or llm.base_url is wrong (OpenAI-compatible URLs usually end in /v1)"
            )

    def _unreachable(self, attempts: int) -> FatalLLMError:
        return FatalLLMError(
            f"cannot connect to {self.base_url} (model '{self.cfg.model}'): {attempts} connection attempts "
            "failed; is the server running and llm.base_url right?"
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "[key]") if self._api_key else text

    def _failed(self, key: str, error: str, attempts: int, started: float) -> ChatAnswer:
        log.warning("request %s failed: %s after %d attempt(s)", key[:12], error, attempts)
        return ChatAnswer.failure(key, error, attempts, time.monotonic() - started)
