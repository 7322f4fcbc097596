import dataclasses
import math
import socket
import time

import pytest

from freeal_stream.config import LLMConfig
from freeal_stream.llm.client import ChatAnswer, ChatRequest, FatalLLMError, LLMClient
from freeal_stream.llm.retry import RetryPolicy
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer, Reply, drop, error, garbage, ok, slow

FAST = RetryPolicy(max_retries=3, base_delay_s=0.01, max_delay_s=0.05)


class MemoryCache:
    def __init__(self) -> None:
        self.answers: dict[str, ChatAnswer] = {}
        self.puts: list[str] = []
        self.failures: list[str] = []

    def get_answers(self, keys):
        return {k: self.answers[k] for k in keys if k in self.answers}

    def put_answers(self, pairs):
        for request, answer in pairs:
            assert request.key() == answer.key
            if answer.error:
                self.failures.append(answer.error)
            else:
                self.puts.append(answer.key)
                self.answers[answer.key] = answer


def make_cfg(**kw) -> LLMConfig:
    base = dict(model="test-model", timeout_s=5.0, max_retries=3, concurrency=1, logprobs=False)
    return LLMConfig(**{**base, **kw})


def make_client(server, cache=None, api_key="test-key", policy=FAST, **cfg_kw) -> LLMClient:
    url = server if isinstance(server, str) else server.base_url
    return LLMClient(make_cfg(**cfg_kw), url, api_key, cache, retry_policy=policy)


def req(query: str, cfg: LLMConfig | None = None, **kw) -> ChatRequest:
    messages = [{"role": "system", "content": "Classify."}, {"role": "user", "content": query}]
    return ChatRequest.build(messages, cfg or make_cfg(), "t1", **kw)


