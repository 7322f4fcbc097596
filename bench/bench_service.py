"""Service figures: ingestion rows/s into the store, annotation labels/s through the actors next to a plain
`openai` loop on the same server in the same run, and the time to resume a killed run.

Three parts, each in one process run, so that every comparison is side by side on the same (shared, noisy)
machine: compare the ratios, not the absolute speeds across runs.

1. ingest: 200k synthetic short texts into (a) `Store.add_items` directly, (b) the store actor, (c) the HTTP
   API (`ApiServer` + `ServiceClient`, 5,000 items a POST, handlers doing what `Service.add_items` does),
   (d) a CSV file read with `read_items` and added through the store actor (the inbox path); alternating
   a, b, c, d, a, b, c, d. Plus re-adding rows already stored, and 1M rows through (a) alone.
2. llm: the embedded llama.cpp server (one slot). A plain `openai.OpenAI` loop (1 request in flight, and a
   thread pool with 2 in flight) against `AnnotatorPool` (1 actor, and 2 actors as a job with concurrency 1
   gets them; chunks of 16, each answer committed by the store actor), alternating A/B/C/D, each
   measurement on its own disjoint but same-sized slice of MR texts and a fresh store. Two prompt shapes:
   zero-shot (all prompts share the system prompt) and the pipeline's grouped demos (8 consecutive queries
   share a block of 8 demos; every measurement gets blocks of its own). Then the same against
   `tests/fake_openai_server` answering at once (in its own process): a fake server, so those rows measure
   per-request overhead only, never labelling speed; and what one stored answer costs per call.
3. resume: the CLI on a small job (80 texts, 3 rounds) against the deterministic fake LLM
   (`tests/keyword_llm.respond`, 0.5 s per answer, about the local server's pace): a full run, a run
   SIGKILLed a few requests into round 2's annotation and its rerun, and a rerun of the finished job. Log
   lines are timestamped as they appear; the CLI logs are kept under --logs.

    RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=. \
        .venv/bin/python -m bench.bench_service [--parts ingest,fake,llm,resume] [--out bench/results/service.json]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import dataclasses
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import openai
import ray

from bench.common import REPO
from freeal_stream.actors.annotators import AnnotatorPool, wait_for_actors
from freeal_stream.actors.runtime import start_ray
from freeal_stream.actors.store_actor import start_store
from freeal_stream.config import DataConfig, LLMConfig, RayConfig
from freeal_stream.intake import add_batch, batch_from_items
from freeal_stream.llm.client import ChatAnswer, ChatRequest, LLMClient
from freeal_stream.llm.prompts import TEMPLATE_VERSION, annotation_messages
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.service.client import ServiceClient
from freeal_stream.service.http_api import ApiHandlers, ApiServer
from freeal_stream.sources import content_hash, read_items
from freeal_stream.store import Store

STARTUP = "startup_s (to 'running on local Ray')"
MR = REPO.parent / "shared" / "data" / "mr" / "train.csv"
TASK = "Classify the sentiment of the movie review: negative or positive."
PLAIN1 = "plain openai loop, 1 in flight"
PLAIN2 = "plain openai thread pool, 2 in flight"
ACTORS1 = "AnnotatorPool 1 actor (1 in flight) + store actor"
ACTORS2 = "AnnotatorPool 2 actors (2 in flight: the default for concurrency 1) + store actor"
VERB = Verbalizer({"negative": ["negative"], "positive": ["positive"]})
WORDS = [
    "the",
    "film",
    "plot",
    "actor",
    "scene",
    "slow",
    "funny",
    "dull",
    "great",
    "script",
    "score",
    "music",
    "ending",
    "twist",
    "cast",
    "camera",
    "story",
    "pace",
    "drama",
    "comedy",
    "horror",
    "sequel",
    "director",
    "dialogue",
    "visual",
    "effect",
    "moving",
    "boring",
    "clever",
    "charming",
    "flat",
    "heart",
    "tense",
    "cheap",
    "smart",
    "long",
    "short",
    "dark",
    "bright",
    "warm",
    "cold",
    "loud",
    "quiet",
    "order",
    "refund",
    "delivery",
    "parcel",
    "invoice",
    "login",
    "password",
    "screen",
    "crash",
    "update",
    "button",
    "account",
    "email",
    "card",
    "price",
]


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        RAY_AUTH_MODE="disabled",
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )


def _start_ray() -> None:
    if not ray.is_initialized():
        start_ray(RayConfig(local_cpus=2), address="local")


# ---- 1. ingestion ---------------------------------------------------------------------------------------
def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n unique short texts (8-20 words) and their ids."""
    rng = random.Random(seed)
    texts = [f"message {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(8, 20))) for i in range(n)]
    return [f"id-{i}" for i in range(n)], texts


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(s + size, n)


def ingest_store(ids, texts, hashes, batch: int, call: Callable[..., int]) -> dict[str, Any]:
    """Batches of `batch` rows through `call` (Store.add_items or the proxy's); rows/s overall and per batch."""
    per_batch, added = [], 0
    t0 = time.perf_counter()
    for s, e in _batches(len(ids), batch):
        t = time.perf_counter()
        added += call(ids[s:e], texts[s:e], [None] * (e - s), [None] * (e - s), hashes[s:e])
        per_batch.append((e - s) / (time.perf_counter() - t))
    seconds = time.perf_counter() - t0
    k = min(5, len(per_batch))
    return {
        "rows": len(ids),
        "added": added,
        "batch_rows": batch,
        "seconds": round(seconds, 2),
        "rows_per_s": round(len(ids) / seconds),
        "first_batches_rows_per_s": round(statistics.median(per_batch[:k])),
        "last_batches_rows_per_s": round(statistics.median(per_batch[-k:])),
    }


def _direct(tmp: Path, tag: str, ids, texts, hashes, batch: int) -> list[dict[str, Any]]:
    store = Store(tmp / f"direct-{tag}.duckdb")
    out = [
        {"path": "(a) Store.add_items, in process", **ingest_store(ids, texts, hashes, batch, store.add_items)},
        {
            "path": "(a') Store.add_items, the same rows again (all duplicates)",
            **ingest_store(ids, texts, hashes, batch, store.add_items),
        },
    ]
    store.close()
    return out


def _actor(tmp: Path, tag: str, ids, texts, hashes, batch: int) -> list[dict[str, Any]]:
    proxy = start_store(tmp / f"actor-{tag}.duckdb")
    r = ingest_store(ids, texts, hashes, batch, proxy.add_items)
    proxy.close()
    return [{"path": "(b) store actor: proxy.add_items", **r}]


def _http(tmp: Path, tag: str, ids, texts, post_batch: int) -> list[dict[str, Any]]:
    """The HTTP API, wired as Service.add_items wires it: batch_from_items + add_batch into the store actor."""
    proxy = start_store(tmp / f"http-{tag}.duckdb")

    def add_items(items: list[dict[str, Any]]) -> dict[str, Any]:
        added = add_batch(proxy, batch_from_items(items), "POST /items")
        return {"received": len(items), "added": added, "duplicates": len(items) - added}

    api = ApiServer(ApiHandlers(add_items, lambda: {}, lambda since, limit: {"items": [], "next": since}))
    client = ServiceClient(api.start(), timeout_s=300)
    items = [{"id": i, "text": x} for i, x in zip(ids, texts)]
    rows = len(items)
    per_batch, added = [], 0
    t0 = time.perf_counter()
    for s, e in _batches(rows, post_batch):
        t = time.perf_counter()
        added += client.add_items(items[s:e])["added"]
        per_batch.append((e - s) / (time.perf_counter() - t))
    seconds = time.perf_counter() - t0
    api.stop()
    proxy.close()
    # parts of that time measured alone: the handler's batch building (hashing), and JSON out and back in
    t = time.perf_counter()
    for s, e in _batches(rows, post_batch):
        batch_from_items(items[s:e])
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    for s, e in _batches(rows, post_batch):
        json.loads(json.dumps({"items": items[s:e]}).encode())
    json_s = time.perf_counter() - t
    k = min(5, len(per_batch))
    return [
        {
            "path": "(c) HTTP API: ServiceClient.add_items -> ApiServer -> batch_from_items + add_batch -> store actor",
            "rows": rows,
            "added": added,
            "batch_rows": post_batch,
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds),
            "first_batches_rows_per_s": round(statistics.median(per_batch[:k])),
            "last_batches_rows_per_s": round(statistics.median(per_batch[-k:])),
            "alone_batch_from_items_s": round(build_s, 2),
            "alone_json_dumps_loads_s": round(json_s, 2),
        }
    ]


