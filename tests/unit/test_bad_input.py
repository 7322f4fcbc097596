"""Bad input never crashes a job and never loses a row: a file that cannot be used is refused with the file,
the column and the fix (nothing stored); a bad row is quarantined (stored with its raw content, location and
reason, not labelled); a usable row with a caveat is stored and flagged. Real DuckDB files, no LLM, no Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import duckdb
import pytest
import yaml

from freeal_stream.cli import main
from freeal_stream.config import ConfigError, DataConfig, load_job, parse_job
from freeal_stream.intake import add_api_items, add_batch, ingest, ingest_data_file, quarantine_rows, read_data_batches
from freeal_stream.llm.prompts import TRUNCATION_MARK, annotation_messages, truncate_text
from freeal_stream.llm.verbalizer import Verbalizer
from freeal_stream.progress import Progress
from freeal_stream.service.client import ServiceClient
from freeal_stream.service.http_api import ApiHandlers, ApiServer
from freeal_stream.service.inbox import Inbox
from freeal_stream.sources import DataError, content_hash, read_items
from freeal_stream.status import job_status
from freeal_stream.store import Store

CLASSES = {"pos": ["positive"], "neg": ["negative"]}


def make_job(tmp_path: Path, data: Path, **data_cfg):
    raw = {
        "name": "bad",
        "data": {"path": str(data), "text_column": "text", **data_cfg},
        "task": {"description": "Sentiment.", "classes": CLASSES},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # class order is part of the job
    return load_job(path)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    yield s
    s.close()


def stored(store: Store) -> dict[str, str]:
    items = store.items_range(0, store.count_items())
    return dict(zip(items.ids, items.texts))


def quarantined(store: Store) -> list[tuple]:
    """(location, reason, raw) of every quarantined row, in file order."""
    rows = store.problems(1000, "quarantined")
    return [(r["location"], r["reason"], r["raw"]) for r in rows]


def counts(store: Store, job) -> dict[tuple[str, str], int]:
    """What `status` reports: rows per (action, reason)."""
    q = job_status(store, job)["quarantine"]
    return {(c["action"], c["reason"]): c["count"] for c in q["by_reason"]}


def ingest_file(store: Store, job, path: Path) -> int:
    """`path` read with the job's data settings and added, as `ingest` does without a running service."""
    return add_batch(
        store, read_items(dataclasses.replace(job.data, path=str(path)), class_names=job.task.class_names), path.name
    )


# ---- CSV --------------------------------------------------------------------------------------------------
def test_ragged_rows_and_bad_quoting_are_quarantined_and_every_good_row_is_stored(tmp_path, store):
    data = tmp_path / "d.csv"
    data.write_text(
        "id,text,gold\n"
        "a,first good row,pos\n"
        "b,too,many,fields\n"
        "c,too few\n"
        'd,"a ""quoted"", fine, text",neg\n'
        'e,"bad "quote" inside",neg\n'
        'f,"unclosed quote,neg\n'
        "g,after the unclosed quote,pos\n"
        'h,"a text over\ntwo lines",neg\n',
        encoding="utf-8",
    )
    job = make_job(tmp_path, data, id_column="id", gold_column="gold")
    assert ingest_file(store, job, data) == 4
    assert stored(store) == {
        "a": "first good row",
        "d": 'a "quoted", fine, text',
        "g": "after the unclosed quote",
        "h": "a text over\ntwo lines",
    }
    assert quarantined(store) == [
        ("line 3", "unreadable row", "b,too,many,fields"),
        ("line 4", "unreadable row", "c,too few"),
        ("line 6", "unreadable row", 'e,"bad "quote" inside",neg'),
        ("line 7", "unreadable row", 'f,"unclosed quote,neg'),
    ]
    details = [r["detail"] for r in store.problems(10)]
    assert details[0].startswith("line 3: 4 fields where the header has 3. Fix: quote")
    assert details[3].startswith("line 7: a quote opened on this line is never closed")
    assert counts(store, job) == {("quarantined", "unreadable row"): 4}


