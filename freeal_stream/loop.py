"""FreeAL rounds: the full loop and the budgeted multi-round schedule.

One round = the LLM annotates a set of items with retrieved demos, then the SLM is trained robustly on
every LLM label so far and picks the next demo pool. Each finished round is recorded in the store; a
rerun skips finished rounds and, inside an unfinished one, the answer cache replays what was paid for.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from freeal_stream import budget as budget_policy
from freeal_stream.config import JobConfig, job_to_dict
from freeal_stream.demos import group_queries, retrieve_for_groups, select_demo_pool
from freeal_stream.llm.client import ChatRequest, LLMClient
from freeal_stream.llm.demo_generation import generate_demos
from freeal_stream.llm.prompts import (TEMPLATE_VERSION, annotation_messages, clean_paraphrase,
                                       paraphrase_max_tokens, paraphrase_messages)
from freeal_stream.llm.ratelimit import estimate_tokens
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.progress import Progress
from freeal_stream.slm.encoder import Encoder, cached_embed
from freeal_stream.slm.trainer import SLMResult, resolve_mode, train_slm
from freeal_stream.sources import read_items
from freeal_stream.store import StateError, Store
from strategies.base import QueryContext
from strategies.registry import load_strategy

# Fields that may change between runs on the same state: they steer how far the job goes, not what its
# finished rounds mean. Anything else changed would mix incompatible rounds, so resuming is refused.
RESUMABLE_FIELDS = {"budget", "freeal.rounds", "llm.concurrency", "llm.requests_per_minute",
                    "llm.tokens_per_minute", "llm.timeout_s", "llm.max_retries", "llm.server_threads",
                    "slm.threads", "slm.device", "slm.epochs", "name", "state_dir"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("classes", "params"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resumable(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields whose change makes the stored rounds meaningless for this job (empty = resumable)."""
    a, b = _flatten(stored), _flatten(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [k for k in changed if k not in RESUMABLE_FIELDS and k.split(".")[0] not in RESUMABLE_FIELDS]


@dataclass
class Pool:
    """The job's items as aligned columns; positions index every per-item array in a run."""

    ids: list[str]
    texts: list[str]
    views: list[str | None]
    golds: list[str | None]
    pos: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.pos = {i: n for n, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)


class FreeALRun:
    """Runs a job's rounds against one store, one LLM client and one progress printer."""

    def __init__(self, job: JobConfig, store: Store, client: LLMClient, model_name: str,
                 progress: Progress | None = None):
        self.job, self.store, self.client = job, store, client
        self.llm_cfg = dataclasses.replace(job.llm, model=model_name)  # the name the endpoint serves
        self.progress = progress or Progress()
        self.verbalizer = Verbalizer(job.task.classes)
        self.n_classes = len(job.task.classes)
        self.strategy = load_strategy(job.strategy.name, job.strategy.params)
        self.pool = Pool(**store.items())
        self.encoder = Encoder(job.slm.encoder, max_length=job.slm.max_length)
        self._base_emb: np.ndarray | None = None

    # ---- pieces -----------------------------------------------------------------------------------
    def base_embeddings(self) -> np.ndarray:
        """Frozen-encoder embeddings of the pool, for round 1's retrieval (before any SLM exists)."""
        if self._base_emb is None:
            self.progress.say(f"embedding {len(self.pool)} texts with the frozen encoder (cached)")
            self._base_emb = cached_embed(self.encoder, self.pool.texts, self.job.state_path / "embeddings")
        return self._base_emb

    def gold_index(self) -> np.ndarray:
        """Gold labels as class indices (-1 = none or not a class name); used only for reporting."""
        names = {n: i for i, n in enumerate(self.job.task.class_names)}
        return np.array([names.get(g, -1) if g is not None else -1 for g in self.pool.golds])

    def initial_demos(self) -> list[tuple[str, str, int, str]]:
        """Round 0's pool: demos the LLM writes itself from unlabelled prototypes (or stored ones)."""
        stored = self.store.demo_pool(0)
        if stored or self.job.freeal.demos_per_prompt == 0:
            return stored
        self.progress.say("generating demonstrations from unlabelled prototypes")
        fr = self.job.freeal
        pairs = generate_demos(self.client, self.llm_cfg, self.job.task.description, self.verbalizer, self.pool.texts,
                               prototypes=fr.prototypes, per_class=fr.generated_per_class, seed=self.job.seed,
                               progress=lambda d, t, _l: self.progress.update("demo generation", d, t))
        demos = [(f"gen-{n}", text, label, source) for n, (text, label, source) in enumerate(pairs)]
        self.store.set_demo_pool(0, demos)
        return demos

    def annotate(self, round_: int, targets: np.ndarray, demos: list[tuple[str, str, int, str]],
                 demo_emb: np.ndarray, query_emb: np.ndarray) -> dict[str, int]:
        """Ask the LLM for the labels of `targets` (pool positions), within budget; store the outcome."""
        fr = self.job.freeal
        demo_labels = np.array([d[2] for d in demos], dtype=int)
        groups = group_queries(query_emb[targets], demo_emb, fr.demo_group_size)
        demo_lists = retrieve_for_groups(query_emb[targets], groups, demo_emb, demo_labels,
                                         fr.demos_per_prompt, self.n_classes)
        plan: list[tuple[int, ChatRequest, list[str]]] = []
        for g, dl in zip(groups, demo_lists):
            shots = [(demos[d][1], demos[d][2]) for d in dl]
            for q in targets[g]:
                msgs = annotation_messages(self.job.task.description, self.verbalizer, shots, self.pool.texts[q])
                req = ChatRequest.build(msgs, self.llm_cfg, TEMPLATE_VERSION)
                plan.append((int(q), req, [demos[d][0] for d in dl]))
        plan = self._fit_budget(plan)
        stage = f"round {round_} annotate"

        def report(done: int, total: int, ledger: Any) -> None:
            self.progress.update(stage, done, total, f"sent={ledger.requests_sent} "
                                 f"tok={ledger.prompt_tokens + ledger.completion_tokens} "
                                 f"cached={ledger.cached_tokens}")

        answers = self.client.complete_many([p[1] for p in plan], progress=report)
        rows, counts = [], {"requested": len(plan), "labelled": 0, "no_label": 0, "failed": 0}
        for (q, req, demo_ids), ans in zip(plan, answers):
            if ans.content is None:
                counts["failed"] += 1  # not stored as annotated: the item stays in the pool for a rerun
                continue
            label = self.verbalizer.parse(ans.content)
            probs = self.verbalizer.probs_from_logprobs(ans.top_logprobs)
            conf = float(probs[label]) if (label is not None and probs is not None) else None
            counts["labelled" if label is not None else "no_label"] += 1
            rows.append((self.pool.ids[q], ans.key, label, conf, demo_ids))
        self.store.add_annotations(round_, rows)
        return counts

    def _fit_budget(self, plan: list[tuple[int, ChatRequest, list[str]]]) -> list[tuple[int, ChatRequest, list[str]]]:
        """Shrink a round to what the budget can pay for, keeping already-paid requests (they are free)."""
        if not plan or (self.job.budget.max_requests is None and self.job.budget.max_tokens is None):
            return plan
        paid = self.store.get_answers([p[1].key() for p in plan])
        fresh = [p for p in plan if p[1].key() not in paid]
        est = np.mean([estimate_tokens(p[1].messages, p[1].max_tokens) for p in fresh]) if fresh else 0.0
        s = self.store.spent()
        n = budget_policy.affordable(len(fresh), est, budget_policy.Spent(
            s["requests"], s["prompt_tokens"] + s["completion_tokens"]), self.job.budget)
        if n < len(fresh):
            self.progress.say(f"budget: sending {n} of {len(fresh)} new requests "
                              f"(~{est:.0f} tokens each; spent {s['requests']} requests, "
                              f"{s['prompt_tokens'] + s['completion_tokens']} tokens)")
        allowed = {p[1].key() for p in fresh[:n]}
        return [p for p in plan if p[1].key() in paid or p[1].key() in allowed]

    def llm_label_array(self) -> np.ndarray:
        """Each pool item's latest LLM label as a class index; -1 where there is none (not asked, no label)."""
        llm = self.store.llm_labels()
        return np.array([-1 if llm.get(x) is None else llm[x] for x in self.pool.ids], dtype=int)

    def train(self, round_: int) -> tuple[SLMResult, np.ndarray]:
        """Robust self-training on every LLM label so far (unlabelled rows join the consistency term)."""
        labels = self.llm_label_array()
        views = self._views(labels)
        mode = resolve_mode(self.job.slm, len(self.pool), int((labels >= 0).sum()))
        self.progress.say(f"[round {round_} train] SLM in {mode} mode on {int((labels >= 0).sum())} LLM labels "
                          f"+ {int((labels < 0).sum())} unlabelled texts (views: {self._view_kind()})")
        result = train_slm(self.pool.texts, labels, self.n_classes, self.job.slm, self.job.freeal, views=views,
                           seed=self.job.seed + round_, cache_dir=self.job.state_path / "embeddings",
                           progress=lambda msg: self.progress.say(f"[round {round_} train] {msg}"))
        model_dir = self.job.state_path / "models" / f"round-{round_}"
        result.model.save(model_dir)
        self.store.add_scores(round_, self.pool.ids, result.probs, result.losses, result.clean)
        self.store.set_phase(round_, self.job.freeal.schedule, "trained", model_path=str(model_dir))
        return result, labels

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
        plan = [(int(i), ChatRequest.build(paraphrase_messages(self.pool.texts[i]), self.llm_cfg, TEMPLATE_VERSION,
                                           max_tokens=paraphrase_max_tokens(self.pool.texts[i]), logprobs=False), [])
                for i in rows]
        plan = self._fit_budget(plan)
        answers = self.client.complete_many(
            [p[1] for p in plan], progress=lambda d, t, _l: self.progress.update("paraphrase views", d, t))
        views: list[str | None] = [None] * len(self.pool)
        for (i, _, _), ans in zip(plan, answers):
            views[i] = clean_paraphrase(ans.content)
        return views

    def demo_pool_from(self, round_: int, result: SLMResult, labels: np.ndarray
                       ) -> tuple[list[tuple[str, str, int, str]], np.ndarray]:
        """The SLM's feedback: k medoids of each class's R% smallest-loss rows; returns (pool, clean rows)."""
        fr = self.job.freeal
        idx, clean = select_demo_pool(labels, result.losses, result.embeddings, fr.clean_ratio,
                                      fr.medoids_per_class, seed=self.job.seed + round_)
        demos = [(self.pool.ids[i], self.pool.texts[i], int(labels[i]), f"slm round {round_}") for i in idx]
        self.store.set_demo_pool(round_, demos)
        return demos, clean

    def metrics(self, round_: int, started: float, counts: dict[str, int], result: SLMResult,
                labels: np.ndarray, clean: np.ndarray, n_demos: int, ledger_before: dict[str, int]) -> dict[str, Any]:
        gold = self.gold_index()
        spent = self.store.spent()
        m: dict[str, Any] = {
            "round": round_, "seconds": round(time.time() - started, 1), "slm_mode": result.mode,
            **{f"llm_{k}": v for k, v in counts.items()},
            "annotated_total": int((labels >= 0).sum()), "demo_pool": n_demos, "clean_set": int(len(clean)),
            **{f"{k}_round": spent[k] - ledger_before[k] for k in spent},
            **{f"{k}_total": v for k, v in spent.items()},
        }
        if (gold >= 0).any():
            has = gold >= 0
            lab = has & (labels >= 0)
            m["llm_label_acc"] = round(float((labels[lab] == gold[lab]).mean()), 4) if lab.any() else None
            m["slm_acc"] = round(float((result.probs.argmax(1)[has] == gold[has]).mean()), 4)
            m["clean_precision"] = round(float((labels[clean] == gold[clean]).mean()), 4) if len(clean) else None
        return m

    # ---- schedules --------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        done = {r["round"] for r in self.store.rounds() if r["phase"] == "done"}
        fr = self.job.freeal
        demos = self.initial_demos()
        query_emb = self.base_embeddings()
        demo_emb = self.encoder.embed([d[1] for d in demos]) if demos else query_emb[:0]
        result: SLMResult | None = None
        for round_ in range(1, fr.rounds + 1):
            if round_ in done:
                continue
            if result is None and round_ > 1:
                result, demos, demo_emb, query_emb = self._reload(round_ - 1)
            started, before = time.time(), self.store.spent()
            counts = self.store.round_annotations(round_)
            if counts:  # stored before the last run stopped: selecting again would pay for a second P%
                self.progress.say(f"round {round_}/{fr.rounds}: its {counts['requested']} annotations are "
                                  "already stored; resuming at training")
                wanted = counts["requested"]
            else:
                targets = self._targets(round_, result)
                if len(targets) == 0:
                    self.progress.say(f"round {round_}: nothing left to annotate; stopping")
                    break
                self.store.set_phase(round_, fr.schedule, "annotating")
                self.progress.say(f"round {round_}/{fr.rounds}: {len(targets)} texts to the LLM "
                                  f"({'refinement' if fr.schedule == 'full' and round_ > 1 else fr.schedule})")
                counts, wanted = self.annotate(round_, targets, demos, demo_emb, query_emb), len(targets)
            result, labels = self.train(round_)
            demos, clean = self.demo_pool_from(round_, result, labels)
            demo_emb = result.embeddings[[self.pool.pos[d[0]] for d in demos]]
            query_emb = result.embeddings
            m = self.metrics(round_, started, counts, result, labels, clean, len(demos), before)
            self.store.set_phase(round_, fr.schedule, "done", metrics=m)
            self.progress.say(format_round(m))
            if counts["requested"] < wanted:
                self.progress.say("budget exhausted: stopping after this round")
                break
        return [r["metrics"] for r in self.store.rounds() if r["phase"] == "done"]

    def _targets(self, round_: int, result: SLMResult | None) -> np.ndarray:
        """Which pool positions go to the LLM this round."""
        fr = self.job.freeal
        annotated = self.store.annotated_ids()
        unannotated = np.array([i for i, x in enumerate(self.pool.ids) if x not in annotated], dtype=int)
        if fr.schedule == "full":
            if round_ == 1:
                return unannotated
            # refinement: everything outside the SLM's clean sets (including no-label rows) is asked again
            _, clean = select_demo_pool(self.llm_label_array(), result.losses, result.embeddings,
                                        fr.clean_ratio, 1)
            keep = np.zeros(len(self.pool), bool)
            keep[clean] = True
            return np.flatnonzero(~keep)
        n = budget_policy.round_size(len(unannotated), fr.query_fraction)
        probs = result.probs[unannotated] if result is not None else None
        ids = np.array(self.pool.ids, dtype=object)[unannotated]
        chosen = self.strategy.query(ids, n, QueryContext(round=round_, probs=probs, seed=self.job.seed))
        return np.array(sorted(self.pool.pos[x] for x in chosen), dtype=int)

    def _reload(self, round_: int) -> tuple[SLMResult, list[tuple[str, str, int, str]], np.ndarray, np.ndarray]:
        """Resume after round `round_` finished in an earlier run: its model and demo pool are in the store."""
        from freeal_stream.slm.model import SLM  # local: only a resumed run needs to load a checkpoint

        info = next(r for r in self.store.rounds() if r["round"] == round_)
        model = SLM.load(Path(info["model_path"]))
        self.progress.say(f"resuming after round {round_}: loading its SLM from {info['model_path']}")
        probs, emb = model.predict_proba(self.pool.texts), model.embed(self.pool.texts)
        labels = self.llm_label_array()
        has = np.flatnonzero(labels >= 0)
        losses = np.full(len(self.pool), np.nan)
        losses[has] = -np.log(np.maximum(probs[has, labels[has]], 1e-12))  # the CE the trainer reports
        result = SLMResult(probs=probs, embeddings=emb, losses=losses, clean=np.zeros(len(self.pool), bool),
                           mode=info["metrics"].get("slm_mode", ""), history=[], model=model)
        demos = self.store.demo_pool(round_)
        return result, demos, emb[[self.pool.pos[d[0]] for d in demos]], emb


def format_round(m: dict[str, Any]) -> str:
    acc = "".join(f" {name} {m[key]:.3f}" for key, name in (("llm_label_acc", "LLM label acc"),
                                                             ("slm_acc", "SLM acc")) if m.get(key) is not None)
    acc = f" |{acc}" if acc else ""
    return (f"round {m['round']} done in {m['seconds']:.0f}s: LLM labelled {m['llm_labelled']}, no label "
            f"{m['llm_no_label']}, failed {m['llm_failed']} | requests {m['requests_round']} tokens "
            f"{m['prompt_tokens_round'] + m['completion_tokens_round']} (cached {m['cached_tokens_round']}) "
            f"| clean set {m['clean_set']} demos {m['demo_pool']} | SLM {m['slm_mode']}{acc}")


def ingest(job: JobConfig, store: Store, progress: Progress) -> int:
    """Load the job's data file into the store; ids already there are kept as they are."""
    batch = read_items(job.data)
    clash = store.conflicting_ids(batch.ids, batch.hashes)
    if clash:
        raise StateError(f"{job.data.path}: ids {clash} are already stored with a different text. Fix: give "
                         "changed texts new ids, or use a new state_dir")
    added = store.add_items(batch.ids, batch.texts, batch.views, batch.golds, batch.hashes)
    msg = f"ingested {added} new items ({store.count_items()} in the store)"
    if batch.skipped_empty:
        msg += f"; skipped {batch.skipped_empty} rows with an empty text"
    progress.say(msg)
    return added


def open_state(job: JobConfig) -> Store:
    """Open the job's store, refusing an incompatible config change (budget and rounds may change)."""
    import json

    store = Store(job.state_path / "freeal.duckdb")
    current = job_to_dict(job)
    stored = store.get_meta("job")
    if stored is not None:
        diff = check_resumable(json.loads(stored), current)
        if diff:
            store.close()
            raise StateError(f"{job.state_path}: state was made by a different job config; changed fields: "
                             f"{', '.join(diff)}. Fix: revert them, or set a new state_dir to start afresh")
    store.set_meta("job", json.dumps(current))
    return store


def api_key(job: JobConfig, local: bool) -> str:
    """The API key from the environment variable the job names (never from the job file)."""
    key = os.environ.get(job.llm.api_key_env)
    if key:
        return key
    return "local-server" if local else "not-set"