def _inbox(tmp: Path, tag: str, ids, texts) -> list[dict[str, Any]]:
    """The inbox path: a CSV file read with read_items, added through the store actor with add_batch."""
    path = tmp / f"inbox-{tag}.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(zip(ids, texts))
    proxy = start_store(tmp / f"inbox-{tag}.duckdb")
    t0 = time.perf_counter()
    b = read_items(DataConfig(path=str(path), text_column="text", id_column="id"))
    read_s = time.perf_counter() - t0
    t = time.perf_counter()
    added = add_batch(proxy, b, path.name)
    add_s = time.perf_counter() - t
    proxy.close()
    rows = len(ids)
    return [
        {
            "path": "(d) inbox: read_items(CSV) + add_batch -> store actor (one batch)",
            "rows": rows,
            "added": added,
            "batch_rows": rows,
            "seconds": round(read_s + add_s, 2),
            "rows_per_s": round(rows / (read_s + add_s)),
            "read_s": round(read_s, 2),
            "read_rows_per_s": round(rows / read_s),
            "add_s": round(add_s, 2),
            "add_rows_per_s": round(rows / add_s),
            "csv_mb": round(path.stat().st_size / 2**20, 1),
        }
    ]


def part_ingest(tmp: Path, rows: int, big_rows: int, batch: int, post_batch: int, reps: int) -> dict[str, Any]:
    """Each path `reps` times, alternating a, b, c, d, a, b, ...; each time a fresh store file. Then
    Store.add_items alone on `big_rows` rows (how the rate holds up as the table grows)."""
    n_all = max(rows, big_rows)
    ids, texts = synthetic(n_all)
    t = time.perf_counter()
    hashes = [content_hash(x) for x in texts]
    hash_rate = n_all / (time.perf_counter() - t)
    print(f"  content_hash: {hash_rate:,.0f} texts/s", flush=True)
    _start_ray()
    i, x, h = ids[:rows], texts[:rows], hashes[:rows]
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        tag = str(rep)
        for fn in (
            lambda tag=tag: _direct(tmp, tag, i, x, h, batch),
            lambda tag=tag: _actor(tmp, tag, i, x, h, batch),
            lambda tag=tag: _http(tmp, tag, i, x, post_batch),
            lambda tag=tag: _inbox(tmp, tag, i, x),
        ):
            for r in fn():
                r["rep"] = rep
                runs.append(r)
                print(f"  {r}", flush=True)
    summary = []
    for path in dict.fromkeys(r["path"] for r in runs):
        rs = [r for r in runs if r["path"] == path]
        summary.append(
            {
                "path": path,
                "rows": rs[0]["rows"],
                "batch_rows": rs[0]["batch_rows"],
                "rows_per_s_each": [r["rows_per_s"] for r in rs],
                "rows_per_s_mean": round(statistics.mean(r["rows_per_s"] for r in rs)),
            }
        )
    big = None
    if big_rows > rows:
        big = {
            "path": "(a) Store.add_items, in process",
            **_direct(tmp, "big", ids[:big_rows], texts[:big_rows], hashes[:big_rows], batch)[0],
        }
        big.pop("path")
        print(f"  {big_rows:,} rows in process: {big}", flush=True)
    return {"content_hash_texts_per_s": round(hash_rate), "runs": runs, "summary": summary, "big": big}


