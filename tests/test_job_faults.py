"""A whole job against a flaky endpoint: 429 storms (with and without Retry-After), 5xx, timeouts, dropped
connections, garbage bodies, empty and two-label answers. The job ends with every row labelled, and no
answer that was stored is ever asked for again."""
from __future__ import annotations

import dataclasses
import random
import threading

import duckdb
import pytest

from tests.fake_openai_server import FakeOpenAIServer, body_hash, drop, error, garbage, ok
from freeal_stream.store import _LABELS_SQL
from tests.helpers import cli_process, make_job
from tests.keyword_llm import respond

pytestmark = pytest.mark.integration

FAULTS = {
    "429 with Retry-After": lambda: error(429, headers={"Retry-After": "0.2"}),
    "429 without Retry-After": lambda: error(429),
    "500": lambda: error(500),
    "503": lambda: error(503),
    "timeout": lambda: dataclasses.replace(ok("billing"), delay_s=3.0),
    "dropped connection": drop,
    "garbage body": garbage,
    "empty answer": lambda: ok(""),
    "two labels": lambda: ok("billing technical"),
}


class Flaky:
    """Faults on ~35% of requests (seeded), the deterministic keyword answer otherwise."""

    def __init__(self, seed: int = 7):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: dict[str, int] = {}
        self.answered: dict[str, int] = {}   # body hash -> real answers delivered (what a provider bills)

    def __call__(self, body):
        with self.lock:
            kind = self.rng.choice(list(FAULTS)) if self.rng.random() < 0.35 else None
            if kind:
                self.injected[kind] = self.injected.get(kind, 0) + 1
            else:
                self.answered[body_hash(body)] = self.answered.get(body_hash(body), 0) + 1
        return FAULTS[kind]() if kind else respond(body)


def test_job_survives_a_flaky_endpoint(tmp_path):
    flaky = Flaky()
    log = tmp_path / "run.log"
    with FakeOpenAIServer(flaky) as server:
        job = make_job(tmp_path, 10, llm={"base_url": server.base_url, "model": "kw", "concurrency": 2,
                                          "timeout_s": 1.0, "max_retries": 6},
                       slm={"mode": "head", "epochs": 3},
                       freeal={"rounds": 2, "query_fraction": 0.5, "generated_per_class": 4})
        p = cli_process("run", str(job), log=log)
        assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
        server_requests = list(server.requests)
    assert len(flaky.injected) >= 6, flaky.injected   # most kinds were really played
    con = duckdb.connect(str(tmp_path / "state" / "freeal.duckdb"), read_only=True)
    n_items = con.execute("SELECT count(*) FROM items").fetchone()[0]
    unlabelled = con.execute(f"SELECT count(*) FROM ({_LABELS_SQL}) WHERE label IS NULL").fetchone()[0]
    stored = con.execute("SELECT count(*) FROM llm_answers").fetchone()[0]
    con.close()
    assert n_items == 40 and unlabelled == 0   # every row has a label of record (the LLM's or the SLM's)
    # retries only resend what failed: no request got a real answer twice, and each real answer is stored
    # (plus those that were faults in disguise: empty and two-label answers are stored as 'no label')
    assert max(flaky.answered.values()) == 1
    assert stored == len(flaky.answered) + flaky.injected.get("empty answer", 0) + flaky.injected.get("two labels", 0)
    assert len(server_requests) == sum(flaky.injected.values()) + len(flaky.answered)
    assert "round 2 done" in log.read_text()
