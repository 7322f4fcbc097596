"""A round's SLM: robust self-training on every LLM label so far, the pool scored with it, its demo pool.

Training cost follows the labels, not the pool: the trainer gets the labelled rows and (for the consistency
term on never-annotated texts) at most CONSISTENCY_SAMPLE others, drawn at random; below that, every row, as
the paper does. Scoring the pool is the scorer actors' job, shard by shard (`scoring.score_pool`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from freeal_stream.dawid_skene import MIN_LABELS_PER_CLASS, can_fit
from freeal_stream.demos import select_demo_pool
from freeal_stream.records import Demo
from freeal_stream.rounds.annotation import paraphrases
from freeal_stream.rounds.arrays import RowArray
from freeal_stream.rounds.context import RoundContext
from freeal_stream.rounds.planning import llm_label_array, llm_losses, training_labels
from freeal_stream.rounds.quality import (
    CALIBRATION_ITEMS,
    FOLDS,
    OutOfFold,
    Tally,
    fit_round_calibration,
    item_probabilities,
    slm_wins,
    store_quality,
)
from freeal_stream.rounds.scoring import score_pool
from freeal_stream.rounds.state import SLMState, softmax
from freeal_stream.slm.model import write_model_files
from freeal_stream.slm.trainer import TrainingData, final_split, resolve_mode, resolve_warmup

CONSISTENCY_SAMPLE = 50_000  # never-annotated rows a round's SLM sees in its consistency term, at most
SCORE_WRITE_ROWS = 65536  # rows per write of the SLM's scores to the store


def train_round(ctx: RoundContext, round_: int) -> Path:
    """Train round `round_`'s SLM, score the pool with it and store its scores; returns the model's folder."""
    job, pool = ctx.job, ctx.pool
    labels, human = training_labels(ctx)
    n_lab = int((labels >= 0).sum())
    mode = resolve_mode(ctx.slm, pool.size, n_lab)
    warmup = resolve_warmup(job.freeal, n_lab, job.slm.epochs)
    rows = training_rows(labels, job.seed + round_)
    sampled = "" if len(rows) == pool.size else f", {len(rows) - n_lab:,} of them in the consistency term"
    say = lambda msg: ctx.say(f"[round {round_} train] {msg}")
    n_human = int(human.sum())
    humans = f" ({n_human} of them human labels, clean by fiat)" if n_human else ""
    say(
        f"SLM in {mode} mode on {n_lab} labels{humans} + {pool.size - n_lab} unlabelled texts{sampled} "
        f"(views: {view_kind(ctx)}; warm-up {warmup} epochs)"
    )
    data = dataclasses.replace(training_data(ctx, rows, labels[rows], mode), trusted=human[rows] if n_human else None)
    shared = ray.put(data)  # sent once to the trainer, for the SLM and for the calibration's fold SLMs
    trained = _call_trainer(
        ctx,
        lambda t: t.train.remote(shared, ctx.n_classes, ctx.slm, job.freeal, job.seed + round_),
        say,
        f"round {round_} train",
    )
    model_dir = write_model_files(trained.files, job.state_path / "models" / f"round-{round_}")
    logits, _ = score_pool(ctx, round_, trained.files, trained.mode, fresh=True)
    llm_all = llm_label_array(ctx)
    n_llm = int((llm_all >= 0).sum())
    oof = None
    if can_fit(n_llm, ctx.n_classes):
        oof = _cross_fit(
            ctx, shared, rows, labels[rows] >= 0, trained.mode, job.seed + round_, say, f"round {round_} calibration"
        )
    else:  # the fold SLMs would cost several trainings for a fit that cannot be made
        say(
            f"calibration skipped: {n_llm} LLM labels, fewer than {MIN_LABELS_PER_CLASS} a class; no estimate of "
            "the export this round"
        )
    _store_scores(ctx, round_, labels, human, llm_all, logits, oof)
    return model_dir


def training_rows(labels: np.ndarray, seed: int) -> np.ndarray:
    """Pool positions the SLM trains on, sorted: every labelled row and at most CONSISTENCY_SAMPLE others."""
    unlabelled = np.flatnonzero(labels < 0)
    if len(unlabelled) > CONSISTENCY_SAMPLE:
        unlabelled = np.random.default_rng(seed).choice(unlabelled, CONSISTENCY_SAMPLE, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(labels >= 0), unlabelled]))


def view_kind(ctx: RoundContext) -> str:
    kind = ctx.job.slm.views
    if kind == "auto":
        kind = "column" if ctx.job.data.augmented_column else "perturb"
    return kind


def training_data(ctx: RoundContext, rows: np.ndarray, labels: np.ndarray, mode: str) -> TrainingData:
    """The rows' inputs for `mode` with their consistency views (`slm.views`)."""
    pool, kind = ctx.pool, view_kind(ctx)
    views: list[str | None] | None = None
    if kind == "column":
        views = pool.columns(rows).views
    elif kind == "llm":
        views = [None] * len(rows)
        labelled = np.flatnonzero(labels >= 0)
        for k, view in zip(labelled, paraphrases(ctx, pool.texts(rows[labelled]))):
            views[k] = view
    if mode == "finetune":
        return TrainingData(labels, texts=pool.texts(rows), views=views)
    emb = pool.frozen().gather(rows)
    if views is None:
        return TrainingData(labels, emb=emb)
    has_view = np.array([v is not None for v in views])
    if kind == "column":
        view_emb = pool.frozen_views().gather(rows)
    else:
        view_emb = emb.copy()
        at = np.flatnonzero(has_view)
        if len(at):
            view_emb[at] = ctx.session.scorers.embed(ctx.encoder, [v for v in views if v is not None])  # rows `at`
    return TrainingData(labels, emb=emb, view_emb=view_emb, has_view=has_view)