# ---- 2. annotation throughput ---------------------------------------------------------------------------
def mr_rows(seed: int = 0) -> list[tuple[str, int]]:
    with open(MR, encoding="utf-8") as f:
        rows = [(r["text"], VERB.names.index(r["label"])) for r in csv.DictReader(f)]
    random.Random(seed).shuffle(rows)
    return rows


def build_requests(
    cfg: LLMConfig,
    queries: list[tuple[str, int]],
    demo_pool: list[tuple[str, int]] | None,
    group: int,
    block_offset: int,
) -> list[ChatRequest]:
    """Zero-shot (demo_pool None) or grouped: each run of `group` queries shares one 8-demo block (4 per class)."""
    reqs = []
    for q, (text, _) in enumerate(queries):
        demos: list[tuple[str, int]] = []
        if demo_pool is not None:
            b = block_offset + q // group
            neg = [d for d in demo_pool if d[1] == 0]
            pos = [d for d in demo_pool if d[1] == 1]
            demos = [x for i in range(4) for x in (neg[(4 * b + i) % len(neg)], pos[(4 * b + i + 1) % len(pos)])]
        reqs.append(ChatRequest.build(annotation_messages(TASK, VERB, demos, text), cfg, TEMPLATE_VERSION))
    return reqs


def _payload(r: ChatRequest) -> dict[str, Any]:
    """What LLMClient sends for a request (same fields, so the server does the same work)."""
    p: dict[str, Any] = {
        "model": r.model,
        "messages": r.as_messages(),
        "temperature": r.temperature,
        "max_tokens": r.max_tokens,
    }
    if r.logprobs:
        p["logprobs"] = True
        if r.top_logprobs:
            p["top_logprobs"] = r.top_logprobs
    return p


