"""Human review on a real store: which rows are picked, the files review tools read and write, human labels as
the first layer of the label of record, idempotent import with bad rows quarantined, the accuracy check."""

from __future__ import annotations

import csv
import json

import duckdb
import numpy as np
import pytest

from freeal_stream.records import Annotation
from freeal_stream.review import (
    ReviewFileError,
    import_review,
    pick_for_review,
    read_review_file,
    review_check,
    wilson,
    write_queue,
)
from freeal_stream.store import Store

CLASSES = ["billing", "technical", "shipping"]


def filled_store(tmp_path, n=30):
    """n items: the LLM labelled the first two thirds (class k % 2, i.e. never 'shipping'), the SLM scored all
    of them with rising confidence; items 0, 3 and 6 are disputed (in the SLM's noisy split)."""
    s = Store(tmp_path / "s.duckdb")
    ids = [f"i{k}" for k in range(n)]
    s.add_items(ids, [f"text {k}" for k in range(n)], [None] * n, [None] * n, [f"h{k}" for k in range(n)])
    labelled = range(2 * n // 3)
    s.add_annotations(1, [Annotation(ids[k], f"q{k}", k % 2, 0.5 + k / (2 * n), ()) for k in labelled])
    probs = np.full((n, 3), 0.0)
    for k in range(n):
        c = 2 if k >= 2 * n // 3 and k % 5 == 0 else k % 2  # a few SLM-only 'shipping' labels: the rare class
        probs[k, c] = 0.4 + 0.5 * k / n
        probs[k, (c + 1) % 3] = 1 - probs[k, c]
    clean = np.array([k in labelled and k not in (0, 3, 6) for k in range(n)])
    losses = np.where([k in labelled for k in range(n)], 0.1, np.nan)
    s.add_scores(1, np.arange(n), probs, losses, clean)
    return s


def test_picks_random_then_disputed_rare_and_least_confident_and_never_a_reviewed_row(tmp_path):
    s = filled_store(tmp_path)
    rows = pick_for_review(s, 10, "llm", 3, random_share=0.2, seed=1).rows
    why = [r.reason for r in rows]
    assert len(rows) == 10 and len({r.item_id for r in rows}) == 10
    assert why.count("random") == 2
    disputed = [r for r in rows if r.reason == "disputed"]
    assert {r.item_id for r in disputed} <= {"i0", "i3", "i6"} and all(r.disputed for r in disputed)
    assert {r.item_id for r in rows} >= {"i0", "i3", "i6"}  # all three disputed rows are in (drawn or picked)
    rare = [r for r in rows if r.reason == "rare class"]
    assert rare and all(r.label == 2 for r in rare)  # 'shipping' has 2 of 30 labels
    rest = [r for r in rows if r.reason == "least confident"]
    assert [r.confidence for r in rest] == sorted(r.confidence for r in rest)
    assert pick_for_review(s, 10, "llm", 3, random_share=0.2, seed=1).rows == rows  # same state, same queue
    # a reviewed row is never offered again
    s.queue_for_review(rows)
    s.add_human_labels("f", [_h(rows[0].item_id, 2)], "llm")
    assert rows[0].item_id not in {r.item_id for r in pick_for_review(s, 30, "llm", 3).rows}
    s.close()


def test_the_random_sample_is_a_prefix_of_one_order_so_hard_rows_reviewed_for_another_reason_stay_in_it(tmp_path):
    s = filled_store(tmp_path)
    order = [i for i, _ in s.random_sample_ids("llm", 30, "0")]  # the seeded order over all 30 labelled rows
    first = pick_for_review(s, 2, "llm", 3, random_share=1.0)
    assert [r.item_id for r in first.rows] == order[:2] and first.joined_random == []
    # review order[2] for another reason (as if it was disputed), and the first two as the random draw
    s.queue_for_review(first.rows)
    s.add_human_labels("a.csv", [_h(order[0], 0), _h(order[1], 0), _h(order[2], 0)], "llm")
    assert {a["reason"] for a in s.review_agreement()} == {"random", "not queued"}
    second = pick_for_review(s, 2, "llm", 3, random_share=1.0)
    assert second.joined_random == [order[2]]  # not skipped: it joins the sample, not asked again
    assert second.rows[0].item_id == order[3] and len(second.rows) == 2
    assert second.rows[1].reason == "least confident"  # the review budget left goes to the other reasons
    s.queue_for_review(second.rows, second.joined_random)
    assert {a["reason"]: a["reviewed"] for a in s.review_agreement()} == {"random": 3}
    s.close()


def _h(item_id, label):
    from freeal_stream.records import HumanLabel

    return HumanLabel(item_id, label, "ann")


def test_human_labels_win_in_every_output_and_import_is_idempotent(tmp_path):
    s = filled_store(tmp_path)
    rows = pick_for_review(s, 6, "slm", 3, random_share=0.5).rows
    s.queue_for_review(rows)
    before = {r[1]: r for r in s.labels_rows("slm")}
    first = s.add_human_labels("a.csv", [_h(rows[0].item_id, 2), _h(rows[1].item_id, rows[1].label)], "slm")
    assert first == {"new": 2, "changed": 0, "unchanged": 0}
    assert s.add_human_labels("a.csv", [_h(rows[0].item_id, 2), _h(rows[1].item_id, rows[1].label)], "slm") == {
        "new": 0,
        "changed": 0,
        "unchanged": 2,
    }
    for rule in ("llm", "slm", "auto"):
        after = {r[1]: r for r in s.labels_rows(rule)}
        assert after[rows[0].item_id][4:7] == (2, "human", 1.0) and after[rows[0].item_id][10] == 1.0
        assert after[rows[0].item_id][7:10] == before[rows[0].item_id][7:10]  # the models' own labels stay
    assert s.label_counts("slm")[0]["human"] == 2
    changed = {i for i, r in {r[1]: r for r in s.labels_rows("slm")}.items() if r[4] != before[i][4]}
    assert changed == ({rows[0].item_id} if rows[0].label != 2 else set())  # rows[1] was confirmed, not changed
    s.export(str(tmp_path / "out.csv"), "CSV", CLASSES, "slm")
    with open(tmp_path / "out.csv", encoding="utf-8") as f:
        exported = {r["id"]: r for r in csv.DictReader(f)}
    assert exported[rows[0].item_id]["label"] == "shipping" and exported[rows[0].item_id]["source"] == "human"
    # the check compares with the label the reviewer was shown
    agreement = {a["reason"]: a for a in s.review_agreement()}
    assert sum(a["reviewed"] for a in agreement.values()) == 2
    assert sum(a["agreed"] for a in agreement.values()) == (rows[0].label == 2) + 1
    # a later review of the same row changes it (latest wins)
    assert s.add_human_labels("b.csv", [_h(rows[0].item_id, 0)], "slm")["changed"] == 1
    s.close()


def test_an_old_state_file_gets_the_review_tables_on_open(tmp_path):
    s = Store(tmp_path / "s.duckdb")
    s.close()
    con = duckdb.connect(str(tmp_path / "s.duckdb"))
    con.execute("DROP TABLE human_labels")
    con.execute("DROP TABLE review_queue")
    con.close()
    s = Store(tmp_path / "s.duckdb")
    Store.close(s)
    s = Store(tmp_path / "s.duckdb")  # and opening it again is harmless
    assert s.review_agreement() == [] and s.human_label_positions()[0].size == 0
    s.close()


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_label_studio_argilla_and_csv_exports(tmp_path):
    known = lambda ids: {"a", "b", "c", "d"}
    ls_full = [
        {
            "id": 1,
            "data": {"text": "x", "item_id": "a"},
            "annotations": [
                {
                    "result": [
                        {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["Billing"]}}
                    ],
                    "was_cancelled": False,
                    "completed_by": 7,
                }
            ],
        },
        {
            "id": 2,
            "data": {"text": "y", "item_id": "b"},
            "annotations": [
                {
                    "result": [{"from_name": "label", "type": "choices", "value": {"choices": ["shipping"]}}],
                    "was_cancelled": True,
                }
            ],
            "predictions": [],
        },  # cancelled: not reviewed
        {
            "id": 3,
            "data": {"text": "z", "item_id": "c"},
            "annotations": [
                {"result": [{"from_name": "label", "type": "choices", "value": {"choices": ["billing"]}}]},
                {"result": [{"from_name": "label", "type": "choices", "value": {"choices": ["technical"]}}]},
            ],
        },
        {
            "id": 4,
            "data": {"text": "w", "item_id": "zz"},
            "annotations": [{"result": [{"from_name": "label", "type": "choices", "value": {"choices": ["billing"]}}]}],
        },
    ]
    got = read_review_file(_write(tmp_path / "ls.json", json.dumps(ls_full)), CLASSES, known)
    assert [(h.item_id, h.label, h.reviewer) for h in got.labels] == [("a", 0, "7")]
    assert got.not_reviewed == 1
    assert [(p.reason, p.location) for p in got.problems] == [
        ("reviewers disagree", "task[2]"),
        ("review of an unknown item", "task[3]"),
    ]
    ls_min = [
        {"id": 1, "text": "x", "item_id": "a", "label": "technical"},
        {"id": 2, "text": "y", "item_id": "b", "label": {"choices": ["shipping"]}},
        {"id": 3, "text": "z", "item_id": "c"},
        {"id": 4, "item_id": "d", "label": "refund"},
    ]
    got = read_review_file(_write(tmp_path / "min.json", json.dumps(ls_min)), CLASSES, known)
    assert [(h.item_id, h.label) for h in got.labels] == [("a", 1), ("b", 2)] and got.not_reviewed == 1
    assert got.problems[0].reason == "review label not a class" and "'refund'" in got.problems[0].detail
    argilla_nested = [
        {
            "id": "a",
            "fields": {"text": "x"},
            "suggestions": {"label": {"value": "billing", "score": 0.6}},
            "responses": {"label": [{"value": "shipping", "user_id": "u1", "status": "submitted"}]},
        },
        {"id": "b", "fields": {"text": "y"}, "responses": {"label": [{"value": "billing", "status": "draft"}]}},
        {"id": "c", "fields": {"text": "z"}, "responses": {}},
    ]
    got = read_review_file(_write(tmp_path / "arg.json", json.dumps(argilla_nested)), CLASSES, known)
    assert [(h.item_id, h.label, h.reviewer) for h in got.labels] == [("a", 2, "u1")] and got.not_reviewed == 2
    argilla_flat = [
        {
            "id": "a",
            "text": "x",
            "label.responses": ["technical"],
            "label.responses.users": ["u"],
            "label.responses.status": ["submitted"],
            "label.suggestion": "billing",
        }
    ]
    got = read_review_file(_write(tmp_path / "flat.json", json.dumps(argilla_flat)), CLASSES, known)
    assert [(h.item_id, h.label) for h in got.labels] == [("a", 1)]
    ls_csv = "text,item_id,id,label,annotator\nx,a,1,billing,7\ny,b,2,,\n"
    got = read_review_file(_write(tmp_path / "ls.csv", ls_csv), CLASSES, known)
    assert [(h.item_id, h.label) for h in got.labels] == [("a", 0)] and got.not_reviewed == 1
    with pytest.raises(ReviewFileError, match="needs the columns 'item_id' and 'label'"):
        read_review_file(_write(tmp_path / "bad.csv", "id,text\n1,x\n"), CLASSES, known)
    with pytest.raises(ReviewFileError, match="not a JSON file"):
        read_review_file(_write(tmp_path / "bad.json", "{nope"), CLASSES, known)
    with pytest.raises(ReviewFileError, match="not found"):
        read_review_file(tmp_path / "missing.json", CLASSES, known)


