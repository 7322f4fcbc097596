"""The whole FreeAL loop with the LOCAL LLM (the embedded llama.cpp server) on MR and SUBJ subsets (issue 5).

For each data set a stratified subset of the train split (the pool the loop labels; its gold column is read
only for reporting) and a stratified subset of the test split (scored by each round's SLM, never used for
any choice) are written to CSV under --work (default /tmp/benchB_loop). Then, in this order:

  1. schedule "full" (the paper's loop): a zero-shot pass of the same LLM over the pool (no demos, the
     "LLM zero-shot ICL" stage), then round 1 (self-generated demos, every text), then refinement rounds
     (only texts outside the SLM's clean sets go back to the LLM, with the SLM's demos);
  2. schedule "budgeted" (P = --fraction of the still-unannotated texts per round, random strategy) on the
     same pool, with its own state (its own demo generation).

Per round it records: the LLM's label accuracy against gold (this round's labels, and all latest LLM labels,
no-label counted as wrong and not), the SLM's accuracy on the pool and on the test subset, the labels of
record (what `export` would write) against gold, requests, prompt/completion/cached tokens (the store's
`llm_answers` table: `Store.spent`), and wall time. Results are merged into bench/results/loop_<dataset>.json
after every round (so a run cut short keeps what it finished) and plotted to bench/results/loop_<dataset>.png.

    .venv/bin/python -m bench.bench_loop --dataset mr --n-train 600
    .venv/bin/python -m bench.bench_loop --plot-only --dataset mr
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from bench.common import REPO, RESULTS

DATA_DIR = REPO.parent / "shared" / "data"

DATASETS: dict[str, dict[str, Any]] = {
    "mr": {
        "description": "Classify the sentiment of the movie review sentence: positive or negative.",
        "classes": {"negative": ["negative"], "positive": ["positive"]},
        "augmented_column": "backtranslation",  # the paper's en->fr->en view, shipped with the data
    },
    "subj": {
        "description": (
            "Classify the sentence from a movie review or plot summary as subjective (it expresses "
            "the writer's opinion, judgement or feeling) or objective (it states facts, such as "
            "what happens in the plot)."
        ),
        "classes": {"subjective": ["subjective"], "objective": ["objective"]},
        "augmented_column": None,  # no second view in the data: model-free perturbation
    },
}

# The paper's figures (docs/METHOD.md, "Reference figures"; GPT-3.5-Turbo + RoBERTa-base, full data, test accuracy).
PAPER = {
    "mr": {
        "llm_zero_shot": 90.05,
        "llm_after": 93.10,
        "slm_after": 90.20,
        "budgeted_slm_by_round": [81.20, 87.75, 88.95],
    },
    "subj": {"llm_zero_shot": 55.65, "llm_after": 90.27, "slm_after": 94.45, "budgeted_slm_by_round": None},
}


# ---- data ----------------------------------------------------------------------------------------------
def stratified(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n rows with the label shares of df (all of df when n >= len(df)), in a seeded random order."""
    if n >= len(df):
        return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    from sklearn.model_selection import train_test_split

    part, _ = train_test_split(df, train_size=n, stratify=df["label"], random_state=seed)
    return part.reset_index(drop=True)


def write_subsets(
    dataset: str, data_dir: Path, work: Path, n_train: int, n_test: int, subset_seed: int
) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    train = pd.read_csv(data_dir / dataset / "train.csv", keep_default_na=False)
    test = pd.read_csv(data_dir / dataset / "test.csv", keep_default_na=False)
    train, test = stratified(train, n_train, subset_seed), stratified(test, n_test, subset_seed)
    keep = ["id", "text", "label"] + (
        [DATASETS[dataset]["augmented_column"]] if DATASETS[dataset]["augmented_column"] else []
    )
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{dataset}_train_{len(train)}_s{subset_seed}.csv"
    train[keep].to_csv(path, index=False)
    test[["id", "text", "label"]].to_csv(work / f"{dataset}_test_{len(test)}_s{subset_seed}.csv", index=False)
    return path, train, test


