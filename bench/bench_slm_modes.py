"""Head vs fine-tune, robust vs plain CE, on the LLM labels of a finished job (few, noisy labels).

Reads the job's state (items, the LLM's latest label per item, gold for scoring only) and retrains the SLM
under each setting with the job's own SLM/FreeAL config, the same seed and views. It answers the question
behind `slm.mode: auto`'s `finetune_min_labels`: with a few hundred LLM labels, which mode labels best?

    .venv/bin/freeal-stream run jobs/demo.yaml      # first, once
    .venv/bin/python -m bench.bench_slm_modes jobs/demo.yaml [--settings head:6,finetune:6,finetune:15]
    .venv/bin/python -m bench.bench_slm_modes jobs/demo.yaml --settings head:6 --warmups 1,2,3 --seeds 0,1,2 \
        --out bench/results/slm_modes_demo_warmup.json      # the warm-up default on few noisy labels
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import duckdb
import numpy as np

from bench.common import REPO
from freeal_stream.config import load_job
from freeal_stream.slm.trainer import Recipe, train_slm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job")
    ap.add_argument("--settings", default="head:6,finetune:6,finetune:15", help="mode:epochs,...")
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--warmups", default="", help="freeal.warmup_epochs values to compare (default: the job's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "slm_modes_demo.json"))
    args = ap.parse_args()
    job = load_job(args.job)
    con = duckdb.connect(str(job.state_path / "freeal.duckdb"), read_only=True)
    items = con.execute("SELECT id, text, gold FROM items ORDER BY seq").fetchall()
    llm = dict(con.execute("SELECT item_id, arg_max(label, round) FROM annotations GROUP BY item_id").fetchall())
    con.close()
    names = job.task.class_names
    texts = [t for _, t, _ in items]
    gold = np.array([names.index(g) for _, _, g in items])
    labels = np.array([-1 if llm.get(i) is None else llm[i] for i, _, _ in items])
    has = labels >= 0
    print(f"{len(texts)} texts, {int(has.sum())} LLM labels, {(labels[has] == gold[has]).mean():.3f} right")
    results = []
    warmups = [int(w) for w in args.warmups.split(",")] if args.warmups else [job.freeal.warmup_epochs]
    runs = [
        (setting, w, seed, recipe)
        for setting in args.settings.split(",")
        for w in warmups
        for seed in map(int, args.seeds.split(","))
        for recipe in ("robust", "plain_ce")
        if recipe == "robust" or w == warmups[0]
    ]  # plain CE has no warm-up
    for setting, warmup, seed, recipe_name in runs:
        mode, epochs = setting.split(":")
        recipe = Recipe() if recipe_name == "robust" else Recipe.plain_ce()
        cfg = dataclasses.replace(job.slm, mode=mode, epochs=int(epochs))
        t0 = time.perf_counter()
        r = train_slm(
            texts,
            labels,
            len(names),
            cfg,
            dataclasses.replace(job.freeal, warmup_epochs=warmup),
            recipe=recipe,
            seed=seed,
            cache_dir=job.state_path / "embeddings",
        )
        pred = r.probs.argmax(1)
        row = {
            "mode": mode,
            "epochs": int(epochs),
            "recipe": recipe_name,
            "warmup_epochs": warmup,
            "seed": seed,
            "acc_all": round(float((pred == gold).mean()), 3),
            "acc_never_annotated": round(float((pred[~has] == gold[~has]).mean()), 3) if (~has).any() else None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "job": args.job,
        "n_texts": len(texts),
        "n_llm_labels": int(has.sum()),
        "llm_label_acc": round(float((labels[has] == gold[has]).mean()), 3),
        "seeds": args.seeds,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
