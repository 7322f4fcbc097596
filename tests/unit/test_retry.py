import random

import httpx2
import openai
import pytest

from freeal_stream.config import LLMConfig
from freeal_stream.llm.retry import BadResponse, RetryPolicy, classify, retry_after_s

URL = "http://127.0.0.1:1/v1/chat/completions"


def status_error(status: int, headers: dict[str, str] | None = None, message: str = "boom") -> openai.APIStatusError:
    request = httpx2.Request("POST", URL)
    response = httpx2.Response(status, headers=headers or {}, request=request)
    return openai.APIStatusError(message, response=response, body=None)


def connection_error(cause: Exception) -> openai.APIConnectionError:
    try:
        try:
            raise cause
        except Exception as exc:
            raise openai.APIConnectionError(request=httpx2.Request("POST", URL)) from exc
    except openai.APIConnectionError as err:
        return err


@pytest.mark.parametrize(
    "status, kind",
    [
        (429, "rate_limited"),
        (408, "timeout"),
        (409, "http_409"),
        (500, "http_500"),
        (502, "http_502"),
        (503, "http_503"),
        (599, "http_599"),
    ],
)
def test_transient_statuses(status, kind):
    failure = classify(status_error(status))
    assert failure.transient and failure.kind == kind and failure.status == status


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_fatal_statuses_are_not_retried(status):
    failure = classify(status_error(status))
    assert not failure.transient and failure.kind == f"http_{status}" and failure.retry_after_s is None


def test_transport_failures():
    timeout = classify(openai.APITimeoutError(request=httpx2.Request("POST", URL)))
    assert timeout.kind == "timeout" and timeout.transient
    refused = classify(connection_error(httpx2.ConnectError("Connection refused")))
    assert refused.kind == "unreachable" and refused.transient
    dropped = classify(connection_error(httpx2.RemoteProtocolError("Server disconnected")))
    assert dropped.kind == "connection" and dropped.transient
    garbage = classify(BadResponse("not a chat completion"))
    assert garbage.kind == "bad_response" and garbage.transient


def test_retry_after_headers():
    assert classify(status_error(429, {"Retry-After": "3"})).retry_after_s == 3.0
    assert classify(status_error(503, {"Retry-After": "0.5"})).retry_after_s == 0.5
    assert retry_after_s(httpx2.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after_s(httpx2.Headers({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert retry_after_s(httpx2.Headers({})) is None
    assert retry_after_s(None) is None


def test_full_jitter_exponential_backoff_is_capped():
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0)
    rng = random.Random(0)
    for retry_index in range(8):
        ceiling = min(4.0, 0.5 * 2**retry_index)
        delays = [policy.delay(retry_index, rng=rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling  # jitter spans the whole range
        assert min(delays) < 0.2 * ceiling


def test_retry_after_wins_and_is_capped():
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0, max_retry_after_s=10.0)
    assert policy.delay(0, retry_after_s=7.0) == 7.0
    assert policy.delay(5, retry_after_s=600.0) == 10.0
    assert policy.delay(0, retry_after_s=-1.0) == 0.0


def test_max_retries_comes_from_config():
    policy = RetryPolicy.from_config(LLMConfig(max_retries=2), base_delay_s=0.01)
    assert policy.max_retries == 2 and policy.base_delay_s == 0.01
