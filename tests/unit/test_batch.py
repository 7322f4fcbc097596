"""llm.mode batch: batch files, results, prices, and BatchAnnotators against a real local batch service.

The service (freeal_stream/testing/fake_batch_api.py) implements OpenAI's files and batches endpoints and runs every
line against the keyword LLM, so answers are real and comparable with live ones; the client is the openai SDK.
Kills are real SIGKILLs of a child process at the moment the service receives (or has handled) a call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from freeal_stream.budget import BudgetGuard, Spent, cost, mode_price, price_for, spent_from_usage
from freeal_stream.config import BudgetConfig, ConfigError, LLMConfig, Price, parse_job
from freeal_stream.llm.batch import BatchAnnotators, BatchTimeLimit
from freeal_stream.llm.batch_format import (
    UNFINISHED,
    BatchFileError,
    jsonl_line,
    plan_files,
    prompt_tokens,
    read_results,
    request_from_json,
    request_json,
)
from freeal_stream.llm.client import ChatRequest, LLMClient
from freeal_stream.status import format_status, job_status
from freeal_stream.store import Store
from freeal_stream.testing.fake_batch_api import BatchScript, FakeBatchAPI
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer, error, ok
from freeal_stream.testing.jobs import ROOT
from freeal_stream.testing.keyword_llm import respond

PRICE = Price(input=1.0, cached_input=0.25, output=4.0)  # batch_discount 0.5 by default
TEXTS = [
    "I was charged twice for my invoice",
    "the app crashes on the login screen button",
    "my parcel never arrived, tracking is stuck",
    "how do I reset my password",
    "refund for the payment please",
    "page will not load after the update",
    "courier lost the package",
    "delete my account and my data",
]


def cfg_for(base_url: str, **kw) -> LLMConfig:
    return dataclasses.replace(
        LLMConfig(
            base_url=base_url,
            model="kw",
            mode="batch",
            batch_poll_s=0.02,
            batch_poll_max_s=0.1,
            max_retries=2,
            timeout_s=10,
        ),
        **kw,
    )


def requests_for(cfg: LLMConfig, texts=TEXTS) -> list[ChatRequest]:
    return [ChatRequest.build([{"role": "user", "content": f"Label it. <text>{t}</text>"}], cfg, "t") for t in texts]


@pytest.fixture
def upstream():
    with FakeOpenAIServer(respond) as server:
        yield server


@pytest.fixture
def api(upstream):
    with FakeBatchAPI(upstream.base_url, step_s=0.02) as service:
        yield service


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.duckdb")
    yield s
    s.close()


def submitted_ids(api: FakeBatchAPI) -> list[str]:
    """Every custom_id of every batch created, with repeats (a request submitted twice shows twice)."""
    return [
        json.loads(line)["custom_id"]
        for b in api.batches.values()
        for line in api.contents[b["input_file_id"]].splitlines()
    ]


# ---- batch files and result lines ------------------------------------------------------------------------
def test_files_are_split_by_model_lines_bytes_and_enqueued_tokens():
    cfg = LLMConfig(model="a")
    reqs = requests_for(cfg) + requests_for(dataclasses.replace(cfg, model="b"), TEXTS[:2])
    assert [(f.model, len(f.requests)) for f in plan_files(reqs, 3)] == [("a", 3), ("a", 3), ("a", 2), ("b", 2)]
    same = requests_for(cfg, [f"text {i}" for i in range(4)])  # lines of one length
    one = len(jsonl_line(same[0]))
    assert [len(f.requests) for f in plan_files(same, 50000, max_bytes=2 * one + 1)] == [2, 2]
    tokens = [prompt_tokens(r) for r in reqs[:3]]
    files = plan_files(reqs[:3], 50000, max_tokens=tokens[0] + tokens[1])
    assert [len(f.requests) for f in files] == [2, 1] and files[0].prompt_tokens == tokens[0] + tokens[1]
    with pytest.raises(BatchFileError, match="llm.batch_enqueued_tokens"):
        plan_files(reqs[:1], 50000, max_tokens=2)
    line = json.loads(jsonl_line(reqs[0]))
    assert line["custom_id"] == reqs[0].key() and line["url"] == "/v1/chat/completions"
    assert line["body"]["model"] == "a" and line["body"]["logprobs"] is True
    assert request_from_json(request_json(reqs[0])) == reqs[0]


def test_result_lines_become_answers_failures_or_rows_to_send_again():
    body = {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "kw",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "billing"}}],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 1,
            "total_tokens": 101,
            "prompt_tokens_details": {"cached_tokens": 64},
        },
    }
    reqs = {r.key(): r for r in requests_for(LLMConfig(model="kw"), TEXTS[:5])}
    a_, b_, c_, d_, e_ = reqs
    lines = [
        {"custom_id": a_, "response": {"status_code": 200, "body": body}, "error": None},
        {"custom_id": b_, "response": {"status_code": 400, "body": {"error": {"message": "bad"}}}},
        {"custom_id": c_, "response": {"status_code": 500, "body": {"error": {"message": "oops"}}}},
        {"custom_id": d_, "response": None, "error": {"code": "batch_expired", "message": "..."}},
        {"custom_id": e_, "response": {"status_code": 200, "body": {"not": "a completion"}}},
        {"custom_id": "never-sent", "response": {"status_code": 200, "body": body}},
    ]
    content = b"\n".join(json.dumps(x).encode() for x in lines) + b"\nnot json\n"
    rows = {r.key: r for r in read_results(content, 42.0, reqs)}
    rows = {"a": rows[a_], "b": rows[b_], "c": rows[c_], "d": rows[d_], "e": rows[e_], **rows}
    a = rows["a"].answer
    assert (a.content, a.prompt_tokens, a.cached_tokens, a.latency_s, a.error) == ("billing", 100, 64, 42.0, None)
    assert (rows["b"].answer.error, rows["b"].retry) == ("http_400", False)
    assert (rows["c"].answer.error, rows["c"].retry) == ("http_500", True)
    assert (rows["d"].answer.error, rows["d"].retry) == (UNFINISHED, True)
    assert (rows["e"].answer.error, rows["e"].retry) == ("bad_response", True)
    assert len(rows) == 10  # the 5 rows under both names; the line naming no request sent is skipped


# ---- the local service, through the openai SDK ---------------------------------------------------------
def test_the_local_service_runs_batches_as_the_batch_api_does(upstream):
    """States in order, answers in the output file, not-run rows in the error file, validation, paging."""
    upstream.responder = lambda body: dataclasses.replace(respond(body), delay_s=0.05)
    with FakeBatchAPI(upstream.base_url, step_s=0.1) as api:
        client = openai.OpenAI(base_url=api.base_url, api_key="x")
        reqs = requests_for(LLMConfig(model="kw"))
        f = client.files.create(file=("in.jsonl", b"".join(jsonl_line(r) for r in reqs)), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        states = [b.status]
        while b.status != "completed":
            b = client.batches.retrieve(b.id)
            states += [b.status] if b.status != states[-1] else []
        assert states == ["validating", "in_progress", "finalizing", "completed"] and b.error_file_id is None
        by_key = {r.key(): r for r in reqs}
        rows = {r.key: r.answer.content for r in read_results(client.files.content(b.output_file_id).read(), 0, by_key)}
        assert rows == {r.key(): respond({"messages": [{"content": r.messages[0][1]}]}).content for r in reqs}
        assert (b.request_counts.completed, b.request_counts.total) == (len(TEXTS), len(TEXTS))

        api.script(BatchScript(expire_after_rows=2))
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        while b.status not in ("expired", "completed"):
            b = client.batches.retrieve(b.id)
        errors = read_results(client.files.content(b.error_file_id).read(), 0, by_key)
        assert b.status == "expired" and b.request_counts.completed == 2
        assert len(errors) == len(TEXTS) - 2 and all(e.retry for e in errors)

        bad = jsonl_line(reqs[0]) * 2 + jsonl_line(dataclasses.replace(reqs[1], model="other"))
        f2 = client.files.create(file=("bad.jsonl", bad), purpose="batch")
        b = client.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
        while b.status != "failed":
            b = client.batches.retrieve(b.id)
        assert {e.code for e in b.errors.data} == {"duplicate_custom_id", "mismatched_model"}
        with pytest.raises(openai.BadRequestError):
            client.batches.create(
                input_file_id=b.output_file_id or f.id, endpoint="/v1/embeddings", completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError, match="input_file_id is required"):  # 400, as OpenAI
            client.batches.create(input_file_id="", endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            client.batches.create(input_file_id="file-none", endpoint="/v1/chat/completions", completion_window="24h")
        assert [x.id for x in client.batches.list(limit=1).data] == [b.id]  # newest first, paged
        assert len(list(client.batches.list(limit=1))) == 3
        assert [x.filename for x in client.files.list(purpose="batch")] == ["bad.jsonl", "in.jsonl"]


# ---- prices ---------------------------------------------------------------------------------------------
def test_batch_answers_are_priced_at_the_discount_and_cached_tokens_at_the_cached_price():
    assert mode_price(PRICE, False) is PRICE
    half = mode_price(PRICE, True)
    assert (half.input, half.cached_input, half.output) == (0.5, 0.125, 2.0)
    assert price_for(BudgetConfig(prices={"m": PRICE}), "m", batch=True) == half
    assert mode_price(Price(input=2.0, output=2.0, batch_discount=0.0), True).input == 2.0
    usage = {"model": "m", "requests": 1, "prompt_tokens": 1000, "cached_tokens": 400, "completion_tokens": 10}
    budget = BudgetConfig(prices={"m": PRICE})
    live = spent_from_usage([usage], budget).cost
    batch = spent_from_usage([{**usage, "batch": True}], budget).cost
    assert live == pytest.approx((600 * 1.0 + 400 * 0.25 + 10 * 4.0) / 1e6)
    assert batch == pytest.approx(live / 2)
    assert cost(half, 1000, 400, 10) == pytest.approx(batch)


def test_status_estimates_the_cost_to_finish_in_each_mode(store):
    job = parse_job(
        {
            "name": "t",
            "data": {"path": "x.csv"},
            "llm": {"model": "kw"},
            "task": {"description": "d", "classes": {"a": ["a"], "b": ["b"]}},
            "budget": {"prices": {"kw": dataclasses.asdict(PRICE)}},
        },
        "/jobs/job.yaml",
    )
    store.add_items([str(i) for i in range(40)], TEXTS * 5, [None] * 40, [None] * 40, [str(i) for i in range(40)])
    request = requests_for(LLMConfig(model="kw"), TEXTS[:1])[0]
    answer = read_results(
        json.dumps(
            {
                "custom_id": request.key(),
                "response": {
                    "status_code": 200,
                    "body": {
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": "a"}}],
                        "usage": {
                            "prompt_tokens": 1000,
                            "completion_tokens": 10,
                            "prompt_tokens_details": {"cached_tokens": 400},
                        },
                    },
                },
            }
        ).encode(),
        1.0,
        {request.key(): request},
    )[0].answer
    store.put_answers([(request, answer)])
    est = job_status(store, job)["estimate_to_finish"]
    assert est["requests"] > 0
    assert est["cost_by_mode"]["live"] == pytest.approx(est["requests"] * cost(PRICE, 1000, 400, 10), abs=1e-6)
    assert est["cost_by_mode"]["batch"] == pytest.approx(est["cost_by_mode"]["live"] / 2, abs=1e-6)
    assert any("in batch mode" in line for line in format_status(job_status(store, job)))


def test_batch_mode_needs_an_endpoint_with_a_batch_api():
    with pytest.raises(ConfigError, match="llm.mode.*needs base_url"):
        parse_job(
            {
                "name": "t",
                "data": {"path": "x.csv"},
                "task": {"description": "d", "classes": {"a": ["a"], "b": ["b"]}},
                "llm": {"mode": "batch"},
            },
            "/jobs/job.yaml",
        )


def test_the_store_records_submissions_idempotently_and_prices_as_batch_only_what_a_batch_answered(store):
    cfg = LLMConfig(model="kw")
    reqs = requests_for(cfg, TEXTS[:3])
    rows = [(r.key(), request_json(r)) for r in reqs]
    store.add_batch("s1", "kw", 30, rows)
    store.add_batch("s1", "kw", 30, rows)  # the store actor may run a call twice after a restart
    assert [(b["submission"], b["state"], b["requests"]) for b in store.open_batches()] == [("s1", "prepared", 3)]
    assert [request_from_json(j) for _, j in store.batch_requests("s1")] == reqs
    answer = read_results(
        json.dumps(
            {
                "custom_id": reqs[0].key(),
                "response": {
                    "status_code": 200,
                    "body": {
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": "billing"}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 1},
                    },
                },
            }
        ).encode(),
        1.0,
        {reqs[0].key(): reqs[0]},
    )[0].answer
    store.put_answers([(reqs[0], dataclasses.replace(answer, key=reqs[0].key()))])  # answered live first
    store.put_batch_results(
        [(r, dataclasses.replace(answer, key=r.key())) for r in reqs[:2]],
        [(reqs[2], dataclasses.replace(answer, key=reqs[2].key(), content=None, error="http_400"))],
        "s1",
    )
    store.finish_batch("s1", "completed")
    assert [(u["batch"], u["requests"]) for u in store.usage_by_model()] == [(False, 1), (True, 1)]
    assert store.failure_counts() == {"http_400": 1}
    assert store.open_batches() == [] and store.batch_counts() == {"completed": 1}


# ---- against the local batch service ----------------------------------------------------------------------
def test_batch_answers_equal_live_answers_and_are_stored_once_at_batch_prices(upstream, api, store, tmp_path):
    """One batch, the states it goes through reported, answers equal to live ones, stored and priced as batch."""
    cfg = cfg_for(api.base_url)
    said: list[str] = []
    seen: list[tuple[list[int], list]] = []
    pool = BatchAnnotators(cfg, api.base_url, "key", store, price=PRICE, say=said.append)
    reqs = requests_for(cfg) + requests_for(cfg)[:2]  # duplicates go once
    answers = pool.complete_many(reqs, on_answers=lambda i, a: seen.append((i, a)))
    live = LLMClient(dataclasses.replace(cfg, mode="live"), upstream.base_url, None).complete_many(reqs)
    assert [a.content for a in answers] == [a.content for a in live]
    assert [a.top_logprobs for a in answers] == [a.top_logprobs for a in live]
    assert api.batches_created == 1 and api.rows_run == len(TEXTS) and pool.batches_created == 1
    assert sorted(i for idx, _ in seen for i in idx) == list(range(len(reqs)))
    order = ["validating", "in_progress", "finalizing", "completed"]  # a poll may fall between two states
    seen_states = [st for line in said for st in order if line.endswith(st) or f": {st} " in line]
    assert seen_states and seen_states[-1] == "completed" and seen_states == sorted(seen_states, key=order.index)
    usage = store.usage_by_model()
    assert [(u["batch"], u["requests"]) for u in usage] == [(True, len(TEXTS))]
    assert store.open_batches() == [] and store.batch_counts() == {"completed": 1}
    again = BatchAnnotators(cfg, api.base_url, "key", store).complete_many(reqs)  # all from the store
    assert [a.content for a in again] == [a.content for a in answers] and api.batches_created == 1


def test_a_round_too_big_for_one_file_is_split_and_the_enqueued_token_limit_is_kept(upstream, store):
    cfg = cfg_for("", batch_max_requests=3)
    reqs = requests_for(cfg)
    limit = sum(prompt_tokens(r) for r in reqs[:3]) + 1  # room for one file of 3 at a time
    with FakeBatchAPI(upstream.base_url, step_s=0.02, enqueued_token_limit=limit) as api:
        cfg = dataclasses.replace(cfg, base_url=api.base_url, batch_enqueued_tokens=limit)
        answers = BatchAnnotators(cfg, api.base_url, None, store).complete_many(reqs)
        assert all(a.content for a in answers)
        assert api.batches_created == 3 and sorted(submitted_ids(api)) == sorted(r.key() for r in reqs)
        assert all(b["status"] == "completed" for b in api.batches.values())  # never token_limit_exceeded


def test_an_expired_batch_keeps_its_answers_and_sends_only_the_rest_again(api, store):
    api.script(BatchScript(expire_after_rows=3))
    cfg = cfg_for(api.base_url)
    answers = BatchAnnotators(cfg, api.base_url, None, store).complete_many(requests_for(cfg))
    assert all(a.content for a in answers)
    assert [b["status"] for b in api.batches.values()] == ["expired", "completed"]
    assert api.rows_run == len(TEXTS)  # no row paid twice
    assert len(submitted_ids(api)) == len(TEXTS) + len(TEXTS) - 3
    assert store.batch_counts() == {"completed": 1, "expired": 1}


def test_rows_in_the_error_file_are_recorded_as_failures_or_sent_again(store):
    """A 400 is final (recorded, not resent); a 500 goes in the next batch and is answered there."""
    flaky = {"n": 0}

    def upstream(body):
        text = body["messages"][-1]["content"]
        if "password" in text:
            return error(400, "this request is refused")
        if "parcel" in text and flaky["n"] == 0:
            flaky["n"] += 1
            return error(500, "upstream hiccup")
        return respond(body)

    with FakeOpenAIServer(upstream) as up, FakeBatchAPI(up.base_url, step_s=0.02) as api:
        cfg = cfg_for(api.base_url)
        said: list[str] = []
        answers = BatchAnnotators(cfg, api.base_url, None, store, say=said.append).complete_many(requests_for(cfg))
    by_text = dict(zip(TEXTS, answers))
    assert by_text["how do I reset my password"].error == "http_400"
    assert by_text["my parcel never arrived, tracking is stuck"].content == "shipping"
    assert store.failure_counts() == {"http_400": 1}
    assert api.batches_created == 2 and api.rows_run == len(TEXTS) + 1
    assert any("1 failed, 1 to send again" in s for s in said)


def test_a_batch_that_never_finishes_stops_the_run_resumably(api, store):
    """The wait limit stops the run with the batch named; the next run polls it and submits nothing new."""
    api.script(BatchScript(hold=True))
    cfg = cfg_for(api.base_url, batch_max_wait_s=0.5)
    reqs = requests_for(cfg)
    with pytest.raises(BatchTimeLimit, match=r"1 batch\(es\) still not finished .*llm.batch_max_wait_s.*Run again"):
        BatchAnnotators(cfg, api.base_url, None, store).complete_many(reqs)
    job = parse_job(
        {"name": "t", "data": {"path": "x.csv"}, "task": {"description": "d", "classes": {"a": ["a"], "b": ["b"]}}},
        "/jobs/job.yaml",
    )
    st = job_status(store, job)
    assert [(b["state"], b["requests"]) for b in st["batches"]["in_flight"]] == [("in_progress", len(TEXTS))]
    assert any("batches in flight: 1" in line for line in format_status(st))
    api.release()
    said: list[str] = []
    answers = BatchAnnotators(cfg_for(api.base_url), api.base_url, None, store, say=said.append).complete_many(reqs)
    assert all(a.content for a in answers) and api.batches_created == 1
    assert any("resuming 1 batch submission" in s for s in said)
    assert job_status(store, job)["batches"]["in_flight"] == []


def test_a_cancelled_batch_keeps_what_ran_and_the_rest_is_sent_again(api, store):
    api.script(BatchScript(hold=True))
    cfg = cfg_for(api.base_url)

    def cancel_it(line: str) -> None:
        if "in_progress" in line:
            openai.OpenAI(base_url=api.base_url, api_key="x").batches.cancel(next(iter(api.batches)))

    answers = BatchAnnotators(cfg, api.base_url, None, store, say=cancel_it).complete_many(requests_for(cfg))
    assert all(a.content for a in answers)
    assert [b["status"] for b in api.batches.values()] == ["cancelled", "completed"]


def test_a_batch_failing_validation_is_sent_again_then_recorded_as_failed(api, store):
    api.script(*[BatchScript(fail_code="invalid_request")] * 2)
    cfg = cfg_for(api.base_url, max_retries=1)
    said: list[str] = []
    answers = BatchAnnotators(cfg, api.base_url, None, store, say=said.append).complete_many(requests_for(cfg)[:2])
    assert [a.error for a in answers] == [UNFINISHED + "_exhausted"] * 2
    assert api.batches_created == 2 and any("scripted validation failure" in s for s in said)
    assert store.failure_counts() == {UNFINISHED + "_exhausted": 2}


def test_the_budget_guard_admits_a_batch_whole_or_cut_to_fit(api, store):
    budget = BudgetConfig(max_requests=5)
    guard = BudgetGuard(budget, lambda: spent_from_usage(store.usage_by_model(), budget))
    cfg = cfg_for(api.base_url)
    pool = BatchAnnotators(cfg, api.base_url, None, store, guard=guard)
    answers = pool.complete_many(requests_for(cfg))
    assert [a.error for a in answers] == [None] * 5 + ["budget_exhausted"] * 3
    assert len(submitted_ids(api)) == 5 and spent_from_usage(store.usage_by_model(), budget).requests == 5
    assert guard.admit([Spent(1, 1)]) == 0


def test_cached_prompt_tokens_reported_by_the_provider_are_charged_at_the_cached_price(store):
    with (
        FakeOpenAIServer(lambda body: ok("billing", cached_tokens=8)) as up,
        FakeBatchAPI(up.base_url, step_s=0.02) as api,
    ):
        cfg = cfg_for(api.base_url)
        answers = BatchAnnotators(cfg, api.base_url, None, store).complete_many(requests_for(cfg)[:2])
    assert [a.cached_tokens for a in answers] == [8, 8]
    (u,) = store.usage_by_model()
    spent = spent_from_usage([u], BudgetConfig(prices={"kw": PRICE})).cost
    assert spent == pytest.approx(cost(mode_price(PRICE, True), u["prompt_tokens"], 16, u["completion_tokens"]))
    assert spent < cost(mode_price(PRICE, True), u["prompt_tokens"], 0, u["completion_tokens"])


# ---- a SIGKILL between upload and create ---------------------------------------------------------------------
def child(state: str, base_url: str) -> None:
    """What a killed run does: send TEXTS through the batch API (run in a child process by the test below)."""
    store = Store(state)
    cfg = cfg_for(base_url)
    answers = BatchAnnotators(cfg, base_url, None, store).complete_many(requests_for(cfg))
    print(json.dumps([a.content for a in answers]))


@pytest.mark.parametrize(
    "stage,method,path",
    [
        ("handled", "POST", "/v1/files"),  # the file is stored; the run dies before it learns the id
        ("before", "POST", "/v1/batches"),  # the file id is recorded; no batch exists yet
        ("handled", "POST", "/v1/batches"),  # the batch exists; the run dies before it learns the id
    ],
)
def test_a_run_killed_between_upload_and_create_resumes_without_submitting_twice(
    upstream, tmp_path, stage, method, path
):
    proc: list[subprocess.Popen] = []

    def kill(at_stage: str, at_method: str, at_path: str) -> None:
        if (at_stage, at_method, at_path) == (stage, method, path) and proc and proc[0].poll() is None:
            proc[0].send_signal(signal.SIGKILL)
            proc[0].wait()

    state = str(tmp_path / "state.duckdb")
    with FakeBatchAPI(upstream.base_url, step_s=0.02, hook=kill) as api:
        proc.append(
            subprocess.Popen(
                [sys.executable, "-c", f"from tests.unit.test_batch import child; child({state!r}, {api.base_url!r})"],
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                stdout=subprocess.PIPE,
            )
        )
        assert proc[0].wait(timeout=120) == -signal.SIGKILL
        api.hook = None
        store = Store(state)
        try:
            answers = BatchAnnotators(cfg_for(api.base_url), api.base_url, None, store).complete_many(
                requests_for(cfg_for(api.base_url))
            )
            assert store.open_batches() == []
        finally:
            store.close()
        time.sleep(0.1)
    assert [a.content for a in answers] == [
        respond({"messages": [{"content": f"<text>{t}</text>"}]}).content for t in TEXTS
    ]
    assert api.uploads == 1 and api.batches_created == 1 and api.rows_run == len(TEXTS)
    assert sorted(submitted_ids(api)) == sorted(r.key() for r in requests_for(cfg_for(api.base_url)))


def test_the_batch_service_has_a_command_line(tmp_path):
    """`python -m freeal_stream.testing.fake_batch_api` (the README's walk-through) serves the batch API until
    stopped."""
    p = subprocess.Popen(
        [sys.executable, "-m", "freeal_stream.testing.fake_batch_api", "--port", "0"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = p.stdout.readline()
        assert line.startswith("batch API on http://127.0.0.1:"), repr(line)
        assert openai.OpenAI(base_url=line.split()[3], api_key="x").batches.list().data == []
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()  # let the first failure, not the clean-up's, be the one reported
            raise
    assert Path(ROOT / "freeal_stream" / "testing" / "fake_batch_api.py").exists()