def test_json_lines_in_a_csv_file_are_quarantined_not_split_into_fields(tmp_path, store):
    # the csv module splits '{"id": "j", "text": "t", "gold": "pos"}' at its commas into three fields of garbage
    data = tmp_path / "d.csv"
    data.write_text(
        "id,text,gold\n"
        "a,first good row,pos\n"
        '{"id": "j1", "text": "a json line", "gold": "pos"}\n'
        '  {"id":"j2","text":"compact, with a comma","gold":"neg"}\n'
        '{"id": "j3"}\n'
        'b,"{""quoted"": ""a CSV field that is JSON""}",neg\n'
        "{not json,really,pos\n",
        encoding="utf-8",
    )
    job = make_job(tmp_path, data, id_column="id", gold_column="gold")
    assert ingest_file(store, job, data) == 3
    assert stored(store) == {
        "a": "first good row",
        "b": '{"quoted": "a CSV field that is JSON"}',
        "{not json": "really",
    }
    assert quarantined(store) == [
        ("line 3", "JSON line in a CSV file", '{"id": "j1", "text": "a json line", "gold": "pos"}'),
        ("line 4", "JSON line in a CSV file", '  {"id":"j2","text":"compact, with a comma","gold":"neg"}'),
        ("line 5", "JSON line in a CSV file", '{"id": "j3"}'),
    ]
    assert store.problems(1)[0]["detail"] == (
        "line 3: a JSON object, not a row of the CSV's columns. Fix: write it as a CSV row, or put JSON records "
        "in a .jsonl file of their own"
    )


def test_non_utf8_bytes_quarantine_the_row_with_the_bytes_shown(tmp_path, store):
    data = tmp_path / "d.csv"
    data.write_bytes(b"id,text\na,fine\nb,caf\xff\xfe au lait\nc,also fine\n")
    job = make_job(tmp_path, data, id_column="id")
    assert ingest_file(store, job, data) == 2 and set(stored(store)) == {"a", "c"}
    [(location, reason, raw)] = quarantined(store)
    assert (location, reason, raw) == ("line 3", "not UTF-8", "b,caf\\xff\\xfe au lait")
    assert "byte 6 of line 3 is not UTF-8. Fix: save the file as UTF-8" in store.problems(1)[0]["detail"]


def test_a_header_that_is_not_utf8_refuses_the_file(tmp_path, store):
    data = tmp_path / "d.csv"
    data.write_bytes(b"\xff\xfeid,text\na,x\n")
    with pytest.raises(DataError, match=r"d\.csv: cannot be read as csv: the header \(line 1\) is not UTF-8"):
        read_items(DataConfig(path=str(data)))


def test_empty_and_blank_texts_and_ids_are_quarantined(tmp_path, store):
    data = tmp_path / "d.csv"
    data.write_text("id,text\na,kept\nb,\nc,   \n,no id here\nd,kept too\n")
    job = make_job(tmp_path, data, id_column="id")
    assert ingest_file(store, job, data) == 2
    assert quarantined(store) == [
        ("line 3", "empty text", "b,"),
        ("line 4", "empty text", "c,   "),
        ("line 5", "empty id", ",no id here"),
    ]
    assert "field 'text' is empty or blank" in store.problems(1)[0]["detail"]
    assert counts(store, job) == {("quarantined", "empty text"): 2, ("quarantined", "empty id"): 1}