def last_user(body) -> str:
    return body["messages"][-1]["content"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- request keys --------------------------------------------------------------------------------


def test_key_is_stable_and_sensitive_to_every_field():
    a = req("hello")
    assert a.key() == req("hello").key() and len(a.key()) == 64
    assert dataclasses.replace(a, temperature=0).key() == a.key()  # 0 and 0.0 are one value
    changed = [
        dataclasses.replace(a, messages=(*a.messages, ("user", "more"))),
        dataclasses.replace(a, messages=(("system", "Classify."), ("assistant", "hello"))),
        dataclasses.replace(a, model="other"),
        dataclasses.replace(a, temperature=0.5),
        dataclasses.replace(a, max_tokens=9),
        dataclasses.replace(a, logprobs=True),
        dataclasses.replace(a, top_logprobs=3),
        dataclasses.replace(a, template_version="t2"),
        dataclasses.replace(a, seed=7),
        dataclasses.replace(a, grammar='root ::= "positive" | "negative"'),
    ]
    keys = {r.key() for r in changed}
    assert len(keys) == len(changed) and a.key() not in keys
    assert hash(a) == hash(req("hello"))


def test_build_uses_config_and_overrides():
    cfg = make_cfg(logprobs=True, top_logprobs=4, max_tokens=6, temperature=0.2)
    r = req("x", cfg)
    assert (r.model, r.max_tokens, r.temperature, r.logprobs, r.top_logprobs) == ("test-model", 6, 0.2, True, 4)
    r2 = req("x", cfg, logprobs=False, max_tokens=100, temperature=0.9)
    assert (r2.logprobs, r2.top_logprobs, r2.max_tokens, r2.temperature) == (False, 0, 100, 0.9)
    assert r.as_messages()[1] == {"role": "user", "content": "x"}


# --- answers ---------------------------------------------------------------------------------------


def test_answer_fields_and_logprobs():
    top = [[("pos", math.log(0.7)), ("neg", math.log(0.2))], [("itive", -0.01)]]
    with FakeOpenAIServer(lambda body: ok("positive", top_logprobs=top, cached_tokens=4)) as server:
        client = make_client(server, logprobs=True, top_logprobs=2)
        [answer] = client.complete_many([req("great film", client.cfg)])
    assert server.requests[0]["logprobs"] is True and server.requests[0]["top_logprobs"] == 2
    assert answer.content == "positive" and answer.error is None and answer.finish_reason == "stop"
    assert answer.top_logprobs == [
        [("pos", pytest.approx(math.log(0.7))), ("neg", pytest.approx(math.log(0.2)))],
        [("itive", -0.01)],
    ]
    assert answer.cached_tokens == 4 and answer.prompt_tokens >= 4 and answer.completion_tokens > 0
    assert answer.attempts == 1 and not answer.from_cache
    assert client.ledger.requests_sent == 1 and client.ledger.cached_tokens == 4
    assert client.ledger.prompt_tokens == answer.prompt_tokens
    verb = Verbalizer({"positive": ["positive"], "negative": ["negative"]})
    assert verb.probs_from_logprobs(answer.top_logprobs)[0] == pytest.approx(0.7 / 0.9)


def test_logprobs_only_sent_when_requested():
    with FakeOpenAIServer() as server:
        make_client(server).complete_many([req("a")])
    assert "logprobs" not in server.requests[0] and "top_logprobs" not in server.requests[0]


def test_garbage_content_is_returned_for_the_parser_to_reject():
    with FakeOpenAIServer(lambda body: ok("Well, it could be either, really!")) as server:
        [answer] = make_client(server).complete_many([req("a")])
    assert answer.error is None and answer.content == "Well, it could be either, really!"
    assert Verbalizer({"positive": ["positive"], "negative": ["negative"]}).parse(answer.content) is None
    with FakeOpenAIServer(lambda body: ok(None)) as server:
        [answer] = make_client(server).complete_many([req("a")])
    assert answer.content == "" and answer.error is None


def test_non_json_body_is_retried_then_exhausted():
    cache = MemoryCache()
    with FakeOpenAIServer() as server:
        server.script(garbage(), Reply(raw=b'{"choices": []}'))
        [answer] = make_client(server, cache).complete_many([req("a")])
        assert answer.content == "positive" and answer.attempts == 3
    with FakeOpenAIServer(lambda body: garbage()) as server:
        [answer] = make_client(server, cache).complete_many([req("b")])
    assert answer.error == "bad_response_exhausted" and answer.content is None
    assert answer.key not in cache.answers


def _set(path: str, value):
    """A patch setting one field of the completion body: 'choices.0.message.content' = value."""

    def patch(completion):
        *parents, last = path.split(".")
        node = completion
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return patch


def _drop_usage(completion):
    del completion["usage"]


TOP = [[("positive", -0.1), ("negative", -2.5)]]
MALFORMED = {  # what an endpoint sent -> a word the stored reason must hold
    "logprob 'abc'": (_set("choices.0.logprobs.content.0.top_logprobs.0.logprob", "abc"), "logprob"),
    "logprob NaN": (_set("choices.0.logprobs.content.0.top_logprobs.1.logprob", float("nan")), "logprob"),
    "logprob Infinity": (_set("choices.0.logprobs.content.0.top_logprobs.0.logprob", float("inf")), "logprob"),
    "logprob positive": (_set("choices.0.logprobs.content.0.top_logprobs.0.logprob", 3.0), "logprob"),
    "token an int": (_set("choices.0.logprobs.content.0.top_logprobs.0.token", 7), "token"),
    "top_logprobs a string": (_set("choices.0.logprobs.content.0.top_logprobs", "abc"), "top_logprobs"),
    "logprobs a string": (_set("choices.0.logprobs", "abc"), "logprobs"),
    "logprobs.content an object": (_set("choices.0.logprobs.content", {"a": 1}), "logprobs"),
    "content an int": (_set("choices.0.message.content", 5), "content"),
    "content a list": (_set("choices.0.message.content", ["positive"]), "content"),
    "content an object": (_set("choices.0.message.content", {"text": "positive"}), "content"),
    "content a lone surrogate": (_set("choices.0.message.content", "positive\ud800"), "content"),
    "content far over max_tokens": (_set("choices.0.message.content", "positive " * 20000), "content"),
    "message a string": (_set("choices.0.message", "positive"), "message"),
    "finish_reason an object": (_set("choices.0.finish_reason", {"a": 1}), "finish_reason"),
    "usage over 2^31": (_set("usage.prompt_tokens", 2**31), "prompt_tokens"),
    "usage over 2^64": (_set("usage.completion_tokens", 2**70), "completion_tokens"),
    "usage negative": (_set("usage.prompt_tokens", -500), "prompt_tokens"),
    "usage a string": (_set("usage.prompt_tokens", "lots"), "prompt_tokens"),  # "12" is read as 12
    "usage a float": (_set("usage.completion_tokens", 1.5), "completion_tokens"),
    "usage a list": (_set("usage", [1, 2]), "usage"),
    "cached over prompt": (_set("usage.prompt_tokens_details", {"cached_tokens": 10**6}), "cached_tokens"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_answer_is_stored_once_as_no_label_with_the_reason(kind):
    patch, word = MALFORMED[kind]
    cache = MemoryCache()
    with FakeOpenAIServer(lambda body: ok("positive", top_logprobs=TOP, patch=patch)) as server:
        client = make_client(server, cache, logprobs=True, top_logprobs=2)
        request = req("a", client.cfg)
        [answer] = client.complete_many([request])
        [again] = client.complete_many([request])
    assert len(server.requests) == 1 and cache.puts == [answer.key] and again.from_cache  # paid once
    assert answer.error is None and answer.content == "" and answer.top_logprobs is None
    assert answer.malformed and word in answer.malformed, answer.malformed
    for n in (answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens):
        assert isinstance(n, int) and 0 <= n < 2**31
    verb = Verbalizer({"positive": ["positive"], "negative": ["negative"]})
    assert verb.parse(answer.content) is None and verb.probs_from_logprobs(answer.top_logprobs) is None


def test_an_answer_without_usage_keeps_its_label_and_is_charged_the_estimate():
    from freeal_stream.budget import estimate

    with FakeOpenAIServer(lambda body: ok("positive", patch=_drop_usage)) as server:
        client = make_client(server)
        request = req("a", client.cfg)
        [answer] = client.complete_many([request])
    assert answer.content == "positive" and answer.malformed is None and answer.usage_estimated
    charged = estimate(request.messages, request.max_tokens, None)
    assert answer.prompt_tokens + answer.completion_tokens == charged.tokens > 0
    assert answer.completion_tokens == request.max_tokens and answer.cached_tokens == 0
    assert client.ledger.prompt_tokens + client.ledger.completion_tokens == charged.tokens


# --- cache and deduplication --------------------------------------------------------------------------


def test_cache_hits_are_not_sent_and_new_answers_are_stored():
    cache = MemoryCache()
    cached = req("known")
    cache.answers[cached.key()] = ChatAnswer(cached.key(), "negative", "stop", 5, 1, 0, None, 0.1, 1, None)
    with FakeOpenAIServer() as server:
        client = make_client(server, cache)
        answers = client.complete_many([cached, req("new")])
    assert [last_user(b) for b in server.requests] == ["new"]
    assert answers[0].content == "negative" and answers[0].from_cache
    assert answers[1].content == "positive" and not answers[1].from_cache
    assert cache.puts == [req("new").key()]
    assert client.ledger.cache_hits == 1 and client.ledger.requests_sent == 1


def test_second_run_sends_nothing():
    cache = MemoryCache()
    requests = [req(f"q{i}") for i in range(5)]
    with FakeOpenAIServer() as server:
        make_client(server, cache).complete_many(requests)
        again = make_client(server, cache).complete_many(requests)
        assert len(server.requests) == 5
    assert all(a.from_cache for a in again)


def test_duplicate_keys_are_sent_once():
    seen = []
    with FakeOpenAIServer(lambda body: ok(last_user(body).upper())) as server:
        client = make_client(server, concurrency=4)
        answers = client.complete_many(
            [req("a"), req("a"), req("b"), req("a")], progress=lambda done, total, ledger: seen.append((done, total))
        )
    assert len(server.requests) == 2 and set(server.hash_counts.values()) == {1}
    assert [a.content for a in answers] == ["A", "A", "B", "A"]
    assert seen[-1] == (4, 4) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert client.complete_many([]) == []


# --- order and concurrency -------------------------------------------------------------------------


def test_requests_start_in_the_order_given():
    with FakeOpenAIServer() as server:
        make_client(server).complete_many([req(f"q{i}") for i in range(8)])
    assert [last_user(b) for b in server.requests] == [f"q{i}" for i in range(8)]


def test_concurrency_bound_is_respected():
    with FakeOpenAIServer(lambda body: slow(0.15)) as server:
        answers = make_client(server, concurrency=3).complete_many([req(f"q{i}") for i in range(10)])
    assert all(a.error is None for a in answers)
    assert server.max_in_flight == 3


# --- transient failures ------------------------------------------------------------------------------


def test_429_then_success():
    with FakeOpenAIServer() as server:
        server.script(error(429, "slow down"))
        client = make_client(server)
        [answer] = client.complete_many([req("a")])
    assert answer.content == "positive" and answer.attempts == 2
    assert client.ledger.retries == 1 and client.ledger.requests_sent == 2


def test_retry_after_is_honoured():
    with FakeOpenAIServer() as server:
        server.script(error(429, headers={"Retry-After": "0.6"}))
        started = time.monotonic()
        [answer] = make_client(server).complete_many([req("a")])
        elapsed = time.monotonic() - started
    assert answer.content == "positive"
    assert 0.55 <= elapsed < 2.0  # without the header the backoff would be <= 0.01 s


def test_5xx_burst_recovered():
    with FakeOpenAIServer() as server:
        server.script(error(500), error(502), error(503))
        [answer] = make_client(server).complete_many([req("a")])
    assert answer.content == "positive" and answer.attempts == 4


def test_5xx_exhausted_is_reported_not_cached():
    cache = MemoryCache()
    with FakeOpenAIServer(lambda body: error(500)) as server:
        client = make_client(server, cache, policy=dataclasses.replace(FAST, max_retries=2))
        [answer] = client.complete_many([req("a")])
    assert answer.error == "http_500_exhausted" and answer.attempts == 3 and answer.content is None
    assert cache.answers == {} and client.ledger.failures == {"http_500_exhausted": 1}
    assert cache.failures == ["http_500_exhausted"]  # recorded as an outcome, not as an answer


def test_dropped_connection_is_retried():
    with FakeOpenAIServer() as server:
        server.script(drop(), drop())
        [answer] = make_client(server).complete_many([req("a")])
    assert answer.content == "positive" and answer.attempts == 3


def test_timeout_retried_then_exhausted_and_not_cached():
    cache = MemoryCache()
    with FakeOpenAIServer(lambda body: slow(3.0)) as server:
        client = make_client(server, cache, timeout_s=0.25, policy=dataclasses.replace(FAST, max_retries=1))
        [answer] = client.complete_many([req("a")])
        assert answer.error == "timeout_exhausted" and answer.content is None and answer.attempts == 2
        assert cache.answers == {} and len(server.requests) == 2
        server.responder = lambda body: ok("negative")  # a later run retries it
        [answer] = make_client(server, cache).complete_many([req("a")])
    assert answer.content == "negative" and not answer.from_cache and len(cache.answers) == 1


def test_other_4xx_fails_the_request_without_retry():
    with FakeOpenAIServer() as server:
        server.script(error(400, "context length exceeded"))
        client = make_client(server)
        answers = client.complete_many([req("too long"), req("fine")])
    assert answers[0].error == "http_400" and answers[0].attempts == 1
    assert answers[1].content == "positive" and len(server.requests) == 2


def test_logprobs_rejection_falls_back_once_per_session():
    with FakeOpenAIServer(reject_logprobs=True) as server:
        client = make_client(server, logprobs=True)
        answers = client.complete_many([req(f"q{i}", client.cfg) for i in range(3)])
    assert all(a.content == "positive" and a.top_logprobs is None for a in answers)
    assert sum("logprobs" in b for b in server.requests) == 1 and len(server.requests) == 4


def test_grammar_is_sent_only_when_the_request_has_one():
    grammar = 'root ::= "positive" | "negative"'
    with FakeOpenAIServer() as server:
        make_client(server).complete_many([req("a"), req("b", grammar=grammar)])
    assert "grammar" not in server.requests[0] and server.requests[1]["grammar"] == grammar


def test_an_endpoint_that_rejects_the_grammar_stops_the_run_with_the_fix():
    def strict(body):
        return error(400, "Unrecognized request argument supplied: grammar") if "grammar" in body else ok()

    with FakeOpenAIServer(strict) as server, pytest.raises(FatalLLMError, match="set llm.grammar: false"):
        make_client(server).complete_many([req("a", grammar='root ::= "x"')])
    assert len(server.requests) == 1


# --- fatal errors --------------------------------------------------------------------------------------


def test_401_is_fatal_fast_and_never_shows_the_key():
    secret = "sk-test-SECRET-0123456789"
    with FakeOpenAIServer(api_key="the-right-key") as server:
        client = make_client(server, api_key=secret, concurrency=4, api_key_env="MY_LLM_KEY")
        started = time.monotonic()
        with pytest.raises(FatalLLMError) as info:
            client.complete_many([req(f"q{i}") for i in range(30)])
        assert time.monotonic() - started < 2.0
        assert len(server.requests) <= 4  # no retry storm
    message = str(info.value)
    assert "MY_LLM_KEY" in message and server.base_url in message and "test-model" in message
    assert secret not in message and "SECRET" not in message


def test_401_without_key_says_to_set_the_variable():
    with FakeOpenAIServer(api_key="k") as server:
        with pytest.raises(FatalLLMError, match="set the environment variable OPENAI_API_KEY"):
            make_client(server, api_key=None).complete_many([req("a")])
        assert server.requests and len(server.requests) == 1


def test_404_model_is_fatal():
    with FakeOpenAIServer(models={"real-model"}) as server:
        with pytest.raises(FatalLLMError, match="test-model") as info:
            make_client(server).complete_many([req("a"), req("b")])
        assert len(server.requests) == 1
    assert "404" in str(info.value) and "does not exist" in str(info.value)


def test_unreachable_base_url_is_fatal_fast():
    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    with pytest.raises(FatalLLMError, match="cannot connect") as info:
        make_client(url, policy=RetryPolicy(max_retries=10, base_delay_s=0.05)).complete_many(
            [req(f"q{i}") for i in range(5)]
        )
    assert time.monotonic() - started < 3.0 and url in str(info.value)


def test_completed_answers_are_cached_before_a_fatal_error():
    cache = MemoryCache()
    with FakeOpenAIServer() as server:
        server.script(ok("positive"), ok("negative"), error(401))
        with pytest.raises(FatalLLMError):
            make_client(server, cache).complete_many([req(f"q{i}") for i in range(5)])
    assert len(cache.answers) == 2
