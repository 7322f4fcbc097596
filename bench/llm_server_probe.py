"""Probe the embedded llama.cpp server: startup (incl. first-time join), cold vs prefix-cached latency, usage fields.

Run on a quiet machine, one probe at a time:
    .venv/bin/python -m bench.llm_server_probe [--model qwen2.5-coder-0.5b-instruct] [--n 5]
A fresh temp cache dir is used (unless --cache-dir) so the first model_file() call measures the real join+sha256;
it is deleted afterwards.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time
import urllib.request

from openai import OpenAI

from freeal_stream.local_llm import LocalLLMServer, model_file

REVIEWS = [
    ("A moving story with wonderful performances; I left the theatre smiling.", "positive"),
    ("The plot was thin, the jokes fell flat and I checked my watch twice.", "negative"),
    ("Gorgeous photography and a score that lingers long after the credits.", "positive"),
    ("Two hours of my life I will never get back. Avoid.", "negative"),
    ("The cast has real chemistry and the script is sharp and funny.", "positive"),
    ("Clumsy editing and wooden acting sink an otherwise decent idea.", "negative"),
    ("A clever, tender film that trusts its audience.", "positive"),
    ("Loud, long and utterly forgettable; the sequel nobody asked for.", "negative"),
    ("Every scene feels alive; the director is at the top of her game.", "positive"),
    ("Predictable from the first minute and painfully slow to get there.", "negative"),
]


def build_messages(nonce: str, query: str, n_demos: int) -> list[dict]:
    """FreeAL-style prompt: instructions + demonstrations (the shared prefix) + one text to label."""
    demos = "\n\n".join(
        f"Example {i + 1}:\nReview: {REVIEWS[i % len(REVIEWS)][0]} (variant {i // len(REVIEWS)})\n"
        f"Answer: {REVIEWS[i % len(REVIEWS)][1]}"
        for i in range(n_demos)
    )
    system = (
        f"{nonce}You are an expert annotator for sentiment analysis of movie reviews. Read the review and "
        "answer with exactly one word, either 'positive' or 'negative', with no explanation. Consider the "
        "overall opinion of the writer, not individual words; sarcasm counts as negative.\n\n" + demos
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Review: {query}\nAnswer:"}]


def one(client: OpenAI, model: str, messages: list[dict]) -> dict:
    t = time.perf_counter()
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=5
    )
    dt = time.perf_counter() - t
    extra = r.model_extra or {}
    details = r.usage.prompt_tokens_details
    return {
        "s": round(dt, 3),
        "prompt_tokens": r.usage.prompt_tokens,
        "cached_tokens": getattr(details, "cached_tokens", None),
        "timings": {k: extra.get("timings", {}).get(k) for k in ("cache_n", "prompt_n", "prompt_ms")},
        "answer": r.choices[0].message.content,
    }


def summary(rows: list[dict]) -> dict:
    s = [r["s"] for r in rows]
    return {"median_s": round(statistics.median(s), 3), "min_s": min(s), "max_s": max(s), "requests": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--demos", type=int, default=16, help="demonstrations in the prompt (~600 tokens at 16)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cache-dir", help="model cache (default: a fresh temp dir, so the join is measured)")
    args = ap.parse_args()

    cache = args.cache_dir or tempfile.mkdtemp(prefix="freeal-probe-cache-")
    os.environ["FREEAL_MODEL_CACHE"] = cache  # the server child inherits it
    out: dict = {"model": args.model, "cpus": len(os.sched_getaffinity(0)), "loadavg_before": os.getloadavg()}

    t = time.perf_counter()
    model_file(args.model)
    out["model_file_first_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    model_file(args.model)
    out["model_file_reuse_s"] = round(time.perf_counter() - t, 4)

    srv = LocalLLMServer(args.model, threads=args.threads)
    t = time.perf_counter()
    with srv:
        out["server_start_s"] = round(time.perf_counter() - t, 2)
        out["threads"] = srv.threads
        client = OpenAI(base_url=srv.base_url, api_key="unused", timeout=300, max_retries=0)
        queries = [r[0] for r in REVIEWS]
        # cold: a unique nonce at the very start of the prompt -> no reusable prefix in the slot
        cold = [
            one(client, srv.model_name, build_messages(f"[run {i} {time.time_ns()}] ", queries[i], args.demos))
            for i in range(args.n)
        ]
        # prefix-shared: identical system+demos, only the final user message differs
        shared_prefix = f"[shared {time.time_ns()}] "
        one(client, srv.model_name, build_messages(shared_prefix, "Fine.", args.demos))  # prime the slot
        warm = [
            one(client, srv.model_name, build_messages(shared_prefix, queries[(i + 3) % len(queries)], args.demos))
            for i in range(args.n)
        ]
        # alternating prefixes A, B, A: is A's KV restored from llama.cpp's host-RAM prompt cache?
        a, b = f"[A {time.time_ns()}] ", f"[B {time.time_ns()}] "
        alternating = [one(client, srv.model_name, build_messages(p, queries[0], args.demos)) for p in (a, b, a)]
        root = srv.base_url.removesuffix("/v1")
        metrics = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(root + "/metrics").read().decode()
    out["cold"] = summary(cold)
    out["prefix_shared"] = summary(warm)
    out["alternating_A_B_A"] = alternating
    out["metrics"] = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^llamacpp:(\w+) ([\d.e+-]+)$", metrics, re.M)
        if m.group(1)
        in (
            "prompt_tokens_total",
            "prompt_tokens_cached_total",
            "prompt_seconds_total",
            "tokens_predicted_total",
            "n_decode_total",
        )
    }
    out["loadavg_after"] = os.getloadavg()
    if not args.cache_dir:
        shutil.rmtree(cache, ignore_errors=True)  # the joined GGUF is ~0.5 GB
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