# ---- JSON lines and Parquet ---------------------------------------------------------------------------------
def test_broken_json_lines_are_quarantined_by_line(tmp_path, store):
    data = tmp_path / "d.jsonl"
    data.write_bytes(
        b'{"id": "a", "text": "one"}\n'
        b'{"id": "b", "text": "broken\n'
        b'["not", "an", "object"]\n'
        b'{"id": "c", "text": ["a", "list"]}\n'
        b'\xff{"id": "x", "text": "bad bytes"}\n'
        b'{"id": "d", "text": "four"}\n'
    )
    job = make_job(tmp_path, data, id_column="id")
    assert ingest_file(store, job, data) == 2 and stored(store) == {"a": "one", "d": "four"}
    assert quarantined(store) == [
        ("line 2", "broken JSON line", '{"id": "b", "text": "broken'),
        ("line 3", "broken JSON line", '["not", "an", "object"]'),
        ("line 4", "bad field type", '{"id": "c", "text": ["a", "list"]}'),
        ("line 5", "not UTF-8", '\\xff{"id": "x", "text": "bad bytes"}'),
    ]
    assert "line 4: field 'text' is a list, not a string" in store.problems(10)[2]["detail"]


def test_a_jsonl_file_with_no_json_object_is_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("id,text\na,b\n")
    with pytest.raises(DataError, match=r"d\.jsonl: cannot be read as jsonl: no line is a JSON object \(line 1"):
        read_items(DataConfig(path=str(data)))


@pytest.mark.parametrize(
    "fmt, body", [("parquet", None), ("csv", "id,body\na,x\n"), ("jsonl", '{"id": "a", "body": "x"}\n')]
)
def test_a_missing_text_column_refuses_the_file_and_stores_nothing(tmp_path, store, fmt, body):
    data = tmp_path / f"d.{fmt}"
    if body is None:
        duckdb.sql(f"COPY (SELECT 'a' AS id, 'x' AS body) TO '{data}' (FORMAT PARQUET)")
    else:
        data.write_text(body)
    job = make_job(tmp_path, data, id_column="id")
    with pytest.raises(DataError) as e:
        ingest(job, store, Progress())
    assert (
        f"d.{fmt}: no column 'text' (data.text_column); the file has ['id', 'body']. "
        "Fix: set data.text_column to one of those" in str(e.value)
    )
    assert store.count_items() == 0 and store.problem_counts() == []


def test_a_missing_id_column_a_missing_file_and_an_unreadable_file_are_refused(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text\nx\n")
    with pytest.raises(DataError, match=r"no column 'key' \(data\.id_column\).*Fix: set data\.id_column"):
        read_items(DataConfig(path=str(data), id_column="key"))
    with pytest.raises(DataError, match="nope.csv: data file not found. Fix: check data.path"):
        read_items(DataConfig(path=str(tmp_path / "nope.csv")))
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match=r"g\.parquet: cannot be read as parquet: .* Fix: check the file"):
        read_items(DataConfig(path=str(garbage)))


# ---- duplicates ---------------------------------------------------------------------------------------------
def test_a_duplicate_id_in_one_file_keeps_the_first_and_quarantines_a_changed_text(tmp_path, store):
    data = tmp_path / "d.csv"
    data.write_text("id,text\na,the first text\nb,other\na,a different text\na,the first text\n")
    job = make_job(tmp_path, data, id_column="id")
    batch = read_items(job.data)
    assert batch.duplicates == 1  # same id, same text: a plain duplicate, skipped
    assert add_batch(store, batch, "d.csv") == 2 and stored(store)["a"] == "the first text"
    [(location, reason, raw)] = quarantined(store)
    assert (location, reason, raw) == ("line 4", "id reused with another text", "a,a different text")
    assert "id 'a' was first used by line 2 with a different text; the first is kept" in store.problems(1)[0]["detail"]


