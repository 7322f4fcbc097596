"""A round's figures (what it sent, what came back, what it cost; accuracy where the data has gold) and the
one line that prints them."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from freeal_stream.rounds.context import RoundContext
from freeal_stream.rounds.planning import human_label_array, llm_label_array
from freeal_stream.rounds.quality import round_quality
from freeal_stream.rounds.state import SLMState
from freeal_stream.session import spent_now
from freeal_stream.store import LABEL_RULES


class PhaseClock:
    """Wall seconds per phase of a round (`plan_s`, `annotate_s`, `train_s`, `demos_s`); a phase a resumed
    round skips is absent."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[f"{phase}_s"] = round(now - self._last, 2)
        self._last = now


def round_metrics(
    ctx: RoundContext,
    state: SLMState,
    started: float,
    planned: int,
    clean: np.ndarray,
    spent_before: dict[str, int],
    laps: dict[str, float],
) -> dict[str, Any]:
    """The figures stored with a finished round (and shown by `status`)."""
    store = ctx.store
    labels = llm_label_array(ctx)
    spent = store.spent()
    stored = store.round_annotations(state.round) or {"requested": 0, "labelled": 0, "no_label": 0}
    m: dict[str, Any] = {
        "round": state.round,
        "seconds": round(time.time() - started, 1),
        "slm_mode": state.mode,
        "pool": ctx.pool.size,
        "llm_requested": planned,
        "llm_labelled": stored["labelled"],
        "llm_no_label": stored["no_label"],
        "llm_failed": planned - stored["requested"],
        "annotated_total": int((labels >= 0).sum()),
        "sent_total": store.annotated_count(),
        "human_labels": int((human_label_array(ctx) >= 0).sum()),
        "demo_pool": len(state.demos),
        "clean_set": int(len(clean)),
        **{f"{k}_round": spent[k] - spent_before[k] for k in spent},
        **{f"{k}_total": v for k, v in spent.items()},
        "cost_total": round(spent_now(store, ctx.job).cost, 6),
        **laps,
        **round_quality(ctx, state.round),  # the export's estimated accuracy and the calibration behind it
    }
    gold = ctx.pool.gold()
    if (gold >= 0).any() and state.logits is not None:
        lab = (gold >= 0) & (labels >= 0)
        right = sum(
            int((block.argmax(1) == gold[s : s + len(block)])[gold[s : s + len(block)] >= 0].sum())
            for s, block in state.logits.shards(65536)
        )
        m["llm_label_acc"] = round(float((labels[lab] == gold[lab]).mean()), 4) if lab.any() else None
        m["slm_acc"] = round(right / int((gold[: state.logits.rows] >= 0).sum()), 4)
        m["clean_precision"] = round(float((labels[clean] == gold[clean]).mean()), 4) if len(clean) else None
        # the labels of record as `export` writes them, under the job's rule and under each rule
        by_rule = {rule: store.gold_agreement(ctx.job.task.class_names, rule) for rule in LABEL_RULES}
        m["export_acc_by_rule"] = {rule: round(right / n, 4) if n else None for rule, (n, right) in by_rule.items()}
        m["export_acc"] = m["export_acc_by_rule"][ctx.job.freeal.label_of_record]
    return m


def format_estimate(est: dict[str, Any]) -> str:
    """'export est. 0.873 [0.861, 0.885]': the export's expected accuracy and its interval."""
    return f"export est. {est['accuracy']:.3f} [{est['low']:.3f}, {est['high']:.3f}]"


def format_round(m: dict[str, Any]) -> str:
    acc = "".join(
        f" {name} {m[key]:.3f}"
        for key, name in (("llm_label_acc", "LLM label acc"), ("slm_acc", "SLM acc"), ("export_acc", "export acc"))
        if m.get(key) is not None
    )
    acc = f" |{acc}" if acc else ""
    if m.get("estimate"):
        acc = f" | {format_estimate(m['estimate'])}{acc}"
    return (
        f"round {m['round']} done in {m['seconds']:.0f}s: LLM labelled {m['llm_labelled']}, no label "
        f"{m['llm_no_label']}, failed {m['llm_failed']} | requests {m['requests_round']} tokens "
        f"{m['prompt_tokens_round'] + m['completion_tokens_round']} (cached {m['cached_tokens_round']}) "
        f"| clean set {m['clean_set']} demos {m['demo_pool']} | SLM {m['slm_mode']}{acc}"
    )
