"""Shared bits of the MR benches (bench_robust, bench_peers, bench_defaults, bench_strategies_mr,
bench_label_of_record): their common options, data loading,
label indices, the train/test evaluation of one SLM, the demo-pool precision, JSON merge and plotting.

MR lives in ../shared/data/mr/{train,test}.csv (never copied into the project); train has the gold
`label`, GPT-3.5's round-1 `gpt35_label` (empty = no usable answer) and a `backtranslation` view.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import REPO

CLASSES = ["negative", "positive"]
DATA_DIR = REPO.parent / "shared" / "data"
CACHE_DIR = Path("/tmp/freeal-stream-cache")  # frozen-embedding cache (head mode), kept out of the repo


def label_index(column: pd.Series) -> np.ndarray:
    """Class names -> indices; empty (the LLM gave no usable answer) -> -1."""
    pos = {c: i for i, c in enumerate(CLASSES)}
    return np.array([pos.get(v, -1) for v in column], dtype=np.int64)


def add_mr_args(ap: argparse.ArgumentParser, out: Path) -> None:
    """The options every MR bench takes: where MR is, the frozen-embedding cache, the result file."""
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument(
        "--cache-dir", type=Path, default=CACHE_DIR, help="frozen-embedding cache (head mode); kept out of the repo"
    )
    ap.add_argument("--out", type=Path, default=out)


def mr_present(data_dir: Path) -> bool:
    """True when MR is there; else prints the skip message every bench uses."""
    if (data_dir / "mr" / "train.csv").exists() and (data_dir / "mr" / "test.csv").exists():
        return True
    print(
        f"skip: MR data not found under {data_dir} (expected mr/train.csv, mr/test.csv); "
        "pass --data-dir to point at it",
        file=sys.stderr,
    )
    return False


def load_mr(data_dir: Path, train_limit: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test); `train_limit` takes a stratified (by gold) subset of train, fixed random_state 0."""
    train = pd.read_csv(data_dir / "mr" / "train.csv", keep_default_na=False)
    test = pd.read_csv(data_dir / "mr" / "test.csv", keep_default_na=False)
    return stratified_subset(train, train_limit), test


def stratified_subset(rows: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """n rows with the gold label shares of `rows` (random_state 0), or all of them when n is None or too big."""
    if not n or n >= len(rows):
        return rows
    from sklearn.model_selection import train_test_split

    part, _ = train_test_split(rows, train_size=n, stratify=rows["label"], random_state=0)
    return part.reset_index(drop=True)


def views_of(train: pd.DataFrame) -> list[str | None]:
    """The back-translation column as the augmented view (None where empty: the trainer then uses noise)."""
    return [v if v else None for v in train["backtranslation"]]


def demo_pool_precision(labels: np.ndarray, gold: np.ndarray, result, clean_ratio: float, k: int, seed: int) -> dict:
    """The demo pool the loop would build from this SLM (loop.demo_pool_from calls exactly this
    `select_demo_pool` with FreeALConfig.clean_ratio / medoids_per_class) and how right its labels are."""
    from freeal_stream.demos import select_demo_pool

    pool, small_loss = select_demo_pool(labels, result.losses, result.embeddings, clean_ratio, k, seed=seed)
    right = labels == gold
    return {
        "demo_n": int(len(pool)),
        "demo_precision": float(right[pool].mean()) if len(pool) else None,
        "small_loss_n": int(len(small_loss)),
        "small_loss_precision": float(right[small_loss].mean()) if len(small_loss) else None,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def write_merged(out: Path, key: str, entry: dict) -> None:
    """Merge under `key` so one run does not erase another's results."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    data[key] = entry
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)


def plot(out_png: Path, draw: Callable, title: str, figsize: tuple[float, float] = (8, 4.5)) -> None:
    """`draw(ax)` on one Agg figure, saved to `out_png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def bar_plot(
    out_png: Path,
    names: list[str],
    means: list[float],
    stds: list[float],
    title: str,
    refs: dict[str, float] | None = None,
    ylabel: str = "MR test accuracy (%)",
) -> None:
    """Horizontal bars with std error bars; `refs` are drawn as labelled vertical lines."""

    def draw(ax):
        y = np.arange(len(names))[::-1]
        ax.barh(y, means, xerr=stds, color="#4c72b0", alpha=0.85, capsize=3)
        for yi, m, sd in zip(y, means, stds):
            ax.text(m + sd + 0.2, yi, f"{m:.2f}", va="center", fontsize=8)
        ax.set_yticks(y, names, fontsize=8)
        for i, (lab, v) in enumerate((refs or {}).items()):
            ax.axvline(v, color=f"C{i + 1}", ls="--", lw=1, label=f"{lab} ({v:.2f})")
        if refs:
            ax.legend(fontsize=7, loc="lower right")
        lo = min(list(means) + list((refs or {}).values()))
        ax.set_xlim(max(0, lo - 8), min(100, max(means) + 4))
        ax.set_xlabel(ylabel)

    plot(out_png, draw, title, figsize=(8, 0.45 * len(names) + 1.6))


def train_and_score(
    train: pd.DataFrame,
    test: pd.DataFrame,
    column: str,
    recipe,
    use_view: bool,
    cfg,
    freeal,
    seed: int,
    cache_dir: Path | None,
    tag: str,
    labels: np.ndarray | None = None,
    demo_seed: int = 1,
) -> tuple[dict, object]:
    """Train one SLM on `column` (or explicit `labels`, -1 = none) and score it: test accuracy, clean-set and
    demo-pool precision against gold. Returns (metrics, SLMResult). `demo_seed` = the loop's job.seed + round
    (job seed 0, round 1)."""
    import time

    from freeal_stream.slm.trainer import train_slm

    labels = label_index(train[column]) if labels is None else labels
    gold = label_index(train["label"])
    t0 = time.perf_counter()
    result = train_slm(
        train["text"].tolist(),
        labels,
        len(CLASSES),
        cfg,
        freeal,
        views=views_of(train) if use_view else None,
        recipe=recipe,
        seed=seed,
        cache_dir=cache_dir if cfg.mode == "head" else None,
        progress=lambda msg: print(f"  [{tag} seed {seed}] {msg}", flush=True),
    )
    train_s = time.perf_counter() - t0
    test_acc = float((result.model.predict_proba(test["text"].tolist()).argmax(1) == label_index(test["label"])).mean())
    rows = sum(h["rows"] for h in result.history)
    loop_s = sum(h["seconds"] - h["split_seconds"] for h in result.history)
    has, right = labels >= 0, labels == gold
    clean = result.clean
    m = {
        "seed": seed,
        "test_acc": test_acc,
        "train_acc_vs_gold": float((result.probs.argmax(1) == gold).mean()),
        "label_acc_on_labelled": float(right[has].mean()),
        "n_labelled": int(has.sum()),
        "n_clean": int(clean.sum()),
        # of the rows kept as clean, how many carry the gold label; and how many right labels were kept
        "clean_precision": float(right[clean].mean()) if recipe.gmm else None,
        "clean_recall": float((clean & right).sum() / max(1, (has & right).sum())) if recipe.gmm else None,
        "samples_per_s": rows / max(loop_s, 1e-9),
        "train_seconds": train_s,
        "history": result.history,
    }
    if not right[has].all():  # demo precision means something only on noisy labels
        m.update(demo_pool_precision(labels, gold, result, freeal.clean_ratio, freeal.medoids_per_class, demo_seed))
    return m, result
