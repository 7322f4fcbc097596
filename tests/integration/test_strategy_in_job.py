"""A user's strategy file in a real job: one that breaks the contract stops the run with an error naming it,
before the round starts (nothing stored for it); fixed, the same job resumes and finishes."""

from __future__ import annotations

import duckdb

from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import cli_process, make_job
from freeal_stream.testing.keyword_llm import respond

BROKEN = """
import numpy as np
from strategies.base import Candidates, QueryStrategy


class Mine(QueryStrategy):
    def candidates(self, shard, n, ctx):
        k = min(n, len(shard))
        return Candidates(np.array([shard.ids[0]] * k, dtype=object), np.zeros(k))   # the same id k times
"""

FIXED = """
import numpy as np
from strategies.base import QueryStrategy
from strategies.order import top


class Mine(QueryStrategy):
    def candidates(self, shard, n, ctx):
        return top(shard.ids, np.zeros(len(shard)), n, ctx)
"""


def test_a_misbehaving_strategy_stops_the_run_cleanly_and_a_fixed_one_resumes(tmp_path):
    (tmp_path / "mine.py").write_text(BROKEN)
    log = tmp_path / "run.log"
    with FakeOpenAIServer(respond) as server:
        job = make_job(
            tmp_path,
            6,
            llm={"base_url": server.base_url, "model": "kw"},
            slm={"mode": "head", "epochs": 2},
            freeal={"rounds": 1, "generated_per_class": 3},
            strategy={"name": "mine.py:Mine"},
        )  # relative to the job file
        assert cli_process("run", str(job), log=log).wait(timeout=300) == 2
        text = log.read_text()
        assert "strategy 'Mine': candidates() returned id" in text and "more than once" in text
        assert "Traceback" not in text
        con = duckdb.connect(str(tmp_path / "state" / "freeal.duckdb"), read_only=True)
        assert con.execute("SELECT count(*) FROM rounds").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM annotations").fetchone()[0] == 0
        con.close()

        (tmp_path / "mine.py").write_text(FIXED)
        assert cli_process("run", str(job), log=log).wait(timeout=300) == 0, log.read_text()[-2000:]
    con = duckdb.connect(str(tmp_path / "state" / "freeal.duckdb"), read_only=True)
    assert con.execute("SELECT phase FROM rounds").fetchall() == [("done",)]
    con.close()
