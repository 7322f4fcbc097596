"""The coordinator: FreeAL rounds (the full loop and the budgeted multi-round schedule) over actors.

One round = choose items, store the plan (items + the demos each prompt shows), the annotators ask the
LLM (labels are committed as chunks come back), the trainer actor trains the SLM robustly on every LLM
label so far, the scores, the model's files and the next demo pool are stored. A rerun skips finished
rounds; an unfinished one resumes at its stored phase: the stored plan rebuilds the same requests, so
answers already paid for come from the store, and training is simply run again.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from freeal_stream import budget as budget_policy
from freeal_stream.demos import group_queries, retrieve_for_groups, select_demo_pool
from freeal_stream.llm.client import ChatAnswer, ChatRequest
from freeal_stream.llm.demo_generation import generate_demos
from freeal_stream.llm.prompts import (TEMPLATE_VERSION, annotation_messages, clean_paraphrase,
                                       paraphrase_max_tokens, paraphrase_messages)
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.progress import Progress
from freeal_stream.session import Session, spent_now
from freeal_stream.slm.encoder import EmbeddingCache, cache_key, choose_encoder
from freeal_stream.slm.model import write_model_files
from freeal_stream.slm.trainer import SLMResult, resolve_mode, resolve_warmup
from strategies.base import QueryContext
from strategies.select import select
from strategies.shards import array_shards
from strategies.registry import load_strategy

Demo = tuple[str, str, int, str]   # (demo id, text, class index, source)


@dataclass
class Pool:
    """The job's items as aligned columns; positions index every per-item array in a round."""

    ids: list[str]
    texts: list[str]
    views: list[str | None]
    golds: list[str | None]
    pos: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.pos = {i: n for n, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Scored:
    """The latest SLM's view of the pool: what retrieval, selection and refinement read."""

    round: int
    files: dict[str, bytes]      # the model, to score items that arrive later
    probs: np.ndarray
    embeddings: np.ndarray
    losses: np.ndarray
    demos: list[Demo]
    prev_labels: np.ndarray | None = None   # the SLM before this one's predictions (-1: not scored)


class FreeALRun:
    """Runs a job's rounds with a session's actors; all state goes to (and comes back from) the store."""

    def __init__(self, session: Session, progress: Progress | None = None):
        self.s, self.job, self.store = session, session.job, session.store
        self.llm_cfg = dataclasses.replace(self.job.llm, model=session.model_name)
        self.progress = progress or Progress()
        self.verbalizer = Verbalizer(self.job.task.classes)
        self.n_classes = len(self.job.task.classes)
        self.strategy = load_strategy(self.job.strategy.name, self.job.strategy.params)
        self.pool = Pool(**self.store.items())
        self.scored: Scored | None = None

    # ---- pieces -----------------------------------------------------------------------------------
    @functools.cached_property
    def encoder(self) -> str:
        """The job's frozen encoder. `auto` is chosen once, by the pool when it is first needed, and kept in the
        store, so every later round (however the pool grows) and every resumed run embeds with the same one."""
        choice = choose_encoder(self.job.slm, len(self.pool), self.store.get_meta("slm_encoder"))
        self.store.set_meta("slm_encoder", choice.name)
        self.progress.say(choice.why)
        return choice.name

    @functools.cached_property
    def _emb_cache(self) -> EmbeddingCache:
        return EmbeddingCache(self.job.state_path / "embeddings", cache_key(self.encoder, self.job.slm.max_length))

    def refresh_pool(self) -> int:
        """Take in items ingested since the pool was read (they join this round); returns how many."""
        n_before = len(self.pool)
        self.pool = Pool(**self.store.items())
        added = len(self.pool) - n_before
        if added and self.scored is not None and self.scored.round == 0:
            self.scored = None   # no SLM yet: rebuilt from the frozen encoder for the whole pool
        elif added and self.scored is not None:
            new = self.pool.texts[n_before:]
            self.progress.say(f"scoring {added} new items with round {self.scored.round}'s SLM")
            probs, emb = self.s.scorers.score(f"round-{self.scored.round}", self.scored.files, new)
            self.scored.probs = np.concatenate([self.scored.probs, probs])
            self.scored.embeddings = np.concatenate([self.scored.embeddings, emb])
            self.scored.losses = np.concatenate([self.scored.losses, np.full(added, np.nan)])
            if self.scored.prev_labels is not None:
                self.scored.prev_labels = np.concatenate([self.scored.prev_labels, np.full(added, -1)])
        return added

    def base_embeddings(self) -> np.ndarray:
        """Frozen-encoder embeddings of the pool (round 1's retrieval), computed by the scorers, cached."""
        return self._emb_cache.get(self.pool.texts, self._embed_by_scorers)

    def embed_missing(self) -> None:
        """Fill the frozen-embedding cache for texts not in it yet, loading nothing (the trainer reads it)."""
        self._emb_cache.fill(self.pool.texts, self._embed_by_scorers)

    def _embed_by_scorers(self, texts: list[str]) -> np.ndarray:
        threads = self.s.scorers.work_threads()
        self.progress.say(f"embedding {len(texts)} texts with the frozen encoder {self.encoder} ({len(threads)} "
                          f"scorer actors, {'+'.join(map(str, threads))} threads)")
        return self.s.scorers.embed(texts, self.encoder)

    def gold_index(self) -> np.ndarray:
        """Gold labels as class indices (-1 = none or not a class name); used only for reporting."""
        names = {n: i for i, n in enumerate(self.job.task.class_names)}
        return np.array([names.get(g, -1) if g is not None else -1 for g in self.pool.golds])

    def initial_demos(self) -> list[Demo]:
        """Round 0's pool: demos the LLM writes itself from unlabelled prototypes (or stored ones)."""
        stored = self.store.demo_pool(0)
        if stored or self.job.freeal.demos_per_prompt == 0:
            return stored
        self.progress.say("generating demonstrations from unlabelled prototypes")
        fr = self.job.freeal
        pairs = generate_demos(self.s.annotators, self.llm_cfg, self.job.task.description, self.verbalizer,
                               self.pool.texts, prototypes=fr.prototypes, per_class=fr.generated_per_class,
                               seed=self.job.seed,
                               progress=lambda d, t, _l: self.progress.update("demo generation", d, t))
        demos = [(f"gen-{n}", text, label, source) for n, (text, label, source) in enumerate(pairs)]
        self.store.set_demo_pool(0, demos)
        return demos

    def plan(self, targets: np.ndarray, demos: list[Demo], demo_emb: np.ndarray, query_emb: np.ndarray
             ) -> list[tuple[str, list[str]]]:
        """(item id, demo ids) per target: queries grouped to share one retrieved demo block."""
        fr = self.job.freeal
        demo_labels = np.array([d[2] for d in demos], dtype=int)
        groups = group_queries(query_emb[targets], demo_emb, fr.demo_group_size)
        demo_lists = retrieve_for_groups(query_emb[targets], groups, demo_emb, demo_labels,
                                         fr.demos_per_prompt, self.n_classes)
        return [(self.pool.ids[q], [demos[d][0] for d in dl]) for g, dl in zip(groups, demo_lists)
                for q in targets[g]]

    def _request(self, item_id: str, demo_ids: list[str], demos: dict[str, Demo]) -> ChatRequest:
        shots = [(demos[d][1], demos[d][2]) for d in demo_ids]
        msgs = annotation_messages(self.job.task.description, self.verbalizer, shots,
                                   self.pool.texts[self.pool.pos[item_id]], self.job.data.max_text_chars)
        return ChatRequest.build(msgs, self.llm_cfg, TEMPLATE_VERSION)

    def annotate(self, round_: int, plan: list[tuple[str, list[str]]], demos: list[Demo]) -> None:
        """Ask the LLM for the planned labels not yet stored; each chunk's labels are committed on arrival."""
        by_id = {d[0]: d for d in demos}
        done = self.store.annotated_in_round(round_)
        todo = [(i, d) for i, d in plan if i not in done]
        if len(todo) < len(plan):
            self.progress.say(f"round {round_}: {len(plan) - len(todo)} of {len(plan)} planned labels already "
                              "stored; asking for the rest")
        requests = [self._request(i, d, by_id) for i, d in todo]
        stage = f"round {round_} annotate"

        def report(n: int, total: int, ledger: Any) -> None:
            self.progress.update(stage, n, total, f"sent={ledger.requests_sent} "
                                 f"tok={ledger.prompt_tokens + ledger.completion_tokens} "
                                 f"cached={ledger.cached_tokens}")

        def commit(idx: list[int], answers: list[ChatAnswer]) -> None:
            rows = []
            for k, ans in zip(idx, answers):
                if ans.content is None:
                    continue   # failed or not admitted: not stored, so the item stays in the pool
                label = self.verbalizer.parse(ans.content)
                probs = self.verbalizer.probs_from_logprobs(ans.top_logprobs)
                conf = float(probs[label]) if (label is not None and probs is not None) else None
                rows.append((todo[k][0], ans.key, label, conf, todo[k][1]))
            self.store.add_annotations(round_, rows)

        self.s.annotators.complete_many(requests, progress=report, on_answers=commit)

    def fit_budget(self, requests: list[ChatRequest]) -> int:
        """How many of `requests` (in order) the budget pays for; stored answers are free."""
        if budget_policy.headroom(budget_policy.Spent(), self.job.budget) is None:
            return len(requests)
        paid = self.store.get_answers([r.key() for r in requests])
        fresh = [budget_policy.estimate(r.messages, r.max_tokens, self.s.price) for r in requests
                 if r.key() not in paid]
        n_fresh = budget_policy.affordable(fresh, spent_now(self.store, self.job), self.job.budget)
        if n_fresh == len(fresh):
            return len(requests)
        n = seen = 0
        for r in requests:   # the longest prefix holding at most n_fresh unpaid requests
            seen += r.key() not in paid
            if seen > n_fresh:
                break
            n += 1
        return n

    def llm_label_array(self) -> np.ndarray:
        """Each pool item's latest LLM label as a class index; -1 where there is none (not asked, no label)."""
        llm = self.store.llm_labels()
        return np.array([-1 if llm.get(x) is None else llm[x] for x in self.pool.ids], dtype=int)

    def train(self, round_: int) -> tuple[SLMResult, dict[str, bytes], np.ndarray]:
        """Robust self-training on every LLM label so far, in the trainer actor; scores and model stored."""
        labels = self.llm_label_array()
        views = self._views(labels)
        n_lab = int((labels >= 0).sum())
        slm = dataclasses.replace(self.job.slm, encoder=self.encoder)
        mode = resolve_mode(slm, len(self.pool), n_lab)
        say = lambda msg: self.progress.say(f"[round {round_} train] {msg}")  # noqa: E731
        warmup = resolve_warmup(self.job.freeal, n_lab, self.job.slm.epochs)
        say(f"SLM in {mode} mode on {n_lab} LLM labels + {len(self.pool) - n_lab} unlabelled texts "
            f"(views: {self._view_kind()}; warm-up {warmup} epochs)")
        self.embed_missing()   # head mode reads them from the cache the scorers fill
        args = (self.pool.texts, labels, self.n_classes, slm, self.job.freeal, views, self.job.seed + round_,
                str(self.job.state_path / "embeddings"))
        while True:
            try:
                result, files = self._train_remote(args, say)
                break
            except RayActorError:   # killed or out of memory: training has no side effects, run it again
                say("the trainer actor died; starting a new one and training again")
                self.s.replace_trainer()
        model_dir = write_model_files(files, self.job.state_path / "models" / f"round-{round_}")
        self.store.add_scores(round_, self.pool.ids, result.probs, result.losses, result.clean)
        self.store.set_phase(round_, self.job.freeal.schedule, "trained", model_path=str(model_dir))
        return result, files, labels

    def _train_remote(self, args: tuple, say: Any) -> tuple[SLMResult, dict[str, bytes]]:
        """Train in the trainer actor, relaying its progress lines while it works."""
        trainer = self.s.trainer
        ref = trainer.train.remote(*args)
        while not ray.wait([ref], timeout=2.0)[0]:
            for msg in ray.get(trainer.messages.remote()):
                say(msg)
        result, files = ray.get(ref)
        for msg in ray.get(trainer.messages.remote()):
            say(msg)
        return result, files

    def label_new_with_slm(self) -> int:
        """Score the items no round has seen with the latest SLM (no LLM cost), for when no round can run."""
        if self.scored is None or self.scored.round == 0:
            return 0
        self.refresh_pool()
        new = self.store.unscored_ids()
        at = [self.pool.pos[i] for i in new if i in self.pool.pos]
        if at:
            self.store.add_scores(self.scored.round, [self.pool.ids[i] for i in at], self.scored.probs[at],
                                  np.full(len(at), np.nan), np.zeros(len(at), bool))
        return len(at)

    def _view_kind(self) -> str:
        kind = self.job.slm.views
        if kind == "auto":
            kind = "column" if self.job.data.augmented_column else "perturb"
        return kind

    def _views(self, labels: np.ndarray) -> list[str | None] | None:
        """Consistency views per row; None (whole list or a row) means model-free perturbation."""
        kind = self._view_kind()
        if kind == "column":
            return list(self.pool.views)
        if kind == "llm":
            return self._paraphrases(np.flatnonzero(labels >= 0))
        return None

    def _paraphrases(self, rows: np.ndarray) -> list[str | None]:
        """LLM rewrites of the LLM-labelled rows (cached and budgeted like annotations); None elsewhere."""
        limit = self.job.data.max_text_chars
        requests = [ChatRequest.build(paraphrase_messages(self.pool.texts[i], limit), self.llm_cfg, TEMPLATE_VERSION,
                                      max_tokens=paraphrase_max_tokens(self.pool.texts[i]), logprobs=False)
                    for i in rows]
        requests = requests[:self.fit_budget(requests)]
        answers = self.s.annotators.complete_many(
            requests, progress=lambda d, t, _l: self.progress.update("paraphrase views", d, t))
        views: list[str | None] = [None] * len(self.pool)
        for i, ans in zip(rows, answers):
            views[i] = clean_paraphrase(ans.content)
        return views

    def demo_pool_from(self, round_: int, result: SLMResult, labels: np.ndarray) -> tuple[list[Demo], np.ndarray]:
        """The SLM's feedback: k medoids of each class's R% smallest-loss rows; returns (pool, clean rows)."""
        fr = self.job.freeal
        idx, clean = select_demo_pool(labels, result.losses, result.embeddings, fr.clean_ratio,
                                      fr.medoids_per_class, seed=self.job.seed + round_)
        demos = [(self.pool.ids[i], self.pool.texts[i], int(labels[i]), f"slm round {round_}") for i in idx]
        self.store.set_demo_pool(round_, demos)
        return demos, clean

    def metrics(self, round_: int, started: float, planned: int, result: SLMResult, labels: np.ndarray,
                clean: np.ndarray, n_demos: int, before: dict[str, int]) -> dict[str, Any]:
        gold = self.gold_index()
        spent = self.store.spent()
        stored = self.store.round_annotations(round_) or {"requested": 0, "labelled": 0, "no_label": 0}
        m: dict[str, Any] = {
            "round": round_, "seconds": round(time.time() - started, 1), "slm_mode": result.mode,
            "pool": len(self.pool), "llm_requested": planned, "llm_labelled": stored["labelled"],
            "llm_no_label": stored["no_label"], "llm_failed": planned - stored["requested"],
            "annotated_total": int((labels >= 0).sum()), "demo_pool": n_demos, "clean_set": int(len(clean)),
            **{f"{k}_round": spent[k] - before[k] for k in spent},
            **{f"{k}_total": v for k, v in spent.items()},
            "cost_total": round(spent_now(self.store, self.job).cost, 6),
        }
        if (gold >= 0).any():
            has = gold >= 0
            lab = has & (labels >= 0)
            m["llm_label_acc"] = round(float((labels[lab] == gold[lab]).mean()), 4) if lab.any() else None
            m["slm_acc"] = round(float((result.probs.argmax(1)[has] == gold[has]).mean()), 4)
            m["clean_precision"] = round(float((labels[clean] == gold[clean]).mean()), 4) if len(clean) else None
        return m

    # ---- schedules --------------------------------------------------------------------------------
    def run(self, last_round: int | None = None) -> list[dict[str, Any]]:
        """Rounds 1..last_round (default: the job's `freeal.rounds`) that are not done yet."""
        last_round = last_round or self.job.freeal.rounds
        for round_ in range(1, last_round + 1):
            if not self.run_round(round_):
                break
        return [r["metrics"] for r in self.store.rounds() if r["phase"] == "done"]

    def next_round(self) -> int:
        rounds = self.store.rounds()
        return (rounds[-1]["round"] + (rounds[-1]["phase"] == "done")) if rounds else 1

    def run_round(self, round_: int) -> bool:
        """Run (or finish) one round; False when the run should stop (nothing left, budget spent)."""
        phases = {r["round"]: r["phase"] for r in self.store.rounds()}
        if phases.get(round_) == "done":
            return True
        fr = self.job.freeal
        started, before = time.time(), self.store.spent()   # round 1's cost includes generating its demos
        self.refresh_pool()
        if self.scored is None or self.scored.round != round_ - 1:
            self.scored = self._scored_after(round_ - 1)
        demos = self.scored.demos
        plan = self.store.round_plan(round_) if phases.get(round_) else []
        if not phases.get(round_):
            query_emb = self.scored.embeddings
            demo_emb = self._demo_embeddings(demos, query_emb)
            targets = self._targets(round_)
            if len(targets) == 0:
                self.progress.say(f"round {round_}: nothing left to annotate; stopping")
                return False
            plan = self.plan(targets, demos, demo_emb, query_emb)
            by_id = {d[0]: d for d in demos}
            n = self.fit_budget([self._request(i, d, by_id) for i, d in plan])
            if n == 0:
                self.progress.say(f"round {round_}: the budget is spent; stopping (raise budget caps to go on)")
                return False
            if n < len(plan):
                self.progress.say(f"budget: round {round_} sends {n} of {len(plan)} planned requests")
            plan = plan[:n]
            self.store.set_round_plan(round_, plan)
            self.store.set_phase(round_, fr.schedule, "annotating")
            self.progress.say(f"round {round_}/{max(fr.rounds, round_)}: {len(plan)} texts to the LLM "
                              f"({'refinement' if fr.schedule == 'full' and round_ > 1 else fr.schedule})")
        if phases.get(round_) in (None, "annotating"):
            self.annotate(round_, plan, demos)
            self.store.set_phase(round_, fr.schedule, "annotated")
            self._warn_if_one_class(round_)
        else:
            self.progress.say(f"round {round_}: its annotations are stored; resuming at training")
        result, files, labels = self.train(round_)
        new_demos, clean = self.demo_pool_from(round_, result, labels)
        self.scored = Scored(round_, files, result.probs, result.embeddings, result.losses, new_demos,
                             prev_labels=self._slm_labels(round_ - 1))
        m = self.metrics(round_, started, len(plan), result, labels, clean, len(new_demos), before)
        self.store.set_phase(round_, fr.schedule, "done", metrics=m)
        self.progress.say(format_round(m))
        if self.s.guard.refused:
            self.progress.say("budget exhausted: stopping after this round")
            return False
        return True

    def _demo_embeddings(self, demos: list[Demo], query_emb: np.ndarray) -> np.ndarray:
        """Demo vectors in the space the queries are in (pool items: their row; generated: the encoder)."""
        if not demos:
            return query_emb[:0]
        if all(d[0] in self.pool.pos for d in demos):
            return query_emb[[self.pool.pos[d[0]] for d in demos]]
        return self._emb_cache.get([d[1] for d in demos], self._embed_by_scorers)

    def _warn_if_one_class(self, round_: int, enough: int = 20) -> None:
        """Say so when a round's LLM labels all name one class: the LLM cannot tell the classes apart (or the
        demos mislead it), and training on one class teaches the SLM nothing."""
        counts = self.store.round_label_counts(round_)
        if len(counts) == 1 and sum(counts.values()) >= enough and self.n_classes > 1:
            (label, n), = counts.items()
            self.progress.say(f"warning: all {n} LLM labels of round {round_} are '{self.job.task.class_names[label]}'; "
                              "the LLM may be unable to tell the classes apart. Check task.description, the class "
                              "words and the demos (status and export show them) before spending more")

    def _targets(self, round_: int) -> np.ndarray:
        """Which pool positions go to the LLM this round."""
        fr = self.job.freeal
        annotated = self.store.annotated_ids()
        unannotated = np.array([i for i, x in enumerate(self.pool.ids) if x not in annotated], dtype=int)
        if fr.schedule == "full":
            if self.scored.round == 0:
                return unannotated
            # refinement: everything outside the SLM's clean sets (no-label and new rows included) again, but
            # a text goes to the LLM at most twice (METHOD.md): later rounds only refine what is new
            _, clean = select_demo_pool(self.llm_label_array(), self.scored.losses, self.scored.embeddings,
                                        fr.clean_ratio, 1)
            keep = np.zeros(len(self.pool), bool)
            keep[clean] = True
            twice = self.store.asked_twice()
            keep[[p for p, x in enumerate(self.pool.ids) if x in twice]] = True
            return np.flatnonzero(~keep)
        n = budget_policy.round_size(len(unannotated), fr.query_fraction)
        trained = self.scored.round > 0
        left = budget_policy.headroom(spent_now(self.store, self.job), self.job.budget)
        ctx = QueryContext(round=round_, seed=self.job.seed, n_classes=self.n_classes,
                           budget_left=None if left is None or left.requests == float("inf") else int(left.requests))
        shards = array_shards(np.array(self.pool.ids, dtype=object), rows=unannotated, needs=self.strategy.needs,
                              probs=self.scored.probs if trained else None,
                              embeddings=self.scored.embeddings,   # the frozen encoder's before any SLM
                              llm_labels=self.llm_label_array() if "llm_labels" in self.strategy.needs else None,
                              slm_labels=self.scored.prev_labels)
        chosen = select(self.strategy, shards, n, ctx)
        return np.array(sorted(self.pool.pos[x] for x in chosen), dtype=int)

    def _scored_after(self, round_: int) -> Scored:
        """The pool as seen after round `round_` (0 = before any SLM: the frozen encoder, generated demos)."""
        if round_ == 0:
            emb = self.base_embeddings()
            return Scored(0, {}, np.zeros((len(self.pool), 0)), emb, np.full(len(self.pool), np.nan),
                          self.initial_demos())
        from freeal_stream.slm.model import read_model_files

        info = next(r for r in self.store.rounds() if r["round"] == round_)
        self.progress.say(f"resuming after round {round_}: scoring the pool with its SLM ({info['model_path']})")
        files = read_model_files(info["model_path"])
        probs, emb = self.s.scorers.score(f"round-{round_}", files, self.pool.texts)
        labels = self.llm_label_array()
        has = np.flatnonzero(labels >= 0)
        losses = np.full(len(self.pool), np.nan)
        losses[has] = -np.log(np.maximum(probs[has, labels[has]], 1e-12))  # the CE the trainer reports
        return Scored(round_, files, probs, emb, losses, self.store.demo_pool(round_),
                      prev_labels=self._slm_labels(round_ - 1))

    def _slm_labels(self, round_: int) -> np.ndarray | None:
        """Round `round_`'s SLM predictions for the pool (-1 for items it never scored); None before round 1."""
        if round_ < 1:
            return None
        preds = self.store.slm_preds(round_)
        return np.array([preds.get(x, -1) for x in self.pool.ids], dtype=int)


def format_round(m: dict[str, Any]) -> str:
    acc = "".join(f" {name} {m[key]:.3f}" for key, name in (("llm_label_acc", "LLM label acc"),
                                                             ("slm_acc", "SLM acc")) if m.get(key) is not None)
    acc = f" |{acc}" if acc else ""
    return (f"round {m['round']} done in {m['seconds']:.0f}s: LLM labelled {m['llm_labelled']}, no label "
            f"{m['llm_no_label']}, failed {m['llm_failed']} | requests {m['requests_round']} tokens "
            f"{m['prompt_tokens_round'] + m['completion_tokens_round']} (cached {m['cached_tokens_round']}) "
            f"| clean set {m['clean_set']} demos {m['demo_pool']} | SLM {m['slm_mode']}{acc}")