def job_dict(
    dataset: str, schedule: str, data_path: Path, state_dir: Path, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    spec = DATASETS[dataset]
    data = {"path": str(data_path), "text_column": "text", "id_column": "id", "gold_column": "label"}
    if spec["augmented_column"]:
        data["augmented_column"] = spec["augmented_column"]
    freeal: dict[str, Any] = {
        "schedule": schedule,
        "rounds": args.rounds_full if schedule == "full" else args.rounds_budgeted,
    }
    if schedule == "budgeted":
        freeal["query_fraction"] = args.fraction
    return {
        "name": f"bench-loop-{dataset}-{schedule}-s{seed}",
        "data": data,
        "task": {"description": spec["description"], "classes": spec["classes"]},
        "llm": {"base_url": None, "model": "qwen2.5-coder-0.5b-instruct", "temperature": 0.0, "concurrency": 1},
        "slm": {"mode": args.slm_mode, "threads": args.threads},  # everything else: the project's defaults
        "freeal": freeal,
        "state_dir": str(state_dir),
        "seed": seed,
    }


# ---- measuring -----------------------------------------------------------------------------------------
def acc(pred: np.ndarray, gold: np.ndarray) -> float | None:
    return round(float((pred == gold).mean()), 4) if len(gold) else None


def llm_figures(labels: np.ndarray, gold: np.ndarray) -> dict[str, Any]:
    """Accuracy of LLM labels (-1 = no label): counting no-label as wrong, and on the labelled only."""
    has = labels >= 0
    return {
        "n": int(len(labels)),
        "no_label": int((~has).sum()),
        "acc": acc(labels, gold),
        "acc_on_labelled": acc(labels[has], gold[has]),
        "pred_share_by_class": [round(float((labels == c).mean()), 4) for c in range(2)] if len(labels) else None,
    }


def usage_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in after}
    d["cached_share"] = round(d["cached_tokens"] / d["prompt_tokens"], 4) if d["prompt_tokens"] else None
    return d


def zero_shot_pass(run: Any, texts: list[str], gold: np.ndarray, say: Any) -> dict[str, Any]:
    """The same LLM, the same prompt template and settings, no demonstrations, over the whole pool."""
    from freeal_stream.llm.client import ChatRequest
    from freeal_stream.llm.prompts import TEMPLATE_VERSION, annotation_messages

    ctx = run.ctx
    store = ctx.store
    reqs = [
        ChatRequest.build(
            annotation_messages(ctx.job.task.description, ctx.verbalizer, [], t), ctx.llm, TEMPLATE_VERSION
        )
        for t in texts
    ]
    before, t0 = store.spent(), time.time()
    answers = ctx.session.annotators.complete_many(
        reqs, progress=lambda d, t, _l: ctx.progress.update("zero-shot pass", d, t)
    )
    labels = np.array([-1 if (p := ctx.verbalizer.parse(a.content)) is None else p for a in answers])
    out = {
        **llm_figures(labels, gold),
        "seconds": round(time.time() - t0, 1),
        "usage": usage_delta(store.spent(), before),
    }
    say(
        f"zero-shot: acc {out['acc']} (on labelled {out['acc_on_labelled']}, no label {out['no_label']}), "
        f"{out['usage']['requests']} requests, {out['seconds']} s"
    )
    return out


def round_record(
    run: Any,
    round_: int,
    gold_by_id: dict[str, int],
    test_texts: list[str],
    test_gold: np.ndarray,
    wall: float,
    before: dict[str, int],
) -> dict[str, Any]:
    from freeal_stream.actors.scorers import ShardInput
    from freeal_stream.rounds.planning import llm_label_array
    from freeal_stream.store import LABEL_RULES

    ctx = run.ctx
    store, names = ctx.store, ctx.job.task.class_names
    m = next(r["metrics"] for r in store.rounds() if r["round"] == round_)
    ids = store.items_range(0, ctx.pool.size).ids
    gold = np.array([gold_by_id[i] for i in ids])
    llm = llm_label_array(ctx)
    at = store.positions_of(sorted(store.annotated_in_round(round_)))
    annotated = store.annotated_positions()
    t0 = time.time()
    logits: list = []
    ctx.session.scorers.score_shards(
        f"test-{round_}",
        run.latest.files,
        [(0, ShardInput(texts=test_texts))],
        lambda _s, scores: logits.append(scores.logits),
    )
    probs = logits[0]
    test_s = time.time() - t0
    rule = ctx.job.freeal.label_of_record
    by_rule = {r: store.gold_agreement(names, r) for r in LABEL_RULES}
    by_source, disputed = store.label_counts(rule)
    demos = store.demo_pool(round_)
    demo_right = [gold_by_id[d.id] == d.label for d in demos if d.id in gold_by_id]
    rec = {
        "round": round_,
        "metrics": m,
        "llm_this_round": llm_figures(llm[at], gold[at]) if len(at) else None,
        "llm_all_annotated": llm_figures(llm[annotated], gold[annotated]),
        "llm_whole_pool": llm_figures(llm, gold),  # never-annotated texts count as no label
        "annotated_total": int(len(annotated)),
        "slm_pool_acc": m.get("slm_acc"),
        "slm_test_acc": acc(probs.argmax(1), test_gold),
        "test_n": int(len(test_gold)),
        "test_scoring_s": round(test_s, 1),
        "labels_of_record_acc": round(by_rule[rule][1] / by_rule[rule][0], 4) if by_rule[rule][0] else None,
        "labels_of_record_acc_by_rule": {r: round(right / n, 4) if n else None for r, (n, right) in by_rule.items()},
        "labels_by_source": by_source,
        "llm_labels_disputed": disputed,
        "clean_precision": m.get("clean_precision"),
        "demo_pool": len(demos),
        "demo_pool_acc": round(float(np.mean(demo_right)), 4) if demo_right else None,
        "usage_in_call": usage_delta(store.spent(), before),  # demo generation included in round 1
        "usage_total": store.spent(),
        "wall_s": round(wall, 1),
    }
    rec["usage_in_call"]["requests_round_metric"] = m.get("requests_round")
    return rec