def run_plain(base_url: str, reqs: list[ChatRequest], in_flight: int) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=300)

    def one(r: ChatRequest) -> tuple[str, int, int]:
        resp = client.chat.completions.create(**_payload(r))
        d = getattr(resp.usage, "prompt_tokens_details", None)
        return resp.choices[0].message.content, resp.usage.prompt_tokens, (getattr(d, "cached_tokens", 0) or 0)

    t = time.perf_counter()
    if in_flight == 1:
        res = [one(r) for r in reqs]
    else:
        with concurrent.futures.ThreadPoolExecutor(in_flight) as ex:
            res = list(ex.map(one, reqs))
    seconds = time.perf_counter() - t
    client.close()
    return {
        "seconds": seconds,
        "contents": [c for c, _, _ in res],
        "prompt_tokens": sum(p for _, p, _ in res),
        "cached_tokens": sum(c for _, _, c in res),
    }


def run_llmclient(base_url: str, cfg: LLMConfig, reqs: list[ChatRequest], path: Path | None) -> dict[str, Any]:
    """The project's LLMClient in this process (no Ray); with `path`, answers committed to a Store there."""
    store = Store(path) if path is not None else None
    client = LLMClient(cfg, base_url, None, cache=store)
    t = time.perf_counter()
    answers = client.complete_many(reqs)
    seconds = time.perf_counter() - t
    if store is not None:
        store.close()
    return {
        "seconds": seconds,
        "contents": [a.content for a in answers],
        "prompt_tokens": sum(a.prompt_tokens for a in answers),
        "cached_tokens": sum(a.cached_tokens for a in answers),
        "errors": sum(a.error is not None for a in answers),
    }


def run_actors(
    base_url: str, cfg: LLMConfig, reqs: list[ChatRequest], path: Path, size: int, chunk: int
) -> dict[str, Any]:
    t = time.perf_counter()
    store = start_store(path)
    pool = AnnotatorPool(cfg, base_url, None, store, size=size, chunk_size=chunk, max_restarts=0)
    wait_for_actors(pool)
    startup = time.perf_counter() - t
    t = time.perf_counter()
    answers = pool.complete_many(reqs)
    seconds = time.perf_counter() - t
    stored = len(store.get_answers([r.key() for r in reqs]))
    pool.shutdown()
    store.close()
    return {
        "seconds": seconds,
        "startup_s": startup,
        "contents": [a.content for a in answers],
        "prompt_tokens": sum(a.prompt_tokens for a in answers),
        "stored": stored,
        "cached_tokens": sum(a.cached_tokens for a in answers),
        "errors": sum(a.error is not None for a in answers),
    }


def alternate(
    methods: dict[str, Callable[[list[ChatRequest], Path], dict[str, Any]]],
    slices: Callable[[int], list[ChatRequest]],
    reps: int,
    tmp: Path,
    tag: str,
) -> list[dict[str, Any]]:
    """A/B/C, A/B/C...: measurement k gets the k-th disjoint slice of texts and a fresh store file."""
    runs, k = [], 0
    for rep in range(reps):
        for name, fn in methods.items():
            reqs = slices(k)
            r = fn(reqs, tmp / f"{tag}-{k}.duckdb")
            r.update(method=name, rep=rep, slice=k, requests=len(reqs), per_s=len(reqs) / r["seconds"])
            contents = r.pop("contents")
            r["answered"] = sum(c is not None for c in contents)
            r["parsed"] = sum(VERB.parse(c) is not None for c in contents if c is not None)
            runs.append(r)
            print(
                f"    {tag} {name} rep {rep}: {r['per_s']:.2f}/s ({r['seconds']:.1f} s, cached "
                f"{r['cached_tokens']}/{r['prompt_tokens']} prompt tokens)",
                flush=True,
            )
            k += 1
    return runs


