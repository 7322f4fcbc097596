"""SIGKILL the driver mid-annotation and mid-training, rerun: every row labelled, nothing stored is paid
again, and the labels equal an uninterrupted run's (the test LLM is deterministic)."""
from __future__ import annotations

import csv
import dataclasses
import signal
import time
from pathlib import Path

import duckdb
import pytest

from tests.fake_openai_server import FakeOpenAIServer
from tests.helpers import cli_process, make_job
from tests.keyword_llm import respond

pytestmark = pytest.mark.integration
CONCURRENCY = 2


def slow_respond(body):
    return dataclasses.replace(respond(body), delay_s=0.1)


def job_in(tmp: Path, server: FakeOpenAIServer) -> Path:
    tmp.mkdir()
    return make_job(tmp, 20, llm={"base_url": server.base_url, "model": "kw", "concurrency": CONCURRENCY},
                    slm={"mode": "head", "epochs": 25}, freeal={"rounds": 3, "query_fraction": 0.3,
                                                                 "generated_per_class": 4})


def run_to_end(job: Path, log: Path) -> None:
    p = cli_process("run", str(job), log=log)
    assert p.wait(timeout=600) == 0, log.read_text()[-3000:]


def kill_when(job: Path, log: Path, ready) -> None:
    """Start a run and SIGKILL it the moment `ready(log text)` holds."""
    p = cli_process("run", str(job), log=log)
    deadline = time.monotonic() + 600
    while not ready(log.read_text()):
        assert p.poll() is None, "the run ended before the kill point:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)


def stored_keys(state: Path) -> set[str]:
    deadline = time.monotonic() + 60
    while True:   # the store actor dies with the driver; the file frees a moment later
        try:
            con = duckdb.connect(str(state / "freeal.duckdb"), read_only=True)
            break
        except duckdb.IOException:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    keys = {r[0] for r in con.execute("SELECT key FROM llm_answers").fetchall()}
    con.close()
    return keys


def exported_labels(job: Path, tmp: Path) -> dict[str, str]:
    out = tmp / "labels.csv"
    p = cli_process("export", str(job), str(out), log=tmp / "export.log")
    assert p.wait(timeout=120) == 0
    with open(out, encoding="utf-8") as f:
        return {r["id"]: r["label"] for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    with FakeOpenAIServer(slow_respond) as server:
        job = job_in(tmp / "job", server)
        run_to_end(job, tmp / "run.log")
        return exported_labels(job, tmp), len(server.requests)


@pytest.mark.parametrize("kill_point", ["mid-annotation", "mid-training"])
def test_killed_run_resumes_to_the_same_labels_without_paying_twice(tmp_path, reference, kill_point):
    ref_labels, ref_requests = reference
    log = tmp_path / "run.log"
    with FakeOpenAIServer(slow_respond) as server:
        job = job_in(tmp_path / "job", server)
        if kill_point == "mid-annotation":
            start = {}

            def ready(text: str) -> bool:   # a few requests into round 2's annotation
                if "round 2/3:" in text and "n" not in start:
                    start["n"] = len(server.requests)
                return "n" in start and len(server.requests) >= start["n"] + 5
        else:
            def ready(text: str) -> bool:
                return "[round 2 train] SLM in head mode" in text
        kill_when(job, log, ready)
        paid_before_kill = stored_keys(tmp_path / "job" / "state")
        sent_before_kill = len(server.requests)
        run_to_end(job, log)
        assert "resum" in log.read_text().split("ingested")[-1]   # the rerun said it resumed
    counts = {}
    for body in server.requests:
        from tests.fake_openai_server import body_hash

        counts[body_hash(body)] = counts.get(body_hash(body), 0) + 1
    repeated = sum(c - 1 for c in counts.values())
    # only requests in flight at the kill (answered by the server, never stored) may go out again
    assert repeated <= CONCURRENCY
    assert len(paid_before_kill) > 0 and sent_before_kill < len(server.requests) or kill_point == "mid-training"
    assert len(server.requests) <= ref_requests + CONCURRENCY
    labels = exported_labels(job, tmp_path)
    assert len(labels) == 80 and all(labels.values())
    assert labels == ref_labels
