"""The embedded LLMs on MR and SUBJ, zero-shot: today's plain answers against constrained, calibrated ones (issue 20).

Both local models are served at once (one llama.cpp child each) and every text is asked of each in turn, so
load from anything else on the machine falls on both alike. Per model and text, two requests back to back:

  - "plain": the annotation prompt as a hosted endpoint gets it (no grammar, top 5 logprobs), the label
    parsed from the answer's words: what the embedded server did before;
  - "constrained": the same prompt through `llm/calibration.py` as the embedded server now sends it (a
    GBNF grammar allowing only the class words, top 20 logprobs), read four ways from that one answer:
    the word answered, the argmax of the class logprobs (what the loop now does), that argmax calibrated
    by the prompt's content-free prior (`llm.calibrate: true`), and by a prior fitted on all the answers (a
    reference: the mean class probabilities of the whole subset, which the loop does not compute).

The second request repeats the first's prompt, so llama.cpp serves it from its prefix cache: its latency is
not a labelling rate. "s/label" is the plain request's (a full prompt), so the two models compare like for like.
Gold comes from the data (../shared/data, or --data-dir), a stratified subset of the train split.

    RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. nice -n 10 .venv/bin/python \
        python -m bench.bench_local_llm --n 100 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.bench_loop import DATASETS, stratified
from bench.common import REPO, RESULTS
from freeal_stream.config import LLMConfig
from freeal_stream.llm import calibration
from freeal_stream.llm.client import ChatAnswer, LLMClient
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.local_llm import LocalLLMServer

MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")


def figures(labels: np.ndarray, gold: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy (no label counts as wrong), each class's share of the answers, and the no-label count."""
    return {
        "acc": round(float((labels == gold).mean()), 4),
        "share": [round(float((labels == c).mean()), 3) for c in range(n_classes)],
        "no_label": int((labels < 0).sum()),
    }


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return round(float(wins / (len(pos) * len(neg))), 4)


def evaluate(
    verbalizer: Verbalizer,
    gold: np.ndarray,
    plain: list[ChatAnswer],
    constrained: list[ChatAnswer],
    prior: np.ndarray | None,
) -> dict[str, Any]:
    c = len(verbalizer)
    probs = [verbalizer.probs_from_logprobs(a.top_logprobs) for a in constrained]
    has = np.array([p is not None for p in probs])
    p = np.array([q if q is not None else np.full(c, 1.0 / c) for q in probs])
    batch = np.maximum(p[has].mean(0), calibration.PRIOR_FLOOR) if has.any() else None

    def label(parsed: int | None) -> int:
        return -1 if parsed is None else parsed

    out = {
        "plain": figures(np.array([label(verbalizer.parse(a.content)) for a in plain]), gold, c),
        "constrained_word": figures(np.array([label(verbalizer.parse(a.content)) for a in constrained]), gold, c),
        "class_logprobs": figures(
            np.array([label(calibration.read(verbalizer, a).label) for a in constrained]), gold, c
        ),
        "calibrated_content_free": figures(
            np.array([label(calibration.read(verbalizer, a, prior).label) for a in constrained]), gold, c
        ),
        "calibrated_batch_prior": figures(
            np.array([label(calibration.read(verbalizer, a, batch / batch.sum()).label) for a in constrained]), gold, c
        )
        if batch is not None
        else None,
        "content_free_prior": None if prior is None else [round(float(x), 4) for x in prior],
        "class_logprobs_found": int(has.sum()),
        "s_per_label_plain": round(float(np.mean([a.latency_s for a in plain])), 3),
    }
    if c == 2:
        out["auc_class1"] = auc(p[:, 1], gold == 1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    servers = {m: LocalLLMServer(m, threads=args.threads) for m in args.models}
    results: dict[str, Any] = {
        "n_per_dataset": args.n,
        "subset_seed": args.seed,
        "models": list(args.models),
        "loadavg_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "datasets": {},
    }
    try:
        for srv in servers.values():
            t = time.perf_counter()
            srv.start()
            print(f"{srv.model} up in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for ds in args.datasets:
            spec = DATASETS[ds]
            rows = stratified(pd.read_csv(args.data_dir / ds / "train.csv", keep_default_na=False), args.n, args.seed)
            verbalizer = Verbalizer(spec["classes"])
            gold = np.array([verbalizer.names.index(g) for g in rows["label"]])
            task = spec["description"]
            clients, plain_cfg, new_cfg = {}, {}, {}
            for m, srv in servers.items():
                plain_cfg[m] = LLMConfig(base_url=srv.base_url, model=m, top_logprobs=5)  # a hosted endpoint's
                new_cfg[m] = LLMConfig(model=m)  # the embedded server's
                clients[m] = LLMClient(new_cfg[m], srv.base_url, None)
            priors = {
                m: calibration.prior(
                    verbalizer,
                    clients[m].complete_many(
                        calibration.calibration_requests(
                            dataclasses.replace(new_cfg[m], calibrate=True), task, verbalizer, []
                        )
                    ),
                )
                for m in servers
            }
            plain: dict[str, list[ChatAnswer]] = {m: [] for m in servers}
            constrained: dict[str, list[ChatAnswer]] = {m: [] for m in servers}
            t0 = time.time()
            for i, text in enumerate(rows["text"]):
                for m in servers:  # interleaved: the same moment's load on both models
                    plain[m] += clients[m].complete_many(
                        [calibration.annotation_request(plain_cfg[m], task, verbalizer, [], text)]
                    )
                    constrained[m] += clients[m].complete_many(
                        [calibration.annotation_request(new_cfg[m], task, verbalizer, [], text)]
                    )
                if (i + 1) % 10 == 0:
                    print(f"{ds}: {i + 1}/{len(rows)} texts, {time.time() - t0:.0f} s", file=sys.stderr)
            results["datasets"][ds] = {
                m: evaluate(verbalizer, gold, plain[m], constrained[m], priors[m]) for m in servers
            }
            results["datasets"][ds]["wall_s"] = round(time.time() - t0, 1)
            args.out.write_text(json.dumps(results, indent=1))
    finally:
        for srv in servers.values():
            srv.stop()
    results["loadavg_after"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--datasets", default="mr,subj")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n", type=int, default=100, help="texts per data set (stratified by gold)")
    ap.add_argument("--seed", type=int, default=0, help="subset seed")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads per server (0 = all cores)")
    ap.add_argument("--out", type=Path, default=RESULTS / "local_llm.json")
    args = ap.parse_args()
    args.datasets = args.datasets.split(",")
    args.models = tuple(args.models.split(","))
    missing = [ds for ds in args.datasets if not (args.data_dir / ds / "train.csv").exists()]
    if missing:
        print(
            f"skip: data not found for {missing} under {args.data_dir} (expected <dataset>/train.csv); pass --data-dir",
            file=sys.stderr,
        )
        return
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
