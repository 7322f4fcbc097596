"""`status` figures from a real store: spend priced per model, what is left, the estimate to finish."""

from __future__ import annotations

import dataclasses

import pytest

from freeal_stream.config import parse_job
from freeal_stream.llm.client import ChatRequest
from freeal_stream.records import Annotation
from freeal_stream.status import format_status, job_status, remaining_requests
from freeal_stream.store import Store
from tests.unit.test_sources_store import answer


def job(**budget):
    return parse_job(
        {
            "name": "j",
            "data": {"path": "x.csv"},
            "task": {"description": "d", "classes": {"a": ["a"], "b": ["b"]}},
            "llm": {"model": "m"},
            "freeal": {"rounds": 3, "query_fraction": 0.5},
            "budget": budget,
        }
    )


def test_status_prices_spend_and_estimates_the_rest(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    s.add_items(
        [f"i{n}" for n in range(8)], [f"t{n}" for n in range(8)], [None] * 8, [None] * 8, [f"h{n}" for n in range(8)]
    )
    req = ChatRequest(
        messages=(("user", "hi"),),
        model="m",
        temperature=0.0,
        max_tokens=2,
        logprobs=False,
        top_logprobs=0,
        template_version="v",
    )
    s.put_answers([(req, answer(req.key()))])  # 10 prompt tokens (4 cached), 1 completion token
    s.add_annotations(1, [Annotation("i0", req.key(), 0, 0.9, ())])
    s.set_phase(1, "budgeted", "done")
    j = job(max_requests=10, max_cost=1.0, prices={"m": {"input": 1000.0, "cached_input": 100.0, "output": 2000.0}})
    st = job_status(s, j)
    s.close()
    assert st["items"] == 8 and st["annotated_by_llm"] == 1 and st["never_annotated"] == 7
    assert st["spent"]["cost"] == pytest.approx((6 * 1000 + 4 * 100 + 1 * 2000) / 1e6)
    assert st["spent"]["priced"] and st["left"]["requests"] == 9 and st["left"]["tokens"] is None
    # 2 rounds left at P = 50% of the 7 never annotated: 4, then 2 (round_size rounds half up)
    assert st["estimate_to_finish"]["requests"] == remaining_requests(j, [{"phase": "done"}], 7) == 6
    assert st["estimate_to_finish"]["tokens"] == 6 * 11
    lines = format_status(st)
    assert any(line.startswith("spent: 1 requests, 11 tokens") and "cost 0.0084" in line for line in lines)


def test_status_says_when_cost_is_unknown(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    req = ChatRequest(
        messages=(("user", "hi"),),
        model="m",
        temperature=0.0,
        max_tokens=2,
        logprobs=False,
        top_logprobs=0,
        template_version="v",
    )
    s.put_answers([(req, answer(req.key()))])
    st = job_status(s, job())
    s.close()
    assert st["left"] is None and not st["spent"]["priced"]
    assert any("cost not known" in line for line in format_status(st))


def test_status_lists_failed_requests_by_kind(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    req = ChatRequest(
        messages=(("user", "hi"),),
        model="m",
        temperature=0.0,
        max_tokens=2,
        logprobs=False,
        top_logprobs=0,
        template_version="v",
    )
    for error in ("timeout_exhausted", "timeout_exhausted", "http_500_exhausted"):
        s.put_answers([(req, dataclasses.replace(answer(req.key()), content=None, error=error))])
    st = job_status(s, job())
    s.close()
    assert st["llm_failures"] == {"http_500_exhausted": 1, "timeout_exhausted": 2}
    assert st["spent"]["requests"] == 0  # a failure is not an answer: nothing paid
    assert any(
        line.startswith(
            "LLM requests failed after retries (not paid; asked again later): 3 "
            "(http_500_exhausted 1, timeout_exhausted 2)"
        )
        for line in format_status(st)
    )


def test_status_shows_the_latest_estimate_and_the_target_stops_spending(tmp_path):
    """The last finished round's gold-free estimate reaches `status` (plain data and lines), and a job whose target
    the estimate's lower end has reached plans no further round."""
    import json
    from types import SimpleNamespace

    from freeal_stream.rounds.quality import COVERAGE, target_reached

    s = Store(tmp_path / "s.duckdb")
    cover = [{"threshold": t, "share": round(1 - t / 2, 4), "accuracy": round(min(1.0, t + 0.05), 4)} for t in COVERAGE]
    est = {
        "accuracy": 0.873,
        "low": 0.861,
        "high": 0.885,
        "interval": 0.9,
        "rule": "auto",
        "slm_labels": 0.7,
        "coverage": cover,
    }
    base = {
        "seconds": 1.0,
        "llm_labelled": 1,
        "llm_no_label": 0,
        "llm_failed": 0,
        "requests_round": 1,
        "prompt_tokens_round": 10,
        "completion_tokens_round": 1,
        "cached_tokens_round": 0,
        "clean_set": 1,
        "demo_pool": 2,
        "slm_mode": "head",
    }
    s.set_phase(1, "budgeted", "done", metrics={**base, "round": 1, "estimate": {**est, "accuracy": 0.8}})
    s.set_phase(2, "budgeted", "done", metrics={**base, "round": 2, "estimate": est})
    s.set_phase(3, "budgeted", "annotating")
    st = job_status(s, job())
    assert st["estimate"] == {"round": 2, **est}
    lines = format_status(st)
    assert any(
        line.startswith("export accuracy, estimated without gold after round 2: 0.873 (90% interval 0.861-0.885")
        for line in lines
    )
    assert any(">= 0.9: 55% at 0.950" in line for line in lines)
    assert any(line.startswith("  round 2: done") and "export est. 0.873 [0.861, 0.885]" in line for line in lines)
    s.set_meta("quality/round-2", json.dumps({"estimate": est}))
    ctx = lambda target: SimpleNamespace(
        job=parse_job(
            {
                "name": "j",
                "data": {"path": "x.csv"},
                "task": {"description": "d", "classes": {"a": ["a"], "b": ["b"]}},
                "freeal": {"target_accuracy": target},
            }
        ),
        store=s,
    )
    assert target_reached(ctx(0.86), 2) is not None and "0.873 [0.861, 0.885]" in target_reached(ctx(0.86), 2)
    assert target_reached(ctx(0.87), 2) is None  # the point estimate is there, the lower end is not
    assert target_reached(ctx(None), 2) is None and target_reached(ctx(0.5), 0) is None
    s.close()


def test_status_counts_answers_charged_by_estimate_and_malformed_ones(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    reqs = [
        ChatRequest(
            messages=(("user", f"hi {n}"),),
            model="m",
            temperature=0.0,
            max_tokens=2,
            logprobs=False,
            top_logprobs=0,
            template_version="v",
        )
        for n in range(3)
    ]
    s.put_answers([(reqs[0], answer(reqs[0].key()))])
    s.put_answers([(reqs[1], dataclasses.replace(answer(reqs[1].key()), usage_estimated=True))])
    s.put_answers(
        [
            (
                reqs[2],
                dataclasses.replace(
                    answer(reqs[2].key(), ""), usage_estimated=True, malformed="content is a int, not a string"
                ),
            )
        ]
    )
    st = job_status(s, job(max_tokens=100))
    s.close()
    assert st["spent"]["charged_by_estimate"] == 2 and st["spent"]["malformed_answers"] == 1
    assert st["spent"]["tokens"] == 33 and st["left"]["tokens"] == 67
    lines = format_status(st)
    assert any(line.startswith("charged by estimate: 2 answers") for line in lines)
    assert any(line.startswith("malformed answers: 1 paid answers") for line in lines)
