"""Query strategies on MR, budgeted variant: does choosing which 10% the LLM sees beat choosing at random?

Each round the strategy picks P% of the still-unannotated train texts, the real GPT-3.5 round-1 answer
(`gpt35_label`, empty = no usable answer) stands in for the LLM, and the SLM is retrained from scratch in head
mode, robust recipe, back-translation views, on every label so far (never-annotated texts in the consistency
term). Round 1 has no SLM yet, so every strategy picks the same seeded random 10% there. Reported: SLM test
accuracy per round (mean ± std over seeds), and how often GPT-3.5 was right on the texts picked.

    .venv/bin/python -m bench.bench_strategies_mr --seeds 0,1,2 --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.mr_data import CLASSES, RESULTS, add_mr_args, label_index, load_mr, mr_present, write_merged
from freeal_stream.budget import round_size
from freeal_stream.config import FreeALConfig, SLMConfig
from freeal_stream.slm.trainer import train_slm
from strategies.base import QueryContext
from strategies.registry import load_strategy
from strategies.select import select
from strategies.shards import array_shards

STRATEGIES = {
    "random": ("random", {}),
    "uncertainty": ("uncertainty", {"measure": "entropy"}),
    "hybrid": ("hybrid", {"measure": "entropy"}),
    "diversity": ("diversity", {}),
    "disagreement": ("disagreement", {}),
}
DEFAULT = "random,uncertainty,hybrid"
PAPER_RANDOM = [81.20, 87.75, 88.95]  # FreeAL paper, MR, budgeted, random 10%/round, RoBERTa-base fine-tuned


def simulate(
    name: str, train, test, cfg: SLMConfig, fraction: float, rounds: int, seed: int, cache_dir: Path
) -> list[dict]:
    """One strategy, one seed: the per-round record of the budgeted loop."""
    strategy = load_strategy(*STRATEGIES[name])
    ids = train["id"].astype(str).to_numpy(dtype=object)
    pos = {i: k for k, i in enumerate(ids)}
    texts, views = train["text"].tolist(), train["backtranslation"].tolist()
    llm, gold, test_gold = label_index(train["gpt35_label"]), label_index(train["label"]), label_index(test["label"])
    labels = np.full(len(ids), -1, dtype=np.int64)
    annotated = np.zeros(len(ids), dtype=bool)
    columns: dict[str, np.ndarray] = {}  # nothing before the first SLM
    out = []
    for round_ in range(1, rounds + 1):
        n = round_size(int((~annotated).sum()), fraction)
        t0 = time.perf_counter()
        picked = select(
            strategy,
            array_shards(ids, rows=~annotated, needs=strategy.needs, **columns),
            n,
            QueryContext(round=round_, seed=seed, n_classes=len(CLASSES)),
        )
        select_s = time.perf_counter() - t0
        at = np.array([pos[i] for i in picked])
        annotated[at], labels[at] = True, llm[at]
        result = train_slm(
            texts, labels, len(CLASSES), cfg, FreeALConfig(), views=views, seed=seed, cache_dir=cache_dir
        )
        test_acc = float((result.model.predict_proba(test["text"].tolist()).argmax(1) == test_gold).mean())
        previous = columns.get("probs")
        columns = {
            "probs": result.probs,
            "embeddings": result.embeddings,
            "slm_labels": np.full(len(ids), -1) if previous is None else previous.argmax(1),
        }
        out.append(
            {
                "round": round_,
                "picked": int(n),
                "annotated": int(annotated.sum()),
                "llm_acc_on_picked": float((llm[at] == gold[at]).mean()),
                "picked_positive_share": float((gold[at] == 1).mean()),
                "test_acc": test_acc,
                "select_s": select_s,
            }
        )
        print(
            f"  [{name} seed {seed}] round {round_}: +{n} -> {annotated.sum()} annotated, "
            f"GPT-3.5 right on {out[-1]['llm_acc_on_picked']:.3f} of the picked, test {test_acc:.4f}",
            flush=True,
        )
    return out


def summarise(runs: list[list[dict]]) -> list[dict]:
    """Per round: mean and std (over seeds) of each figure."""
    rows = []
    for r in range(len(runs[0])):
        at = [run[r] for run in runs]
        row = {"round": at[0]["round"], "annotated_mean": float(np.mean([a["annotated"] for a in at]))}
        for key in ("test_acc", "llm_acc_on_picked"):
            v = np.array([a[key] for a in at])
            row[f"{key}_mean"], row[f"{key}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        rows.append(row)
    return rows


def print_table(summary: dict[str, list[dict]]) -> None:
    names = list(summary)
    print("\nSLM test accuracy (%), mean ± std over seeds; GPT-3.5 accuracy on the texts picked in brackets")
    print("| round | annotated | " + " | ".join(names) + " | paper, random (RoBERTa-base fine-tuned) |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for r, first in enumerate(summary[names[0]]):
        cells = [
            f"{s[r]['test_acc_mean'] * 100:.2f} ± {s[r]['test_acc_std'] * 100:.2f} "
            f"[{s[r]['llm_acc_on_picked_mean'] * 100:.1f}]"
            for s in (summary[n] for n in names)
        ]
        paper = f"{PAPER_RANDOM[r]:.2f}" if r < len(PAPER_RANDOM) else "-"
        print(f"| {first['round']} | {first['annotated_mean']:.0f} | " + " | ".join(cells) + f" | {paper} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", default=DEFAULT, help="comma-separated, from: " + ", ".join(STRATEGIES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.1, help="P: share of the still-unannotated pool per round")
    ap.add_argument("--epochs", type=int, default=SLMConfig.epochs)
    ap.add_argument("--threads", type=int, default=SLMConfig.threads)
    add_mr_args(ap, RESULTS / "strategies_mr.json")
    args = ap.parse_args(argv)

    if not mr_present(args.data_dir):
        return 0
    names = args.strategies.split(",")
    unknown = set(names) - set(STRATEGIES)
    if unknown:
        ap.error(f"unknown strategy(ies) {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = SLMConfig(mode="head", epochs=args.epochs, threads=args.threads)
    torch.set_num_threads(cfg.threads)
    train, test = load_mr(args.data_dir, None)
    print(
        f"MR: {len(train)} train / {len(test)} test, P={args.fraction}, {args.rounds} rounds, seeds {seeds}, "
        f"head mode, {cfg.threads} thread(s)",
        flush=True,
    )
    runs = {
        n: [simulate(n, train, test, cfg, args.fraction, args.rounds, s, args.cache_dir) for s in seeds] for n in names
    }
    summary = {n: summarise(r) for n, r in runs.items()}
    key = f"head-ep{args.epochs}-P{args.fraction}-rounds{args.rounds}"
    write_merged(
        args.out,
        key,
        {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "n_train": len(train),
            "n_test": len(test),
            "seeds": seeds,
            "strategies": {n: {"name": STRATEGIES[n][0], "params": STRATEGIES[n][1]} for n in names},
            "slm": dataclasses.asdict(cfg),
            "freeal": dataclasses.asdict(FreeALConfig()),
            "paper_random": PAPER_RANDOM,
            "summary": summary,
            "runs": runs,
        },
    )
    print_table(summary)
    print(f"\nwrote {args.out} [{key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
