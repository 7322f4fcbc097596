"""Whose label should stand where the SLM disputes an LLM label? `freeal.label_of_record` 'llm' vs 'slm'.

An LLM label is *disputed* when the SLM put it in its noisy split. For each run this reports, over the
LLM-labelled items, the accuracy against gold of the labels of record under either rule, how many labels
are disputed, and how often the SLM is right on them. Two kinds of run:

  * a job's state directory (`--state DIR`, repeatable): the store's own label-of-record query
    (`Store.labels_rows`), so the figures are what `export` writes under each rule. The job needs a gold
    column; it is read only here.
  * MR with GPT-3.5's real labels (`--mr`): the robust head-mode SLM of bench_robust (same recipe and
    defaults) trained on all 8,662 labels, one run per seed; disputed = the LLM-labelled rows outside the
    GMM clean set, exactly as the store decides it.

    python -m bench.bench_label_of_record --mr --seeds 0,1 --state .freeal/demo \
        --state /tmp/benchC_loop/state_mr_full_s0_n600

-> bench/results/label_of_record.json and label_of_record.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.mr_data import RESULTS, add_mr_args, label_index, load_mr, mr_present, plot


def summary(llm: np.ndarray, slm: np.ndarray, slm_conf: np.ndarray, gold: np.ndarray, disputed: np.ndarray) -> dict:
    """Accuracy of the labels of record under each rule, over items with an LLM label and a gold label, and
    the SLM's mean confidence on its disputes (a gold-free figure a user can see)."""
    by_rule = {"llm": llm, "slm": np.where(disputed, slm, llm)}
    return {
        "n_llm_labelled": int(len(llm)),
        "n_disputed": int(disputed.sum()),
        "slm_conf_on_disputed": round(float(slm_conf[disputed].mean()), 4) if disputed.any() else None,
        "acc": {rule: round(float((labels == gold).mean()), 4) for rule, labels in by_rule.items()},
        "slm_right_on_disputed": round(float((slm[disputed] == gold[disputed]).mean()), 4) if disputed.any() else None,
        "llm_right_on_disputed": round(float((llm[disputed] == gold[disputed]).mean()), 4) if disputed.any() else None,
    }


def from_state(state: Path) -> dict:
    """The figures for one job's state, through the store's own label-of-record query."""
    from freeal_stream.store import Store

    store = Store(state / "freeal.duckdb")
    try:
        names = list(json.loads(store.get_meta("job"))["task"]["classes"])
        # under 'slm' a disputed row's confidence is the SLM's own
        rows = [r for r in store.labels_rows("slm") if r[7] is not None and r[3] in names]
    finally:
        store.close()
    if not rows:
        raise SystemExit(f"{state}: no LLM-labelled item with a gold label")
    gold = np.array([names.index(r[3]) for r in rows])
    llm, disputed = np.array([r[7] for r in rows]), np.array([bool(r[9]) for r in rows])
    slm = np.array([-1 if r[8] is None else r[8] for r in rows])
    slm_conf = np.array([r[6] if r[9] else np.nan for r in rows], dtype=float)
    return {"run": str(state), **summary(llm, slm, slm_conf, gold, disputed)}


def from_mr(data_dir: Path, seeds: list[int], cache_dir: Path) -> list[dict]:
    """MR with GPT-3.5's labels: the robust head-mode SLM, per seed."""
    from mr_data import CLASSES, views_of

    from freeal_stream.config import FreeALConfig, SLMConfig
    from freeal_stream.slm.trainer import Recipe, train_slm

    train, _ = load_mr(data_dir, None)
    labels, gold = label_index(train["gpt35_label"]), label_index(train["label"])
    has = labels >= 0
    out = []
    for seed in seeds:
        result = train_slm(
            train["text"].tolist(),
            labels,
            len(CLASSES),
            SLMConfig(mode="head"),
            FreeALConfig(),
            views=views_of(train),
            recipe=Recipe(),
            seed=seed,
            cache_dir=cache_dir,
            progress=lambda msg, seed=seed: print(f"  [seed {seed}] {msg}", flush=True),
        )
        disputed = ~result.clean[has]
        out.append(
            {
                "run": f"MR, GPT-3.5 labels, robust head SLM, seed {seed}",
                **summary(labels[has], result.probs.argmax(1)[has], result.probs.max(1)[has], gold[has], disputed),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", type=Path, action="append", default=[], help="a job's state_dir (repeatable)")
    ap.add_argument("--mr", action="store_true", help="also MR with GPT-3.5's labels")
    ap.add_argument("--seeds", default="0,1", help="seeds for --mr")
    add_mr_args(ap, RESULTS / "label_of_record.json")
    args = ap.parse_args(argv)
    runs = [from_state(s) for s in args.state]
    if args.mr and mr_present(args.data_dir):
        runs += from_mr(args.data_dir, [int(s) for s in args.seeds.split(",")], args.cache_dir)
    if not runs:
        if args.mr:  # MR is absent: mr_present printed the skip message
            return 0
        print("nothing to measure: pass --state DIR and/or --mr", file=sys.stderr)
        return 2
    print(
        f"{'run':<72} {'LLM lab.':>8} {'disputed':>8} {'SLM conf':>8} {'SLM right':>9} {'llm rule':>8} {'slm rule':>8}"
    )
    for r in runs:
        print(
            f"{r['run'][-72:]:<72} {r['n_llm_labelled']:>8} {r['n_disputed']:>8} "
            f"{r['slm_conf_on_disputed'] if r['slm_conf_on_disputed'] is not None else '-':>8} "
            f"{r['slm_right_on_disputed'] if r['slm_right_on_disputed'] is not None else '-':>9} "
            f"{r['acc']['llm']:>8.4f} {r['acc']['slm']:>8.4f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs}, indent=1))

    def draw(ax):
        x = np.arange(len(runs))
        for k, rule in enumerate(("llm", "slm")):
            ax.bar(x + (k - 0.5) * 0.38, [r["acc"][rule] for r in runs], 0.38, label=f"label_of_record: {rule}")
        ax.set_xticks(x, [Path(r["run"]).name[-30:] for r in runs], rotation=15, ha="right", fontsize=7)
        ax.set_ylim(0.5, 1.0)
        ax.set_ylabel("labels of record right (LLM-labelled items)")
        ax.legend()

    plot(args.out.with_suffix(".png"), draw, "Label of record where the SLM disputes the LLM")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
