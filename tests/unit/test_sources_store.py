import dataclasses
import json

import numpy as np
import pytest

from freeal_stream.config import DataConfig, job_to_dict, parse_job
from freeal_stream.llm.client import ChatAnswer, ChatRequest
from freeal_stream.records import Annotation
from freeal_stream.session import check_resumable
from freeal_stream.sources import DataError, read_items
from freeal_stream.store import Store


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "fmt,body",
    [
        ("csv", 'id,text,gold\na,hello there,pos\nb,,neg\nc,"bye, now",neg\n'),
        (
            "jsonl",
            '{"id":"a","text":"hello there","gold":"pos"}\n{"id":"b","text":"  ","gold":"neg"}\n'
            '{"id":"c","text":"bye, now","gold":"neg"}\n',
        ),
    ],
)
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
    return ChatAnswer(
        key=key,
        content=content,
        finish_reason="stop",
        prompt_tokens=10,
        completion_tokens=1,
        cached_tokens=4,
        top_logprobs=[[("pos", -0.1), ("neg", -2.3)]],
        latency_s=0.1,
        attempts=1,
        error=None,
    )


def test_store_items_idempotent_and_answer_cache(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    assert s.add_items(["a", "b"], ["x", "y"], [None, None], ["p", None], ["h1", "h2"]) == 2
    assert s.add_items(["a", "c"], ["x", "z"], [None, None], [None, None], ["h1", "h3"]) == 1
    assert s.items_range(0, 10).ids == ["a", "b", "c"]
    assert s.items_at([2, 0]).texts == ["z", "x"] and list(s.positions_of(["c", "zz", "a"])) == [2, -1, 0]
    assert s.conflicting_ids(["a", "b"], ["h1", "other"]) == ["b"]
    req = ChatRequest(
        messages=(("user", "hi"),),
        model="m",
        temperature=0.0,
        max_tokens=2,
        logprobs=True,
        top_logprobs=2,
        template_version="v",
    )
    s.put_answers([(req, answer(req.key()))])
    s.put_answers([(req, answer(req.key(), "other"))])  # a second put never overwrites what was paid for
    got = s.get_answers([req.key(), "missing"])
    assert list(got) == [req.key()] and got[req.key()].content == "positive" and got[req.key()].from_cache
    assert got[req.key()].top_logprobs == [[("pos", -0.1), ("neg", -2.3)]]
    assert s.spent() == {
        "requests": 1,
        "prompt_tokens": 10,
        "completion_tokens": 1,
        "cached_tokens": 4,
        "usage_estimated": 0,
        "malformed": 0,
    }
    s.close()


_SCHEMA_1_ANSWERS = """CREATE TABLE llm_answers (
    key VARCHAR PRIMARY KEY, model VARCHAR, request JSON, content VARCHAR, finish_reason VARCHAR,
    prompt_tokens INTEGER, completion_tokens INTEGER, cached_tokens INTEGER, top_logprobs JSON,
    latency_s DOUBLE, attempts INTEGER, created_at DOUBLE)"""


def test_answers_stored_by_an_older_version_resume_migrated_checked_and_charged(tmp_path):
    """Schema 1 kept what the wire said: a logprob 'abc' (replaying it crashed every resume), usage that was
    missing (stored 0: the budget never counted it) or negative (it lowered the spend)."""
    import duckdb

    from freeal_stream.budget import estimate
    from freeal_stream.llm.verbalizer import Verbalizer

    path = tmp_path / "old.duckdb"
    reqs = [
        ChatRequest(
            messages=(("user", f"text {n} " * 10),),
            model="m",
            temperature=0.0,
            max_tokens=4,
            logprobs=True,
            top_logprobs=2,
            template_version="v",
        )
        for n in range(4)
    ]
    con = duckdb.connect(str(path))
    con.execute(_SCHEMA_1_ANSWERS)
    rows = [
        ("positive", 10, 1, '[[["positive", "abc"]]]'),  # a bad logprob
        ("positive", 0, 0, '[[["positive", -0.1]]]'),  # usage missing
        ("negative", -500, 1, None),  # negative usage
        ("negative", 10, 1, '[[["negative", -0.2]]]'),
    ]  # fine
    for r, (content, pt, ct, top) in zip(reqs, rows):
        con.execute(
            "INSERT INTO llm_answers VALUES (?, 'm', ?, ?, 'stop', ?, ?, 0, ?, 0.1, 1, 0)",
            [r.key(), json.dumps({"messages": r.as_messages(), "max_tokens": 4}), content, pt, ct, top],
        )
    con.close()

    s = Store(path)
    got = s.get_answers([r.key() for r in reqs])
    verb = Verbalizer({"positive": ["positive"], "negative": ["negative"]})
    bad = got[reqs[0].key()]
    assert bad.malformed and "logprob" in bad.malformed and bad.content == "" and bad.top_logprobs is None
    assert verb.parse(bad.content) is None and verb.probs_from_logprobs(bad.top_logprobs) is None
    for r in reqs[1:3]:  # charged the estimate, as a new answer without usage is
        e = estimate(r.messages, r.max_tokens, None)
        assert got[r.key()].usage_estimated and got[r.key()].prompt_tokens + got[r.key()].completion_tokens == e.tokens
    assert got[reqs[3].key()].prompt_tokens == 10 and not got[reqs[3].key()].usage_estimated
    assert got[reqs[1].key()].content == "positive" and verb.parse(got[reqs[1].key()].content) == 0
    spent = s.spent()
    assert spent["usage_estimated"] == 2 and spent["malformed"] == 1 and spent["prompt_tokens"] > 0
    assert s.get_meta("schema_version") == "4"
    big = ChatRequest(
        messages=(("user", "x"),),
        model="m",
        temperature=0.0,
        max_tokens=4,
        logprobs=False,
        top_logprobs=0,
        template_version="v",
    )
    s.put_answers([(big, dataclasses.replace(answer(big.key()), prompt_tokens=3_000_000_000))])  # BIGINT now
    s.close()
    s = Store(path)  # opening again migrates nothing twice
    assert s.spent()["usage_estimated"] == 2 and s.spent()["requests"] == 5
    s.close()


def test_label_of_record_under_each_rule(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    s.add_items(["a", "b", "c", "d", "e"], list("vwxyz"), [None] * 5, [None] * 5, list("12345"))
    s.add_annotations(
        1, [Annotation("a", "k1", 0, 0.9, ()), Annotation("b", "k2", None, None, ()), Annotation("d", "k4", 0, 0.7, ())]
    )
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
    assert s.label_counts("slm") == ({"llm": 2, "slm": 3}, 1)  # disputed the same under either rule
    positions, labels = s.llm_label_positions()
    assert list(positions) == [0, 1, 3, 4] and list(labels) == [1, -1, 0, 1]  # -1: the LLM gave no label
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
    s.add_scores(
        1,
        np.arange(4),
        probs,
        np.array([3.0, 1.0, nan, nan]),
        np.array([True, False, False, False]),
        p_right=np.array([0.9, 0.3, 0.8, nan]),
        llm_p_right=np.array([0.1, 0.7, nan, nan]),
    )
    s.add_scores(1, np.array([4]), np.array([[0.1, 0.9]]), np.array([2.0]), np.array([False]))  # not calibrated
    s.add_annotations(2, [Annotation("e", "ke", 0, 0.6, ())])  # labelled after the last SLM: nothing judged it
    auto = {r[1]: r for r in s.labels_rows("auto")}
    assert auto["a"][4:7] == (1, "slm round 1", 0.9) and auto["a"][10] == 0.9  # the SLM more likely right
    assert auto["d"][4:7] == (0, "llm round 1", 0.7) and auto["d"][9]  # disputed, yet the LLM more likely right
    assert {r[1]: r for r in s.labels_rows("slm")}["d"][4:6] == (1, "slm round 1")
    assert auto["c"][4:7] == (1, "slm round 1", 0.8)  # never annotated: the calibrated probability
    assert auto["e"][4:7] == (0, "llm round 2", 0.6) and auto["e"][10] is None  # not judged yet: as 'llm'
    assert auto["f"][4:7] == (0, "llm round 1", 0.9)  # no calibration stored: the LLM's label and confidence
    llm = {r[1]: r for r in s.labels_rows("llm")}
    assert llm["a"][4:7] == (0, "llm round 1", 0.1)  # the rule's label, with its calibrated probability
    assert s.label_counts("auto") == ({"llm": 3, "slm": 2}, 2)
    s.close()


def test_a_schema_3_state_gains_the_calibrated_probabilities_and_a_human_label_still_wins(tmp_path):
    """A state written by the human-review version (schema 3: human_labels, no p_right) migrates on open; under
    'auto' a human label stands over both models' labels, with probability 1."""
    import duckdb

    from freeal_stream.records import HumanLabel

    path = tmp_path / "v3.duckdb"
    s = Store(path)
    s.add_items(list("ab"), list("xy"), [None] * 2, [None] * 2, list("12"))
    s.add_annotations(1, [Annotation(i, f"k{i}", 0, 0.9, ()) for i in "ab"])
    s.add_scores(1, np.arange(2), np.array([[0.2, 0.8], [0.3, 0.7]]), np.array([3.0, 2.0]), np.array([False, False]))
    s.close()
    con = duckdb.connect(str(path))  # as schema 3 left it
    con.execute("ALTER TABLE slm_scores DROP COLUMN p_right; ALTER TABLE slm_scores DROP COLUMN llm_p_right")
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    con.close()
    s = Store(path)
    assert s.get_meta("schema_version") == "4"
    s.add_scores(
        2,
        np.arange(2),
        np.array([[0.2, 0.8], [0.3, 0.7]]),
        np.array([3.0, 2.0]),
        np.array([False, False]),
        p_right=np.array([0.9, 0.9]),
        llm_p_right=np.array([0.1, 0.1]),
    )
    s.add_human_labels("r.csv", [HumanLabel("b", 0, "ann")], "auto")
    auto = {r[1]: r for r in s.labels_rows("auto")}
    assert auto["a"][4:7] == (1, "slm round 2", 0.9) and auto["a"][10] == 0.9
    assert auto["b"][4:7] == (0, "human", 1.0) and auto["b"][10] == 1.0 and auto["b"][7:9] == (0, 1)
    s.close()


def test_second_writer_is_refused(tmp_path):
    import subprocess
    import sys

    s = Store(tmp_path / "s.duckdb")
    code = (
        "import sys; from freeal_stream.store import Store, StateError\n"
        f"try: Store(r'{tmp_path / 's.duckdb'}')\nexcept StateError as e: print('refused', e); sys.exit(0)\n"
        "sys.exit(1)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    s.close()
    assert r.returncode == 0 and "in use by another process" in r.stdout


def test_resume_compatibility():
    base = {"name": "t", "data": {"path": "x.csv"}, "task": {"description": "d", "classes": {"a": "a", "b": "b"}}}
    a = job_to_dict(parse_job(base))
    b = job_to_dict(
        parse_job(
            {
                **base,
                "budget": {"max_requests": 5},
                "freeal": {
                    "rounds": 7,
                    "label_of_record": "slm",  # changes no stored round
                    "warmup_epochs": 1,
                },
            }
        )
    )  # the default before it was chosen by label count
    c = job_to_dict(parse_job({**base, "freeal": {"tau": 0.5}, "llm": {"model": "other"}}))
    assert check_resumable(a, b) == []
    assert check_resumable(a, c) == ["freeal.tau", "llm.model"]


def test_state_from_before_a_new_field_resumes_when_the_field_holds_its_default():
    from freeal_stream.config import DataConfig, LLMConfig

    stored = {"data": {"path": "x.csv"}, "llm": {"model": "m"}}
    current = {
        "data": {"path": "x.csv", "max_text_chars": DataConfig.max_text_chars},
        "llm": {"model": "m", "circuit_failures": LLMConfig.circuit_failures},
    }
    assert check_resumable(stored, current) == []
    current["data"]["max_text_chars"] = 50  # a new field set away from its default does change the prompts
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
    assert s.items_range(0, 5).ids == ["a", "b"] and s.get_meta("schema_version") == "4"
    assert s.add_items(["c"], ["z"], [None], [None], ["h3"]) == 1 and list(s.positions_of(["c"])) == [2]
    positions, preds = s.slm_predictions(1)
    assert list(positions) == [0] and list(preds) == [0]
    # 4: the calibrated probabilities, empty for rounds scored before they existed ('auto' then acts as 'llm')
    assert {r[1]: r for r in s.labels_rows("auto")}["a"][6:] == (0.9, None, 0, False, None)
    s.close()
    assert Store(path).get_meta("schema_version") == "4"  # opening again changes nothing


@pytest.mark.parametrize("fmt", ["JSON", "CSV", "PARQUET"])
def test_a_confidence_that_is_not_a_number_is_exported_as_null(tmp_path, fmt):
    """An `Infinity` logprob gives confidence NaN: exports and /labels carry null, never a NaN token."""
    import duckdb

    s = Store(tmp_path / "s.duckdb")
    s.add_items(["a", "b", "c"], ["x", "y", "z"], [None] * 3, [None] * 3, ["1", "2", "3"])
    s.add_annotations(
        1,
        [
            Annotation("a", "k1", 0, float("nan"), ()),
            Annotation("b", "k2", 1, float("inf"), ()),
            Annotation("c", "k3", 1, 0.75, ()),
        ],
    )
    out = tmp_path / f"labels.{fmt.lower()}"
    s.export(str(out), fmt, ["neg", "pos"], "llm")
    assert [x["confidence"] for x in s.labels_since(0, 10, ["neg", "pos"], "llm")["items"]] == [None, None, 0.75]
    s.close()
    if fmt == "JSON":
        rows = [
            json.loads(line, parse_constant=lambda name: pytest.fail(f"the export holds {name}"))
            for line in out.read_text().splitlines()
        ]
        confidences = [r["confidence"] for r in rows]
    else:
        confidences = [r[0] for r in duckdb.sql(f"SELECT confidence FROM '{out}' ORDER BY id").fetchall()]
    assert confidences == [None, None, 0.75]


def test_the_state_folder_and_its_files_are_private(tmp_path):
    """Texts, answers and models are the user's data: state folder 0700, DuckDB file 0600 (also for a state
    made by an older version with the umask's 0755/0644), model and embedding folders 0700."""
    import os
    import stat

    from freeal_stream.slm.encoder import EmbeddingCache
    from freeal_stream.slm.model import write_model_files

    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
    old = os.umask(0o022)
    try:
        Store(tmp_path / "new" / "state" / "freeal.duckdb").close()
        assert mode(tmp_path / "new" / "state") == 0o700 and mode(tmp_path / "new" / "state" / "freeal.duckdb") == 0o600
        made_before = tmp_path / "old"
        made_before.mkdir(mode=0o755)
        Store(made_before / "freeal.duckdb").close()
        os.chmod(made_before, 0o755)
        os.chmod(made_before / "freeal.duckdb", 0o644)
        Store(made_before / "freeal.duckdb").close()
        assert mode(made_before) == 0o700 and mode(made_before / "freeal.duckdb") == 0o600
        shared = tmp_path / "shared"  # a folder holding the user's other files keeps its mode
        shared.mkdir(mode=0o755)
        (shared / "notes.txt").write_text("mine")
        Store(shared / "freeal.duckdb").close()
        assert mode(shared) == 0o755 and mode(shared / "freeal.duckdb") == 0o600
        models = write_model_files({"model.json": b"{}"}, shared / "models" / "round-1")
        cache = EmbeddingCache(shared / "embeddings", "enc|max_length=8")
        assert mode(shared / "models") == mode(models) == mode(shared / "embeddings") == mode(cache.dir) == 0o700
    finally:
        os.umask(old)
