"""Sending a round's plan to the LLM and committing its labels as the answers come back.

The annotator actors store every answer before it counts (never paid twice); this module turns each batch of
answers into `Annotation` rows the moment it arrives, so a killed round loses no label.
"""

from __future__ import annotations

import numpy as np

from freeal_stream.llm import calibration
from freeal_stream.llm.client import ChatAnswer, ChatRequest, Ledger
from freeal_stream.llm.prompts import TEMPLATE_VERSION, clean_paraphrase, paraphrase_max_tokens, paraphrase_messages
from freeal_stream.records import Annotation
from freeal_stream.rounds.context import RoundContext
from freeal_stream.rounds.planning import RoundPlan, affordable


def annotate(ctx: RoundContext, plan: RoundPlan) -> None:
    """Ask the LLM for the planned labels not yet stored; each batch of labels is committed on arrival.

    The demo blocks' calibration requests go first (stored answers come back free), so every label is read
    against its prompt's prior the moment it arrives (llm/calibration.py)."""
    round_ = plan.round
    done = ctx.store.annotated_in_round(round_)
    todo = [k for k, it in enumerate(plan.items) if it.item_id not in done]
    if len(todo) < len(plan):
        ctx.say(
            f"round {round_}: {len(plan) - len(todo)} of {len(plan)} planned labels already stored; asking for the rest"
        )
    priors = _priors(ctx, plan, todo)
    stage = f"round {round_} annotate"

    def report(n: int, total: int, ledger: Ledger) -> None:
        ctx.progress.update(
            stage,
            n,
            total,
            f"sent={ledger.requests_sent} "
            f"tok={ledger.prompt_tokens + ledger.completion_tokens} cached={ledger.cached_tokens}",
        )

    def commit(idx: list[int], answers: list[ChatAnswer]) -> None:
        rows = []
        for k, ans in zip(idx, answers):
            if ans.content is None:
                continue  # failed or not admitted: not stored, so the item stays in the pool
            item = plan.items[todo[k]]
            reading = calibration.read(ctx.verbalizer, ans, priors.get(item.demo_ids))
            rows.append(Annotation(item.item_id, ans.key, reading.label, reading.confidence, item.demo_ids))
        ctx.store.add_annotations(round_, rows)

    ctx.session.annotators.complete_many([plan.requests[k] for k in todo], progress=report, on_answers=commit)


def _priors(ctx: RoundContext, plan: RoundPlan, todo: list[int]) -> dict[tuple[str, ...], np.ndarray]:
    """Each demo block's class prior, from its content-free answers (blocks whose answers carry no class
    logprobs, or that the budget did not admit, are left out: their labels are read uncalibrated)."""
    blocks = [b for b in plan.blocks(todo) if plan.calibration.get(b)]
    requests = [r for b in blocks for r in plan.calibration[b]]
    if not requests:
        return {}
    answers = iter(
        ctx.session.annotators.complete_many(
            requests, progress=lambda d, t, _l: ctx.progress.update(f"round {plan.round} calibrate", d, t)
        )
    )
    priors = {}
    for b in blocks:
        got = [a for _, a in zip(plan.calibration[b], answers) if a.content is not None]
        if (p := calibration.prior(ctx.verbalizer, got)) is not None:
            priors[b] = p
    return priors


def warn_if_one_class(ctx: RoundContext, round_: int, enough: int = 20) -> None:
    """Say so when a round's LLM labels all name one class: the LLM cannot tell the classes apart (or the demos
    mislead it), and training on one class teaches the SLM nothing."""
    counts = ctx.store.round_label_counts(round_)
    if len(counts) == 1 and sum(counts.values()) >= enough and ctx.n_classes > 1:
        ((label, n),) = counts.items()
        ctx.say(
            f"warning: all {n} LLM labels of round {round_} are '{ctx.job.task.class_names[label]}'; the LLM "
            "may be unable to tell the classes apart. Check task.description, the class words and the demos "
            "(status and export show them) before spending more"
        )


def paraphrases(ctx: RoundContext, texts: list[str]) -> list[str | None]:
    """LLM rewrites of `texts` (the `views: llm` consistency view; cached and budgeted like annotations);
    None where the budget or the answer gave none."""
    limit = ctx.job.data.max_text_chars
    requests = [
        ChatRequest.build(
            paraphrase_messages(t, limit),
            ctx.llm,
            TEMPLATE_VERSION,
            max_tokens=paraphrase_max_tokens(t),
            logprobs=False,
        )
        for t in texts
    ]
    n = affordable(ctx, requests)
    answers = ctx.session.annotators.complete_many(
        requests[:n], progress=lambda d, t, _l: ctx.progress.update("paraphrase views", d, t)
    )
    return [clean_paraphrase(a.content) for a in answers] + [None] * (len(texts) - n)