def test_an_id_stored_earlier_with_another_text_is_quarantined_in_a_later_file(tmp_path, store):
    first, later = tmp_path / "first.csv", tmp_path / "later.csv"
    first.write_text("id,text\na,original\nb,second\n")
    later.write_text("id,text\na,changed\nb,second\nc,new\n")
    job = make_job(tmp_path, first, id_column="id")
    assert ingest_file(store, job, first) == 2
    assert ingest_file(store, job, later) == 1  # c; b is a plain duplicate
    assert stored(store) == {"a": "original", "b": "second", "c": "new"}
    [row] = store.problems(10)  # located and shown as the row was written, as a clash within one file is
    assert (row["source"], row["location"], row["line"], row["reason"], row["item_id"], row["raw"]) == (
        "later.csv",
        "line 2",
        2,
        "id reused with another text",
        "a",
        "a,changed",
    )
    assert row["detail"].startswith("line 2: id 'a' is already stored with a different text; the stored one is kept")
    ingest_file(store, job, later)  # the same file again records nothing twice
    assert counts(store, job) == {("quarantined", "id reused with another text"): 1}


# ---- flagged, kept ------------------------------------------------------------------------------------------
def test_a_long_text_is_stored_whole_flagged_and_truncated_in_the_prompt(tmp_path, store):
    long = "word " * 100
    data = tmp_path / "d.csv"
    data.write_text(f"text\nshort one\n{long}\n")
    job = make_job(tmp_path, data, max_text_chars=100)
    assert ingest_file(store, job, data) == 2
    assert stored(store)["row-1"] == long
    [row] = store.problems(10)
    assert (row["action"], row["reason"], row["location"], row["item_id"]) == (
        "flagged",
        "long text",
        "line 3",
        "row-1",
    )
    assert "over data.max_text_chars = 100: it is stored whole, the LLM sees its first 100" in row["detail"]
    cut = truncate_text(long, 100)
    assert cut.endswith(TRUNCATION_MARK) and len(cut) <= 100 + len(TRUNCATION_MARK) and "wor [" not in cut
    prompt = annotation_messages("d", Verbalizer(CLASSES), [(long, 0)], long, max_text_chars=100)
    assert all(len(m["content"]) < 150 for m in prompt[1:])
    assert truncate_text("short one", 100) == "short one"  # unchanged: same prompt, same cached answer


def test_a_gold_label_outside_the_classes_is_flagged_and_dropped(tmp_path, store):
    data = tmp_path / "d.csv"
    data.write_text("text,gold\nfine,pos\ngreat,POS \nawful,negativ\n")
    job = make_job(tmp_path, data, gold_column="gold")
    assert ingest_file(store, job, data) == 3
    assert store.items_range(0, 3).golds == ["pos", "pos", None]  # matched case-insensitively; the typo is dropped
    [row] = store.problems(10)
    assert (row["action"], row["reason"], row["location"]) == ("flagged", "unknown gold label", "line 4")
    assert "gold label 'negativ' (field 'gold') is not one of ['pos', 'neg']" in row["detail"]
    assert store.gold_agreement(["pos", "neg"], "llm")[0] == 2


def test_no_gold_value_in_the_class_list_refuses_the_file_as_a_config_error(tmp_path, store):
    data = tmp_path / "d.csv"
    data.write_text("text,gold\nfine,1\nawful,0\n")
    job = make_job(tmp_path, data, gold_column="gold")
    with pytest.raises(
        DataError,
        match=r"none of the 2 values of column 'gold' \(data\.gold_column\) is a class "
        r"of task\.classes .*Fix: make task\.classes' names",
    ):
        ingest(job, store, Progress())
    assert store.count_items() == 0


