"""A whole job against a flaky endpoint: 429 storms (with and without Retry-After), 5xx, timeouts, dropped
connections, garbage bodies, empty, truncated, foreign-language and two-label answers. The job ends with every row
labelled, and no answer that was stored is ever asked for again."""

from __future__ import annotations

from freeal_stream.store import Store
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.faults import Flaky
from freeal_stream.testing.jobs import cli_process, make_job


def test_job_survives_a_flaky_endpoint(tmp_path):
    flaky = Flaky()
    log = tmp_path / "run.log"
    with FakeOpenAIServer(flaky) as server:
        job = make_job(
            tmp_path,
            10,
            llm={"base_url": server.base_url, "model": "kw", "concurrency": 2, "timeout_s": 1.0, "max_retries": 6},
            slm={"mode": "head", "epochs": 3},
            freeal={"rounds": 2, "query_fraction": 0.5, "generated_per_class": 4},
        )
        p = cli_process("run", str(job), log=log)
        assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
        server_requests = list(server.requests)
    assert len(flaky.injected) >= 6, flaky.injected  # most kinds were really played
    store = Store(tmp_path / "state" / "freeal.duckdb")
    labels = [r[4] for r in store.labels_rows("llm")]
    stored = store.spent()["requests"]
    store.close()
    assert len(labels) == 40 and None not in labels  # every row has a label of record (the LLM's or the SLM's)
    # retries only resend what failed: no request got a real answer twice, and each real answer is stored
    # (plus the faults that arrive as answers: stored as 'no label', see faults.ANSWERED_FAULTS)
    assert max(flaky.answered.values()) == 1
    assert stored == flaky.paid_answers()
    assert len(server_requests) == sum(flaky.injected.values()) + len(flaky.answered)
    assert "round 2 done" in log.read_text()
