"""Human labels back in the loop, through the CLI on a real job (fake OpenAI server, real Ray, DuckDB, SLM):
review export -> edit -> import -> export changes exactly the edited rows; the next round never sends a reviewed
text to the LLM and trains on the human labels as clean; status and the report show the human check."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import duckdb
import yaml

from freeal_stream.cli import main
from freeal_stream.report import PLOTS
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import cli_process, make_job
from freeal_stream.testing.keyword_llm import respond

CLASSES = ["billing", "technical", "shipping", "account"]


def labels(job: Path, out: Path) -> dict[str, dict[str, str]]:
    assert main(["export", str(job), str(out)]) == 0
    with open(out, encoding="utf-8") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_a_review_round_trip_changes_exactly_the_edited_rows_and_steers_the_next_round(tmp_path, capsys):
    log = tmp_path / "run.log"
    with FakeOpenAIServer(respond) as server:
        job = make_job(
            tmp_path,
            8,
            llm={"base_url": server.base_url, "model": "kw"},
            slm={"mode": "head", "epochs": 4},
            freeal={"rounds": 1, "query_fraction": 0.3, "generated_per_class": 3, "prototypes": 4},
        )
        assert cli_process("run", str(job), log=log).wait(timeout=600) == 0, log.read_text()[-3000:]
        before = labels(job, tmp_path / "before.csv")

        queue = tmp_path / "queue.csv"
        assert main(["review", "export", str(job), str(queue), "--n", "8"]) == 0
        assert "wrote 8 rows for review" in capsys.readouterr().out
        with open(queue, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 8 and rows[0]["suggested_label"] in CLASSES and not any(r["label"] for r in rows)
        edited = {}
        for r, change in zip(rows[:3], (True, True, False)):  # two corrections, one confirmation
            r["label"] = next(c for c in CLASSES if c != r["suggested_label"]) if change else r["suggested_label"]
            edited[r["item_id"]] = r["label"]
        with open(queue, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

        assert main(["review", "import", str(job), str(queue)]) == 0
        out = capsys.readouterr().out
        assert "3 human labels (3 new, 0 changed, 0 as stored already); 5 rows not reviewed; 0 quarantined" in out
        after = labels(job, tmp_path / "after.csv")
        assert {i for i in after if after[i]["label"] != before[i]["label"]} == {
            i for i, lab in edited.items() if lab != before[i]["label"]
        }
        assert {i for i in after if after[i]["source"] == "human"} == set(edited)
        assert all(after[i]["label"] == lab for i, lab in edited.items())
        assert main(["review", "import", str(job), str(queue)]) == 0  # idempotent
        assert "(0 new, 0 changed, 3 as stored already)" in capsys.readouterr().out
        assert labels(job, tmp_path / "again.csv") == after

        # a second queue never offers a reviewed row
        assert (
            main(["review", "export", str(job), str(tmp_path / "q2.json"), "--n", "50", "--format", "labelstudio"]) == 0
        )
        assert not {t["data"]["item_id"] for t in json.loads((tmp_path / "q2.json").read_text())} & set(edited)

        # the next round: reviewed texts are not sent to the LLM, and the SLM keeps their labels as clean
        spec = yaml.safe_load(job.read_text())
        spec["freeal"]["rounds"] = 2
        job.write_text(yaml.safe_dump(spec, sort_keys=False))
        assert cli_process("run", str(job), log=log).wait(timeout=600) == 0, log.read_text()[-3000:]
    assert "of them human labels, clean by fiat" in log.read_text()
    con = duckdb.connect(str(tmp_path / "state" / "freeal.duckdb"), read_only=True)
    sent = {r[0] for r in con.execute("SELECT item_id FROM annotations WHERE round = 2").fetchall()}
    clean = dict(con.execute("SELECT item_id, clean FROM slm_scores WHERE round = 2").fetchall())
    metrics = json.loads(con.execute("SELECT metrics FROM rounds WHERE round = 2").fetchone()[0])
    con.close()
    assert sent and not sent & set(edited)
    assert all(clean[i] for i in edited) and metrics["human_labels"] == 3
    final = labels(job, tmp_path / "final.csv")
    assert all(final[i]["label"] == lab and final[i]["source"] == "human" for i, lab in edited.items())

    assert main(["status", str(job)]) == 0
    assert "human review: 3 rows; the models' label was right on 1 (33.3%" in capsys.readouterr().out
    report = tmp_path / "report.html"
    assert main(["report", str(job), str(report)]) == 0
    page = report.read_text(encoding="utf-8")
    assert all(f'id="plot-{p}"' in page for p in PLOTS) and "human" in page
