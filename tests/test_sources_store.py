import json

import numpy as np
import pytest

from freeal_stream.config import DataConfig, parse_job
from freeal_stream.llm.client import ChatAnswer, ChatRequest
from freeal_stream.session import check_resumable
from freeal_stream.config import job_to_dict
from freeal_stream.sources import DataError, read_items
from freeal_stream.records import Annotation
from freeal_stream.store import StateError, Store


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt,body", [
    ("csv", "id,text,gold\na,hello there,pos\nb,,neg\nc,\"bye, now\",neg\n"),
    ("jsonl", '{"id":"a","text":"hello there","gold":"pos"}\n{"id":"b","text":"  ","gold":"neg"}\n'
              '{"id":"c","text":"bye, now","gold":"neg"}\n'),
])
def test_read_items_formats_skip_empty(tmp_path, fmt, body):
    p = write(tmp_path / f"d.{fmt}", body)
    b = read_items(DataConfig(path=p, id_column="id", gold_column="gold"))
    assert b.ids == ["a", "c"] and b.texts == ["hello there", "bye, now"] and b.golds == ["pos", "neg"]
    assert b.skipped_empty == 1


def test_read_parquet_and_missing_column(tmp_path):
    import duckdb
    p = tmp_path / "d.parquet"
    duckdb.sql(f"COPY (SELECT 'x' AS body) TO '{p}' (FORMAT PARQUET)")
    with pytest.raises(DataError, match="no column 'text'"):
        read_items(DataConfig(path=str(p)))
    assert read_items(DataConfig(path=str(p), text_column="body")).ids == ["row-0"]


def test_duplicate_id_with_another_text_is_quarantined_keeping_the_first(tmp_path):
    p = write(tmp_path / "d.csv", "id,text\na,one\na,two\na,one\n")
    b = read_items(DataConfig(path=p, id_column="id"))
    assert b.texts == ["one"] and b.duplicates == 1
    assert [(q.reason, q.line, q.raw) for q in b.problems] == [("id reused with another text", 3, "a,two")]


def answer(key, content="positive"):
    return ChatAnswer(key=key, content=content, finish_reason="stop", prompt_tokens=10, completion_tokens=1,
                      cached_tokens=4, top_logprobs=[[("pos", -0.1), ("neg", -2.3)]], latency_s=0.1,
                      attempts=1, error=None)


