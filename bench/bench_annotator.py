"""Annotator throughput against the embedded llama.cpp server: per-query demos vs prefix-shared groups.

Each configuration gets a freshly started server (no prompt cache carried over) and labels the same
queries through the project's own path: class-balanced retrieval, query grouping, prefix-ordered prompts,
LLMClient. Demos are gold-labelled texts from the demo data (a fixed pool, so only the grouping differs);
accuracy against gold is printed because grouping trades retrieval precision for cache hits.

    .venv/bin/python -m bench.bench_annotator [--queries 48] [--groups 1,8,16] [--out bench/results/annotator.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np

from bench.common import REPO
from freeal_stream.config import LLMConfig
from freeal_stream.demos import group_queries, retrieve_for_groups
from freeal_stream.llm.client import ChatRequest, LLMClient
from freeal_stream.llm.prompts import TEMPLATE_VERSION, annotation_messages
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.local_llm import LocalLLMServer
from freeal_stream.slm.encoder import Encoder

TASK = "Classify the customer support message by its main topic: billing, technical, shipping or account."


def load(n_demo_per_class: int, n_queries: int, seed: int) -> tuple[list, list, Verbalizer]:
    with open(REPO / "jobs" / "data" / "support_tickets.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    verb = Verbalizer({c: [c] for c in ("billing", "technical", "shipping", "account")})
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    demos, taken = [], {c: 0 for c in verb.names}
    rest = []
    for r in rows:
        if taken[r["label"]] < n_demo_per_class:
            taken[r["label"]] += 1
            demos.append((r["text"], verb.names.index(r["label"])))
        else:
            rest.append((r["text"], verb.names.index(r["label"])))
    return demos, rest[:n_queries], verb


def run_config(group: int, demos, queries, verb, demo_emb, query_emb, m: int, model: str) -> dict:
    with LocalLLMServer(model=model) as server:
        cfg = LLMConfig(model=server.model_name, max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=5)
        client = LLMClient(cfg, server.base_url, None)
        groups = group_queries(query_emb, demo_emb, group)
        lists = retrieve_for_groups(query_emb, groups, demo_emb, np.array([d[1] for d in demos]), m, len(verb))
        plan = [
            (
                q,
                ChatRequest.build(
                    annotation_messages(TASK, verb, [demos[d] for d in dl], queries[q][0]), cfg, TEMPLATE_VERSION
                ),
            )
            for g, dl in zip(groups, lists)
            for q in g
        ]
        start = time.perf_counter()
        answers = client.complete_many([r for _, r in plan])
        seconds = time.perf_counter() - start
    right = sum(verb.parse(a.content) == queries[q][1] for (q, _), a in zip(plan, answers))
    prompt = sum(a.prompt_tokens for a in answers)
    cached = sum(a.cached_tokens for a in answers)
    return {
        "demo_group_size": group,
        "queries": len(plan),
        "seconds": round(seconds, 1),
        "labels_per_s": round(len(plan) / seconds, 3),
        "accuracy": round(right / len(plan), 3),
        "prompt_tokens": prompt,
        "cached_share": round(cached / prompt, 3) if prompt else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=48)
    ap.add_argument("--groups", default="1,8,16")
    ap.add_argument("--demos-per-class", type=int, default=12)
    ap.add_argument("--m", type=int, default=8, help="demos per prompt")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "annotator.json"))
    args = ap.parse_args()
    demos, queries, verb = load(args.demos_per_class, args.queries, args.seed)
    enc = Encoder("all-MiniLM-L6-v2", max_length=64)
    demo_emb, query_emb = enc.embed([d[0] for d in demos]), enc.embed([q[0] for q in queries])
    results = [
        run_config(int(g), demos, queries, verb, demo_emb, query_emb, args.m, args.model)
        for g in args.groups.split(",")
    ]
    base = results[0]["labels_per_s"]
    for r in results:
        r["speedup_vs_first"] = round(r["labels_per_s"] / base, 2)
        print(json.dumps(r))
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.node()} {platform.machine()}",
        "model": args.model,
        "m": args.m,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