# ---- the job file ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "section, value, field, problem",
    [
        ("data", {"path": "x.csv", "max_text_chars": "long"}, "data.max_text_chars", "expected int, got str"),
        ("data", {"path": ["a.csv", "b.csv"]}, "data.path", "expected str, got list"),
        ("data", {"path": "x.csv", "text_colum": "t"}, "data.text_colum", "unknown key"),
        ("data", {"path": "x.csv", "max_text_chars": 10}, "data.max_text_chars", "must be >= 50"),
        ("data", {"path": "x.csv", "id_column": "text"}, "data.id_column", "must differ from text_column"),
        ("data", "x.csv", "data", "expected a mapping, got str"),
        ("freeal", {"rounds": "3"}, "freeal.rounds", "expected int, got str '3'"),
        ("freeal", {"rounds": 2.5}, "freeal.rounds", "expected int, got float"),
        ("llm", {"logprobs": "yes"}, "llm.logprobs", "expected bool, got str"),
        ("task", {"description": "d", "classes": ["pos", "neg"]}, "task.classes", "expected a mapping, got list"),
        ("budget", {"max_cost": [1]}, "budget.max_cost", "expected float, got list"),
    ],
)
def test_wrong_types_in_the_job_file_name_the_field_and_the_fix(section, value, field, problem):
    raw = {"name": "t", "data": {"path": "x.csv"}, "task": {"description": "d", "classes": CLASSES}, section: value}
    with pytest.raises(ConfigError) as e:
        parse_job(raw, "job.yaml")
    assert e.value.field_path == field and problem in e.value.problem and e.value.fix
    assert str(e.value).startswith(f"job.yaml: field '{field}': ")


# ---- the other ways in: the inbox and POST /items -------------------------------------------------------------
def test_the_inbox_quarantines_bad_rows_and_refuses_a_file_without_the_text_column(tmp_path, store):
    job = make_job(tmp_path, tmp_path / "unused.csv", id_column="id")
    inbox = Inbox(tmp_path / "inbox", lambda p: ingest_data_file(store, job, p), settle_s=0.0)
    (inbox.root / "good.csv").write_text("id,text\na,fine\nb,,\nc,also fine\n")
    (inbox.root / "bad.csv").write_text("id,body\nx,y\n")
    inbox.scan()
    results = {r.name: r for r in inbox.scan()}
    assert results["good.csv"].status == "ingested" and results["good.csv"].added == 2
    assert results["bad.csv"].status == "failed"
    note = (inbox.failed / "bad.csv.error.txt").read_text()
    assert "no column 'text' (data.text_column)" in note and "Fix: set data.text_column" in note
    assert quarantined(store) == [("line 3", "unreadable row", "b,,")]
    assert store.problems(1)[0]["source"] == "good.csv"


def test_post_items_quarantines_the_bad_items_and_stores_the_good_ones(tmp_path, store):
    job = make_job(tmp_path, tmp_path / "unused.csv", max_text_chars=60)
    handlers = ApiHandlers(
        lambda items: add_api_items(store, job, items),
        lambda: job_status(store, job),
        lambda since, limit: {},
        lambda rows, source: quarantine_rows(store, rows, source),
    )
    with ApiServer(handlers) as server:
        client = ServiceClient(server.url)
        assert client.add_items([{"id": "k", "text": "kept"}])["added"] == 1
        answer = client.add_items(
            [
                {"id": "1", "text": "good"},
                {"id": "2", "text": "   "},
                {"text": 5},
                {"id": "k", "text": "changed"},
                {"id": "3", "text": "x " * 40, "gold": "meh"},
            ]
        )
    assert (answer["received"], answer["added"], answer["quarantined"], answer["flagged"]) == (5, 2, 3, 2)
    reasons = sorted((p["location"], p["reason"]) for p in answer["problems"])
    assert reasons == [
        ("id '3'", "long text"),
        ("id '3'", "unknown gold label"),
        ("id 'k'", "id reused with another text"),
        ("items[1]", "invalid item"),
        ("items[2]", "invalid item"),
    ]
    assert set(stored(store)) == {"k", "1", "3"} and stored(store)["k"] == "kept"
    rows = {r["location"]: r for r in store.problems(10, "quarantined")}
    assert rows["items[1]"]["raw"] == '{"id": "2", "text": "   "}' and rows["items[1]"]["source"] == "POST /items"
    assert "items[2].text: missing or empty" in rows["items[2]"]["detail"]