def summarise(runs: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    names = list(dict.fromkeys(r["method"] for r in runs))
    rate = {n: statistics.mean(r["per_s"] for r in runs if r["method"] == n) for n in names}
    out = []
    for n in names:
        rs = [r for r in runs if r["method"] == n]
        pt, ct = sum(r["prompt_tokens"] for r in rs), sum(r["cached_tokens"] for r in rs)
        out.append(
            {
                "method": n,
                "per_s_mean": round(rate[n], 3),
                "per_s_each": [round(r["per_s"], 3) for r in rs],
                f"vs_{base}": round(rate[n] / rate[base], 3),
                "cached_share": round(ct / pt, 3) if pt else None,
                "requests_each": rs[0]["requests"],
            }
        )
    return out


def part_llm(tmp: Path, n_req: int, n_req_demo: int, reps: int) -> dict[str, Any]:
    from freeal_stream.local_llm import LocalLLMServer

    _start_ray()
    rows = mr_rows()
    demo_pool, rows = rows[:480], rows[480:]  # enough for a fresh demo block in every slice
    out: dict[str, Any] = {}
    server = LocalLLMServer(model="qwen2.5-coder-0.5b-instruct", context_size=4096)
    t = time.perf_counter()
    base_url = server.start()
    out["server_start_s"] = round(time.perf_counter() - t, 1)
    out["server_threads"] = server.threads
    try:
        cfg = LLMConfig(
            base_url=base_url, model=server.model_name, max_tokens=4, temperature=0.0, concurrency=1, max_retries=0
        )
        # warm-up: the first request pays for the cold system prompt; neither method should
        run_plain(base_url, build_requests(cfg, rows[-2:], None, 8, 0), 1)
        plain1 = lambda reqs, p: run_plain(base_url, reqs, 1)
        plain2 = lambda reqs, p: run_plain(base_url, reqs, 2)
        actors1 = lambda reqs, p: run_actors(base_url, cfg, reqs, p, size=1, chunk=16)
        actors2 = lambda reqs, p: run_actors(base_url, cfg, reqs, p, size=2, chunk=16)
        offset = 0
        for shape, n, demos, methods in (
            ("zero-shot", n_req, None, {PLAIN1: plain1, PLAIN2: plain2, ACTORS1: actors1, ACTORS2: actors2}),
            (
                "grouped demos (8 per block)",
                n_req_demo,
                demo_pool,
                {PLAIN1: plain1, ACTORS1: actors1, ACTORS2: actors2},
            ),
        ):
            base = offset

            def slices(k: int, n=n, demos=demos, base=base) -> list[ChatRequest]:
                # every slice gets demo blocks of its own: no measurement reuses a prefix another one cached
                return build_requests(
                    cfg, rows[base + k * n : base + (k + 1) * n], demos, 8, block_offset=k * (n // 8 + 1)
                )

            print(f"  real server, {shape}: {n} requests per measurement", flush=True)
            runs = alternate(methods, slices, reps, tmp, "llm-" + shape.split()[0])
            offset += n * len(methods) * reps
            out[shape] = {"requests_per_measurement": n, "runs": runs, "summary": summarise(runs, PLAIN1)}
    finally:
        server.stop()
    return out


FAKE_SERVER = (
    "import sys\nfrom freeal_stream.testing.fake_openai_server import FakeOpenAIServer\n"
    "with FakeOpenAIServer() as s:\n    print(s.base_url, flush=True)\n    sys.stdin.read()\n"
)


def part_fake(tmp: Path, n_req: int, reps: int) -> dict[str, Any]:
    """Per-request overhead with a server that answers at once, in its own process (no GIL shared with us)."""
    _start_ray()
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    base_url = proc.stdout.readline().strip()
    rows = mr_rows(1)
    try:
        cfg1 = LLMConfig(base_url=base_url, model="m", max_tokens=4, concurrency=1, max_retries=0)
        cfg2 = dataclasses.replace(cfg1, concurrency=2)
        methods = {
            PLAIN1: lambda reqs, p: run_plain(base_url, reqs, 1),
            PLAIN2: lambda reqs, p: run_plain(base_url, reqs, 2),
            "LLMClient in process, concurrency 2, no store": lambda reqs, p: run_llmclient(base_url, cfg2, reqs, None),
            "LLMClient in process, concurrency 2, Store (DuckDB) per answer": lambda reqs, p: run_llmclient(
                base_url, cfg2, reqs, p
            ),
            ACTORS1: lambda reqs, p: run_actors(base_url, cfg1, reqs, p, 1, 16),
            ACTORS2: lambda reqs, p: run_actors(base_url, cfg1, reqs, p, 2, 16),
        }
        run_plain(base_url, build_requests(cfg1, rows[-4:], None, 8, 0), 1)  # warm-up
        runs = alternate(
            methods, lambda k: build_requests(cfg1, rows[k * n_req : (k + 1) * n_req], None, 8, 0), reps, tmp, "fake"
        )
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    return {
        "requests_per_measurement": n_req,
        "runs": runs,
        "summary": summarise(runs, PLAIN1),
        "store_calls": store_call_costs(tmp, rows[:200]),
    }


def store_call_costs(tmp: Path, rows: list[tuple[str, int]]) -> dict[str, float]:
    """Milliseconds per call: what each stored answer costs in process, through the store actor, and a bare
    Ray round trip to the store actor (the same answers and requests as an annotator would store)."""
    cfg = LLMConfig(model="m", max_tokens=4)
    reqs = build_requests(cfg, rows, None, 8, 0)
    answers = [
        ChatAnswer(
            key=r.key(),
            content="positive",
            finish_reason="stop",
            prompt_tokens=100,
            completion_tokens=1,
            cached_tokens=0,
            top_logprobs=[[("positive", -0.1), ("negative", -2.4)]],
            latency_s=0.01,
            attempts=1,
            error=None,
        )
        for r in reqs
    ]
    out: dict[str, float] = {}
    store = Store(tmp / "calls-direct.duckdb")
    t = time.perf_counter()
    for r, a in zip(reqs, answers):
        store.put_answers([(r, a)])
    out["Store.put_answer in process (DuckDB commit per answer)"] = (time.perf_counter() - t) / len(reqs) * 1e3
    store.close()
    proxy = start_store(tmp / "calls-actor.duckdb")
    t = time.perf_counter()
    for r, a in zip(reqs, answers):
        proxy.put_answers([(r, a)])
    out["proxy.put_answer through the store actor"] = (time.perf_counter() - t) / len(reqs) * 1e3
    t = time.perf_counter()
    for _ in reqs:
        ray.get(proxy.handle.pid.remote())
    out["bare Ray call to the store actor (pid)"] = (time.perf_counter() - t) / len(reqs) * 1e3
    t = time.perf_counter()
    for _ in reqs:
        proxy.count_items()
    out["proxy.count_items (Ray call + trivial query)"] = (time.perf_counter() - t) / len(reqs) * 1e3
    proxy.close()
    out = {k: round(v, 2) for k, v in out.items()}
    print(f"  ms per call: {out}", flush=True)
    return out


# ---- 3. resume ------------------------------------------------------------------------------------------
class LogWatch:
    """Timestamps (monotonic) each line of a log file as it appears (polled every 10 ms)."""

    def __init__(self, path: Path):
        self.path, self.lines = path, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos, buf = 0, b""
        while not self._stop.is_set():
            if self.path.exists():
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                pos += len(data)
                buf += data
                now = time.monotonic()
                *done, buf = buf.split(b"\n")
                self.lines.extend((now, d.decode("utf-8", "replace")) for d in done)
            time.sleep(0.01)

    def stop(self) -> None:
        time.sleep(0.05)
        self._stop.set()
        self._thread.join()

    def first(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _cli(job: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "freeal_stream.cli", "run", str(job)],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=REPO,
    )


def timed_run(
    job: Path, log: Path, stamps: list[float], kill_when: Callable[[LogWatch], bool] | None = None
) -> dict[str, Any]:
    watch = LogWatch(log)
    t0 = time.monotonic()
    p = _cli(job, log)
    killed = False
    while p.poll() is None:
        if kill_when is not None and kill_when(watch):
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    p.wait(timeout=600)
    end = time.monotonic()
    watch.stop()
    if not killed and p.returncode != 0:
        raise RuntimeError(f"run failed ({p.returncode}):\n{watch.text()[-3000:]}")
    rel = lambda t: None if t is None else round(t - t0, 2)
    new = [s for s in stamps if s >= t0]
    return {
        "wall_s": round(end - t0, 2),
        "killed": killed,
        "requests_received": len(new),
        STARTUP: rel(watch.first("running on local Ray")),
        "ingested_at_s": rel(watch.first("ingested ")),
        "rescoring_started_at_s": rel(watch.first("resuming after round")),
        "already_stored_line_at_s": rel(watch.first("planned labels already stored")),
        "round2_annotate_progress_at_s": rel(watch.first("[round 2 annotate]")),
        "first_request_at_s": rel(new[0] if new else None),
        "already_stored_line": next((line for _, line in watch.lines if "already stored" in line), None),
        "_t0": t0,
        "_end": end,
    }


def file_free_after(db: Path, since: float) -> float:
    """Seconds from `since` until the DuckDB file can be opened (the killed run's store actor let it go)."""
    while True:
        try:
            duckdb.connect(str(db), read_only=True).close()
            return round(time.monotonic() - since, 2)
        except duckdb.IOException:
            time.sleep(0.05)


def bare_ray_init_s() -> float:
    code = (
        "import time,ray; t=time.perf_counter(); ray.init(address='local', num_cpus=2, "
        "include_dashboard=False, log_to_driver=False); print(time.perf_counter()-t); ray.shutdown()"
    )
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    total = time.perf_counter() - t
    return {
        "ray_init_s": round(float(out.stdout.strip().splitlines()[-1]), 2),
        "python_ray_init_shutdown_s": round(total, 2),
    }


def import_cli_s() -> float:
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import freeal_stream.cli, freeal_stream.loop, freeal_stream.session"],
        env=_env(),
        cwd=REPO,
        check=True,
    )
    return round(time.perf_counter() - t, 2)


def part_resume(tmp: Path, logs: Path, delay_s: float) -> dict[str, Any]:
    if ray.is_initialized():
        ray.shutdown()
    from freeal_stream.testing.fake_openai_server import FakeOpenAIServer, body_hash
    from freeal_stream.testing.jobs import make_job
    from freeal_stream.testing.keyword_llm import respond

    stamps: list[float] = []

    def slow_respond(body):
        stamps.append(time.monotonic())
        return dataclasses.replace(respond(body), delay_s=delay_s)

    out: dict[str, Any] = {"fake_llm_delay_s": delay_s, "python_imports_s": import_cli_s(), **bare_ray_init_s()}
    with FakeOpenAIServer(slow_respond) as server:

        def job_in(d: Path) -> Path:
            d.mkdir()
            return make_job(
                d,
                20,
                llm={"base_url": server.base_url, "model": "kw", "concurrency": 2},
                slm={"mode": "head", "epochs": 25},
                freeal={"rounds": 3, "query_fraction": 0.3, "generated_per_class": 4},
            )

        job = job_in(tmp / "full")
        out["full_run"] = timed_run(job, tmp / "full.log", stamps)
        print(f"  full run: {out['full_run']}", flush=True)
        out["finished_job_rerun"] = timed_run(job, tmp / "finished.log", stamps)
        print(f"  rerun of the finished job: {out['finished_job_rerun']}", flush=True)

        job = job_in(tmp / "killed")
        first_body = len(server.requests)
        mark: dict[str, int] = {}

        # a few requests into round 2's annotation, as tests/integration/test_resume_kill.py
        def ready(w: LogWatch) -> bool:
            if "n" not in mark and w.first("round 2/3:") is not None:
                mark["n"] = len(stamps)
            return "n" in mark and len(stamps) >= mark["n"] + 5

        killed = timed_run(job, tmp / "killed.log", stamps, kill_when=ready)
        killed["file_free_after_kill_s"] = file_free_after(tmp / "killed" / "state" / "freeal.duckdb", killed["_end"])
        out["killed_run"] = killed
        print(f"  killed run: {killed}", flush=True)
        rerun = timed_run(job, tmp / "rerun.log", stamps)
        # requests the killed run's orphaned actors still sent after the SIGKILL (before Ray reaped them)
        killed["requests_after_kill"] = sum(killed["_end"] < s <= rerun["_t0"] for s in stamps)
        bodies = collections.Counter(body_hash(b) for b in server.requests[first_body:])
        rerun["killed_plus_rerun_requests"] = sum(bodies.values())
        rerun["sent_twice"] = sum(c - 1 for c in bodies.values())
        out["rerun_after_kill"] = rerun
        print(f"  rerun after the kill: {out['rerun_after_kill']}", flush=True)
    logs.mkdir(parents=True, exist_ok=True)
    for name in ("full", "finished", "killed", "rerun"):
        (logs / f"resume-{name}.log").write_text((tmp / f"{name}.log").read_text())
    for v in out.values():
        if isinstance(v, dict):
            v.pop("_t0", None), v.pop("_end", None)
    return out


# ---- report ---------------------------------------------------------------------------------------------
def table(res: dict[str, Any]) -> str:
    lines = []
    if "ingest" in res:
        ing = res["ingest"]
        lines += [
            "| ingestion path | rows | rows per call | rows/s (each rep) | mean rows/s |",
            "|---|---|---|---|---|",
        ]
        for r in ing["summary"]:
            each = " / ".join(f"{v:,}" for v in r["rows_per_s_each"])
            lines.append(f"| {r['path']} | {r['rows']:,} | {r['batch_rows']:,} | {each} | {r['rows_per_s_mean']:,} |")
        if ing["big"]:
            b = ing["big"]
            lines.append(
                f"| (a) Store.add_items, in process, one long run | {b['rows']:,} | {b['batch_rows']:,} | "
                f"first 5 batches {b['first_batches_rows_per_s']:,}, "
                f"last 5 {b['last_batches_rows_per_s']:,} | "
                f"{b['rows_per_s']:,} |"
            )
        lines.append("")
    for part, key in (("llm", "zero-shot"), ("llm", "grouped demos (8 per block)"), ("fake", None)):
        if part not in res:
            continue
        block = res[part][key] if key else res[part]
        title = (
            f"real llama.cpp server, {key}, {block['requests_per_measurement']} requests per measurement"
            if key
            else f"FAKE instant server (overhead only), {block['requests_per_measurement']} requests per measurement"
        )
        lines += [
            f"| {title} | labels/s (each rep) | mean | vs plain loop | prompt tokens cached |",
            "|---|---|---|---|---|",
        ]
        for s in block["summary"]:
            each = " / ".join(f"{x:.2f}" for x in s["per_s_each"])
            cached = "-" if s["cached_share"] is None else f"{s['cached_share']:.0%}"
            lines.append(f"| {s['method']} | {each} | {s['per_s_mean']:.2f} | {s['vs_' + PLAIN1]:.2f}x | {cached} |")
        lines.append("")
    if "fake" in res and "store_calls" in res["fake"]:
        lines += ["| one stored answer costs (ms per call, driver process) | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in res["fake"]["store_calls"].items()]
        lines.append("")
    if "resume" in res:
        r = res["resume"]
        lines += [
            f"| resume (80 texts, 3 rounds, fake deterministic LLM {r['fake_llm_delay_s']} s/answer) | wall s | "
            "startup s | requests it sent | first request at s | round 2 annotating again at s |",
            "|---|---|---|---|---|---|",
        ]
        for k in ("full_run", "killed_run", "rerun_after_kill", "finished_job_rerun"):
            v = r[k]
            again = v["round2_annotate_progress_at_s"] if k == "rerun_after_kill" else "-"
            lines.append(
                f"| {k.replace('_', ' ')} | {v['wall_s']} | {v[STARTUP]} | {v['requests_received']} | "
                f"{v['first_request_at_s'] or '-'} | {again} |"
            )
        rr = r["rerun_after_kill"]
        lines.append(
            f"| (requests: full run {r['full_run']['requests_received']}; killed run "
            f"{r['killed_run']['requests_received']} + {r['killed_run']['requests_after_kill']} sent by its "
            f"actors after the SIGKILL + rerun {rr['requests_received']} = "
            f"{rr['killed_plus_rerun_requests']}, "
            f"of which sent twice: {rr['sent_twice']}) | | | | | |"
        )
        lines.append(
            f"| (bare `ray.init` + shutdown in a fresh python: {r['python_ray_init_shutdown_s']} s; importing "
            f"the CLI's modules: {r['python_imports_s']} s; DuckDB file free "
            f"{r['killed_run']['file_free_after_kill_s']} "
            "s after the SIGKILL) | | | | | |"
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="ingest,fake,llm,resume")
    ap.add_argument("--rows", type=int, default=200_000, help="rows for every ingestion path")
    ap.add_argument("--big-rows", type=int, default=1_000_000, help="rows for Store.add_items alone")
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--post-batch", type=int, default=5_000)
    ap.add_argument("--llm-requests", type=int, default=64)
    ap.add_argument("--llm-demo-requests", type=int, default=32)
    ap.add_argument("--fake-requests", type=int, default=400)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument(
        "--resume-delay",
        type=float,
        default=0.5,
        help="seconds the fake LLM takes per answer in the resume part (about the local server's)",
    )
    ap.add_argument(
        "--logs",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench_service_logs",
        help="where the resume part's CLI logs are kept",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "service.json")
    ap.add_argument("--table", type=Path, help="only print the tables of an earlier result file")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    parts = args.parts.split(",")
    res: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "note": "shared, noisy 2-core VM: compare only ratios between rows of the same run",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-service-") as d:
        tmp = Path(d)
        for part in parts:
            t = time.perf_counter()
            print(f"== {part}", flush=True)
            sub = tmp / part
            sub.mkdir()
            if part == "ingest":
                res["ingest"] = part_ingest(sub, args.rows, args.big_rows, args.batch, args.post_batch, args.reps)
            elif part == "llm":
                res["llm"] = part_llm(sub, args.llm_requests, args.llm_demo_requests, args.reps)
            elif part == "fake":
                res["fake"] = part_fake(sub, args.fake_requests, args.reps)
            elif part == "resume":
                res["resume"] = part_resume(sub, args.logs, args.resume_delay)
            else:
                raise SystemExit(f"unknown part {part!r}")
            res.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t, 1)
    if ray.is_initialized():
        ray.shutdown()
    res["total_seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print()
    print(table(res))
    print(f"total {res['total_seconds']} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