def _call_trainer(ctx: RoundContext, submit: Callable[[Any], Any], say: Callable[[str], None], stage: str) -> Any:
    """`submit(trainer)`'s result, relaying the trainer's progress lines and steps; a trainer that dies (killed,
    out of memory) is replaced and the call made again (training has no side effects)."""
    session, job = ctx.session, ctx.job
    while True:
        trainer: Any = session.trainer
        ref = submit(trainer)
        shown = None
        try:
            while not ray.wait([ref], timeout=2.0)[0]:
                for msg in ray.get(trainer.messages.remote()):
                    say(msg)
                at = ray.get(trainer.step.remote())
                if at is not None and at != shown:  # steps within the epoch under way
                    ctx.progress.update(f"{stage} epoch {at[0]}/{job.slm.epochs}", at[1], at[2], "steps")
                    shown = at
            result = ray.get(ref)
            for msg in ray.get(trainer.messages.remote()):
                say(msg)
            return result
        except RayActorError:
            say("the trainer actor died; starting a new one and training again")
            session.replace_trainer()


def _cross_fit(
    ctx: RoundContext,
    data: Any,
    rows: np.ndarray,
    labelled: np.ndarray,
    mode: str,
    seed: int,
    say: Callable[[str], None],
    stage: str,
) -> OutOfFold:
    """Out-of-fold logits of the labelled rows, for the round's calibration, and in fine-tune mode the fold SLMs'
    mean logits of the rest (`rounds.quality`)."""
    folds = FOLDS[mode]
    held_out = CALIBRATION_ITEMS // folds
    say(
        f"calibration: {folds} fold SLMs, each with a {100 // folds}% share of the labels (at most {held_out:,}) hidden"
    )
    logits = _call_trainer(
        ctx,
        lambda t: t.out_of_fold.remote(data, ctx.n_classes, ctx.slm, ctx.job.freeal, folds, held_out, seed),
        say,
        stage,
    )
    has = ~np.isnan(logits).any(1)
    return OutOfFold(rows[has & labelled], logits[has & labelled], rows[has & ~labelled], logits[has & ~labelled])


def _store_scores(
    ctx: RoundContext,
    round_: int,
    labels: np.ndarray,
    human: np.ndarray,
    llm_all: np.ndarray,
    logits: RowArray,
    oof: OutOfFold | None = None,
) -> None:
    """The SLM's prediction and confidence for every item, its loss and clean flag for the labelled ones (human
    labels are clean whatever their loss) and, when the round calibrates, both models' probability of being
    right and the export's estimate (`rounds.quality`; a human label is right by fiat). `llm_all`: each item's
    LLM label (-1: none)."""
    job = ctx.job
    has = np.flatnonzero(labels >= 0)
    losses = np.full(len(labels), np.nan)
    clean = np.zeros(len(labels), bool)
    losses[has], clean[has] = final_split(logits.gather(has), labels[has], job.freeal.tau, job.seed + round_)
    clean |= human
    cal = None if oof is None else fit_round_calibration(oof, llm_all, ctx.n_classes)
    tally = Tally()
    for start, block in logits.shards(SCORE_WRITE_ROWS):
        at = np.arange(start, start + len(block))
        probs = None
        if cal is not None and oof is not None:
            llm = llm_all[at]
            oof_block = np.full(block.shape, np.nan, dtype=np.float32)
            oof_block[llm >= 0] = oof.at(at[llm >= 0])
            probs = item_probabilities(cal, block, oof_block, llm, oof.judge(at, block))
            wins = slm_wins(job.freeal.label_of_record, probs, llm, clean[at]) & ~human[at]
            tally.add(np.where(human[at], 1.0, np.where(wins, probs.p_right, probs.llm_p_right)), wins)
        ctx.store.add_scores(
            round_,
            at,
            softmax(block),
            losses[at],
            clean[at],
            None if probs is None else probs.p_right,
            None if probs is None else probs.llm_p_right,
        )
    if cal is not None and oof is not None:
        store_quality(ctx, round_, cal, tally, llm_all, human, logits, oof, clean)


def select_demos(ctx: RoundContext, round_: int, state: SLMState) -> tuple[list[Demo], np.ndarray]:
    """The SLM's feedback: k medoids of each class's R% smallest-loss rows (stored as the round's demo pool);
    returns (demos, positions of the clean rows)."""
    fr = ctx.job.freeal
    labels, human = training_labels(ctx)
    has = np.flatnonzero(labels >= 0)
    losses = llm_losses(state, labels)
    losses[human] = -1.0  # below any CE loss: human rows come first among the clean rows of their class
    idx, clean = select_demo_pool(
        labels[has],
        losses[has],
        state.emb.gather(has),
        fr.clean_ratio,
        fr.medoids_per_class,
        seed=ctx.job.seed + round_,
    )
    items = ctx.pool.columns(has[idx])
    demos = [
        Demo(i, t, int(labels[p]), "human" if human[p] else f"slm round {round_}")
        for i, t, p in zip(items.ids, items.texts, has[idx])
    ]
    ctx.store.set_demo_pool(round_, demos)
    return demos, np.union1d(has[clean], np.flatnonzero(human))
