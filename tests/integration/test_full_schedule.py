"""The full schedule asks the LLM about a text at most twice, however many rounds run; a round whose labels
all name one class is called out."""

from __future__ import annotations

import json

import duckdb

from freeal_stream.testing.fake_openai_server import FakeOpenAIServer, ok
from freeal_stream.testing.jobs import cli_process, make_job
from freeal_stream.testing.keyword_llm import respond


def run(tmp_path, responder, rounds: int) -> tuple[str, duckdb.DuckDBPyConnection]:
    with FakeOpenAIServer(responder) as server:
        job = make_job(
            tmp_path,
            8,
            llm={"base_url": server.base_url, "model": "kw", "concurrency": 2},
            slm={"mode": "head", "epochs": 3},
            freeal={"schedule": "full", "rounds": rounds, "generated_per_class": 4},
        )
        log = tmp_path / "run.log"
        assert cli_process("run", str(job), log=log).wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text(), duckdb.connect(str(tmp_path / "state" / "freeal.duckdb"), read_only=True)


def test_a_text_goes_to_the_llm_at_most_twice(tmp_path):
    text, con = run(tmp_path, respond, rounds=4)
    most = con.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM annotations GROUP BY item_id)").fetchone()[0]
    refined = con.execute("SELECT count(DISTINCT item_id) FROM annotations WHERE round = 2").fetchone()[0]
    by_round = [
        json.loads(m)["requests_round"]
        for (m,) in con.execute("SELECT metrics FROM rounds WHERE metrics IS NOT NULL ORDER BY round").fetchall()
    ]
    paid = con.execute("SELECT count(*) FROM llm_answers").fetchone()[0]
    con.close()
    assert most == 2 and refined > 0
    assert sum(by_round) == paid  # the rounds' books add up: round 1 includes generating its demos
    assert "warning: all" not in text


def test_a_round_with_one_class_only_is_called_out(tmp_path):
    text, con = run(
        tmp_path, lambda body: ok("billing") if "<text>" in body["messages"][-1]["content"] else respond(body), rounds=1
    )
    con.close()
    assert "warning: all 32 LLM labels of round 1 are 'billing'" in text