def test_post_items_may_mix_items_with_and_without_ids(tmp_path, store):
    """An API item's id is optional (its text's hash names it); only a blank id is refused."""
    job = make_job(tmp_path, tmp_path / "unused.csv")
    answer = add_api_items(
        store,
        job,
        [
            {"text": "no id here"},
            {"id": "a", "text": "with an id"},
            {"text": "no id here"},
            {"id": "", "text": "blank id"},
        ],
    )
    assert (answer["added"], answer["duplicates"], answer["quarantined"]) == (2, 1, 1)
    assert [p["reason"] for p in answer["problems"]] == ["empty id"]
    assert "a" in stored(store) and any(i.startswith("h-") for i in stored(store))


def test_ingest_through_a_running_service_records_the_files_bad_rows_under_its_name(tmp_path, store):
    from freeal_stream.cli import _send_to_service

    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "text": "one"}\nbroken {\n{"id": "k", "text": "changed"}\n')
    job = make_job(tmp_path, data, id_column="id")
    store.add_items(["k"], ["kept"], [None], [None], [content_hash("kept")])
    handlers = ApiHandlers(
        lambda items: add_api_items(store, job, items),
        lambda: {},
        lambda since, limit: {},
        lambda rows, source: quarantine_rows(store, rows, source),
    )
    with ApiServer(handlers) as server:
        [batch] = read_data_batches(job, data)
        added, more = _send_to_service(ServiceClient(server.url), batch, "d.jsonl", chunk=1)
    assert (added, more) == (1, 1) and stored(store) == {"k": "kept", "a": "one"}
    rows = {(r["source"], r["location"], r["reason"]) for r in store.problems(10)}
    assert rows == {("d.jsonl", "line 2", "broken JSON line"), ("POST /items", "id 'k'", "id reused with another text")}
    assert [r["raw"] for r in store.problems(10) if r["source"] == "d.jsonl"] == ["broken {"]


# ---- the command line -------------------------------------------------------------------------------------------
def test_ingest_status_and_quarantine_commands_report_the_bad_rows(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_bytes(b'id,text\na,fine\nb,\nc,\xff\nd,"open\ne,ok\n')
    job_path = tmp_path / "job.yaml"
    make_job(tmp_path, data, id_column="id")
    assert main(["ingest", str(job_path), str(data)]) == 0
    out = capsys.readouterr().out
    assert "d.csv: 2 new items of 2; 3 quarantined (empty text 1, not UTF-8 1, unreadable row 1)" in out
    assert main(["status", str(job_path)]) == 0
    assert (
        "bad input: 3 quarantined (empty text 1, not UTF-8 1, unreadable row 1) — list them" in capsys.readouterr().out
    )
    assert main(["status", str(job_path), "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["quarantine"]
    assert q["quarantined"] == 3 and [r["location"] for r in q["rows"]] == ["line 3", "line 4", "line 5"]
    assert main(["quarantine", str(job_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["reason"], r["raw"]) for r in rows] == [
        ("empty text", "b,"),
        ("not UTF-8", "c,\\xff"),
        ("unreadable row", 'd,"open'),
    ]
    assert main(["quarantine", str(job_path)]) == 0
    assert "d.csv line 5: quarantined, unreadable row: line 5: a quote opened" in capsys.readouterr().out


def test_batches_are_stored_in_file_order_while_the_next_is_read(tmp_path):
    import threading

    from freeal_stream.intake import written
    from freeal_stream.sources import Batch

    next_read = threading.Event()
    log: list[str] = []

    def batches():
        for k in range(3):
            log.append(f"read {k}")
            if k:
                next_read.set()
            yield Batch([str(k)], [], [], [], [])

    def write(batch):
        overlapped = batch.ids[0] == "2" or next_read.wait(10)  # the next batch is read while this one is written
        next_read.clear()
        log.append(f"wrote {batch.ids[0]}")
        return overlapped

    out = [(b.ids[0], ok) for b, ok in written(batches(), write)]
    assert out == [("0", True), ("1", True), ("2", True)]
    assert [e for e in log if e.startswith("wrote")] == ["wrote 0", "wrote 1", "wrote 2"]
