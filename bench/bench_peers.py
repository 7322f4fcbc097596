"""FreeAL's SLM against its peers on MR (issue 5, item 5): same GPT-3.5 labels, same encoder and head, same
run, same seeds.

- (i) cleanlab: out-of-sample pred_probs by K-fold cross-validation (the same head on the same frozen
  encoder, plain CE), `cleanlab.filter.find_label_issues`, then plain CE on the rows it keeps;
- (ii) "just ask the LLM": GPT-3.5's own labels against gold. MR's test file has no gpt35_label column,
  so this is measured on the TRAIN rows (no answer counted wrong, and on the answered rows alone);
- (iii) traditional active learning with a human oracle: uncertainty sampling (entropy, through modAL's
  measure in strategies.measures; the loop is driven here because modAL's ActiveLearner.teach breaks on
  scikit-learn >= 1.8) querying GOLD labels in batches of 5% of the pool from a 5% random start, the
  same SLM retrained with plain CE after each batch; test accuracy at 10%, 20%, 50% of the pool (and
  random sampling at the same sizes for reference);
- the references from the same run: gold CE, GPT-3.5 plain CE, GPT-3.5 + robust recipe (FreeAL's SLM).

    python -m bench.bench_peers --seeds 0,1,2

-> bench/results/peers_mr.json and peers_mr.png. Head mode (frozen all-MiniLM-L6-v2 + MLP), fixed epochs,
nothing selected on the test set.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch

from bench.mr_data import (
    CLASSES,
    RESULTS,
    add_mr_args,
    label_index,
    load_mr,
    mean_std,
    mr_present,
    plot,
    train_and_score,
    write_merged,
)
from freeal_stream.config import FreeALConfig, SLMConfig
from freeal_stream.slm.trainer import Recipe, train_slm
from strategies.measures import uncertainty

AL_BATCH = 0.05  # of the pool per query batch (and the random start); 10 retrainings to 50% on a slow box
AL_CHECKPOINTS = (0.10, 0.20, 0.50)


def _quiet_train(texts, labels, cfg, freeal, seed, cache_dir):
    return train_slm(texts, labels, len(CLASSES), cfg, freeal, recipe=Recipe.plain_ce(), seed=seed, cache_dir=cache_dir)


def _test_acc(result, test) -> float:
    return float((result.model.predict_proba(test["text"].tolist()).argmax(1) == label_index(test["label"])).mean())


def cleanlab_peer(train, test, cfg, freeal, seed, cache_dir, folds: int) -> dict:
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    texts = train["text"].tolist()
    labels, gold = label_index(train["gpt35_label"]), label_index(train["label"])
    has = np.flatnonzero(labels >= 0)
    oos = np.zeros((len(texts), len(CLASSES)))
    t0 = time.perf_counter()
    for _, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(has, labels[has]):
        fold_labels = labels.copy()
        fold_labels[has[held]] = -1  # held-out fold: its labels are never seen by its model
        oos[has[held]] = _quiet_train(texts, fold_labels, cfg, freeal, seed, cache_dir).probs[has[held]]
    issues = find_label_issues(labels=labels[has], pred_probs=oos[has])
    kept = labels.copy()
    kept[has[issues]] = -1
    result = _quiet_train(texts, kept, cfg, freeal, seed, cache_dir)
    right = labels == gold
    keep_rows = has[~issues]
    return {
        "seed": seed,
        "test_acc": _test_acc(result, test),
        "folds": folds,
        "n_issues": int(issues.sum()),
        "n_kept": int(len(keep_rows)),
        "kept_precision": float(right[keep_rows].mean()),
        "issues_precision": float((~right[has[issues]]).mean()) if issues.any() else None,
        "oos_acc_vs_gold": float((oos[has].argmax(1) == gold[has]).mean()),
        "seconds": time.perf_counter() - t0,
    }


def active_learning(train, test, cfg, freeal, seed, cache_dir) -> dict:
    """Uncertainty sampling with a gold oracle; random sampling at the checkpoints for reference."""
    texts, gold = train["text"].tolist(), label_index(train["label"])
    n = len(texts)
    rng = np.random.default_rng(seed)
    step = int(round(AL_BATCH * n))
    targets = [int(round(f * n)) for f in np.arange(AL_BATCH, max(AL_CHECKPOINTS) + 1e-9, AL_BATCH)]
    checkpoints = {int(round(f * n)): f for f in AL_CHECKPOINTS}
    queried = np.zeros(n, dtype=bool)
    queried[rng.choice(n, size=step, replace=False)] = True  # the random start
    curve, t0, result = [], time.perf_counter(), None
    for target in targets:
        if queried.sum() < target:
            unl = np.flatnonzero(~queried)
            perm = rng.permutation(len(unl))  # random tie-break among equal scores
            u = uncertainty(result.probs[unl[perm]], "entropy")  # the SLM trained on the previous batch
            queried[unl[perm][np.argsort(-u, kind="stable")][: target - queried.sum()]] = True
        labels = np.where(queried, gold, -1)
        result = _quiet_train(texts, labels, cfg, freeal, seed, cache_dir)
        acc = _test_acc(result, test)
        curve.append({"n_labelled": int(queried.sum()), "fraction": float(queried.sum() / n), "test_acc": acc})
        print(
            f"  [AL entropy seed {seed}] {queried.sum()} gold labels ({queried.sum() / n:.0%}): test {acc:.4f}",
            flush=True,
        )
    random_pts = []
    for target, frac in checkpoints.items():
        labels = np.full(n, -1)
        pick = np.random.default_rng(seed + 1000).choice(n, size=target, replace=False)
        labels[pick] = gold[pick]
        random_pts.append(
            {
                "n_labelled": target,
                "fraction": frac,
                "test_acc": _test_acc(_quiet_train(texts, labels, cfg, freeal, seed, cache_dir), test),
            }
        )
    at = {f"{f:.0%}": next(c["test_acc"] for c in curve if c["n_labelled"] == t) for t, f in checkpoints.items()}
    return {
        "seed": seed,
        "entropy_at": at,
        "random_at": {f"{p['fraction']:.0%}": p["test_acc"] for p in random_pts},
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds for cleanlab's pred_probs")
    ap.add_argument("--epochs", type=int, default=SLMConfig.epochs)
    ap.add_argument("--threads", type=int, default=SLMConfig.threads)
    ap.add_argument("--skip-al", action="store_true", help="leave out the active-learning peer")
    ap.add_argument("--train-limit", type=int, default=None, help="stratified subset of the train set (smoke tests)")
    add_mr_args(ap, RESULTS / "peers_mr.json")
    args = ap.parse_args(argv)
    if not mr_present(args.data_dir):
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg, freeal = SLMConfig(mode="head", epochs=args.epochs, threads=args.threads), FreeALConfig()
    torch.set_num_threads(cfg.threads)
    train, test = load_mr(args.data_dir, args.train_limit)
    llm, gold = label_index(train["gpt35_label"]), label_index(train["label"])
    llm_baseline = {
        "measured_on": f"MR train ({len(train):,} rows; mr/test.csv has no gpt35_label column)",
        "acc_no_answer_wrong": float((llm == gold).mean()),
        "acc_on_answered": float((llm == gold)[llm >= 0].mean()),
        "n_no_answer": int((llm < 0).sum()),
    }
    print(f"LLM baseline (train rows): {llm_baseline}", flush=True)

    refs = {
        "a_gold_ce": ("label", Recipe.plain_ce(), False),
        "b_gpt35_ce": ("gpt35_label", Recipe.plain_ce(), False),
        "c_gpt35_robust_bt": ("gpt35_label", Recipe(), True),
    }
    runs: dict[str, list[dict]] = {k: [] for k in [*refs, "cleanlab_ce", "al_entropy_gold"]}
    for seed in seeds:
        for name, (col, recipe, view) in refs.items():
            m, _ = train_and_score(train, test, col, recipe, view, cfg, freeal, seed, args.cache_dir, name)
            runs[name].append(
                {k: m.get(k) for k in ("seed", "test_acc", "n_clean", "clean_precision", "demo_precision")}
            )
            print(f"  {name} seed {seed}: test {m['test_acc']:.4f}", flush=True)
        cl = cleanlab_peer(train, test, cfg, freeal, seed, args.cache_dir, args.folds)
        runs["cleanlab_ce"].append(cl)
        print(f"  cleanlab seed {seed}: {cl}", flush=True)
        if not args.skip_al:
            runs["al_entropy_gold"].append(active_learning(train, test, cfg, freeal, seed, args.cache_dir))

    summary: dict = {}
    for name in [*refs, "cleanlab_ce"]:
        mu, sd = mean_std([r["test_acc"] for r in runs[name]])
        summary[name] = {"test_acc_mean": mu, "test_acc_std": sd}
    summary["cleanlab_ce"].update(
        {
            k + "_mean": mean_std([r[k] for r in runs["cleanlab_ce"]])[0]
            for k in ("n_kept", "kept_precision", "n_issues")
        }
    )
    for which in ("entropy_at", "random_at"):
        for frac in (f"{f:.0%}" for f in AL_CHECKPOINTS):
            vals = [r[which][frac] for r in runs["al_entropy_gold"]]
            if vals:
                mu, sd = mean_std(vals)
                summary[f"al_{which.split('_')[0]}_gold_{frac}"] = {"test_acc_mean": mu, "test_acc_std": sd}
    entry = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": "2-core VM, shared, no GPU",
        "n_train": len(train),
        "n_test": len(test),
        "seeds": seeds,
        "slm": dataclasses.asdict(cfg),
        "freeal": dataclasses.asdict(freeal),
        "llm_baseline": llm_baseline,
        "al": {
            "measure": "entropy (strategies.measures -> modAL.uncertainty.classifier_entropy)",
            "start": f"{AL_BATCH:.0%} random",
            "batch": f"{AL_BATCH:.0%} of the pool",
            "oracle": "gold label",
            "training": "plain CE, same head/encoder/epochs, retrained from scratch each batch",
        },
        "cleanlab": {"folds": args.folds, "find_label_issues": "defaults (filter_by='prune_by_noise_rate')"},
        "summary": summary,
        "runs": runs,
    }
    key = f"head-ep{args.epochs}" + (f"-train{args.train_limit}" if args.train_limit else "")
    write_merged(args.out, key, entry)

    print(f"\n{key}: MR test accuracy, mean ± std over seeds {seeds}")
    for name, s in summary.items():
        print(f"  {name:<28} {s['test_acc_mean'] * 100:6.2f} ± {s['test_acc_std'] * 100:.2f}")

    def draw(ax):
        if runs["al_entropy_gold"]:
            curves = np.array([[c["test_acc"] for c in r["curve"]] for r in runs["al_entropy_gold"]]) * 100
            x = np.array([c["fraction"] for c in runs["al_entropy_gold"][0]["curve"]]) * 100
            ax.plot(x, curves.mean(0), "o-", ms=3, color="C0", label="AL, entropy, gold labels (human)")
            ax.fill_between(x, curves.min(0), curves.max(0), color="C0", alpha=0.2)
            rx = [float(f) * 100 for f in AL_CHECKPOINTS]
            ry = [summary[f"al_random_gold_{f:.0%}"]["test_acc_mean"] * 100 for f in AL_CHECKPOINTS]
            ax.plot(rx, ry, "s--", color="C7", ms=4, label="random sampling, gold labels")
        lines = {
            "a_gold_ce": ("gold CE, 100% human", "k"),
            "c_gpt35_robust_bt": ("FreeAL SLM: GPT-3.5 + robust, 0% human", "C3"),
            "b_gpt35_ce": ("GPT-3.5 + plain CE, 0% human", "C1"),
            "cleanlab_ce": ("GPT-3.5 + cleanlab + CE, 0% human", "C2"),
        }
        for name, (lab, col) in lines.items():
            v = summary[name]["test_acc_mean"] * 100
            ax.axhline(v, color=col, ls=":" if name == "a_gold_ce" else "--", lw=1.2, label=f"{lab}: {v:.2f}")
        ax.set_xlabel("% of MR train labelled by the oracle")
        ax.set_ylabel("MR test accuracy (%)")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)

    png = args.out.with_suffix(".png")
    plot(
        png,
        draw,
        f"MR, head mode (frozen MiniLM-L6 + MLP), seeds {seeds}; "
        f"LLM's own labels: {llm_baseline['acc_no_answer_wrong'] * 100:.1f}% (train)",
    )
    print(f"\nwrote {args.out} [{key}] and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
