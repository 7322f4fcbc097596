"""The export's quality per unit of LLM spend (issue 17): what a user takes away, measured through the real CLI.

For each condition (data set, strategy, SLM mode, seed) a job YAML is written and `freeal-stream run` is
called as a subprocess, against the instant OpenAI-compatible LLM on 127.0.0.1
(`freeal_stream.testing.instant_llm`):

  * MR: it replays GPT-3.5's real labels (the `gpt35_label` column; where that is empty it answers a word
    that is no class, so the text gets no LLM label, as with the real model);
  * SUBJ: a simulated LLM of stated accuracy (`--llm-accuracy`, right on that share of texts, fixed by a
    hash of the text).

Per round, from `status --json` (the figures each round stores): the export's accuracy over the whole pool
against gold under every label-of-record rule (`--rules`; the rule is a view over the stored data, so one run
serves them all), the spend (texts sent, tokens) and the gold-free estimate of the export's accuracy; and the
round's SLM scored on the test split here (the paper's metric). The final state is exported under each rule and
checked against the last round's figures. The reference is the LLM labelling every text (MR: GPT-3.5's
labels, no answer counted wrong, 89.56%).

State lives under --work (default /tmp/bench_pool_quality), never in the repo; the frozen embeddings of the
pool are computed once per data set and copied into each new state (they depend on the texts only).
Results merge into bench/results/pool_quality_<dataset>.json after every round; a plot goes beside it.

    .venv/bin/python -m bench.bench_pool_quality --dataset mr --strategies random --modes head --rules llm \
        --rounds 3 --seeds 0      # the issue's baseline (~79.3%)
    .venv/bin/python -m bench.bench_pool_quality --plot-only --dataset mr
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from bench.common import REPO, RESULTS, data_dir, result_meta
from bench.mr_data import plot, write_merged

PYTHON = sys.executable
NO_ANSWER = "unsure"  # what the replayed LLM says where GPT-3.5 gave no usable answer: no class word
ENV = {
    "RAY_AUTH_MODE": "disabled",
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

DATASETS: dict[str, dict[str, Any]] = {
    "mr": {
        "description": "Classify the sentiment of the movie review sentence: positive or negative.",
        "classes": {"negative": ["negative"], "positive": ["positive"]},
        "augmented_column": "backtranslation",
        "llm_column": "gpt35_label",
    },
    "subj": {
        "description": (
            "Classify the sentence from a movie review or plot summary as subjective (it expresses "
            "the writer's opinion, judgement or feeling) or objective (it states facts, such as "
            "what happens in the plot)."
        ),
        "classes": {"subjective": ["subjective"], "objective": ["objective"]},
        "augmented_column": None,
        "llm_column": None,
    },
}


# ---- the data and the LLM -------------------------------------------------------------------------------
def prepare(
    dataset: str, data_dir: Path, work: Path, accuracy: float
) -> tuple[Path, Path, pd.DataFrame, pd.DataFrame, float]:
    """(pool CSV, answer table, train, test, the LLM-everywhere accuracy): the pool carries its gold column
    (read by the loop only for reporting); the table is what the instant LLM answers."""
    spec = DATASETS[dataset]
    train = pd.read_csv(data_dir / dataset / "train.csv", keep_default_na=False)
    test = pd.read_csv(data_dir / dataset / "test.csv", keep_default_na=False)
    work.mkdir(parents=True, exist_ok=True)
    cols = ["id", "text", "label"] + ([spec["augmented_column"]] if spec["augmented_column"] else [])
    pool = work / f"{dataset}_pool.csv"
    train[cols].to_csv(pool, index=False)
    table = work / f"{dataset}_answers.jsonl"
    answers = train[spec["llm_column"]] if spec["llm_column"] else train["label"]
    with open(table, "w", encoding="utf-8") as f:
        for text, label in zip(train["text"], answers):
            f.write(json.dumps({"text": text, "label": label or NO_ANSWER}) + "\n")
    return pool, table, train, test, llm_everywhere(dataset, train, accuracy)


def llm_everywhere(dataset: str, train: pd.DataFrame, accuracy: float) -> float:
    """The reference: the LLM's own label on every text, no answer counted wrong."""
    if DATASETS[dataset]["llm_column"]:
        return float((train[DATASETS[dataset]["llm_column"]] == train["label"]).mean())
    from freeal_stream.testing.instant_llm import InstantLLM

    llm = InstantLLM(dict(zip(train["text"], train["label"])), accuracy)
    words = ", ".join(DATASETS[dataset]["classes"])
    system = f"Answer with exactly one of these words: {words}. Reply"
    said = [llm._label(f"<text>\n{t}\n</text>", system) for t in train["text"]]
    return float(np.mean([s == g for s, g in zip(said, train["label"])]))


