"""What a job's state says: spend against the caps, an estimate to finish, rounds, pool and label sources.

One function over anything with the Store's methods (the store itself, or the store actor's proxy
inside a running service), so `freeal-stream status` and `GET /status` report the same figures.
"""

from __future__ import annotations

import math
import time
from typing import Any

from freeal_stream import budget as budget_policy
from freeal_stream.config import JobConfig
from freeal_stream.review import format_review_check, review_check
from freeal_stream.sources import describe_counts


def _plain(s: budget_policy.Spent) -> dict[str, Any]:
    fix = lambda v: None if v == math.inf else v
    return {"requests": fix(s.requests), "tokens": fix(s.tokens), "cost": fix(round(s.cost, 6))}


def remaining_requests(job: JobConfig, rounds: list[dict[str, Any]], unannotated: int) -> int:
    """Requests the rounds not yet done would send, at the job's P and with today's pool (no new data)."""
    done = [r for r in rounds if r["phase"] == "done"]
    left = max(0, job.freeal.rounds - len(done))
    if job.freeal.schedule == "budgeted":
        total, u = 0, unannotated
        for _ in range(left):
            n = budget_policy.round_size(u, job.freeal.query_fraction)
            total, u = total + n, u - n
        return total
    last = done[-1]["metrics"].get("llm_requested", 0) if done else unannotated
    return left * (last if done else unannotated)


STATUS_PROBLEM_ROWS = 100  # rows of bad input shown by `status --json` / GET /status (all: `quarantine`)
_RAW_SHOWN = 300  # characters of a row's raw content shown there


def bad_input(store: Any, limit: int, raw_chars: int | None = None) -> dict[str, Any]:
    """Quarantined (not labelled) and flagged (labelled, with a caveat) rows: counts by reason, first rows."""
    counts = store.problem_counts()
    rows = store.problems(limit)
    if raw_chars is not None:
        rows = [{**r, "raw": r["raw"][:raw_chars] + ("..." if len(r["raw"]) > raw_chars else "")} for r in rows]
    total = {a: sum(c["count"] for c in counts if c["action"] == a) for a in ("quarantined", "flagged")}
    return {**total, "by_reason": counts, "rows": rows}


def format_bad_input(q: dict[str, Any]) -> str:
    """One line: 'bad input: 2 quarantined (empty text 1, not UTF-8 1); 1 flagged (long text 1)'."""
    return "bad input: " + (describe_counts(q["by_reason"]) or "no row quarantined or flagged")


SHORT_COVERAGE = (0.8, 0.9, 0.95, 0.99)  # the coverage table's rows `status` prints (all of them: --json)


