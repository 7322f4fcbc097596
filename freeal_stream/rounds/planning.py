"""Which texts a round sends to the LLM, with which demos, and how many of them the budget pays for.

A `RoundPlan` is built once: its requests are priced (the budget fit) and then sent, the very same objects.
It is stored before the first request goes out, so a resumed round rebuilds the same requests (same keys:
every answer already paid for comes from the store).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from freeal_stream import budget as budget_policy
from freeal_stream.dawid_skene import Calibration
from freeal_stream.demos import group_queries, retrieve_for_groups, small_loss_per_class
from freeal_stream.llm import calibration
from freeal_stream.llm.client import ChatRequest
from freeal_stream.records import Demo, PlanItem
from freeal_stream.rounds.context import RoundContext
from freeal_stream.rounds.quality import round_quality, target_reached
from freeal_stream.rounds.state import SLMState, softmax
from freeal_stream.session import spent_now
from freeal_stream.slm.trainer import per_sample_ce
from strategies.base import QueryContext, QueryStrategy
from strategies.select import select
from strategies.shards import Shard

STRATEGY_SHARD_ROWS = 65536


@dataclass(frozen=True)
class RoundPlan:
    """A round's requests: one per item, aligned with `items` (the item and the demos its prompt shows), and
    per demo block (an item's `demo_ids`) the content-free requests that calibrate its answers (none when the
    job does not calibrate)."""

    round: int
    items: tuple[PlanItem, ...]
    requests: tuple[ChatRequest, ...]
    calibration: dict[tuple[str, ...], tuple[ChatRequest, ...]]

    def __len__(self) -> int:
        return len(self.items)

    def head(self, n: int) -> RoundPlan:
        return RoundPlan(self.round, self.items[:n], self.requests[:n], self.calibration)

    def blocks(self, positions: Sequence[int]) -> list[tuple[str, ...]]:
        """The demo blocks of the items at `positions`, each once, in order."""
        return list(dict.fromkeys(self.items[k].demo_ids for k in positions))

    def sending_order(self) -> list[tuple[int | None, ChatRequest]]:
        """Every request with its item's position (None: a calibration request), a block's calibration just
        before its first item: the order the budget pays for them in."""
        out: list[tuple[int | None, ChatRequest]] = []
        seen: set[tuple[str, ...]] = set()
        for k, (item, request) in enumerate(zip(self.items, self.requests)):
            if item.demo_ids not in seen:
                seen.add(item.demo_ids)
                out += [(None, r) for r in self.calibration.get(item.demo_ids, ())]
            out.append((k, request))
        return out


def plan_round(ctx: RoundContext, round_: int, state: SLMState, strategy: QueryStrategy) -> RoundPlan | None:
    """Choose the round's texts, retrieve their demos and fit the plan to the budget; None when the round
    cannot run (nothing left to annotate, the budget is spent, or the export is estimated good enough), having
    said why."""
    reached = target_reached(ctx, state.round)
    if reached is not None:
        ctx.say(f"round {round_}: {reached}; stopping (raise freeal.target_accuracy to go on)")
        return None
    targets = choose_targets(ctx, round_, state, strategy)
    if len(targets) == 0:
        ctx.say(f"round {round_}: nothing left to annotate; stopping")
        return None
    plan = retrieve_demos(ctx, round_, state, targets)
    order = plan.sending_order()
    paid_for = order[: affordable(ctx, [r for _, r in order])]
    n = sum(k is not None for k, _ in paid_for)
    if n == 0:
        ctx.say(f"round {round_}: the budget is spent; stopping (raise budget caps to go on)")
        return None
    if n < len(plan):
        ctx.say(f"budget: round {round_} sends {n} of {len(plan)} planned requests")
    return plan.head(n)


def stored_plan(ctx: RoundContext, round_: int, state: SLMState) -> RoundPlan:
    """The plan a round stored before it started sending (what a resumed round sends)."""
    return build_plan(ctx, round_, ctx.store.round_plan(round_), state.demos)


def build_plan(ctx: RoundContext, round_: int, items: list[PlanItem], demos: tuple[Demo, ...]) -> RoundPlan:
    """The requests for planned items (the prompt shows each item's demos, then the item) and the
    calibration requests of each demo block."""
    by_id = {d.id: d for d in demos}
    positions = ctx.store.positions_of([it.item_id for it in items])
    texts = ctx.pool.texts(positions)
    task, limit = ctx.job.task.description, ctx.job.data.max_text_chars

    def shown(demo_ids: tuple[str, ...]) -> list[tuple[str, int]]:
        return [(by_id[d].text, by_id[d].label) for d in demo_ids]

    requests = tuple(
        calibration.annotation_request(ctx.llm, task, ctx.verbalizer, shown(it.demo_ids), text, limit)
        for it, text in zip(items, texts)
    )
    blocks = dict.fromkeys(it.demo_ids for it in items)
    calib = {b: calibration.calibration_requests(ctx.llm, task, ctx.verbalizer, shown(b), limit) for b in blocks}
    return RoundPlan(round_, tuple(items), requests, calib)


# ---- which texts ----------------------------------------------------------------------------------------
def choose_targets(ctx: RoundContext, round_: int, state: SLMState, strategy: QueryStrategy) -> np.ndarray:
    """Pool positions that go to the LLM this round, sorted."""
    size = ctx.pool.size
    annotated = np.zeros(size, bool)
    asked = ctx.store.annotated_positions()
    annotated[asked[asked < size]] = True
    annotated[human_label_array(ctx) >= 0] = True  # a human's label is never sent to the LLM again
    if ctx.job.freeal.schedule == "full":
        return _refinement_targets(ctx, state, annotated)
    unannotated = np.flatnonzero(~annotated)
    n = budget_policy.round_size(len(unannotated), ctx.job.freeal.query_fraction)
    left = budget_policy.headroom(spent_now(ctx.store, ctx.job), ctx.job.budget)
    query = QueryContext(
        round=round_,
        seed=ctx.job.seed,
        n_classes=ctx.n_classes,
        budget_left=None if left is None or left.requests == float("inf") else int(left.requests),
    )
    llm_labels = llm_label_array(ctx) if "llm_labels" in strategy.needs else None
    previous = _previous_predictions(ctx, round_) if "slm_labels" in strategy.needs else None
    wants_probs = "probs" in strategy.needs and state.logits is not None
    stored = round_quality(ctx, state.round).get("calibration") if wants_probs else None
    # calibrated where the round could calibrate: `route` (least confidence) then sends the texts where the SLM
    # is least likely right
    probs_of = Calibration.from_json(stored).probs if stored else softmax

    def shards():
        for start in range(0, len(unannotated), STRATEGY_SHARD_ROWS):
            at = unannotated[start : start + STRATEGY_SHARD_ROWS]
            ids = np.array(ctx.store.items_at(at.tolist()).ids, dtype=object)
            cols = {}
            if wants_probs and state.logits is not None:
                cols["probs"] = probs_of(state.logits.gather(at)).astype(np.float32)
            if "embeddings" in strategy.needs:
                cols["embeddings"] = state.emb.gather(at)  # the frozen encoder's before any SLM
            if llm_labels is not None:
                cols["llm_labels"] = llm_labels[at]
            if previous is not None:
                cols["slm_labels"] = previous[at]
            yield Shard(ids, **cols)

    chosen = select(strategy, shards, n, query)
    return np.sort(ctx.store.positions_of(list(chosen)))


def _refinement_targets(ctx: RoundContext, state: SLMState, annotated: np.ndarray) -> np.ndarray:
    """The full schedule: round 1 labels everything; later rounds send everything outside the SLM's clean sets
    (no-label and new items included) again, but a text goes to the LLM at most twice (docs/METHOD.md section 5)."""
    if not state.trained:
        return np.flatnonzero(~annotated)
    labels = llm_label_array(ctx)
    losses = llm_losses(state, labels)
    keep = np.zeros(ctx.pool.size, bool)
    for idx in small_loss_per_class(labels, losses, ctx.job.freeal.clean_ratio).values():
        keep[idx] = True
    twice = ctx.store.annotated_positions(min_rounds=2)
    keep[twice[twice < len(keep)]] = True
    keep[human_label_array(ctx) >= 0] = True
    return np.flatnonzero(~keep)


def llm_losses(state: SLMState, labels: np.ndarray) -> np.ndarray:
    """The SLM's CE loss on each LLM label (NaN where there is none), as the trainer computes it."""
    losses = np.full(len(labels), np.nan)
    has = np.flatnonzero(labels >= 0)
    if len(has) and state.logits is not None:
        losses[has] = per_sample_ce(state.logits.gather(has), labels[has])
    return losses


def llm_label_array(ctx: RoundContext) -> np.ndarray:
    """Each pool item's latest LLM label (-1: not asked, or no usable answer)."""
    labels = np.full(ctx.pool.size, -1, dtype=np.int64)
    positions, values = ctx.store.llm_label_positions()
    inside = positions < ctx.pool.size  # the pool is a snapshot (see Pool)
    labels[positions[inside]] = values[inside]
    return labels


def human_label_array(ctx: RoundContext) -> np.ndarray:
    """Each pool item's human label (-1: not reviewed), from `review import`."""
    labels = np.full(ctx.pool.size, -1, dtype=np.int64)
    positions, values = ctx.store.human_label_positions()
    labels[positions] = values
    return labels


def training_labels(ctx: RoundContext) -> tuple[np.ndarray, np.ndarray]:
    """(labels, human) per pool position: what the SLM trains on and its demos come from. A human label
    replaces the LLM's and is clean by fiat (`human` marks those rows); elsewhere the latest LLM label."""
    human = human_label_array(ctx)
    reviewed = human >= 0
    return np.where(reviewed, human, llm_label_array(ctx)), reviewed


def _previous_predictions(ctx: RoundContext, round_: int) -> np.ndarray | None:
    """The SLM of two rounds back, seen by strategies as `slm_labels` (which predictions moved; -1 for items it
    never scored)."""
    if round_ < 3:
        return None
    preds = np.full(ctx.pool.size, -1, dtype=np.int64)
    positions, values = ctx.store.slm_predictions(round_ - 2)
    inside = positions < ctx.pool.size
    preds[positions[inside]] = values[inside]
    return preds


# ---- with which demos ------------------------------------------------------------------------------------
def retrieve_demos(ctx: RoundContext, round_: int, state: SLMState, targets: np.ndarray) -> RoundPlan:
    """Each target's demos: queries grouped to share one retrieved demo block (prompt-prefix reuse)."""
    fr = ctx.job.freeal
    demos = state.demos
    query_emb = state.emb.gather(targets)
    demo_emb = _demo_embeddings(ctx, state)
    demo_labels = np.array([d.label for d in demos], dtype=int)
    groups = group_queries(query_emb, demo_emb, fr.demo_group_size)
    demo_lists = retrieve_for_groups(query_emb, groups, demo_emb, demo_labels, fr.demos_per_prompt, ctx.n_classes)
    ids = ctx.store.items_at(targets.tolist()).ids
    items = [PlanItem(ids[q], tuple(demos[d].id for d in dl)) for g, dl in zip(groups, demo_lists) for q in g]
    return build_plan(ctx, round_, items, demos)


def _demo_embeddings(ctx: RoundContext, state: SLMState) -> np.ndarray:
    """Demo vectors in the space the queries are in (pool items: their row; generated: the frozen encoder)."""
    if not state.demos:
        return np.zeros((0, state.emb.width), np.float32)
    positions = ctx.store.positions_of([d.id for d in state.demos])
    if (positions >= 0).all():
        return state.emb.gather(positions)
    return ctx.session.scorers.embed(ctx.encoder, [d.text for d in state.demos])


# ---- how many the budget pays for ------------------------------------------------------------------------
def affordable(ctx: RoundContext, requests: Sequence[ChatRequest]) -> int:
    """How many of `requests` (in order) the budget pays for; stored answers are free."""
    job = ctx.job
    if budget_policy.headroom(budget_policy.Spent(), job.budget) is None:
        return len(requests)
    keys = [r.key() for r in requests]
    paid = ctx.store.get_answers(keys)
    fresh = [
        budget_policy.estimate(r.messages, r.max_tokens, ctx.session.price)
        for r, k in zip(requests, keys)
        if k not in paid
    ]
    n_fresh = budget_policy.affordable(fresh, spent_now(ctx.store, job), job.budget)
    if n_fresh == len(fresh):
        return len(requests)
    n = seen = 0
    for k in keys:  # the longest prefix holding at most n_fresh unpaid requests
        seen += k not in paid
        if seen > n_fresh:
            break
        n += 1
    return n
