"""`freeal-stream serve` for real: a separate process with local Ray and a DuckDB file, fed through the
HTTP API, the inbox folder and `freeal-stream ingest`, answered by the deterministic test LLM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from freeal_stream.service.client import ServiceClient, find_service
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import ROOT, cli_process, make_job, wait_for
from freeal_stream.testing.keyword_llm import respond


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-m", "freeal_stream.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_service_labels_data_from_the_api_the_inbox_and_ingest(tmp_path):
    log = tmp_path / "serve.log"
    with FakeOpenAIServer(respond) as server:
        job = make_job(
            tmp_path,
            10,
            llm={"base_url": server.base_url, "model": "kw", "concurrency": 2},
            slm={"mode": "head", "epochs": 3},
            freeal={"rounds": 1, "query_fraction": 0.3},
            service={"port": 0, "min_new_items": 3, "round_every_s": 2, "poll_s": 0.5},
        )
        state = tmp_path / "state"
        proc = cli_process("serve", str(job), log=log)
        try:
            url = wait_for(lambda: find_service(state), 180, "the service to publish its URL", log)
            api = ServiceClient(url)
            wait_for(lambda: any(r["phase"] == "done" for r in api.status()["rounds"]), 300, "round 1", log)

            # the API: ids optional (content hash), the same text twice is one item
            got = api.add_items(
                [
                    {"text": "My refund never reached my card"},
                    {"id": "api-2", "text": "The app crashes on every upload"},
                    {"text": "My refund never reached my card"},
                ]
            )
            assert got == {"received": 3, "added": 2, "duplicates": 1, "quarantined": 0, "flagged": 0, "problems": []}

            # the inbox: written as .tmp then renamed; the same content under a second name adds nothing
            inbox = state / "inbox"
            inbox.mkdir(exist_ok=True)
            (inbox / "more.csv.tmp").write_text(
                "id,text\nin-1,Where is my parcel? Tracking has not moved\n"
                "in-2,I cannot log in since the password reset\n"
            )
            (inbox / "more.csv.tmp").rename(inbox / "more.csv")
            wait_for(lambda: (inbox / "done" / "more.csv").exists(), 60, "the inbox file to be taken", log)
            shutil.copy(inbox / "done" / "more.csv", inbox / "again.csv")
            wait_for(lambda: (inbox / "done" / "again.csv").exists(), 60, "the duplicate file", log)

            # `ingest` and `status` find the running service and go through its API (the file is locked)
            extra = tmp_path / "extra.jsonl"
            extra.write_text(json.dumps({"id": "cli-1", "text": "Please change the email on my account"}) + "\n")
            out = cli("ingest", str(job), str(extra))
            assert out.returncode == 0 and "1 new items sent to the running service" in out.stdout, out
            st = json.loads(cli("status", str(job), "--json").stdout)
            assert st["items"] == 40 + 2 + 2 + 1 and "service" in st

            new_ids = {"api-2", "in-1", "in-2", "cli-1"}

            def all_new_labelled():
                items = api.labels(since=40, limit=100)["items"]
                return len(items) == 5 and all(x["label"] for x in items) and items

            items = wait_for(all_new_labelled, 300, "the new items to be labelled", log)
            assert new_ids <= {x["id"] for x in items}
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
    assert rc == 0, log.read_text()[-3000:]
    assert not (state / "service.json").exists()
    text = log.read_text()
    assert "inbox: more.csv ingested (2 added)" in text and "inbox: again.csv duplicate file" in text
    st = json.loads(cli("status", str(job), "--json").stdout)  # straight from the file once it stopped
    assert st["items"] == 45 and st["rounds"][-1]["phase"] == "done" and st["rounds"][-1]["round"] >= 2


def test_serving_beyond_localhost_needs_a_token(tmp_path, monkeypatch):
    from freeal_stream.cli import main

    job = make_job(tmp_path, 2, service={"host": "0.0.0.0"})
    monkeypatch.delenv("FREEAL_SERVICE_TOKEN", raising=False)
    assert main(["serve", str(job)]) == 2  # refused before Ray, the LLM or the store start


def test_with_the_budget_spent_new_items_get_the_latest_slms_labels(tmp_path):
    """No LLM money left: new data is still labelled, by the last round's SLM, without a request."""
    log = tmp_path / "serve.log"
    with FakeOpenAIServer(respond) as server:
        job = make_job(
            tmp_path,
            6,
            llm={"base_url": server.base_url, "model": "kw"},
            slm={"mode": "head", "epochs": 3},
            freeal={"rounds": 1, "query_fraction": 0.5, "demos_per_prompt": 0},
            budget={"max_requests": 12},
            service={"port": 0, "min_new_items": 1, "poll_s": 0.5},
        )
        proc = cli_process("serve", str(job), log=log)
        try:
            url = wait_for(lambda: find_service(tmp_path / "state"), 180, "the service", log)
            api = ServiceClient(url)
            wait_for(lambda: any(r["phase"] == "done" for r in api.status()["rounds"]), 300, "round 1", log)
            sent = len(server.requests)
            assert api.add_items([{"id": "late", "text": "My parcel was never delivered"}])["added"] == 1
            item = wait_for(
                lambda: [x for x in api.labels(since=24, limit=10)["items"] if x["label"]],
                120,
                "the late item's label",
                log,
            )
            assert item[0]["id"] == "late" and item[0]["source"] == "slm round 1"
            assert len(server.requests) == sent
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
