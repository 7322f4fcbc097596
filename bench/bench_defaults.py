"""Defaults of the robust recipe, chosen on a HELD-OUT part of MR train (issue 5, item 6).

MR train is split once (stratified by gold, random_state 0) into a fit part (80%) and a validation part
(20%, its gold labels used only to score). Two label budgets: `all` = every fit row carries its GPT-3.5
label; `1k` = 1,000 stratified fit rows carry it (any row count, e.g. `250`, works the same way), the other
fit rows are passed unlabelled (as the budgeted schedule does: they enter L_cr_u only). Swept: warmup_epochs
x tau x epochs for the robust recipe, head_hidden at the defaults, plain CE at each epoch count as the
reference; for a few of those SLMs the demo pool's precision over clean_ratio R x medoids k
(select_demo_pool, as loop.demo_pool_from).
The best validation config per budget is then trained on the matching rows of the whole train set and
scored ONCE on the test set next to the current defaults (a confirmation, not a selection).

    python -m bench.bench_defaults --seeds 0,1 --confirm-seeds 0,1,2

-> bench/results/defaults_mr.json and defaults_mr.png. A check that the chosen warm-up holds on noisier labels
(GPT-3.5's labels with 15% more flipped at random, ~80% right, as in the demo):

    python -m bench.bench_defaults --budgets noisy --small-grid --skip-confirm \
        --out bench/results/defaults_mr_noisy.json

Fine-tune mode (the whole encoder; ~3x slower an epoch for the recipe than for CE) on a stratified
`--fit-limit` subset of the fit part, scored on the same validation rows; the test-set confirmation then
trains on `load_mr`'s stratified subset of that size, the subset of BENCHMARKS 4b.3:

    python -m bench.bench_defaults --mode finetune --fit-limit 1000 --budgets all --small-grid --threads 2 \
        --out bench/results/defaults_mr_finetune.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from bench.mr_data import (
    CLASSES,
    RESULTS,
    add_mr_args,
    demo_pool_precision,
    label_index,
    load_mr,
    mean_std,
    mr_present,
    plot,
    stratified_subset,
    views_of,
    write_merged,
)
from freeal_stream.config import FreeALConfig, SLMConfig
from freeal_stream.slm.trainer import Recipe, resolve_warmup, train_slm

VAL_FRACTION = 0.2
WARMUPS, TAUS, EPOCHS, HIDDEN = (1, 2, 3), (0.5, 0.7, 0.9), (4, 8), (1024,)
LONG_WARMUPS = (1, 2, 4)  # at the longer epoch count, tau at its default (a slow box: no full grid)
DEMO_R, DEMO_K = (0.1, 0.2, 0.4), (10, 25, 50)
DEFAULT = {
    "recipe": "robust",
    "warmup": FreeALConfig.warmup_epochs,
    "tau": FreeALConfig.tau,
    "epochs": SLMConfig.epochs,
    "hidden": SLMConfig.head_hidden,
}


def configs() -> list[dict]:
    out = [{**DEFAULT, "recipe": "ce", "epochs": e} for e in EPOCHS]
    out += [{**DEFAULT, "warmup": w, "tau": t} for w, t in itertools.product(WARMUPS, TAUS)]
    out += [{**DEFAULT, "warmup": w, "epochs": e} for e in EPOCHS[1:] for w in LONG_WARMUPS]
    out += [{**DEFAULT, "recipe": r, "hidden": h} for r, h in itertools.product(("ce", "robust"), HIDDEN)]
    return out


def name_of(c: dict) -> str:
    base = f"{c['recipe']} ep{c['epochs']} h{c['hidden']}"
    warmup = "auto" if c["warmup"] is None else c["warmup"]  # None: trainer.resolve_warmup by label count
    return base + (f" w{warmup} tau{c['tau']}" if c["recipe"] == "robust" else "")


def demo_sweep_for(c: dict) -> bool:
    return (
        c["epochs"] == DEFAULT["epochs"]
        and c["hidden"] == DEFAULT["hidden"]
        and (c["recipe"] == "ce" or c["tau"] == DEFAULT["tau"])
    )


NOISY_FLIP = 0.15  # `noisy` budget: this share of the labelled rows flipped at random (seed 0): ~80% right


def budget_labels(fit: pd.DataFrame, budget: str) -> np.ndarray:
    labels = label_index(fit["gpt35_label"])
    if budget == "noisy":  # synthetic, symmetric extra noise: does a default tuned on 94%-right labels hold?
        rng = np.random.default_rng(0)
        has = np.flatnonzero(labels >= 0)
        flip = rng.choice(has, size=int(round(NOISY_FLIP * len(has))), replace=False)
        labels = labels.copy()
        labels[flip] = 1 - labels[flip]
    if budget not in ("all", "noisy"):  # '1k', '250': that many stratified rows labelled
        n = int(budget[:-1]) * 1000 if budget.endswith("k") else int(budget)
        keep, _ = train_test_split(np.arange(len(fit)), train_size=n, stratify=fit["label"], random_state=0)
        masked = np.full(len(fit), -1)
        masked[keep] = labels[keep]
        labels = masked
    return labels


def fit_one(c: dict, rows: pd.DataFrame, labels: np.ndarray, seed: int, cache_dir: Path, threads: int, mode: str):
    cfg = SLMConfig(mode=mode, epochs=c["epochs"], head_hidden=c["hidden"], threads=threads)
    freeal = FreeALConfig(warmup_epochs=c["warmup"], tau=c["tau"])
    robust = c["recipe"] == "robust"
    return train_slm(
        rows["text"].tolist(),
        labels,
        len(CLASSES),
        cfg,
        freeal,
        views=views_of(rows) if robust else None,
        recipe=Recipe() if robust else Recipe.plain_ce(),
        seed=seed,
        cache_dir=cache_dir if mode == "head" else None,
    )


def trained_as(c: dict, labels: np.ndarray) -> dict:
    """What `fit_one` trains for this config: a null warm-up as the trainer resolves it, and no warm-up or tau
    for plain CE, so that two names for one training are trained once."""
    if c["recipe"] != "robust":
        return {**c, "warmup": None, "tau": None}
    n_labelled = int((labels >= 0).sum())
    return {**c, "warmup": resolve_warmup(FreeALConfig(warmup_epochs=c["warmup"]), n_labelled, c["epochs"])}


def accuracy(result, rows: pd.DataFrame) -> float:
    return float((result.model.predict_proba(rows["text"].tolist()).argmax(1) == label_index(rows["label"])).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated, for the validation sweep")
    ap.add_argument("--confirm-seeds", default="0,1,2", help="comma-separated, for the test-set confirmation")
    ap.add_argument(
        "--budgets",
        default="all,1k",
        help="comma-separated, from: all, noisy (all + 15%% flipped), 1k or any row count (that many labelled)",
    )
    ap.add_argument("--small-grid", action="store_true", help="only plain CE and the warm-up sweep at 4 epochs")
    ap.add_argument("--threads", type=int, default=SLMConfig.threads)
    ap.add_argument("--mode", choices=("head", "finetune"), default="head", help="SLM mode")
    ap.add_argument(
        "--fit-limit",
        type=int,
        default=None,
        help="train on this many stratified fit rows (validation rows unchanged); the test-set "
        "confirmation then trains on load_mr's stratified subset of the same size",
    )
    ap.add_argument("--skip-confirm", action="store_true", help="no test-set confirmation of the chosen config")
    add_mr_args(ap, RESULTS / "defaults_mr.json")
    args = ap.parse_args(argv)
    if not mr_present(args.data_dir):
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    confirm_seeds = [int(s) for s in args.confirm_seeds.split(",")]
    torch.set_num_threads(args.threads)
    whole_train, test = load_mr(args.data_dir, None)
    train = stratified_subset(whole_train, args.fit_limit)  # what the test-set confirmation trains on
    fit, val = train_test_split(whole_train, test_size=VAL_FRACTION, stratify=whole_train["label"], random_state=0)
    fit, val = stratified_subset(fit.reset_index(drop=True), args.fit_limit), val.reset_index(drop=True)
    gold_fit = label_index(fit["label"])
    print(f"held-out split of MR train: {len(fit)} fit / {len(val)} validation rows; seeds {seeds}", flush=True)

    key = args.mode + (f"-fit{args.fit_limit}" if args.fit_limit else "") + ("-small" if args.small_grid else "")
    sweep: dict[str, dict] = {}
    entry: dict = {}
    t_start = time.perf_counter()
    for budget in args.budgets.split(","):
        labels = budget_labels(fit, budget)
        sweep[budget] = {}
        for c in configs():
            if args.small_grid and not (
                c["epochs"] == DEFAULT["epochs"]
                and c["hidden"] == DEFAULT["hidden"]
                and (c["recipe"] == "ce" or c["tau"] == DEFAULT["tau"])
            ):
                continue
            name = name_of(c)
            runs = []
            for seed in seeds:
                res = fit_one(c, fit, labels, seed, args.cache_dir, args.threads, args.mode)
                run = {"seed": seed, "val_acc": accuracy(res, val), "n_clean": int(res.clean.sum())}
                right = labels == gold_fit
                if c["recipe"] == "robust":
                    run["clean_precision"] = float(right[res.clean].mean())
                if demo_sweep_for(c):
                    run["demo"] = {
                        f"R{r}_k{k}": demo_pool_precision(labels, gold_fit, res, r, k, seed=1)
                        for r, k in itertools.product(DEMO_R, DEMO_K)
                    }
                runs.append(run)
            mu, sd = mean_std([r["val_acc"] for r in runs])
            sweep[budget][name] = {
                "config": c,
                "val_acc_mean": mu,
                "val_acc_std": sd,
                "clean_precision_mean": mean_std([r.get("clean_precision") for r in runs])[0],
                "runs": runs,
            }
            print(
                f"  [{budget}] {name:<32} val {mu * 100:.2f} ± {sd * 100:.2f}  ({time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )
            entry = {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "machine": "2-core VM, shared, no GPU",
                "complete": False,
                "mode": args.mode,
                "threads": args.threads,
                "seeds": seeds,
                "confirm_seeds": confirm_seeds,
                "n_fit": len(fit),
                "n_val": len(val),
                "split": "train_test_split(MR train, test_size=0.2, stratify=gold, random_state=0)",
                "budgets": {
                    "all": "every fit row has its GPT-3.5 label",
                    "noisy": f"all, then {NOISY_FLIP:.0%} of the labelled rows flipped (seed 0)",
                    "1k": "1,000 stratified fit rows labelled, the rest unlabelled (L_cr_u only); "
                    "a number N: N such rows",
                },
                "default": DEFAULT,
                "sweep": sweep,
            }
            write_merged(args.out, key, entry)

    # choose per budget on validation only; then one test-set confirmation of chosen vs default
    chosen = {
        b: max((s for s in sweep[b].values() if s["config"]["recipe"] == "robust"), key=lambda s: s["val_acc_mean"])[
            "config"
        ]
        for b in sweep
    }
    best_ce = {
        b: max((s for s in sweep[b].values() if s["config"]["recipe"] == "ce"), key=lambda s: s["val_acc_mean"])[
            "config"
        ]
        for b in sweep
    }
    entry["chosen_on_validation"] = {"robust": chosen, "plain_ce": best_ce}
    confirm: dict[str, dict] = {}
    if not args.skip_confirm:
        for budget in sweep:
            labels = budget_labels(train, budget)
            for tag, c in (
                ("default robust", DEFAULT),
                ("chosen robust", chosen[budget]),
                ("chosen plain CE", best_ce[budget]),
            ):
                same = next(
                    (
                        v["test_acc"]
                        for v in confirm.get(budget, {}).values()
                        if trained_as(v["config"], labels) == trained_as(c, labels)
                    ),
                    None,
                )
                accs = same or [
                    accuracy(fit_one(c, train, labels, seed, args.cache_dir, args.threads, args.mode), test)
                    for seed in confirm_seeds
                ]  # the default chosen: not trained twice
                mu, sd = mean_std(accs)
                confirm.setdefault(budget, {})[tag] = {
                    "config": c,
                    "test_acc_mean": mu,
                    "test_acc_std": sd,
                    "test_acc": accs,
                }
                print(f"  [{budget}] test, {tag} {name_of(c)}: {mu * 100:.2f} ± {sd * 100:.2f}", flush=True)
    entry.update({"complete": True, "confirm_on_test": confirm, "seconds": time.perf_counter() - t_start})
    write_merged(args.out, key, entry)

    def draw(ax):
        width = 0.38
        for i, budget in enumerate(sweep):
            names = [n for n in sweep[budget]]
            y = np.arange(len(names))
            ax.barh(
                y + (i - 0.5) * width,
                [sweep[budget][n]["val_acc_mean"] * 100 for n in names],
                height=width,
                xerr=[sweep[budget][n]["val_acc_std"] * 100 for n in names],
                label=f"{budget} labels",
                alpha=0.85,
                capsize=2,
            )
            ax.set_yticks(y, names, fontsize=7)
        vals = [s["val_acc_mean"] * 100 for b in sweep for s in sweep[b].values()]
        ax.set_xlim(min(vals) - 2, max(vals) + 1)
        ax.invert_yaxis()
        ax.set_xlabel("validation accuracy (%) (20% of MR train held out, gold)")
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)

    n = len(next(iter(sweep.values())))
    png = args.out.with_suffix(".png")
    plot(
        png,
        draw,
        f"{args.mode} recipe sweep ({len(fit):,} fit rows) on held-out MR train, GPT-3.5 labels, seeds {seeds}",
        figsize=(9, 0.3 * n + 1.5),
    )
    print(f"\nchosen on validation: {chosen}\nwrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