class InstantServer:
    """The instant LLM as a separate process on 127.0.0.1; its URL once it listens."""

    def __init__(self, table: Path, accuracy: float, log: Path, port: int):
        cmd = [PYTHON, "-m", "freeal_stream.testing.instant_llm", "--table", str(table), "--port", str(port)]
        if accuracy < 1.0:
            cmd += ["--accuracy", str(accuracy)]
        self.log = open(log, "w", encoding="utf-8")  # noqa: SIM115 (open while the server runs)
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **ENV, "PYTHONPATH": str(REPO)},
        )
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(f"the instant LLM did not start (see {log}): {line!r}")
        self.url = line.split("listening on ")[1].strip()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


# ---- one condition ---------------------------------------------------------------------------------------
def job_dict(
    dataset: str,
    pool: Path,
    state: Path,
    url: str,
    cond: dict[str, Any],
    rounds: int,
    rule: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    spec = DATASETS[dataset]
    data = {"path": str(pool), "text_column": "text", "id_column": "id", "gold_column": "label"}
    if spec["augmented_column"]:
        data["augmented_column"] = spec["augmented_column"]
    freeal: dict[str, Any] = {
        "schedule": "budgeted",
        "rounds": rounds,
        "query_fraction": args.fraction,
        "label_of_record": rule,
    }
    freeal.update(cond.get("freeal", {}))
    return {
        "name": f"pq-{cond['key']}",
        "data": data,
        "task": {"description": spec["description"], "classes": spec["classes"]},
        "llm": {"base_url": url, "model": "instant", "concurrency": 8},
        "slm": {"mode": cond["mode"], "threads": args.threads, **cond.get("slm", {})},
        "freeal": freeal,
        "strategy": {"name": cond["strategy"]},
        "ray": {"annotators": 1},
        "state_dir": str(state),
        "seed": cond["seed"],
    }


def cli(args_: list[str], log: Path) -> str:
    """Run `freeal-stream ARGS` as a subprocess (output appended to `log`); its stdout."""
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        ["nice", "-n", "10", PYTHON, "-m", "freeal_stream.cli", *args_],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ freeal-stream {' '.join(args_)}\n{out.stdout}{out.stderr}\n")
    if out.returncode != 0:
        raise SystemExit(f"freeal-stream {args_[0]} failed ({out.returncode}); see {log}:\n{out.stderr[-2000:]}")
    return out.stdout


def seed_embeddings(cache: Path, state: Path) -> None:
    """Copy the pool's frozen embeddings (texts and views; they depend on the texts only) into a new state."""
    if cache.exists():
        (state / "arrays").mkdir(parents=True, exist_ok=True)
        for f in cache.iterdir():
            shutil.copy(f, state / "arrays" / f.name)


def keep_embeddings(cache: Path, state: Path) -> None:
    if not cache.exists() and (state / "arrays").exists():
        cache.mkdir(parents=True)
        for f in (state / "arrays").iterdir():
            if f.name.startswith(("frozen-", "views-")):
                shutil.copy(f, cache / f.name)


def test_accuracy(model_dir: Path, test: pd.DataFrame, classes: list[str], cache_dir: Path) -> float:
    """The round's SLM on the test split (the paper's metric), scored in this process."""
    from freeal_stream.slm.model import SLM

    model = SLM.load(model_dir, cache_dir=cache_dir)
    pred = model.predict_proba(test["text"].tolist()).argmax(1)
    return float((pred == np.array([classes.index(g) for g in test["label"]])).mean())


def shared_errors(state: Path, classes: list[str]) -> dict[str, Any]:
    """How often the LLM is wrong where the SLM is wrong, and where it is right, on texts the SLM had not trained on:
    each text first labelled in round r >= 2, judged by round r-1's SLM (its prediction then was out of sample).
    Under independent errors the two rates are equal; the gold-free estimate assumes they are."""
    import duckdb

    con = duckdb.connect(str(state / "freeal.duckdb"), read_only=True)
    try:
        rows = con.execute(
            """
            WITH first AS (SELECT item_id, min(round) AS round FROM annotations GROUP BY item_id)
            SELECT list_position(?, i.gold) - 1, a.label, s.pred
            FROM first f JOIN annotations a ON a.item_id = f.item_id AND a.round = f.round
            JOIN slm_scores s ON s.item_id = f.item_id AND s.round = f.round - 1
            JOIN items i ON i.id = f.item_id
            WHERE f.round >= 2 AND a.label IS NOT NULL AND i.gold IS NOT NULL""",
            [classes],
        ).fetchall()
    finally:
        con.close()
    gold, llm, slm = (np.array(c) for c in zip(*rows)) if rows else (np.zeros(0),) * 3
    slm_wrong, llm_wrong = slm != gold, llm != gold
    return {
        "texts": len(rows),
        "slm_wrong": round(float(slm_wrong.mean()), 4),
        "llm_wrong": round(float(llm_wrong.mean()), 4),
        "llm_wrong_where_slm_wrong": round(float(llm_wrong[slm_wrong].mean()), 4),
        "llm_wrong_where_slm_right": round(float(llm_wrong[~slm_wrong].mean()), 4),
        "agreement": round(float((llm == slm).mean()), 4),
    }


def run_condition(
    dataset: str,
    cond: dict[str, Any],
    pool: Path,
    train: pd.DataFrame,
    test: pd.DataFrame,
    url: str,
    args: argparse.Namespace,
    save,
) -> dict[str, Any]:
    """One `run` of all the condition's rounds (a rerun resumes), then the per-round figures the loop stored
    (the export's accuracy under each rule, computed by the store's own label-of-record query; the estimate;
    the spend), the test accuracy of each round's model, and one `export` per rule of the final state, checked
    against the last round's figure (the two must agree: the export is what the figures describe)."""
    state = args.work / f"state_{cond['key']}"
    if args.fresh and state.exists():
        shutil.rmtree(state)
    emb_cache = args.work / f"emb_{dataset}"
    seed_embeddings(emb_cache, state)
    log = args.work / f"{cond['key']}.log"
    classes = list(DATASETS[dataset]["classes"])
    gold = dict(zip(train["id"].astype(str), train["label"]))
    job = args.work / f"job_{cond['key']}.yaml"
    job.write_text(
        yaml.safe_dump(job_dict(dataset, pool, state, url, cond, args.rounds, args.rules[0], args), sort_keys=False),
        encoding="utf-8",
    )
    t0 = time.time()
    cli(["run", str(job)], log)
    wall = time.time() - t0
    keep_embeddings(emb_cache, state)
    status = json.loads(cli(["status", "--json", str(job)], log))
    entry: dict[str, Any] = {
        **{k: v for k, v in cond.items() if k != "key"},
        "dataset": dataset,
        "pool": len(train),
        "wall_s": round(wall, 1),
        "rounds": [],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for r in status["rounds"]:
        if r["phase"] != "done":
            continue
        m = r["metrics"]
        t1 = time.time()
        test_acc = test_accuracy(state / "models" / f"round-{r['round']}", test, classes, args.work / "test_emb_cache")
        rec = {
            "round": r["round"],
            "sent_share": round(m["sent_total"] / m["pool"], 4),
            "requests": m["requests_total"],
            "tokens": m["prompt_tokens_total"] + m["completion_tokens_total"],
            "export_acc": {rule: m["export_acc_by_rule"][rule] for rule in args.rules},
            "estimate": m.get("estimate"),
            "estimate_rule": args.rules[0],
            "slm_test_acc": round(test_acc, 4),
            "test_scoring_s": round(time.time() - t1, 1),
            "seconds": m["seconds"],
            "metrics": m,
        }
        entry["rounds"].append(rec)
        est = rec["estimate"]
        est_txt = (
            f" | estimate {100 * est['accuracy']:.1f} [{100 * est['low']:.1f}, {100 * est['high']:.1f}]" if est else ""
        )
        print(
            f"  [{cond['key']}] round {rec['round']}: sent {100 * rec['sent_share']:.1f}% ({rec['requests']} req, "
            f"{rec['tokens']} tok) | export "
            + ", ".join(f"{k} {100 * a:.2f}" for k, a in rec["export_acc"].items())
            + f"{est_txt} | SLM pool {100 * (m.get('slm_acc') or 0):.1f} test {100 * test_acc:.1f} | "
            f"{m['seconds']:.0f} s",
            flush=True,
        )
    for rule in args.rules:
        rjob = args.work / f"job_{cond['key']}_{rule}.yaml"
        rjob.write_text(
            yaml.safe_dump(job_dict(dataset, pool, state, url, cond, args.rounds, rule, args), sort_keys=False),
            encoding="utf-8",
        )
        out = args.work / f"export_{cond['key']}_{rule}.csv"
        cli(["export", str(rjob), str(out)], log)
        labels = pd.read_csv(out, keep_default_na=False, dtype={"id": str})
        acc = float(np.mean([gold[i] == lab for i, lab in zip(labels["id"], labels["label"])]))
        if entry["rounds"] and abs(acc - entry["rounds"][-1]["export_acc"][rule]) > 1e-4:
            raise SystemExit(
                f"{cond['key']}: the export under '{rule}' is {acc:.4f} right, the last round's figure "
                f"says {entry['rounds'][-1]['export_acc'][rule]:.4f}"
            )
    entry["shared_errors"] = shared_errors(state, classes)
    print(f"  [{cond['key']}] errors on texts the SLM had not trained on: {entry['shared_errors']}", flush=True)
    save(entry)
    return entry


# ---- output ----------------------------------------------------------------------------------------------
def condition_name(e: dict[str, Any]) -> str:
    extra = "".join(f" {k}={v}" for k, v in sorted({**e.get("freeal", {}), **e.get("slm", {})}.items()))
    return f"{e['strategy']}, {e['mode']}{e.get('tag', '')}{extra}"


def summarise(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per condition, rule and round: means and sample std over seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, e in data.items():
        if key.startswith("_"):
            continue
        groups.setdefault(condition_name(e), []).append(e)
    rows = []
    for name, runs in groups.items():
        n_rounds = min(len(r["rounds"]) for r in runs)
        for k in range(n_rounds):
            recs = [r["rounds"][k] for r in runs]
            for rule in recs[0]["export_acc"]:
                acc = np.array([r["export_acc"][rule] for r in recs])
                est = [
                    (r["estimate"], r["export_acc"][rule])
                    for r in recs
                    if r.get("estimate") and r.get("estimate_rule") == rule
                ]
                err = np.array([e["accuracy"] - truth for e, truth in est])
                rows.append(
                    {
                        "condition": name,
                        "rule": rule,
                        "round": k + 1,
                        "seeds": len(recs),
                        "sent_share": float(np.mean([r["sent_share"] for r in recs])),
                        "tokens": float(np.mean([r["tokens"] for r in recs])),
                        "export_acc": float(acc.mean()),
                        "export_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                        "slm_test_acc": float(np.mean([r["slm_test_acc"] for r in recs])),
                        "slm_pool_acc": float(np.mean([r["metrics"].get("slm_acc") or np.nan for r in recs])),
                        "estimate": float(np.mean([e["accuracy"] for e, _ in est])) if est else None,
                        "estimate_err": float(err.mean()) if est else None,
                        "estimate_max_abs_err": float(np.abs(err).max()) if est else None,
                        "interval_covers": (
                            f"{sum(e['low'] <= t <= e['high'] for e, t in est)}/{len(est)}" if est else None
                        ),
                    }
                )
    return rows


def print_table(rows: list[dict[str, Any]], reference: float) -> None:
    print(f"\nLLM labels everything: {100 * reference:.2f}%")
    print(
        "| condition | rule | round | seeds | texts sent | tokens | export acc | vs LLM-everywhere | estimate "
        "(mean err, max abs err, interval covers) | SLM pool | SLM test |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        est = (
            "-"
            if r["estimate"] is None
            else (
                f"{100 * r['estimate']:.2f} ({100 * r['estimate_err']:+.2f}, "
                f"{100 * r['estimate_max_abs_err']:.2f}, {r['interval_covers']})"
            )
        )
        print(
            f"| {r['condition']} | {r['rule']} | {r['round']} | {r['seeds']} | {100 * r['sent_share']:.1f}% | "
            f"{r['tokens']:,.0f} | {100 * r['export_acc']:.2f} ± {100 * r['export_std']:.2f} | "
            f"{100 * (r['export_acc'] - reference):+.2f} | {est} | {100 * r['slm_pool_acc']:.1f} | "
            f"{100 * r['slm_test_acc']:.1f} |"
        )


def plot_curves(rows: list[dict[str, Any]], reference: float, out: Path, title: str) -> None:
    def draw(ax):
        lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            lines.setdefault((r["condition"], r["rule"]), []).append(r)
        for k, ((cond, rule), pts) in enumerate(sorted(lines.items())):
            x = [100 * p["sent_share"] for p in pts]
            y = [100 * p["export_acc"] for p in pts]
            ax.errorbar(
                x,
                y,
                yerr=[100 * p["export_std"] for p in pts],
                marker="o",
                ms=3,
                capsize=2,
                color=f"C{k % 10}",
                label=f"{cond}; label of record: {rule}",
            )
            est = [(100 * p["sent_share"], 100 * p["estimate"]) for p in pts if p["estimate"] is not None]
            if est:
                ax.plot(
                    *zip(*est),
                    ls=":",
                    marker="x",
                    ms=4,
                    color=f"C{k % 10}",
                    label=f"{cond}: gold-free estimate ({rule})",
                )
        ax.axhline(100 * reference, color="k", ls="--", lw=1, label=f"LLM labels everything ({100 * reference:.2f})")
        ax.set_xlabel("texts sent to the LLM (% of the pool)")
        ax.set_ylabel("export accuracy over the whole pool (%)")
        ax.legend(fontsize=6.5, loc="lower right")

    plot(out, draw, title, figsize=(9, 5.5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mr", choices=sorted(DATASETS))
    ap.add_argument("--strategies", default="random")
    ap.add_argument("--modes", default="head", help="SLM modes: head, finetune, auto")
    ap.add_argument("--rules", default="llm", help="label-of-record rules to export under (first: the job's)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.1, help="P: share of the unannotated texts per round")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra job settings for every condition (YAML values), e.g. freeal.target_accuracy=0.9",
    )
    ap.add_argument("--tag", default="", help="suffix of the condition keys (separate state for a variant)")
    ap.add_argument("--llm-accuracy", type=float, default=0.9, help="the simulated LLM's accuracy (SUBJ)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="delete each condition's state first (else resume)")
    ap.add_argument(
        "--port",
        type=int,
        default=18917,
        help="the instant LLM's port on 127.0.0.1: fixed, as a state resumes only with the same base_url",
    )
    ap.add_argument("--data-dir", type=Path, default=None, help="default: $FREEAL_DATA_DIR or ../shared/data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_pool_quality"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    args.rules = args.rules.split(",")
    out = args.out or RESULTS / f"pool_quality_{args.dataset}.json"
    if args.plot_only:
        data = json.loads(out.read_text(encoding="utf-8"))
        rows = summarise(data)
        print_table(rows, data["_reference"]["llm_everywhere"])
        plot_curves(rows, data["_reference"]["llm_everywhere"], out.with_suffix(".png"), data["_reference"]["title"])
        return 0
    args.data_dir = data_dir(args.data_dir)
    if not (args.data_dir / args.dataset / "train.csv").exists():
        print(
            f"skip: {args.dataset} not found under {args.data_dir} (expected {args.dataset}/train.csv, test.csv); "
            "pass --data-dir to point at it",
            file=sys.stderr,
        )
        return 0
    extra: dict[str, dict[str, Any]] = {}
    for s in args.set:
        key, _, value = s.partition("=")
        section, _, name = key.partition(".")
        extra.setdefault(section, {})[name] = yaml.safe_load(value)
    pool, table, train, test, reference = prepare(args.dataset, args.data_dir, args.work, args.llm_accuracy)
    llm = (
        "GPT-3.5's real labels replayed"
        if DATASETS[args.dataset]["llm_column"]
        else f"a simulated LLM {args.llm_accuracy:.0%} right"
    )
    title = (
        f"{args.dataset.upper()} ({len(train):,} texts): export accuracy vs LLM spend; {llm}; "
        f"P = {args.fraction:.0%} a round"
    )
    write_merged(
        out, "_reference", {"llm_everywhere": reference, "title": title, "llm": llm, **result_meta(vars(args))}
    )
    print(
        f"{args.dataset}: pool {len(train)}, LLM everywhere {100 * reference:.2f}%; work {args.work}; -> {out}",
        flush=True,
    )
    server = InstantServer(
        table,
        1.0 if DATASETS[args.dataset]["llm_column"] else args.llm_accuracy,
        args.work / f"instant_llm_{args.dataset}.log",
        args.port,
    )
    try:
        for strategy in args.strategies.split(","):
            for mode in args.modes.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    key = f"{args.dataset}-{strategy}-{mode}-p{round(100 * args.fraction)}{args.tag}-s{seed}"
                    cond = {
                        "key": key,
                        "strategy": strategy,
                        "mode": mode,
                        "seed": seed,
                        "fraction": args.fraction,
                        **({"tag": args.tag} if args.tag else {}),
                        **{k: v for k, v in extra.items() if k in ("freeal", "slm")},
                    }

                    def save(entry: dict, key: str = key) -> None:
                        write_merged(out, key, {**entry, "when": time.strftime("%Y-%m-%dT%H:%M:%S")})

                    run_condition(args.dataset, cond, pool, train, test, server.url, args, save)
    finally:
        server.close()
    data = json.loads(out.read_text(encoding="utf-8"))
    rows = summarise(data)
    print_table(rows, reference)
    plot_curves(rows, reference, out.with_suffix(".png"), title)
    print(f"-> {out}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
