"""The soak harness: `serve` is fed continuously (HTTP API and inbox files, with repeats) while its rounds run
against an endpoint that injects faults; then every ingested item must hold exactly one label and the LLM
ledger must add up. Used by tests/integration/test_soak.py (bounded, in CI) and bench/bench_soak.py (longer, recorded
in BENCHMARKS.md)."""

from __future__ import annotations

import csv
import random
import signal
import time
from pathlib import Path
from typing import Any

import duckdb

from freeal_stream.service.client import ServiceClient, find_service
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.faults import Flaky
from freeal_stream.testing.jobs import cli_process, make_job, wait_for
from freeal_stream.testing.keyword_llm import EXAMPLES

INITIAL_PER_CLASS = 10


def _new_item(n: int, rng: random.Random) -> dict[str, str]:
    cls = rng.choice(sorted(EXAMPLES))
    return {"id": f"soak-{n}", "text": f"{rng.choice(EXAMPLES[cls])} (ticket {n}, {rng.random():.6f})"}


def run_soak(tmp: Path, seconds: float, seed: int = 7, fault_rate: float = 0.3) -> dict[str, Any]:
    """Ingest for `seconds`, wait until all is labelled, stop the service; return the books."""
    flaky, rng, log = Flaky(seed, fault_rate), random.Random(seed), tmp / "serve.log"
    sent: dict[str, str] = {}
    repeats = inbox_files = 0
    with FakeOpenAIServer(flaky) as server:
        job = make_job(
            tmp,
            INITIAL_PER_CLASS,
            llm={
                "base_url": server.base_url,
                "model": "kw",
                "concurrency": 2,
                "timeout_s": 1.0,
                "max_retries": 6,
                "circuit_cooldown_s": 0.5,
            },
            slm={"mode": "head", "epochs": 3},
            freeal={"rounds": 1, "query_fraction": 0.3, "generated_per_class": 4},
            service={"port": 0, "min_new_items": 8, "round_every_s": 4, "poll_s": 0.5},
        )
        state, inbox = tmp / "state", tmp / "state" / "inbox"
        proc = cli_process("serve", str(job), log=log)
        try:
            api = ServiceClient(wait_for(lambda: find_service(state), 240, "the service", log))
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < seconds:
                batch = [_new_item(n + i, rng) for i in range(3)]
                n += 3
                if sent and rng.random() < 0.3:  # a client retrying a POST: same id, same text
                    old = rng.choice(sorted(sent))
                    batch.append({"id": old, "text": sent[old]})
                    repeats += 1
                sent.update((x["id"], x["text"]) for x in batch)
                if rng.random() < 0.2:
                    inbox.mkdir(exist_ok=True)
                    tmp_file = inbox / f"drop-{n}.csv.tmp"
                    with open(tmp_file, "w", encoding="utf-8", newline="") as f:
                        csv.writer(f).writerows([("id", "text"), *[(x["id"], x["text"]) for x in batch]])
                    tmp_file.rename(inbox / f"drop-{n}.csv")
                    inbox_files += 1
                else:
                    api.add_items(batch)
                time.sleep(1.0)

            def all_labelled():
                items, since = [], 0
                while (page := api.labels(since=since, limit=10_000))["items"]:
                    items += page["items"]
                    since = page["next"]
                got = {x["id"] for x in items if x["label"]}
                return set(sent) <= got and items

            wait_for(all_labelled, 600, "every ingested item to be labelled", log)
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=180)
        requests = len(server.requests)
    con = duckdb.connect(str(state / "freeal.duckdb"), read_only=True)
    try:
        ids = [r[0] for r in con.execute("SELECT id FROM items").fetchall()]
        stored_answers = con.execute("SELECT count(*) FROM llm_answers").fetchall()[0][0]
        failures = dict(con.execute("SELECT error, count(*) FROM llm_failures GROUP BY error").fetchall())
        rounds = con.execute("SELECT count(*) FROM rounds WHERE phase = 'done'").fetchall()[0][0]
    finally:
        con.close()
    export = tmp / "labels.csv"
    assert cli_process("export", str(job), str(export), log=log).wait(timeout=180) == 0
    with open(export, encoding="utf-8") as f:
        exported = [r for r in csv.DictReader(f)]
    labelled = [r["id"] for r in exported if r["label"]]
    return {
        "seconds": seconds,
        "seed": seed,
        "fault_rate": fault_rate,
        "rc": rc,
        "items_sent": len(sent),
        "repeats_sent": repeats,
        "inbox_files": inbox_files,
        "items_stored": len(ids),
        "initial_items": 4 * INITIAL_PER_CLASS,
        "lost": len(set(sent) - set(labelled)),
        "labelled_more_than_once": len(labelled) - len(set(labelled)),
        "unlabelled": len(exported) - len(labelled),
        "faults_injected": dict(sorted(flaky.injected.items())),
        "requests_received": requests,
        "real_answers": sum(flaky.answered.values()),
        "duplicate_requests_paid": sum(c - 1 for c in flaky.answered.values()),
        "paid_answers": flaky.paid_answers(),
        "stored_answers": stored_answers,
        "failures_recorded": failures,
        "rounds_done": rounds,
        "log_tail": log.read_text()[-2000:],
    }