def run_schedule(
    dataset: str,
    schedule: str,
    seed: int,
    data_path: Path,
    train: pd.DataFrame,
    test: pd.DataFrame,
    args: argparse.Namespace,
    save: Any,
) -> dict[str, Any]:
    from freeal_stream.config import load_job
    from freeal_stream.intake import ingest
    from freeal_stream.loop import FreeALRun
    from freeal_stream.progress import Progress
    from freeal_stream.rounds.metrics import format_round
    from freeal_stream.session import open_session

    state = args.work / f"state_{dataset}_{schedule}_s{seed}_n{len(train)}"
    if args.fresh and state.exists():
        shutil.rmtree(state)
    raw = job_dict(dataset, schedule, data_path, state, args, seed)
    job_file = args.work / f"job_{dataset}_{schedule}_s{seed}_n{len(train)}.yaml"
    job_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    job = load_job(job_file)
    names = job.task.class_names
    gold_by_id = {str(i): names.index(g) for i, g in zip(train["id"], train["label"])}
    test_gold = np.array([names.index(g) for g in test["label"]])
    test_texts = test["text"].tolist()
    progress = Progress()
    say = lambda msg: progress.say(f"[{dataset} {schedule} seed {seed}] {msg}")
    entry: dict[str, Any] = {
        "dataset": dataset,
        "schedule": schedule,
        "seed": seed,
        "job_file": str(job_file),
        "job": raw,
        "n_pool": len(train),
        "n_test": len(test),
        "rounds": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    t_start = time.time()
    with open_session(job, progress) as session:
        ingest(job, session.store, progress)
        run = FreeALRun(session, progress)
        entry["startup_s"] = round(time.time() - t_start, 1)
        items = session.store.items_range(0, run.ctx.pool.size)
        pool_gold = np.array([gold_by_id[i] for i in items.ids])
        if schedule == "full" and not args.no_zero_shot:
            entry["zero_shot"] = zero_shot_pass(run, items.texts, pool_gold, say)
            save(entry)
        last = job.freeal.rounds
        for round_ in range(1, last + 1):
            before, t0 = session.store.spent(), time.time()
            ok = run.run_round(round_)
            if not any(r["round"] == round_ and r["phase"] == "done" for r in session.store.rounds()):
                say(f"round {round_} did not run ({'stopped' if not ok else '?'})")
                break
            rec = round_record(run, round_, gold_by_id, test_texts, test_gold, time.time() - t0, before)
            if round_ == 1:
                rec["demo_generation"] = {
                    "requests": rec["usage_in_call"]["requests"] - (rec["metrics"].get("requests_round") or 0),
                    "demos": [
                        {"text": d.text, "label": names[d.label], "source": d.source}
                        for d in session.store.demo_pool(0)
                    ],
                }
            entry["rounds"].append(rec)
            say(format_round(rec["metrics"]))
            say(
                f"round {round_}: LLM this round {rec['llm_this_round'] and rec['llm_this_round']['acc']} | "
                f"LLM all annotated {rec['llm_all_annotated']['acc']} | SLM pool {rec['slm_pool_acc']} "
                f"test {rec['slm_test_acc']} | labels of record {rec['labels_of_record_acc']} | "
                f"cached share {rec['usage_in_call']['cached_share']} | wall {rec['wall_s']} s"
            )
            save(entry)
            if not ok:
                break
        entry["usage_by_model"] = session.store.usage_by_model()
    entry["wall_s"] = round(time.time() - t_start, 1)
    entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save(entry)
    return entry


# ---- output --------------------------------------------------------------------------------------------
def write_merged(out: Path, key: str, entry: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    data[key] = entry
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def zero_shot_requests(e: dict[str, Any]) -> int:
    """Requests of the separate zero-shot pass: stored in the same state, so left out of the loop's totals."""
    return e["zero_shot"]["usage"]["requests"] if "zero_shot" in e else 0


def print_tables(dataset: str, data: dict[str, Any]) -> None:
    for key, e in data.items():
        print(f"\n{dataset} {key}: pool {e['n_pool']}, test subset {e['n_test']}, wall {e.get('wall_s', '?')} s")
        if "zero_shot" in e:
            z = e["zero_shot"]
            print(
                f"  zero-shot LLM: {pct(z['acc'])} ({pct(z['acc_on_labelled'])} on labelled, {z['no_label']} no "
                f"label), {z['usage']['requests']} requests, cached share {z['usage']['cached_share']}, "
                f"{z['seconds']} s"
            )
        print(
            "| round | to LLM | annotated | LLM acc this round | LLM acc all annotated | SLM pool | SLM test "
            "| labels of record | clean prec | requests (loop cum) | prompt tok | compl tok | cached share "
            "| wall s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in e["rounds"]:
            m, u = r["metrics"], r["usage_in_call"]
            cum = r["usage_total"]["requests"] - zero_shot_requests(e)
            print(
                f"| {r['round']} | {m['llm_requested']} | {r['annotated_total']} | "
                f"{pct(r['llm_this_round'] and r['llm_this_round']['acc'])} | {pct(r['llm_all_annotated']['acc'])} | "
                f"{pct(r['slm_pool_acc'])} | {pct(r['slm_test_acc'])} | {pct(r['labels_of_record_acc'])} | "
                f"{pct(r['clean_precision'])} | {u['requests']} ({cum}) | "
                f"{u['prompt_tokens']} | {u['completion_tokens']} | {u['cached_share']} | {r['wall_s']} |"
            )


def plot(dataset: str, data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    full = [e for k, e in data.items() if e["schedule"] == "full" and e["rounds"]]
    ax = axes[0]
    if full:
        e = full[0]
        stages, llm, slm = [], [], []
        if "zero_shot" in e:
            stages.append("zero-shot")
            llm.append(e["zero_shot"]["acc"])
            slm.append(None)
        for r in e["rounds"]:
            stages.append(f"round {r['round']}")
            llm.append(r["llm_whole_pool"]["acc"])
            slm.append(r["slm_test_acc"])
        x = np.arange(len(stages))
        ax.bar(x - 0.2, [100 * v for v in llm], 0.4, label="LLM labels (pool, no label = wrong)")
        ax.bar(x + 0.2, [100 * v if v is not None else 0 for v in slm], 0.4, label="SLM (test subset)")
        p = PAPER[dataset]
        ax.axhline(p["llm_after"], ls="--", c="C0", lw=0.8, label="paper: LLM after FreeAL (GPT-3.5)")
        ax.axhline(p["slm_after"], ls=":", c="C1", lw=0.8, label="paper: SLM after FreeAL (RoBERTa)")
        ax.axhline(p["llm_zero_shot"], ls="-.", c="C2", lw=0.8, label="paper: LLM zero-shot")
        ax.set_xticks(x, stages)
        ax.set_ylim(30, 105)
        ax.set_ylabel("accuracy %")
        ax.set_title(f"{dataset.upper()} full schedule, pool {e['n_pool']} (seed {e['seed']})")
        ax.legend(fontsize=6.5, loc="upper left", framealpha=0.85, ncol=2)
    ax = axes[1]
    for e in data.values():
        if e["schedule"] != "budgeted" or not e["rounds"]:
            continue
        req = [r["usage_total"]["requests"] - zero_shot_requests(e) for r in e["rounds"]]
        s = f" s{e['seed']}"
        ls, fill = ("-", "full") if e["seed"] == 0 else (":", "none")  # seed 0 solid, others dotted, hollow
        for key, mk, c, name in (
            ("llm_all_annotated", "o", "C0", "LLM labels so far"),
            ("labels_of_record_acc", "s", "C3", "labels of record (pool)"),
            ("slm_pool_acc", "^", "C1", "SLM (pool)"),
            ("slm_test_acc", "v", "C2", "SLM (test)"),
        ):
            ys = [100 * (r[key]["acc"] if isinstance(r[key], dict) else r[key]) for r in e["rounds"]]
            ax.plot(req, ys, marker=mk, ls=ls, c=c, fillstyle=fill, label=name + s)
        for r, q in zip(e["rounds"] if e["seed"] == 0 else [], req):
            ax.annotate(
                f"{r['annotated_total']}",
                (q, 100 * r["labels_of_record_acc"]),
                fontsize=6,
                textcoords="offset points",
                xytext=(2, 4),
            )
    if full:
        e = full[0]
        r = e["rounds"][-1]
        spent = r["usage_total"]["requests"] - zero_shot_requests(e)
        ax.scatter(
            [spent],
            [100 * r["labels_of_record_acc"]],
            marker="*",
            s=120,
            c="k",
            label="full schedule, labels of record",
        )
        ax.scatter(
            [spent], [100 * r["llm_whole_pool"]["acc"]], marker="*", s=120, c="C0", label="full schedule, LLM labels"
        )
        if "zero_shot" in e:
            ax.scatter(
                [zero_shot_requests(e)],
                [100 * e["zero_shot"]["acc"]],
                marker="X",
                s=70,
                c="C2",
                label="zero-shot pass, every text",
            )
    ax.set_xlabel("LLM requests (cumulative; demo generation in, zero-shot pass out)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(30, 105)
    ax.set_title(f"{dataset.upper()} budgeted (P = 10%/round); numbers: texts annotated")
    ax.legend(fontsize=6.5, loc="upper left", framealpha=0.85, ncol=2)
    fig.suptitle("FreeAL loop, local Qwen2.5-Coder-0.5B (llama.cpp) + MiniLM SLM; 2-core CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mr", help="mr, subj or mr,subj")
    ap.add_argument("--schedules", default="full,budgeted")
    ap.add_argument("--seeds", default="0", help="loop seeds (demo generation, training, strategy draws)")
    ap.add_argument("--subset-seed", type=int, default=0, help="which stratified subset (same for every seed)")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--rounds-full", type=int, default=2, help="LLM->SLM->LLM->SLM = 2 (the paper's loop)")
    ap.add_argument("--rounds-budgeted", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--slm-mode", default="auto", choices=["auto", "head", "finetune"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-zero-shot", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="delete this run's state first (else a rerun resumes)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--work", type=Path, default=Path("/tmp/benchB_loop"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets = args.dataset.split(",")
    for ds in datasets:
        if ds not in DATASETS:
            ap.error(f"unknown dataset {ds}; choose from {', '.join(DATASETS)}")
    if args.plot_only:
        for ds in datasets:
            out = args.results / f"loop_{ds}.json"
            data = json.loads(out.read_text(encoding="utf-8"))
            print_tables(ds, data)
            plot(ds, data, out.with_suffix(".png"))
        return 0
    missing = [ds for ds in datasets if not (args.data_dir / ds / "train.csv").exists()]
    if missing:
        print(
            f"skip: data not found for {missing} under {args.data_dir} (expected <dataset>/train.csv and "
            "test.csv); pass --data-dir to point at it",
            file=sys.stderr,
        )
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    for ds in datasets:
        data_path, train, test = write_subsets(
            ds, args.data_dir, args.work, args.n_train, args.n_test, args.subset_seed
        )
        out = args.results / f"loop_{ds}.json"
        print(
            f"{ds}: pool {len(train)} ({train['label'].value_counts().to_dict()}), test subset {len(test)}; "
            f"subsets in {args.work}; results -> {out}",
            flush=True,
        )
        for schedule in args.schedules.split(","):
            for seed in seeds:
                key = f"{schedule}-n{len(train)}-seed{seed}"

                def save(entry: dict, key: str = key, out: Path = out, ds: str = ds) -> None:
                    entry["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                    entry["subset_seed"] = args.subset_seed
                    entry["paper"] = PAPER[ds]
                    write_merged(out, key, entry)

                run_schedule(ds, schedule, seed, data_path, train, test, args, save)
                data = json.loads(out.read_text(encoding="utf-8"))
                plot(ds, data, out.with_suffix(".png"))
        print_tables(ds, json.loads(out.read_text(encoding="utf-8")))
        print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