def test_written_queues_read_back_as_not_reviewed_until_someone_labels(tmp_path):
    s = filled_store(tmp_path)
    rows = pick_for_review(s, 5, "llm", 3).rows
    for fmt, name in (("csv", "q.csv"), ("labelstudio", "q.json"), ("argilla", "q.argilla.json")):
        files = write_queue(rows, tmp_path / name, fmt, CLASSES)
        got = read_review_file(files[0], CLASSES, s.known_ids)
        assert got.labels == [] and got.problems == [] and got.not_reviewed == 5, fmt
    assert (tmp_path / "q.labelstudio.xml").read_text().count("<Choice ") == 3
    tasks = json.loads((tmp_path / "q.json").read_text())
    assert tasks[0]["data"]["item_id"] == rows[0].item_id
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == [CLASSES[rows[0].label]]
    # fill in two labels of the CSV: import stores exactly those, quarantines a bad one, and a rerun adds nothing
    with open(tmp_path / "q.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    table[0]["label"], table[1]["label"], table[2]["label"] = "shipping", "Technical ", "nonsense"
    with open(tmp_path / "q.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    first = import_review(s, tmp_path / "q.csv", CLASSES, "llm")
    assert (first.new, first.not_reviewed, first.quarantined) == (2, 2, 1)
    again = import_review(s, tmp_path / "q.csv", CLASSES, "llm")
    assert (again.new, again.changed, again.unchanged, again.quarantined) == (0, 0, 2, 1)
    assert s.problem_counts() == [{"action": "quarantined", "reason": "review label not a class", "count": 1}]
    assert s.problems(5)[0]["source"] == "review q.csv" and s.problems(5)[0]["location"] == "line 4"
    s.close()


def test_the_check_on_random_rows_has_a_wilson_interval():
    lo, hi = wilson(45, 50)
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)
    check = review_check(
        [{"reason": "random", "reviewed": 50, "agreed": 45}, {"reason": "disputed", "reviewed": 30, "agreed": 12}]
    )
    assert check["reviewed"] == 80 and check["agreed"] == 57
    lo, hi = check["random"]["interval_95"]
    assert check["random"]["accuracy"] == 0.9 and lo < 0.9 < hi
    assert review_check([]) is None
