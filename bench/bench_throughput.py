"""Annotation throughput against an instant OpenAI-compatible server: a bare AsyncOpenAI loop beside the
project's annotator pool (real Ray, real store actor, every answer stored) and a real job, in one run.

The server (`freeal_stream.testing.instant_llm`) runs in its own process and answers at once, so what is
measured is the client side: request preparation, HTTP, answer checking, storing. The prompts are real
annotation prompts (8 MR demos each). Target (issue 16): the job's labels/s >= 0.8 x the bare loop's, same
server, same concurrency.

    .venv/bin/python -m bench.bench_throughput [--requests 6000] [--concurrency 32] [--annotators 2]
        [--job-texts 20000] [--out bench/results/throughput.json]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import REPO, data_dir, result_meta, write_result
from bench.synthetic import mr_sentences, write_pool

TASK = "Classify the sentiment of the movie review sentence: negative or positive."
CLASSES = {"negative": ["negative"], "positive": ["positive"]}


def start_server(table: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """The instant LLM in its own process; returns it and its base URL."""
    path = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in table.items()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "freeal_stream.testing.instant_llm", "--table", str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    line = proc.stdout.readline()
    return proc, line.split("listening on ", 1)[1].strip()


def prompts(n: int, sentences: list[tuple[str, str]]) -> list:
    from freeal_stream.config import LLMConfig
    from freeal_stream.llm.client import ChatRequest
    from freeal_stream.llm.prompts import TEMPLATE_VERSION, annotation_messages
    from freeal_stream.llm.verbalizer import Verbalizer

    verb = Verbalizer(CLASSES)
    cfg = LLMConfig(model="instant", max_tokens=4)
    demos = [(t, 0 if label == "negative" else 1) for t, label in sentences[:8]]
    return [
        ChatRequest.build(
            annotation_messages(TASK, verb, demos, f"{sentences[8 + i % 9000][0]} #{i}"), cfg, TEMPLATE_VERSION
        )
        for i in range(n)
    ]


def bare_loop(base_url: str, requests: list, concurrency: int) -> float:
    """The reference: one AsyncOpenAI client, `concurrency` requests in flight, answers kept in memory."""
    import openai

    async def main() -> None:
        api = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
        slots = asyncio.Semaphore(concurrency)

        async def one(r) -> None:
            async with slots:
                await api.chat.completions.create(
                    model=r.model,
                    messages=r.as_messages(),
                    max_tokens=r.max_tokens,
                    temperature=r.temperature,
                    logprobs=True,
                    top_logprobs=5,
                )

        await asyncio.gather(*(one(r) for r in requests))
        await api.close()

    t0 = time.perf_counter()
    asyncio.run(main())
    return len(requests) / (time.perf_counter() - t0)


def store_writes(store, requests: list, group: int = 256) -> float:
    """Answers written per second through the store actor, in groups as the annotators' group commit makes them."""
    from freeal_stream.llm.client import ChatAnswer

    pairs = [
        (
            r,
            ChatAnswer(
                key=f"w{i}",
                content="positive",
                finish_reason="stop",
                prompt_tokens=900,
                completion_tokens=1,
                cached_tokens=0,
                top_logprobs=[[("positive", -0.1)]],
                latency_s=0.01,
                attempts=1,
                error=None,
            ),
        )
        for i, r in enumerate(requests)
    ]
    t0 = time.perf_counter()
    for k in range(0, len(pairs), group):
        store.put_answers(pairs[k : k + group])
    return len(pairs) / (time.perf_counter() - t0)


