"""Live against batch mode: the same job through the same local batch service (issue 18, item 4).

The demo job (jobs/demo.yaml: its data, classes and settings) runs twice against
freeal_stream/testing/fake_batch_api.py, each on its own state and a fresh upstream (llama.cpp's sampled answers
depend on its prompt cache): with llm.mode live (requests pass through the service to the upstream LLM) and with
llm.mode batch (the same requests go out as batch files, which the service runs against the upstream, one row at
a time). Per mode it records requests and tokens of the stored answers (`status --json`), what the service
received (live requests passed through; batches, uploads and batch rows), the cost at list prices (a yardstick:
gpt-4o-mini's price per million tokens, input 0.15, cached input 0.075, output 0.60, batch discount 50%), the
wall time of `freeal-stream run`, and whether the exported labels are identical.

    .venv/bin/python -m bench.bench_batch --upstream keyword   # freeal_stream/testing/keyword_llm.py: instant
    .venv/bin/python -m bench.bench_batch --upstream local     # the bundled llama.cpp LLM
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO
from freeal_stream.testing.fake_batch_api import FakeBatchAPI

PRICE = {"input": 0.15, "cached_input": 0.075, "output": 0.60, "batch_discount": 0.5}
POLL = {"batch_poll_s": 1.0, "batch_poll_max_s": 5.0}
ENV = dict(
    os.environ,
    PYTHONPATH=str(REPO),
    RAY_AUTH_MODE="disabled",
    OMP_WAIT_POLICY="PASSIVE",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
)


def write_job(work: Path, mode: str, base_url: str, model: str) -> Path:
    job = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    job["name"] = f"bench-batch-{mode}"
    job["data"]["path"] = str(REPO / "jobs" / "data" / "support_tickets.csv")
    job["llm"].update(base_url=base_url, model=model, mode=mode, **POLL)
    job["budget"]["prices"] = {model: PRICE}
    job["state_dir"] = str(work / mode / "state")
    path = work / mode / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def cli(*args: str, log: Path | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "freeal_stream.cli", *args],
        cwd=REPO,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if log is not None:
        log.write_text(out.stdout)
    if out.returncode != 0:
        raise SystemExit(f"freeal-stream {' '.join(args)} failed:\n{out.stdout[-3000:]}")
    return out.stdout


def labels(job: Path) -> dict[str, dict[str, str]]:
    out = job.parent / "labels.csv"
    cli("export", str(job), str(out))
    with open(out, encoding="utf-8") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def run_mode(api: FakeBatchAPI, work: Path, mode: str, model: str) -> dict[str, Any]:
    job = write_job(work, mode, api.base_url, model)
    started = time.monotonic()
    cli("run", str(job), log=job.parent / "run.log")
    wall = time.monotonic() - started
    status = json.loads(cli("status", str(job), "--json"))
    got = labels(job)
    with open(REPO / "jobs" / "data" / "support_tickets.csv", encoding="utf-8") as f:
        gold = {r["id"]: r["label"] for r in csv.DictReader(f)}
    return {
        "mode": mode,
        "wall_s": round(wall, 1),
        "spent": status["spent"],
        "service": {
            "chat_requests": api.chat_requests,
            "batches": api.batches_created,
            "uploads": api.uploads,
            "batch_rows": api.rows_run,
        },
        "accuracy": round(sum(gold[i] == r["label"] for i, r in got.items()) / len(got), 4),
        "labels": {i: (r["label"], r["llm_label"]) for i, r in got.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", choices=("keyword", "local"), default="keyword")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_batch"))
    ap.add_argument("--out", type=Path, help="default: bench/results/batch_<upstream>.json")
    args = ap.parse_args()
    out = args.out or REPO / "bench" / "results" / f"batch_{args.upstream}.json"
    work = args.work / args.upstream
    if work.exists():
        import shutil

        shutil.rmtree(work)
    runs = []
    for mode in ("live", "batch"):  # a fresh upstream each: llama.cpp's sampled answers depend on its prompt cache
        with contextlib.ExitStack() as stack:
            if args.upstream == "keyword":
                from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
                from freeal_stream.testing.keyword_llm import respond

                upstream, model = stack.enter_context(FakeOpenAIServer(respond)).base_url, "kw"
            else:
                from freeal_stream.local_llm import LocalLLMServer

                server = stack.enter_context(LocalLLMServer())
                upstream, model = server.base_url, server.model_name
            api = stack.enter_context(FakeBatchAPI(upstream, workers=1, step_s=0.5))
            runs.append(run_mode(api, work, mode, model))
    live, batch = runs
    same = live["labels"] == batch["labels"]
    result = {
        "upstream": args.upstream,
        "model": model,
        "price_per_million": PRICE,
        "poll": POLL,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "labels_identical": same,
        "items": len(live["labels"]),
        "runs": [{k: v for k, v in r.items() if k != "labels"} for r in runs],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{'mode':6} {'wall s':>7} {'requests':>8} {'tokens':>8} {'cached':>7} {'cost':>9} {'batches':>7} "
        f"{'accuracy':>8}"
    )
    for r in runs:
        s = r["spent"]
        print(
            f"{r['mode']:6} {r['wall_s']:7.1f} {s['requests']:8d} {s['tokens']:8d} {s['cached_tokens']:7d} "
            f"{s['cost']:9.6f} {r['service']['batches']:7d} {r['accuracy']:8.4f}"
        )
    print(
        f"labels identical (label of record and LLM label, all {len(live['labels'])} items): {same}; "
        f"batch/live cost {batch['spent']['cost'] / live['spent']['cost']:.3f}; written to {out}"
    )


if __name__ == "__main__":
    main()