def test_store_items_idempotent_and_answer_cache(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    assert s.add_items(["a", "b"], ["x", "y"], [None, None], ["p", None], ["h1", "h2"]) == 2
    assert s.add_items(["a", "c"], ["x", "z"], [None, None], [None, None], ["h1", "h3"]) == 1
    assert s.items_range(0, 10).ids == ["a", "b", "c"]
    assert s.items_at([2, 0]).texts == ["z", "x"] and list(s.positions_of(["c", "zz", "a"])) == [2, -1, 0]
    assert s.conflicting_ids(["a", "b"], ["h1", "other"]) == ["b"]
    req = ChatRequest(messages=(("user", "hi"),), model="m", temperature=0.0, max_tokens=2, logprobs=True,
                      top_logprobs=2, template_version="v")
    s.put_answer(req, answer(req.key()))
    s.put_answer(req, answer(req.key(), "other"))  # a second put never overwrites what was paid for
    got = s.get_answers([req.key(), "missing"])
    assert list(got) == [req.key()] and got[req.key()].content == "positive" and got[req.key()].from_cache
    assert got[req.key()].top_logprobs == [[("pos", -0.1), ("neg", -2.3)]]
    assert s.spent() == {"requests": 1, "prompt_tokens": 10, "completion_tokens": 1, "cached_tokens": 4}
    s.close()


def test_label_of_record_under_each_rule(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    s.add_items(["a", "b", "c", "d", "e"], list("vwxyz"), [None] * 5, [None] * 5, list("12345"))
    s.add_annotations(1, [Annotation("a", "k1", 0, 0.9, ()), Annotation("b", "k2", None, None, ()),
                          Annotation("d", "k4", 0, 0.7, ())])
    s.add_annotations(2, [Annotation("a", "k3", 1, 0.8, ("d1",))])
    probs = np.array([[0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.1, 0.9]])
    s.add_scores(2, np.arange(4), probs, np.array([0.1, np.nan, np.nan, 2.0]), np.array([True, False, False, False]))
    s.add_annotations(3, [Annotation("e", "k5", 1, 0.6, ())])  # labelled after the last SLM: nothing judged it yet
    for rule in ("llm", "slm"):
        rows = {r[1]: r for r in s.labels_rows(rule)}
        assert rows["a"][4:7] == (1, "llm round 2", 0.8) and not rows["a"][9]  # the SLM kept it clean
        assert rows["b"][4:6] == (0, "slm round 2")  # the LLM gave no label: the SLM's prediction stands
        assert rows["c"][4:6] == (1, "slm round 2")  # never annotated
        assert rows["d"][7:10] == (0, 1, True)  # in the SLM's noisy split: disputed under either rule
        assert rows["e"][4:6] == (1, "llm round 3") and not rows["e"][9]
    # 'llm': the disputed LLM label stands; 'slm': the SLM's prediction replaces it
    assert {r[1]: r for r in s.labels_rows("llm")}["d"][4:7] == (0, "llm round 1", 0.7)
    assert {r[1]: r for r in s.labels_rows("slm")}["d"][4:7] == (1, "slm round 2", 0.9)
    assert s.label_counts("llm") == ({"llm": 3, "slm": 2}, 1)
    assert s.label_counts("slm") == ({"llm": 2, "slm": 3}, 1)   # disputed the same under either rule
    positions, labels = s.llm_label_positions()
    assert list(positions) == [0, 1, 3, 4] and list(labels) == [1, -1, 0, 1]   # -1: the LLM gave no label
    assert list(s.annotated_positions(min_rounds=2)) == [0]
    with pytest.raises(ValueError, match="label_of_record"):
        s.labels_rows("majority")
    s.close()


def test_auto_rule_keeps_the_label_more_likely_right(tmp_path):
    """'auto' replaces an LLM label by the SLM's prediction only where the calibrated probabilities (stored by the
    round that judged that LLM label) say the SLM's is more likely right; the confidence is that probability."""
    s = Store(tmp_path / "s.duckdb")
    s.add_items(list("adcef"), list("vwxyz"), [None] * 5, [None] * 5, list("12345"))
    s.add_annotations(1, [Annotation(i, f"k{i}", 0, 0.9, ()) for i in "adf"])
    probs = np.array([[0.2, 0.8], [0.4, 0.6], [0.3, 0.7], [0.5, 0.5]])
    nan = np.nan
    s.add_scores(1, np.arange(4), probs, np.array([3.0, 1.0, nan, nan]), np.array([True, False, False, False]),
                 p_right=np.array([0.9, 0.3, 0.8, nan]), llm_p_right=np.array([0.1, 0.7, nan, nan]))
    s.add_scores(1, np.array([4]), np.array([[0.1, 0.9]]), np.array([2.0]), np.array([False]))   # not calibrated
    s.add_annotations(2, [Annotation("e", "ke", 0, 0.6, ())])   # labelled after the last SLM: nothing judged it
    auto = {r[1]: r for r in s.labels_rows("auto")}
    assert auto["a"][4:7] == (1, "slm round 1", 0.9) and auto["a"][10] == 0.9   # the SLM more likely right
    assert auto["d"][4:7] == (0, "llm round 1", 0.7) and auto["d"][9]   # disputed, yet the LLM more likely right
    assert {r[1]: r for r in s.labels_rows("slm")}["d"][4:6] == (1, "slm round 1")
    assert auto["c"][4:7] == (1, "slm round 1", 0.8)   # never annotated: the calibrated probability
    assert auto["e"][4:7] == (0, "llm round 2", 0.6) and auto["e"][10] is None   # not judged yet: as 'llm'
    assert auto["f"][4:7] == (0, "llm round 1", 0.9)   # no calibration stored: the LLM's label and confidence
    llm = {r[1]: r for r in s.labels_rows("llm")}
    assert llm["a"][4:7] == (0, "llm round 1", 0.1)   # the rule's label, with its calibrated probability
    assert s.label_counts("auto") == ({"llm": 3, "slm": 2}, 2)
    s.close()


def test_second_writer_is_refused(tmp_path):
    import subprocess
    import sys
    s = Store(tmp_path / "s.duckdb")
    code = ("import sys; from freeal_stream.store import Store, StateError\n"
            f"try: Store(r'{tmp_path / 's.duckdb'}')\nexcept StateError as e: print('refused', e); sys.exit(0)\n"
            "sys.exit(1)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    s.close()
    assert r.returncode == 0 and "in use by another process" in r.stdout


def test_resume_compatibility():
    base = {"name": "t", "data": {"path": "x.csv"}, "task": {"description": "d", "classes": {"a": "a", "b": "b"}}}
    a = job_to_dict(parse_job(base))
    b = job_to_dict(parse_job({**base, "budget": {"max_requests": 5},
                               "freeal": {"rounds": 7, "label_of_record": "slm",   # changes no stored round
                                          "warmup_epochs": 1}}))   # the default before it was chosen by label count
    c = job_to_dict(parse_job({**base, "freeal": {"tau": 0.5}, "llm": {"model": "other"}}))
    assert check_resumable(a, b) == []
    assert check_resumable(a, c) == ["freeal.tau", "llm.model"]


def test_state_from_before_a_new_field_resumes_when_the_field_holds_its_default():
    from freeal_stream.config import DataConfig, LLMConfig

    stored = {"data": {"path": "x.csv"}, "llm": {"model": "m"}}
    current = {"data": {"path": "x.csv", "max_text_chars": DataConfig.max_text_chars},
               "llm": {"model": "m", "circuit_failures": LLMConfig.circuit_failures}}
    assert check_resumable(stored, current) == []
    current["data"]["max_text_chars"] = 50   # a new field set away from its default does change the prompts
    assert check_resumable(stored, current) == ["data.max_text_chars"]


def test_a_version_1_state_file_is_migrated_on_open(tmp_path):
    """Files written before pool positions existed get dense positions in ingestion order (gaps in seq and all),
    and lose the per-item JSON probabilities (they live in array files now)."""
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("""CREATE TABLE items (seq BIGINT PRIMARY KEY, id VARCHAR UNIQUE NOT NULL, text VARCHAR NOT NULL,
                   view VARCHAR, gold VARCHAR, content_hash VARCHAR NOT NULL, ingested_at DOUBLE NOT NULL)""")
    con.execute("INSERT INTO items VALUES (0, 'a', 'x', NULL, NULL, 'h1', 0), (3, 'b', 'y', NULL, 'p', 'h2', 0)")
    con.execute("""CREATE TABLE slm_scores (round INTEGER NOT NULL, item_id VARCHAR NOT NULL, pred INTEGER NOT NULL,
                   confidence DOUBLE NOT NULL, probs JSON, loss DOUBLE, clean BOOLEAN, PRIMARY KEY (round, item_id))""")
    con.execute("INSERT INTO slm_scores VALUES (1, 'a', 0, 0.9, '[0.9, 0.1]', NULL, false)")
    con.close()
    s = Store(path)
    assert s.items_range(0, 5).ids == ["a", "b"] and s.get_meta("schema_version") == "3"
    assert s.add_items(["c"], ["z"], [None], [None], ["h3"]) == 1 and list(s.positions_of(["c"])) == [2]
    positions, preds = s.slm_predictions(1)
    assert list(positions) == [0] and list(preds) == [0]
    # v2 -> v3: the calibrated probabilities, empty for rounds scored before they existed ('auto' then acts as 'llm')
    assert {r[1]: r for r in s.labels_rows("auto")}["a"][6:] == (0.9, None, 0, False, None)
    s.close()
    assert Store(path).get_meta("schema_version") == "3"   # opening again changes nothing
