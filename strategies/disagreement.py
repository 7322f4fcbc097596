"""Disagreement sampling: ask the LLM where the current SLM contradicts a label the pool already has."""

from __future__ import annotations

import numpy as np

from strategies.base import Candidates, QueryContext, QueryStrategy, Shard
from strategies.order import top


class DisagreementStrategy(QueryStrategy):
    """Score = the SLM's probability mass *not* on a reference label, 1 - p[ref]; the reference is the row's
    LLM label if it has one, else the previous round's SLM label (`slm_labels`), else the SLM's own argmax.

    In the budgeted schedule the pool is never-annotated texts, so `llm_labels` are all -1 there and the
    signal is the SLM changing its mind between rounds (a flipped prediction scores above 0.5); the LLM label
    counts for pools of LLM-labelled texts (e.g. choosing which to re-ask). With no reference at all (the
    first SLM) the score is 1 - max p, i.e. least-confidence uncertainty; with no probs it is `random`.
    """

    name = "disagreement"
    needs = frozenset({"probs", "llm_labels", "slm_labels"})

    def candidates(self, shard: Shard, n: int, ctx: QueryContext) -> Candidates:
        if shard.probs is None:
            return top(shard.ids, np.zeros(len(shard)), n, ctx)
        probs = np.asarray(shard.probs, dtype=np.float64)
        ref = probs.argmax(1)
        for labels in (shard.slm_labels, shard.llm_labels):  # later wins: the LLM label beats the old SLM's
            if labels is not None:
                ref = np.where(labels >= 0, labels, ref)
        return top(shard.ids, 1.0 - probs[np.arange(len(probs)), ref], n, ctx)
