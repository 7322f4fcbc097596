"""SLM benchmark on MR with the real GPT-3.5 round-1 labels: does robust self-training beat plain CE?

Conditions: (a) gold labels + plain CE (the ceiling), (b) GPT-3.5 labels + plain CE, (c) GPT-3.5 labels +
the robust recipe with the back-translation column as the view. Fixed epochs, no model selection on the
test set. Results are merged into bench/results/slm_mr.json under a key naming the mode and options.

    PYTHONPATH=. .venv/bin/python bench/bench_slm.py --mode head --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from freeal_stream.config import FreeALConfig, SLMConfig
from freeal_stream.slm.trainer import Recipe, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mr_data import (RESULTS, add_mr_args, bar_plot, load_mr,  # noqa: E402
                     mr_present, train_and_score, write_merged)

CONDITIONS = {  # name -> (label column, recipe, use the back-translation view)
    "a_gold_ce": ("label", Recipe.plain_ce(), False),
    "b_gpt35_ce": ("gpt35_label", Recipe.plain_ce(), False),
    "c_gpt35_robust_bt": ("gpt35_label", Recipe(), True),
    # optional: METHOD.md's single global GMM instead of the per-class split
    "d_gpt35_robust_bt_global": ("gpt35_label", Recipe(per_class_split=False), True),
}
DEFAULT_CONDITIONS = "a_gold_ce,b_gpt35_ce,c_gpt35_robust_bt"


def run_one(name: str, train: pd.DataFrame, test: pd.DataFrame, cfg: SLMConfig, seed: int,
            cache_dir: Path) -> dict:
    column, recipe, use_view = CONDITIONS[name]
    metrics, _ = train_and_score(train, test, column, recipe, use_view, cfg, FreeALConfig(), seed, cache_dir, name)
    return metrics


def summarise(runs: list[dict]) -> dict:
    acc = np.array([r["test_acc"] for r in runs])
    prec = [r["clean_precision"] for r in runs if r["clean_precision"] is not None]
    return {"test_acc_mean": float(acc.mean()), "test_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "clean_precision_mean": float(np.mean(prec)) if prec else None,
            "n_clean_mean": float(np.mean([r["n_clean"] for r in runs])),
            "samples_per_s_mean": float(np.mean([r["samples_per_s"] for r in runs])),
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs]))}


def print_table(key: str, summary: dict[str, dict]) -> None:
    print(f"\n{key}")
    print(f"{'condition':<26} {'test acc (mean ± std)':>22} {'clean prec':>10} {'n_clean':>8} {'samples/s':>10} "
          f"{'train s':>8}")
    for name, s in summary.items():
        prec = f"{s['clean_precision_mean']:.4f}" if s["clean_precision_mean"] is not None else "-"
        print(f"{name:<26} {s['test_acc_mean'] * 100:>13.2f} ± {s['test_acc_std'] * 100:<5.2f} {prec:>10} "
              f"{s['n_clean_mean']:>8.0f} {s['samples_per_s_mean']:>10.1f} {s['train_seconds_mean']:>8.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["head", "finetune"], default="head")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated")
    ap.add_argument("--train-limit", type=int, default=None, help="stratified subset of the train set")
    ap.add_argument("--epochs", type=int, default=SLMConfig.epochs)
    ap.add_argument("--threads", type=int, default=SLMConfig.threads)
    ap.add_argument("--conditions", default=DEFAULT_CONDITIONS, help="comma-separated, from: " + ", ".join(CONDITIONS))
    add_mr_args(ap, RESULTS / "slm_mr.json")
    args = ap.parse_args(argv)

    if not mr_present(args.data_dir):
        return 0
    unknown = set(args.conditions.split(",")) - set(CONDITIONS)
    if unknown:
        ap.error(f"unknown condition(s) {sorted(unknown)}; choose from {', '.join(CONDITIONS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = SLMConfig(mode=args.mode, epochs=args.epochs, threads=args.threads)
    torch.set_num_threads(cfg.threads)
    train, test = load_mr(args.data_dir, args.train_limit)
    key = f"{args.mode}-ep{args.epochs}" + (f"-train{args.train_limit}" if args.train_limit else "")
    print(f"{key}: {len(train)} train / {len(test)} test texts, seeds {seeds}, device {resolve_device(cfg.device)}, "
          f"{cfg.threads} thread(s)", flush=True)

    runs: dict[str, list[dict]] = {}
    for name in args.conditions.split(","):
        runs[name] = [run_one(name, train, test, cfg, seed, args.cache_dir) for seed in seeds]
    summary = {name: summarise(r) for name, r in runs.items()}
    entry = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "n_train": len(train), "n_test": len(test), "seeds": seeds,
             "slm": dataclasses.asdict(cfg), "freeal": dataclasses.asdict(FreeALConfig()),
             "conditions": {n: {"labels": CONDITIONS[n][0], "recipe": dataclasses.asdict(CONDITIONS[n][1]),
                                "view": "backtranslation" if CONDITIONS[n][2] else "model-free"} for n in runs},
             "device": str(resolve_device(cfg.device)), "torch_threads": torch.get_num_threads(),
             "summary": summary, "runs": runs}
    write_merged(args.out, key, entry)
    print_table(key, summary)
    png = args.out.with_name(f"{args.out.stem}_{key}.png")
    bar_plot(png, list(summary), [s["test_acc_mean"] * 100 for s in summary.values()],
             [s["test_acc_std"] * 100 for s in summary.values()], f"MR, {key}, seeds {seeds}")
    print(f"\nwrote {args.out} [{key}] and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