def pool_run(
    base_url: str, requests: list, concurrency: int, annotators: int, chunk: int, work: Path
) -> tuple[float, float]:
    """The annotator pool as a round uses it: real Ray actors, every answer stored by the store actor; then the
    store actor's write rate for answers in groups."""
    import ray

    from freeal_stream.actors.annotators import AnnotatorPool, wait_for_actors
    from freeal_stream.actors.runtime import start_ray
    from freeal_stream.actors.store_actor import start_store
    from freeal_stream.config import LLMConfig, RayConfig

    start_ray(RayConfig())
    store = start_store(work / "pool.duckdb")
    try:
        cfg = LLMConfig(model="instant", max_tokens=4, concurrency=concurrency)
        pool = AnnotatorPool(cfg, base_url, "x", store, size=annotators, chunk_size=chunk, max_restarts=0)
        wait_for_actors(pool)
        t0 = time.perf_counter()
        pool.complete_many(requests)
        rate = len(requests) / (time.perf_counter() - t0)
        pool.shutdown()
        return rate, store_writes(store, requests)
    finally:
        store.close()
        ray.shutdown()


def job_run(base_url: str, texts: int, concurrency: int, annotators: int, work: Path) -> dict:
    """A real `freeal-stream run`: one budgeted round sending half the pool; the annotation phase's labels/s."""
    pool_csv = write_pool(data_dir(), texts, work / f"pool_{texts}.csv")
    job = {
        "name": "throughput",
        "data": {"path": str(pool_csv), "text_column": "text", "id_column": "id"},
        "task": {"description": TASK, "classes": CLASSES},
        "llm": {
            "base_url": base_url,
            "model": "instant",
            "api_key_env": "INSTANT_KEY",
            "max_tokens": 4,
            "concurrency": concurrency,
        },
        "slm": {"mode": "head", "epochs": 1},
        "freeal": {"rounds": 1, "query_fraction": 0.5, "demos_per_prompt": 8, "generated_per_class": 4},
        "ray": {"annotators": annotators},
        "state_dir": str(work / "state"),
        "seed": 0,
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    env = dict(os.environ, INSTANT_KEY="x", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "freeal_stream.cli", "run", str(path)], capture_output=True, text=True, env=env, cwd=REPO
    )
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    from freeal_stream.store import Store

    store = Store(work / "state" / "freeal.duckdb")
    try:
        m = store.rounds()[0]["metrics"]
    finally:
        store.close()
    return {
        "labels": m["llm_requested"],
        "annotate_s": m["annotate_s"],
        "labels_per_s": round(m["llm_requested"] / m["annotate_s"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--annotators", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--job-texts", type=int, default=20000, help="pool of the real job (0 = skip it)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "throughput.json")
    args = ap.parse_args()
    sentences = mr_sentences(data_dir())
    table = {t: label for t, label in sentences}
    with open(
        write_pool(
            data_dir(),
            args.job_texts or 1,
            Path(tempfile.gettempdir()) / "bench_throughput" / f"pool_{args.job_texts or 1}.csv",
        ),
        encoding="utf-8",
    ) as f:
        table.update({r["text"]: r["label"] for r in csv.DictReader(f)})
    requests = prompts(args.requests, sentences)
    proc, url = start_server(table)
    work = Path(tempfile.mkdtemp(prefix="bench_throughput_"))
    try:
        pool_rate, writes = pool_run(url, requests, args.concurrency, args.annotators, args.chunk, work)
        result = {
            "bare_loop_per_s": round(bare_loop(url, requests, args.concurrency), 1),
            "pool_per_s": round(pool_rate, 1),
            "store_answer_writes_per_s": round(writes),
        }
        result["bare_loop_again_per_s"] = round(bare_loop(url, requests, args.concurrency), 1)
        if args.job_texts:
            result["job"] = job_run(url, args.job_texts, args.concurrency, args.annotators, work / "job")
    finally:
        proc.kill()
    bare = (result["bare_loop_per_s"] + result["bare_loop_again_per_s"]) / 2
    result["pool_vs_bare"] = round(result["pool_per_s"] / bare, 3)
    if "job" in result:
        result["job_vs_bare"] = round(result["job"]["labels_per_s"] / bare, 3)
    print(json.dumps(result, indent=1))
    write_result(args.out, {**result_meta(vars(args)), **result})


if __name__ == "__main__":
    main()