def latest_estimate(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last finished round's estimate of the export's accuracy (no gold), with its coverage table."""
    for r in reversed(rounds):
        if r["phase"] == "done" and r["metrics"].get("estimate"):
            return {"round": r["round"], **r["metrics"]["estimate"]}
    return None


def format_estimate_lines(est: dict[str, Any]) -> list[str]:
    """Two lines: the export's estimated accuracy with its interval, then the coverage table in short."""
    cover = ", ".join(
        f">= {c['threshold']:g}: {100 * c['share']:.0f}% at {c['accuracy']:.3f}"
        for c in est["coverage"]
        if c["accuracy"] is not None and c["threshold"] in SHORT_COVERAGE
    )
    over = f" over its {est['items']:,} items" if "items" in est else ""
    return [
        f"export accuracy, estimated without gold after round {est['round']}{over}: {est['accuracy']:.3f} "
        f"({100 * est['interval']:.0f}% interval {est['low']:.3f}-{est['high']:.3f}; label_of_record "
        f"'{est['rule']}', SLM labels {100 * est['slm_labels']:.0f}% of the pool)",
        f"  keeping only labels at least this likely right (share of pool at est. accuracy): {cover}",
    ]


def job_status(store: Any, job: JobConfig) -> dict[str, Any]:
    """The state as plain data (JSON-ready)."""
    rounds = store.rounds()
    usage = store.usage_by_model()
    spent = budget_policy.spent_from_usage(usage, job.budget)
    priced = bool(usage) and all(u["model"] in job.budget.prices for u in usage)
    raw = store.spent()
    n_items = store.count_items()
    annotated = store.annotated_count()
    by_source, disputed = store.label_counts(job.freeal.label_of_record)
    todo = remaining_requests(job, rounds, n_items - annotated)
    per_req = (spent.tokens / spent.requests, spent.cost / spent.requests) if spent.requests else None
    price = job.budget.prices.get(job.llm.model)
    by_mode = (
        {
            mode: round(
                todo
                * budget_policy.cost(
                    budget_policy.mode_price(price, mode == "batch"),
                    raw["prompt_tokens"],
                    raw["cached_tokens"],
                    raw["completion_tokens"],
                )
                / raw["requests"],
                6,
            )
            for mode in ("live", "batch")
        }
        if price and raw["requests"] and todo
        else None
    )
    return {
        "job": job.name,
        "items": n_items,
        "annotated_by_llm": annotated,
        "never_annotated": n_items - annotated,
        "labels_by_source": by_source,
        "label_of_record": job.freeal.label_of_record,
        "llm_labels_disputed": disputed,
        "rounds": [
            {"round": r["round"], "phase": r["phase"], **({"metrics": r["metrics"]} if r["metrics"] else {})}
            for r in rounds
        ],
        "spent": {
            **_plain(spent),
            "cached_tokens": raw["cached_tokens"],
            "priced": priced,
            "charged_by_estimate": raw["usage_estimated"],
            "malformed_answers": raw["malformed"],
        },
        "left": None if (left := budget_policy.headroom(spent, job.budget)) is None else _plain(left),
        "estimate_to_finish": {
            "requests": todo,
            "tokens": round(todo * per_req[0]) if per_req else None,
            "cost": round(todo * per_req[1], 6) if per_req else None,
            "cost_by_mode": by_mode,
            "basis": "the rounds left at the job's P on the current pool, at the mean cost per request so far "
            "(cost_by_mode: at the mean tokens per request so far, live and at the batch discount)",
        },
        "estimate": latest_estimate(rounds),
        "batches": {"in_flight": store.open_batches(), "finished": store.batch_counts()},
        "human_review": review_check(store.review_agreement()),
        "quarantine": bad_input(store, STATUS_PROBLEM_ROWS, _RAW_SHOWN),
        "llm_failures": store.failure_counts(),
    }


_RULE_WORDS = {
    "llm": "the LLM's label stands",
    "slm": "the SLM's prediction replaces it",
    "auto": "the label more likely right stands",
}


def format_status(st: dict[str, Any]) -> list[str]:
    """Human-readable lines for `freeal-stream status`."""
    from freeal_stream.rounds.metrics import format_round

    money = lambda v: "-" if v is None else f"{v:.4f}"
    s, left, est = st["spent"], st["left"], st["estimate_to_finish"]
    lines = [
        f"job {st['job']}: {st['items']} items; annotated by the LLM {st['annotated_by_llm']}; never "
        f"annotated {st['never_annotated']}",
        f"labels by source: {st['labels_by_source']}; LLM labels the SLM disputes: {st['llm_labels_disputed']} "
        f"(label_of_record '{st['label_of_record']}': " + _RULE_WORDS[st["label_of_record"]] + "; `export` marks them)",
        f"spent: {s['requests']} requests, {s['tokens']} tokens ({s['cached_tokens']} prompt tokens from the "
        f"server's prefix cache), "
        + (f"cost {money(s['cost'])}" if s["priced"] else "cost not known (no budget.prices for the model)"),
    ]
    if left is None:
        lines.append("left: no budget caps set")
    else:
        lines.append(
            "left: "
            + ", ".join(
                f"{k} {'unlimited' if v is None else (money(v) if k == 'cost' else v)}" for k, v in left.items()
            )
        )
    by_mode = est.get("cost_by_mode")
    lines.append(
        f"estimated to finish: {est['requests']} requests"
        + (f", ~{est['tokens']} tokens" if est["tokens"] is not None else "")
        + (f", cost ~{money(est['cost'])}" if est["cost"] is not None and s["priced"] else "")
        + (f" (~{money(by_mode['live'])} live, ~{money(by_mode['batch'])} in batch mode)" if by_mode else "")
    )
    if s.get("charged_by_estimate"):
        lines.append(
            f"charged by estimate: {s['charged_by_estimate']} answers came without usable usage (none, "
            "or not a sane count), so each is charged the pre-flight estimate (input ~4 characters a "
            "token, output at llm.max_tokens)"
        )
    if s.get("malformed_answers"):
        lines.append(
            f"malformed answers: {s['malformed_answers']} paid answers failed the answer checks; stored with "
            "no label (never asked again), the SLM labels those texts"
        )
    batches = st.get("batches") or {}
    if batches.get("in_flight"):
        lines.append(
            f"batches in flight: {len(batches['in_flight'])} ("
            + "; ".join(
                f"{b['batch_id'] or 'not yet created'} {b['state']}, {b['requests']} requests to "
                f"{b['model']}, since "
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(b['created_at']))}"
                for b in batches["in_flight"]
            )
            + ") — `run` again resumes polling them"
        )
    if batches.get("finished"):
        lines.append("batches finished: " + ", ".join(f"{k} {n}" for k, n in batches["finished"].items()))
    review = format_review_check(st.get("human_review"))
    if review:
        lines.append(review)
    if st.get("estimate"):
        lines += format_estimate_lines(st["estimate"])
    if st.get("llm_failures"):
        failed = st["llm_failures"]
        lines.append(
            f"LLM requests failed after retries (not paid; asked again later): {sum(failed.values())} ("
            + ", ".join(f"{k} {n}" for k, n in failed.items())
            + ")"
        )
    if st.get("quarantine"):
        lines.append(
            format_bad_input(st["quarantine"])
            + (" — list them with `freeal-stream quarantine <job>`" if st["quarantine"]["rows"] else "")
        )
    for r in st["rounds"]:
        lines.append(
            f"  round {r['round']}: {r['phase']}" + (f" — {format_round(r['metrics'])}" if r.get("metrics") else "")
        )
    return lines
