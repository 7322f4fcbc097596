"""Robust self-training on MR with GPT-3.5's real round-1 labels: the recipe, its ablations, and how clean
the SLM's clean set and demo pool are (issue 5, items 1 and 4).

Conditions (same encoder, same seeds): (a) gold labels + plain CE (the ceiling); (b) GPT-3.5 labels +
plain CE; (c) GPT-3.5 labels + the full robust recipe, `backtranslation` as the augmented view;
(d) ablations of (c): without the GMM clean/noisy split, without consistency regularisation, without
mixup; on request, one GMM over all rows instead of one per class. For every GPT-3.5 condition: precision
against gold of the GMM clean set (SLMResult.clean) and of the demo pool that loop.demo_pool_from would
build from that SLM (freeal_stream.demos.select_demo_pool with FreeALConfig's clean_ratio R and
medoids_per_class k). Fixed epochs; nothing is selected on test.

    python -m bench.bench_robust --mode head --seeds 0,1,2
    python -m bench.bench_robust --mode finetune --train-limit 1000 --seeds 0,1,2 \
        --conditions a_gold_ce,b_gpt35_ce,c_gpt35_robust_bt
    python -m bench.bench_robust --mode finetune --train-limit 1000 --combine A.json B.json   # merge split runs

-> bench/results/slm_robust.json (merged under a key naming mode and options) and slm_robust_<key>.png
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from bench.mr_data import RESULTS, add_mr_args, bar_plot, load_mr, mean_std, mr_present, train_and_score, write_merged
from freeal_stream.config import FreeALConfig, SLMConfig
from freeal_stream.slm.trainer import Recipe, resolve_device

CONDITIONS = {  # name -> (label column, recipe, use the back-translation view)
    "a_gold_ce": ("label", Recipe.plain_ce(), False),
    "b_gpt35_ce": ("gpt35_label", Recipe.plain_ce(), False),
    "c_gpt35_robust_bt": ("gpt35_label", Recipe(), True),
    "d_no_gmm": ("gpt35_label", Recipe(gmm=False), True),
    "d_no_consistency": ("gpt35_label", Recipe(consistency=False), True),
    "d_no_mixup": ("gpt35_label", Recipe(mixup=False), True),
    "d_global_gmm": ("gpt35_label", Recipe(per_class_split=False), True),  # the paper's one GMM, not one per class
}
ON_REQUEST = ("d_global_gmm",)  # not in the default run
METRICS = [
    "test_acc",
    "train_acc_vs_gold",
    "n_clean",
    "clean_precision",
    "clean_recall",
    "demo_precision",
    "small_loss_precision",
    "train_seconds",
    "samples_per_s",
]


def summarise(runs: list[dict]) -> dict:
    out = {}
    for k in METRICS:
        vals = [r.get(k) for r in runs]
        if any(v is not None for v in vals):
            out[f"{k}_mean"], out[f"{k}_std"] = mean_std(vals)
    out["n_seeds"] = len(runs)
    return out


def print_table(key: str, summary: dict[str, dict]) -> None:
    print(f"\n{key}")
    print(
        f"{'condition':<20} {'test acc':>15} {'clean prec':>10} {'n_clean':>8} {'demo prec':>9} "
        f"{'R% prec':>8} {'train s':>8}"
    )
    for name, s in summary.items():

        def f(k, scale=100.0, fmt="{:.2f}", s=s):
            return fmt.format(s[k] * scale) if k in s else "-"

        print(
            f"{name:<20} {f('test_acc_mean'):>7} ± {f('test_acc_std'):<5} {f('clean_precision_mean'):>10} "
            f"{f('n_clean_mean', 1, '{:.0f}'):>8} {f('demo_precision_mean'):>9} {f('small_loss_precision_mean'):>8} "
            f"{f('train_seconds_mean', 1, '{:.0f}'):>8}"
        )


def combine(key: str, sources: list[Path], out: Path) -> int:
    """Merge the runs of `key` from several result files (one bench split over processes on a slow box)
    into `out` under `key`, dropping repeated (condition, seed) pairs; writes the summary and the plot."""
    import json

    runs: dict[str, dict[int, dict]] = {}
    base: dict = {}
    for src in sources:
        entry = json.loads(src.read_text(encoding="utf-8")).get(key)
        if entry is None:
            print(f"{src}: no [{key}], skipped", file=sys.stderr)
            continue
        base = base or entry
        for name, rs in entry["runs"].items():
            for r in rs:
                runs.setdefault(name, {}).setdefault(r["seed"], r)
            base.setdefault("conditions", {}).setdefault(name, entry.get("conditions", {}).get(name))
    if not runs:
        return 1
    order = [n for n in CONDITIONS if n in runs]
    merged = {n: [runs[n][s] for s in sorted(runs[n])] for n in order}
    summary = {n: summarise(r) for n, r in merged.items()}
    seeds = sorted({s for r in runs.values() for s in r})
    entry = {
        **base,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "summary": summary,
        "runs": merged,
        "seeds": seeds,
        "combined_from": [str(p) for p in sources],
        "complete": all(len(r) == len(seeds) for r in merged.values()),
    }  # every condition has every seed
    write_merged(out, key, entry)
    print_table(key, summary)
    refs = {"gold CE": summary["a_gold_ce"]["test_acc_mean"] * 100} if "a_gold_ce" in summary else {}
    png = out.with_name(f"{out.stem}_{key}.png")
    bar_plot(
        png,
        [f"{n} (n={summary[n]['n_seeds']})" for n in summary],
        [s["test_acc_mean"] * 100 for s in summary.values()],
        [s["test_acc_std"] * 100 for s in summary.values()],
        f"MR test accuracy, {key} (MiniLM-L6), GPT-3.5 labels",
        refs=refs,
    )
    print(f"\nwrote {out} [{key}] and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["head", "finetune"], default="head")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated")
    ap.add_argument("--train-limit", type=int, default=None, help="stratified subset of the train set")
    ap.add_argument("--epochs", type=int, default=SLMConfig.epochs)
    ap.add_argument("--threads", type=int, default=SLMConfig.threads)
    ap.add_argument(
        "--conditions",
        default=",".join(n for n in CONDITIONS if n not in ON_REQUEST),
        help="comma-separated, from: " + ", ".join(CONDITIONS),
    )
    add_mr_args(ap, RESULTS / "slm_robust.json")
    ap.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="no training: merge the runs of the key that --mode/--epochs/--train-limit name from "
        "these result files into --out (a run split over several processes)",
    )
    args = ap.parse_args(argv)

    if args.combine:
        key = f"{args.mode}-ep{args.epochs}" + (f"-train{args.train_limit}" if args.train_limit else "")
        return combine(key, args.combine, args.out)
    if not mr_present(args.data_dir):
        return 0
    names = args.conditions.split(",")
    unknown = set(names) - set(CONDITIONS)
    if unknown:
        ap.error(f"unknown condition(s) {sorted(unknown)}; choose from {', '.join(CONDITIONS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg, freeal = SLMConfig(mode=args.mode, epochs=args.epochs, threads=args.threads), FreeALConfig()
    torch.set_num_threads(cfg.threads)
    train, test = load_mr(args.data_dir, args.train_limit)
    key = f"{args.mode}-ep{args.epochs}" + (f"-train{args.train_limit}" if args.train_limit else "")
    print(
        f"{key}: {len(train)} train / {len(test)} test texts, seeds {seeds}, device {resolve_device(cfg.device)}, "
        f"{cfg.threads} thread(s)",
        flush=True,
    )

    runs: dict[str, list[dict]] = {}
    entry: dict = {}
    for name in names:
        column, recipe, use_view = CONDITIONS[name]
        for seed in seeds:
            m, _ = train_and_score(train, test, column, recipe, use_view, cfg, freeal, seed, args.cache_dir, name)
            runs.setdefault(name, []).append(m)
            print(
                f"  {name} seed {seed}: test {m['test_acc']:.4f} clean prec {m['clean_precision']} "
                f"demo prec {m.get('demo_precision')}",
                flush=True,
            )
            summary = {n: summarise(r) for n, r in runs.items()}
            done = sum(len(r) for r in runs.values()) == len(names) * len(seeds)
            entry = {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "complete": done,
                "machine": "2-core VM, shared, no GPU",
                "n_train": len(train),
                "n_test": len(test),
                "seeds": seeds,
                "slm": dataclasses.asdict(cfg),
                "freeal": dataclasses.asdict(freeal),
                "demo_pool": {
                    "function": "freeal_stream.demos.select_demo_pool (as loop.demo_pool_from)",
                    "clean_ratio": freeal.clean_ratio,
                    "k": freeal.medoids_per_class,
                    "seed": 1,
                },
                "conditions": {
                    n: {
                        "labels": CONDITIONS[n][0],
                        "recipe": dataclasses.asdict(CONDITIONS[n][1]),
                        "view": "backtranslation" if CONDITIONS[n][2] else "none",
                    }
                    for n in runs
                },
                "device": str(resolve_device(cfg.device)),
                "torch_threads": torch.get_num_threads(),
                "summary": summary,
                "runs": runs,
            }
            write_merged(args.out, key, entry)  # after every run: a cut-off run keeps what it finished
    summary = entry["summary"]
    print_table(key, summary)
    refs = {}
    if "a_gold_ce" in summary:
        refs["gold CE"] = summary["a_gold_ce"]["test_acc_mean"] * 100
    png = args.out.with_name(f"{args.out.stem}_{key}.png")
    bar_plot(
        png,
        list(summary),
        [s["test_acc_mean"] * 100 for s in summary.values()],
        [s["test_acc_std"] * 100 for s in summary.values()],
        f"MR test accuracy, {key} (MiniLM-L6), GPT-3.5 labels, seeds {seeds}",
        refs=refs,
    )
    print(f"\nwrote {args.out} [{key}] and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
